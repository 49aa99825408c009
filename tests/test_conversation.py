"""Qwen2.5-VL prompts, conversations, answers and the task head (issue 17), on tiny models.

The prompt is rendered by the library, never by the tokenizer folder's chat template: ComfyUI's
bundled ``qwen25_tokenizer`` carries the text-only Qwen2.5 template, which fails on image parts.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from gie_core.engine.conversation import render_qwen_prompt
from gie_core.weights.parts import load_part

INSTRUCTION = "make the sky a warm sunset"

# The chat template of ComfyUI's comfy/text_encoders/qwen25_tokenizer/tokenizer_config.json (the
# text-only Qwen2.5-Instruct one): it concatenates message.content as a string.
QWEN2_5_TEXT_ONLY_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are a helpful assistant.' }}\n"
    "    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user "
    "query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not "
    "loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)


def noise_image(width, height, seed=0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype(np.uint8))


def tokenizer_copy(src, dst, template: str | None):
    """The tokenizer files of ``src`` in ``dst`` as ComfyUI bundles them (tokenizer_config.json,
    vocab.json, merges.txt / tokenizer.json; no chat_template.json, no preprocessor config), with
    ``template`` as tokenizer_config.json's chat template (None: no template at all)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "added_tokens")):
            shutil.copy(f, dst / f.name)
    cfg_path = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    if template is not None:
        cfg["chat_template"] = template
    cfg_path.write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def qwen_file(gie_dir, tmp_path_factory):
    from gie_core.weights.convert import convert

    return convert(gie_dir, tmp_path_factory.mktemp("split"), parts=("qwen",), qwen_format="fp32")["qwen"]


@pytest.fixture(scope="module")
def encoder(gie_dir):
    return load_part("qwen", gie_dir, dtype="fp32").module


# --------------------------------------------------------------------------------------------
# The defect: prompts never depend on the tokenizer folder's chat template
# --------------------------------------------------------------------------------------------


def test_text_only_template_really_fails_on_image_messages(gie_dir, tmp_path):
    """The premise: the text-only template cannot render the encoder's image+text message."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_copy(gie_dir, tmp_path / "tok", QWEN2_5_TEXT_ONLY_TEMPLATE))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSTRUCTION}]}]
    with pytest.raises(TypeError, match="concatenate str"):
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("template", [QWEN2_5_TEXT_ONLY_TEMPLATE, None], ids=["text-only-template", "no-template"])
def test_single_file_qwen_with_comfyui_style_tokenizer_encodes_as_the_vl_one(
        qwen_file, gie_dir, encoder, tmp_path, template):
    """GIE Qwen-VL Encode's path (a single Qwen file + ComfyUI's bundled tokenizer folder) gives the
    same token ids and hidden states as the checkpoint's own Qwen2.5-VL tokenizer."""
    tok_dir = tokenizer_copy(gie_dir, tmp_path / "qwen25_tokenizer", template)
    comfy = load_part("qwen", qwen_file, dtype="fp32", tokenizer_dir=tok_dir).module
    image = noise_image(300, 200)
    assert comfy.prompt(INSTRUCTION) == encoder.prompt(INSTRUCTION)
    ours, ref = comfy.inputs(image, INSTRUCTION), encoder.inputs(image, INSTRUCTION)
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(comfy.encode(image, INSTRUCTION).hidden, encoder.encode(image, INSTRUCTION).hidden)


def test_rewrite_and_judge_prompts_do_not_read_the_tokenizer_template(encoder):
    """Rewriting and the judge render their system + image prompts through the library too."""
    from gie_core.engine.rewrite import REWRITE_SYSTEM, rewrite_chat
    from gie_core.eval.judge import JUDGE_SYSTEM, QwenJudge

    saved = encoder.tokenizer.chat_template
    encoder.tokenizer.chat_template = QWEN2_5_TEXT_ONLY_TEMPLATE
    try:
        text = rewrite_chat(encoder, INSTRUCTION)
        judge = QwenJudge(encoder).chat(2, "Which is better?")
    finally:
        encoder.tokenizer.chat_template = saved
    slot = "<|vision_start|><|image_pad|><|vision_end|>"
    assert text.startswith(f"<|im_start|>system\n{REWRITE_SYSTEM}<|im_end|>\n<|im_start|>user\n{slot}")
    assert judge == (f"<|im_start|>system\n{JUDGE_SYSTEM}<|im_end|>\n<|im_start|>user\n{slot}{slot}"
                     "Which is better?<|im_end|>\n<|im_start|>assistant\n")


def test_renderer_equals_the_official_vl_template(tokenizer_dirs):
    """render_qwen_prompt == the official Qwen2.5-VL chat template (the tiny tokenizer carries it)
    on systems, string and part contents, several images and turns, with and without the
    generation prompt."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dirs.qwen)
    cases = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSTRUCTION}]}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        [{"role": "user", "content": [{"type": "text", "text": "put the hat of image 2 on image 1"},
                                      {"type": "image", "image": "a.png"}, {"type": "image", "image": "b.png"}]},
         {"role": "assistant", "content": [{"type": "image", "image": "out.png"}]},
         {"role": "user", "content": [{"type": "text", "text": "what colour is the hat?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
         {"role": "user", "content": [{"type": "text", "text": "make it blue"}]}],
    ]
    for messages in cases:
        for gen in (True, False):
            assert render_qwen_prompt(messages, add_generation_prompt=gen) == tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=gen)


def test_renderer_refuses_malformed_messages():
    with pytest.raises(TypeError, match="message 0 must be a dict with 'role' and 'content'"):
        render_qwen_prompt([{"content": "x"}])
    with pytest.raises(TypeError, match="message 0 part 1 must be a dict"):
        render_qwen_prompt([{"role": "user", "content": [{"type": "image"}, "text"]}])
    with pytest.raises(TypeError, match="messages must be a list"):
        render_qwen_prompt("hello")


# --------------------------------------------------------------------------------------------
# The app's prompt, token for token
# --------------------------------------------------------------------------------------------

from gie_core.engine.conversation import Conversation, ConversationError  # noqa: E402

SLOT = "<|vision_start|><|image_pad|><|vision_end|>"


def app_chat_text(tokenizer, convo: list[dict]) -> str:
    """app.py's chat_step: the processor's chat template, then the first (system) block cut off."""
    chat_text = tokenizer.apply_chat_template(convo, tokenize=False, add_generation_prompt=True)
    return "<|im_end|>\n".join(chat_text.split("<|im_end|>\n")[1:])


def app_user(text, *images):
    """A user message as app.py builds it: the text part, then one part per image (448x448 bounds)."""
    content = [{"type": "text", "text": text}] if text else []
    return {"role": "user", "content": content + [
        {"type": "image", "image": im, "min_pixels": 448 * 448, "max_pixels": 448 * 448} for im in images]}


@pytest.fixture(scope="module")
def images():
    return noise_image(128, 96, 1), noise_image(64, 64, 2), noise_image(80, 112, 3)


def test_one_turn_one_image_prompt_is_the_apps(tokenizer_dirs, images):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dirs.qwen)
    conv = Conversation().add_user("read the sign", [images[0]])
    expected = f"<|im_start|>user\nread the sign{SLOT}<|im_end|>\n<|im_start|>assistant\n"
    assert conv.prompt() == expected == app_chat_text(tok, [app_user("read the sign", "a.png")])


def test_two_images_prompt_is_the_apps(tokenizer_dirs, images):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dirs.qwen)
    text = "put the hat from image 2 on the dog in image 1"
    conv = Conversation().add_user(text, images[:2])
    expected = f"<|im_start|>user\n{text}{SLOT}{SLOT}<|im_end|>\n<|im_start|>assistant\n"
    assert conv.prompt() == expected == app_chat_text(tok, [app_user(text, "a.png", "b.png")])


def test_three_turns_with_generated_images_and_an_answer_are_the_apps(tokenizer_dirs, images):
    """Edit, question, edit: each generated image is the assistant's turn, answers are text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dirs.qwen)
    conv = (Conversation().add_user("combine these two scenes", images[:2]).add_assistant_image(images[2])
            .add_user("what colour is the sky?").add_assistant_text("blue")
            .add_user("make the sky a sunset"))
    convo = [app_user("combine these two scenes", "a.png", "b.png"),
             {"role": "assistant", "content": [{"type": "image", "image": "gen0.png"}]},
             app_user("what colour is the sky?"),
             {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
             app_user("make the sky a sunset")]
    expected = (f"<|im_start|>user\ncombine these two scenes{SLOT}{SLOT}<|im_end|>\n"
                f"<|im_start|>assistant\n{SLOT}<|im_end|>\n"
                "<|im_start|>user\nwhat colour is the sky?<|im_end|>\n"
                "<|im_start|>assistant\nblue<|im_end|>\n"
                "<|im_start|>user\nmake the sky a sunset<|im_end|>\n<|im_start|>assistant\n")
    assert conv.prompt() == expected == app_chat_text(tok, convo)
    assert conv.images() == [images[0], images[1], images[2]]  # every image in order: Kontext's conditions


def test_conversation_tokens_equal_the_apps_tokens(encoder, images):
    """The encoder's token ids for a 3-turn, 3-image conversation are the app's chat text
    tokenized with each image slot expanded to its 256 tokens (448x448 -> 32x32 patches, 2x2 merge)."""
    conv = (Conversation().add_user("combine these two scenes", images[:2]).add_assistant_image(images[2])
            .add_user("make it night"))
    enc = encoder.conversation_inputs(conv)
    text = app_chat_text(encoder.tokenizer, [
        app_user("combine these two scenes", "a", "b"), {"role": "assistant", "content": [{"type": "image"}]},
        app_user("make it night")])
    expected = encoder.tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * 256))["input_ids"]
    assert enc["input_ids"][0].tolist() == expected
    assert enc["image_grid_thw"].tolist() == [[1, 32, 32]] * 3


def test_one_turn_one_image_edit_layout_encodes_exactly_as_today(encoder, images):
    """The evaluation format (image first) as a conversation gives today's prompt, ids and hidden
    states bit for bit (the parity with upstream does not move)."""
    conv = Conversation(layout="edit").add_user(INSTRUCTION, [images[0]])
    assert conv.prompt() == encoder.prompt(INSTRUCTION)
    today = encoder.inputs(images[0], INSTRUCTION)
    ours = encoder.conversation_inputs(conv)
    assert today.keys() == ours.keys()
    for k in today:
        assert torch.equal(today[k], ours[k]), k
    assert torch.equal(encoder.encode(images[0], INSTRUCTION).hidden, encoder.encode_conversation(conv).hidden)


def test_limits_and_turn_order(images):
    with pytest.raises(ConversationError, match="at most 2 images \\(Image 1 and an optional Image 2\\), got 3"):
        Conversation().add_user("combine", images)
    with pytest.raises(ConversationError, match="the turn is empty"):
        Conversation().add_user("  ")
    with pytest.raises(ConversationError, match="has no reply yet"):
        Conversation().add_user("a", [images[0]]).add_user("b")
    with pytest.raises(ConversationError, match="can only reply to a user turn"):
        Conversation().add_assistant_text("hello")
    with pytest.raises(ConversationError, match="layout 'chat' is unknown; expected one of app, edit"):
        Conversation(layout="chat")
    conv = Conversation()
    for i in range(4):  # 2 user images + 1 edit per turn: 8 images after 3 turns fill the limit
        if i == 3:
            with pytest.raises(ConversationError, match="at most 8 are kept"):
                conv.add_user("more", images[:2])
            break
        conv = conv.add_user("more", images[:2] if i < 2 else images[:1]).add_assistant_image(images[2])
    base = Conversation()
    assert base.add_user("x", [images[0]]) is not base and len(base) == 0  # immutable


# --------------------------------------------------------------------------------------------
# The conversation file
# --------------------------------------------------------------------------------------------


def test_conversation_file_round_trip(tmp_path, images):
    conv = (Conversation().add_user("combine these", images[:2]).add_assistant_image(images[2])
            .add_user("what is it?").add_assistant_text("a dog"))
    path = conv.save(tmp_path / "chat.json")
    back = Conversation.load(path)
    assert back.prompt() == conv.prompt() and back.layout == conv.layout
    assert [np.asarray(a).tolist() == np.asarray(b).tolist() for a, b in zip(back.images(), conv.images())] == [True] * 3
    assert [(t.role, t.text) for t in back.turns] == [(t.role, t.text) for t in conv.turns]
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON .*corrupt"),
    (json.dumps({"messages": []}), "is not a GPT-Image-Edit conversation"),
    (json.dumps({"format": "gpt-image-edit-conversation", "version": 99, "model": "qwen2.5-vl", "turns": []}),
     "format version 99; this release reads version 1"),
    (json.dumps({"format": "gpt-image-edit-conversation", "version": 1, "model": "qwen2-vl", "turns": []}),
     "was written for model 'qwen2-vl'"),
    (json.dumps({"format": "gpt-image-edit-conversation", "version": 1, "model": "qwen2.5-vl",
                 "turns": [{"role": "user", "text": "x", "images": ["bm90IGEgcG5n"]}]}),
     "turn 1 image 1 is not a readable image"),
    (json.dumps({"format": "gpt-image-edit-conversation", "version": 1, "model": "qwen2.5-vl",
                 "turns": [{"role": "assistant", "text": "hi", "images": []}]}),
     "turn 1: the assistant can only reply"),
])
def test_corrupt_or_foreign_conversation_files_are_refused(tmp_path, content, message):
    path = tmp_path / "chat.json"
    path.write_text(content)
    with pytest.raises(ConversationError, match=message) as info:
        Conversation.load(path)
    assert str(path) in str(info.value)


def test_missing_conversation_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="conversation file .*nope.json does not exist"):
        Conversation.load(tmp_path / "nope.json")


def test_turn_text_is_kept_as_typed_and_images_come_in_any_form(encoder, images):
    """The text is not stripped (the app does not; a one-image turn stays today's prompt), and
    a turn takes PIL images in any mode or ComfyUI tensors, a [B, H, W, 3] batch being B images."""
    text = "make it winter \n"
    conv = Conversation(layout="edit").add_user(text, [images[0]])
    assert conv.current_turn().text == text and conv.prompt() == encoder.prompt(text)
    rgba = images[1].convert("RGBA")
    batch = torch.rand(2, 24, 32, 3)
    c = Conversation().add_user("combine", batch)
    assert [im.size for im in c.images()] == [(32, 24), (32, 24)]
    assert Conversation().add_user("x", rgba).images()[0].mode == "RGB"
    with pytest.raises(ConversationError, match="at most 2 images"):
        Conversation().add_user("x", torch.rand(3, 24, 32, 3))
    with pytest.raises(ValueError, match="at least 16 px"):
        Conversation().add_user("x", [Image.new("RGB", (8, 64))])


def test_an_empty_answer_is_still_a_turn(tmp_path, images):
    """A model may answer nothing at all (its first token ends the reply): the turn is kept, and
    renders as the app's template renders an empty text part."""
    conv = Conversation().add_user("say nothing", [images[0]]).add_assistant_text("")
    assert conv.prompt().endswith("<|im_start|>assistant\n<|im_end|>\n")
    assert Conversation.load(conv.save(tmp_path / "c.json")).prompt() == conv.prompt()
