"""``gie-edit`` with two images and conversations, ``gie-ask`` / ``gie-edit --answer`` (issue 17),
as a user runs them on the tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from gie_core.cli.ask import main as ask_main
from gie_core.cli.edit import main
from gie_core.engine.conversation import Conversation
from gie_core.engine.pipeline import EditPipeline

COMMON = ["--steps", "2", "--size", "64x48", "--dtype", "fp32", "--device", "cpu", "--quiet"]
INSTRUCTION = "put the hat from the second image on the dog"


def write_image(path, width, height, seed):
    rng = np.random.RandomState(seed)
    Image.fromarray((rng.rand(height, width, 3) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("in")
    return write_image(d / "dog.png", 90, 60, 1), write_image(d / "hat.png", 48, 48, 2), write_image(d / "x.png", 40, 40, 3)


@pytest.fixture(scope="module")
def weights(gie_dir, kontext_dir):
    return ["--model", str(gie_dir), "--kontext", str(kontext_dir)]


def test_two_image_edit_from_the_cli_equals_the_library(tmp_path, photos, weights, gie_dir, kontext_dir):
    out = tmp_path / "out.png"
    assert main([str(photos[0]), str(photos[1]), INSTRUCTION, "-o", str(out), *weights, *COMMON]) == 0
    pipe = EditPipeline.from_paths(gie_dir=gie_dir, kontext_dir=kontext_dir, dtype="fp32", device="cpu")
    with Image.open(photos[0]) as a, Image.open(photos[1]) as b:
        lib = pipe.edit(a.convert("RGB"), INSTRUCTION, image2=b.convert("RGB"), steps=2, size=(64, 48))
    with Image.open(out) as got:
        assert np.array_equal(np.asarray(got), np.asarray(lib.images[0]))


def test_three_images_are_refused_naming_the_limit(tmp_path, photos, weights, capsys):
    out = tmp_path / "out.png"
    assert main([*map(str, photos), INSTRUCTION, "-o", str(out), *weights, *COMMON]) == 2
    assert "at most 2 (Image 1 and an optional Image 2)" in capsys.readouterr().err
    assert not out.exists()


def test_conversation_turns_and_answers_append_to_the_file(tmp_path, photos, weights, capsys):
    chat = tmp_path / "chat.json"
    assert main([str(photos[0]), str(photos[1]), INSTRUCTION, "-o", str(tmp_path / "1.png"),
                 "--conversation", str(chat), *weights, *COMMON]) == 0
    assert [t.role for t in Conversation.load(chat).turns] == ["user", "assistant"]
    assert main(["now make it night", "-o", str(tmp_path / "2.png"), "--conversation", str(chat), *weights, *COMMON]) == 0
    conv = Conversation.load(chat)
    assert len(conv) == 4 and len(conv.images()) == 4
    with Image.open(tmp_path / "2.png") as im:
        assert np.array_equal(np.asarray(im), np.asarray(conv.images()[-1]))  # the written edit is the reply
    capsys.readouterr()
    assert ask_main(["what colour is the hat?", "--conversation", str(chat), "--model", weights[1],
                     "--dtype", "fp32", "--device", "cpu", "--max-new-tokens", "4"]) == 0
    answer = capsys.readouterr().out.strip()
    conv = Conversation.load(chat)
    assert len(conv) == 6 and conv.turns[-1].text == answer and conv.turns[-2].text == "what colour is the hat?"


def test_answer_prints_text_and_writes_no_image(tmp_path, photos, weights, capsys):
    assert main(["--answer", str(photos[0]), "what does the sign say?", "--model", weights[1], "--dtype", "fp32",
                 "--device", "cpu", "--max-new-tokens", "4"]) == 0
    first = capsys.readouterr().out
    assert ask_main([str(photos[0]), "what does the sign say?", "--model", weights[1], "--dtype", "fp32",
                     "--device", "cpu", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == first and first.strip() != ""
    assert list(tmp_path.iterdir()) == []
    assert main(["--answer", str(photos[0]), "q?", "-o", str(tmp_path / "a.png"), "--model", weights[1]]) == 2
    assert "--answer prints the answer" in capsys.readouterr().err


def test_route_auto_without_a_task_head_edits_and_says_why(tmp_path, photos, weights, capsys):
    out = tmp_path / "out.png"
    assert main([str(photos[0]), "what is this?", "-o", str(out), "--route", "auto", *weights, *COMMON]) == 0
    assert out.is_file() and "no task head" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("{broken", "is not valid JSON"),
    (json.dumps({"format": "gpt-image-edit-conversation", "version": 1, "model": "llava", "turns": []}),
     "was written for model 'llava'"),
])
def test_corrupt_or_foreign_conversation_is_refused_before_loading_and_kept(tmp_path, photos, weights, capsys,
                                                                           content, message):
    chat = tmp_path / "chat.json"
    chat.write_text(content)
    assert main([str(photos[0]), INSTRUCTION, "-o", str(tmp_path / "o.png"), "--conversation", str(chat),
                 *weights, *COMMON]) == 2
    assert message in capsys.readouterr().err
    assert chat.read_text() == content and not (tmp_path / "o.png").exists()


def test_a_turn_killed_midway_leaves_the_old_conversation_file_intact(tmp_path, photos, weights):
    """gie-edit --conversation in a subprocess SIGKILLed while it samples (after loading the file,
    before writing it): the file keeps its old bytes, whole."""
    chat = tmp_path / "chat.json"
    Conversation().add_user("first", [Image.open(photos[0]).convert("RGB")]).add_assistant_text("ok").save(chat)
    before = chat.read_bytes()
    script = textwrap.dedent(f"""
        import os, signal, sys
        from gie_core.engine import pipeline
        from gie_core.cli.edit import main

        def killed(self, *a, **k):
            os.kill(os.getpid(), signal.SIGKILL)  # a kill mid-turn: no cleanup, no exception handlers

        pipeline.EditPipeline.render = killed
        sys.exit(main({[str(photos[0]), "make it red", "-o", str(tmp_path / "o.png"), "--conversation", str(chat),
                        *weights, *COMMON]!r}))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), *sys.path]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert chat.read_bytes() == before and len(Conversation.load(chat)) == 2
    assert not (tmp_path / "o.png").exists()


def test_a_failed_write_leaves_the_old_conversation_file_intact(tmp_path, photos, monkeypatch):
    """A failure while the new conversation file is written (here: the disk refuses the rename)
    leaves the old file as it was and no temporary beside it."""
    from gie_core import files

    chat = tmp_path / "chat.json"
    conv = Conversation().add_user("first", [Image.open(photos[0]).convert("RGB")]).add_assistant_text("ok")
    conv.save(chat)
    before = chat.read_bytes()

    def refuse(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", refuse)
    with pytest.raises(OSError):
        conv.add_user("second").add_assistant_text("fine").save(chat)
    assert chat.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["chat.json"]


def test_jobs_take_a_second_image(tmp_path, photos, weights, gie_dir, kontext_dir):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"image": str(photos[0]), "image2": str(photos[1]), "instruction": INSTRUCTION,
                                "seed": 3, "name": "two"}) + "\n")
    out = tmp_path / "out"
    assert main(["--jobs", str(jobs), "-o", str(out), *weights, *COMMON]) == 0
    pipe = EditPipeline.from_paths(gie_dir=gie_dir, kontext_dir=kontext_dir, dtype="fp32", device="cpu")
    with Image.open(photos[0]) as a, Image.open(photos[1]) as b:
        lib = pipe.edit(a.convert("RGB"), INSTRUCTION, image2=b.convert("RGB"), steps=2, size=(64, 48), seed=3)
    with Image.open(out / "two_s3.png") as got:
        assert np.array_equal(np.asarray(got), np.asarray(lib.images[0]))
    assert torch.is_tensor(lib.tensor)


def test_a_new_conversation_without_an_image_is_text_to_image(tmp_path, weights):
    chat, out = tmp_path / "chat.json", tmp_path / "t2i.png"
    assert main(["a puppy playing in a sunny park", "-o", str(out), "--conversation", str(chat), *weights, *COMMON]) == 0
    conv = Conversation.load(chat)
    assert [t.role for t in conv.turns] == ["user", "assistant"] and conv.turns[0].images == ()
    with Image.open(out) as im:
        assert im.size == (64, 48) and np.array_equal(np.asarray(im), np.asarray(conv.images()[0]))
