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
