"""gie-eval on ImgEdit's Multi-Turn suite and OmniContext's two-image tasks (issue 17): the turns
run as one conversation, each turn's image where a reader finds it, equal to the library's."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from gie_core.cli.eval import main
from gie_core.engine.conversation import Conversation
from gie_core.engine.pipeline import EditPipeline
from gie_core.eval.benchmarks import InstructionSetError, SelectOptions, load_samples
from gie_core.eval.runs import sample_seed

FAST = ["--steps", "1", "--size", "32x32", "--reference-size", "keep", "--dtype", "fp32", "--device", "cpu", "--quiet"]


def write_multiturn(root):
    """Two category files in the published form (Benchmark/Multiturn/Multiturn_readme.md)."""
    (root / "images").mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name in ("000066341.jpg", "000012345.jpg"):
        Image.fromarray((rng.rand(40, 48, 3) * 255).astype(np.uint8)).save(root / "images" / name)
    (root / "content_memory.json").write_text(json.dumps({"1": {
        "id": "images/000066341.jpg", "turn1": "Ensure all subsequent edits are green, add some embellishments",
        "turn2": "Replace the tomato with some fruit", "turn3": "Change the plate's color"}}))
    (root / "version_backtracking.json").write_text(json.dumps({"1": {
        "id": "images/000012345.jpg", "turn1": "add a green vest", "turn2": "withdraw the previous round"}}))
    return root


def test_multiturn_set_reads_every_category_and_its_turns(tmp_path):
    samples = load_samples("imgedit-multiturn", write_multiturn(tmp_path / "mt"))
    assert [(s.key, s.category, len(s.extra["turns"])) for s in samples] == [
        ("content_memory_1", "content_memory", 3), ("version_backtracking_1", "version_backtracking", 2)]
    assert samples[0].instruction == "Change the plate's color"
    assert len(load_samples("imgedit-multiturn", tmp_path / "mt" / "content_memory.json", SelectOptions())) == 1
    (tmp_path / "bad.json").write_text(json.dumps({"1": {"id": "x.jpg", "turn1": "a", "turn3": "c"}}))
    with pytest.raises(InstructionSetError, match="turn1, turn2, ... in sequence"):
        load_samples("imgedit-multiturn", tmp_path / "bad.json")


def test_multiturn_generate_runs_each_sample_as_one_conversation(tmp_path, gie_dir, kontext_dir):
    data = write_multiturn(tmp_path / "mt")
    out = tmp_path / "run"
    assert main(["generate", "imgedit-multiturn", str(data), "-o", str(out), "--model", str(gie_dir),
                 "--kontext", str(kontext_dir), *FAST]) == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.png")) == [
        "content_memory/1_turn1.png", "content_memory/1_turn2.png", "content_memory/1_turn3.png",
        "version_backtracking/1_turn1.png", "version_backtracking/1_turn2.png"]
    pipe = EditPipeline.from_paths(gie_dir=gie_dir, kontext_dir=kontext_dir, dtype="fp32", device="cpu")
    seed = sample_seed(42, "version_backtracking_1")
    with Image.open(data / "images" / "000012345.jpg") as im:
        first = pipe.edit(im.convert("RGB"), "add a green vest", conversation=Conversation(), steps=1, size=(32, 32),
                          seed=seed, reference_resize="keep")
    second = pipe.edit(None, "withdraw the previous round", conversation=first.conversation, steps=1, size=(32, 32),
                       seed=seed, reference_resize="keep")
    for n, expected in ((1, first), (2, second)):
        with Image.open(out / "version_backtracking" / f"1_turn{n}.png") as got:
            assert np.array_equal(np.asarray(got), np.asarray(expected.images[0])), n
    assert main(["generate", "imgedit-multiturn", str(data), "-o", str(out), "--model", str(gie_dir),
                 "--kontext", str(kontext_dir), *FAST]) == 0  # resumed: nothing left to make


def test_omnicontext_two_image_sample_equals_the_library(tmp_path, gie_dir, kontext_dir):
    (tmp_path / "images").mkdir()
    rng = np.random.RandomState(1)
    for i, size in enumerate(((48, 40), (32, 32))):
        Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype(np.uint8)).save(tmp_path / "images" / f"{i}.png")
    data = tmp_path / "omni.jsonl"
    data.write_text(json.dumps({"key": "m0", "task_type": "multiple_object", "instruction": "Put both on a table.",
                                "instruction_language": "en", "input_images": ["images/0.png", "images/1.png"]}) + "\n")
    out = tmp_path / "run"
    assert main(["generate", "omnicontext", str(data), "--task-types", "all", "-o", str(out), "--model", str(gie_dir),
                 "--kontext", str(kontext_dir), *FAST]) == 0
    pipe = EditPipeline.from_paths(gie_dir=gie_dir, kontext_dir=kontext_dir, dtype="fp32", device="cpu")
    with Image.open(tmp_path / "images" / "0.png") as a, Image.open(tmp_path / "images" / "1.png") as b:
        lib = pipe.edit(a.convert("RGB"), "Put both on a table.", image2=b.convert("RGB"), steps=1, size=(32, 32),
                        seed=sample_seed(42, "m0"), reference_resize="keep")
    with Image.open(out / "fullset" / "multiple_object" / "m0.png") as got:
        assert np.array_equal(np.asarray(got), np.asarray(lib.images[0]))
