"""Edits with two images, conversation turns, answers and the task head through the pipeline
(issue 17), on tiny models loaded through the real code."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from gie_core.engine.conversation import Conversation
from gie_core.engine.pipeline import EditPipeline, plan_paths
from gie_core.engine.request import resolve_edit
from gie_core.engine.taskhead import TaskHead, route
from gie_core.imaging.images import reference_size
from gie_core.imaging.ratio import multi_image_output_size
from gie_core.weights.parts import load_part
from gie_core.weights.reader import CheckpointError

INSTRUCTION = "put the hat from image 2 on the dog in image 1"


def noise_image(width, height, seed=0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def pipe(gie_dir, kontext_dir):
    return EditPipeline.from_paths(gie_dir=gie_dir, kontext_dir=kontext_dir, mode="vlm+t5", dtype="fp32",
                                   device="cpu", lm_head=True)


def tiny_head(hidden_size: int, decide: str) -> TaskHead:
    """A tiny head whose last bias makes it say ``decide`` whatever it reads."""
    head = TaskHead(hidden_size, 16)
    torch.manual_seed(0)
    with torch.no_grad():
        head[3].weight.mul_(0.001)
        head[3].bias.copy_(torch.tensor([50.0, -50.0] if decide == "answer" else [-50.0, 50.0]))
    return head


def head_folder(gie_dir, tmp_path, decide: str, fmt: str):
    """A copy of the tiny checkpoint with a task head beside it, as the release ships it (.pt) or
    as gie-convert writes it (.safetensors)."""
    d = tmp_path / f"gie-{decide}-{fmt}"
    shutil.copytree(gie_dir, d)
    state = tiny_head(32, decide).state_dict()
    if fmt == "pt":
        torch.save(state, d / "task_head_final.pt")
    else:
        save_file(state, d / "task_head.safetensors")
    return d


# --------------------------------------------------------------------------------------------
# Output size and references of several images
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes, expected", [
    ([(1024, 768), (800, 600)], (1152, 864)),  # mean 912x684 -> 4:3 -> 9 x (128x96)
    ([(1024, 1024), (512, 512)], (1024, 1024)),
    ([(1920, 1080), (1280, 720)], (1536, 864)),  # 16:9 -> 3 x (512x288)
    ([(600, 800), (700, 1000)], (800, 1120)),  # mean 650x900: 5:7 is nearer than 3:4 -> 5 x (160x224)
])
def test_multi_image_output_size_is_the_apps_dynamic_resize(sizes, expected):
    assert multi_image_output_size(sizes) == expected == _app_dynamic_resize(sizes)


def _app_dynamic_resize(sizes):
    """univa/utils/anyres_util.py's update_size + dynamic_resize, written out independently."""
    import math

    ratios = [(16, 9), (9, 16), (7, 5), (5, 7), (5, 4), (4, 5), (4, 3), (3, 4), (3, 2), (2, 3), (1, 1)]
    w = sum(s[0] for s in sizes) / len(sizes)
    h = sum(s[1] for s in sizes) / len(sizes)
    h, w = int(h), int(w)
    rw, rh = min(ratios, key=lambda p: abs(p[0] / p[1] - w / h))
    bw, bh = rw * 32, rh * 32
    s = max(1, round(math.sqrt(1024 * 1024 / (bw * bh))))
    return (bw * s) // 32 * 32, (bh * s) // 32 * 32


def test_request_with_a_second_image():
    req = resolve_edit(image_width=1024, image_height=768, more_images=[(800, 600)])
    assert (req.width, req.height) == (1152, 864) and req.more_images == ((800, 600),)
    assert (resolve_edit(image_width=1024, image_height=768, more_images=[(800, 600)], width=512, height=512).width) == 512
    with pytest.raises(ValueError, match="at most 2 input images \\(Image 1 and an optional Image 2\\), got 3"):
        resolve_edit(image_width=64, image_height=64, more_images=[(64, 64), (64, 64)])
    with pytest.raises(ValueError, match="snap pads one input image"):
        resolve_edit(image_width=64, image_height=64, more_images=[(64, 64)], snap="default")
    with pytest.raises(ValueError, match="input image 2 is 8x64 but must be at least 16 px"):
        resolve_edit(image_width=64, image_height=64, more_images=[(8, 64)])


def test_two_images_of_different_sizes_are_each_a_reference_at_its_own_size(pipe):
    """Image 1 (landscape) and Image 2 (square): two references, each at its own preferred Kontext
    size, never stacked; the conditioning reads both through Qwen; the edit runs."""
    a, b = noise_image(128, 96, 1), noise_image(64, 64, 2)
    enc = pipe.encode(a, INSTRUCTION, image2=b, steps=2, size=(64, 48))
    lat = [tuple(x.shape[2:]) for x in enc.reference_latents]
    f = 8  # the tiny VAE's factor is FLUX's
    assert lat == [tuple(v // f for v in reversed(reference_size(*a.size))),
                   tuple(v // f for v in reversed(reference_size(*b.size)))]
    assert lat[0] != lat[1]
    n_vlm = pipe.qwen.conversation_inputs(enc.conversation)["input_ids"].shape[1]
    assert enc.positive.context.shape[1] == n_vlm + 256  # both images' Qwen tokens, then T5's 256
    out = pipe.render(enc)
    assert out.images[0].size == (64, 48)
    assert out.conversation.images()[:2] == enc.conversation.images()
    one = pipe.edit(a, INSTRUCTION, steps=2, size=(64, 48))
    assert not torch.equal(one.tensor, out.tensor)  # image 2 changes the edit


def test_one_image_one_turn_conditioning_is_bit_identical_to_todays(pipe):
    a = noise_image(128, 96, 1)
    today = pipe.conditioning(a, INSTRUCTION)
    conv = pipe.conversation_conditioning(Conversation(layout="edit").add_user(INSTRUCTION, [a]))
    assert torch.equal(today.context, conv.context) and torch.equal(today.pooled, conv.pooled)


def test_edit_continues_a_conversation(pipe):
    a, b = noise_image(128, 96, 1), noise_image(64, 64, 2)
    first = pipe.edit(a, INSTRUCTION, image2=b, steps=2, size=(64, 48))
    second = pipe.edit(None, "now make it night", conversation=first.conversation, steps=2, size=(64, 48))
    conv = second.conversation
    assert [t.role for t in conv.turns] == ["user", "assistant", "user", "assistant"]
    assert len(conv.images()) == 4 and conv.turns[2].images == ()
    auto = pipe.encode(None, "now make it night", conversation=first.conversation, steps=2)
    assert (auto.request.width, auto.request.height) == multi_image_output_size([a.size, b.size])  # the app keeps its size
    assert len(auto.reference_latents) == 3  # both inputs and the first edit condition the second
    with pytest.raises(ValueError, match="no input image"):
        pipe.edit(None, "draw a cat", steps=2)


def test_three_images_are_refused_before_any_work(pipe):
    ims = [noise_image(64, 64, i) for i in range(3)]
    with pytest.raises(ValueError, match="at most 2 images \\(Image 1 and an optional Image 2\\), got 3"):
        pipe.turn(None, INSTRUCTION, ims, steps=2)


# --------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------


def test_answers_are_text_and_join_the_conversation(pipe):
    a = noise_image(128, 96, 1)
    ans = pipe.ask(a, "what does the sign say?", max_new_tokens=6)
    assert isinstance(ans.text, str) and str(ans) == ans.text
    assert ans.text == pipe.ask(a, "what does the sign say?", max_new_tokens=6).text  # greedy
    assert ans.conversation.turns[-1].role == "assistant" and ans.conversation.turns[-1].text == ans.text
    follow = pipe.turn(ans.conversation, "make the sign red", route="edit", steps=2, size=(64, 48))
    assert follow.edit is not None and follow.answer is None and len(follow.conversation) == 4


def test_answers_need_the_qwen(kontext_dir):
    with pytest.raises(ValueError, match="answers need the Qwen2.5-VL, which fusion mode 't5' does not load"):
        plan_paths(kontext_dir=kontext_dir, mode="t5", lm_head=True)


# --------------------------------------------------------------------------------------------
# The task head
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("decide", ["answer", "edit"])
def test_task_head_routes_auto_from_either_format(gie_dir, kontext_dir, tmp_path, fmt, decide):
    d = head_folder(gie_dir, tmp_path, decide, fmt)
    pipe = EditPipeline.from_paths(gie_dir=d, kontext_dir=kontext_dir, dtype="fp32", device="cpu", lm_head=True)
    assert isinstance(pipe.task_head, TaskHead)
    conv = Conversation().add_user("what colour is the car?", [noise_image(64, 64)])
    r = pipe.route(conv, "auto")
    assert r.decision == decide and r.logits is not None and "task head says" in r.note
    assert pipe.route(conv, "edit").decision == "edit" and pipe.route(conv, "answer").decision == "answer"
    turn = pipe.turn(None, "what colour is the car?", [noise_image(64, 64)], max_new_tokens=3, steps=2, size=(32, 32))
    assert (turn.answer is not None) == (decide == "answer") and (turn.edit is not None) == (decide == "edit")


def test_task_head_reads_the_generation_prompts_assistant_token(pipe):
    """The head reads the hidden state at the end of the last "<|im_start|>assistant" (the app's
    id 77091 in Qwen2.5's vocabulary; the tiny tokenizer splits the word, so its last piece)."""
    from gie_core.engine.taskhead import assistant_hidden

    tok = pipe.qwen.tokenizer
    conv = Conversation().add_user("a", [noise_image(64, 64)]).add_assistant_text("b").add_user("c")
    ids = pipe.qwen.conversation_inputs(conv)["input_ids"][0]
    pos = pipe.qwen.role_token_position(ids)
    assert pos == len(ids) - 2  # "...<|im_start|>assistant" then "\n"
    word = tok.encode("assistant", add_special_tokens=False)
    assert ids[pos - len(word):pos + 1].tolist() == [tok.convert_tokens_to_ids("<|im_start|>"), *word]
    feats = pipe.qwen.encode_conversation(conv)
    assert torch.equal(assistant_hidden(feats, pos), feats.hidden[0, pos])
    with pytest.raises(ValueError, match="no '<\\|im_start\\|>assistant'"):
        pipe.qwen.role_token_position(torch.tensor([1, 2, 3]))


def test_no_task_head_means_auto_edits_with_a_note(pipe):
    assert pipe.task_head is None
    r = pipe.route(Conversation().add_user("what is this?", [noise_image(64, 64)]), "auto")
    assert r.decision == "edit" and "no task head" in r.note and r.logits is None
    with pytest.raises(ValueError, match="route is 'maybe'.*auto, edit, answer"):
        route("maybe")


def test_task_head_pickles_are_never_run(tmp_path):
    """The shipped .pt is read with torch.load(weights_only=True): a pickle that would run code is refused."""
    class Evil:
        def __reduce__(self):
            return (shutil.rmtree, (str(tmp_path / "victim"),))

    (tmp_path / "victim").mkdir()
    bad = tmp_path / "task_head_final.pt"
    with open(bad, "wb") as f:
        pickle.dump({"0.weight": Evil()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="cannot be read with torch.load\\(weights_only=True\\)"):
        load_part("task_head", bad)
    assert (tmp_path / "victim").is_dir()
    wrong = tmp_path / "wrong.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(CheckpointError, match="must hold exactly 0.weight, 0.bias, 3.weight, 3.bias"):
        load_part("task_head", wrong)


def test_gie_convert_writes_the_task_head_as_safetensors(gie_dir, tmp_path):
    from gie_core.cli.convert import main

    d = head_folder(gie_dir, tmp_path, "answer", "pt")
    assert main([str(d), "--out", str(tmp_path / "models"), "--parts", "task_head"]) == 0
    out = tmp_path / "models" / "gie_connectors" / "gpt-image-edit-task-head.safetensors"
    converted = load_part("task_head", out).module
    shipped = load_part("task_head", d / "task_head_final.pt").module
    for k, v in shipped.state_dict().items():
        assert torch.equal(v, converted.state_dict()[k]), k
    assert load_part("task_head", d).source.kind == "gie_dir"


def test_a_conversation_without_any_image_is_text_to_image(pipe):
    """The app's text to image: no input image anywhere, no Kontext reference, the app's default
    1024x1024 when the size is automatic; the generated image then conditions the next turn."""
    enc = pipe.encode_turn(None, "a red square on a white table", steps=1)
    assert enc.reference_latents == [] and (enc.request.width, enc.request.height) == (1024, 1024)
    first = pipe.turn(None, "a red square on a white table", route="edit", steps=1, size=(32, 32))
    assert first.edit.images[0].size == (32, 32) and len(first.conversation.images()) == 1
    second = pipe.encode_turn(first.conversation, "make it blue", steps=1)
    assert len(second.reference_latents) == 1 and (second.request.width, second.request.height) == (1024, 1024)
