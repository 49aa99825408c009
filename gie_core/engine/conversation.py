"""Qwen2.5-VL prompts, rendered in one place.

:func:`render_qwen_prompt` writes the text the official Qwen2.5-VL chat template
(``chat_template.json`` of Qwen2.5-VL-Instruct) writes for a list of chat messages. The
encoder, instruction rewriting, the judge and the trainer all render through it, so a prompt
never depends on whichever chat template a tokenizer folder carries: ComfyUI's bundled
``qwen25_tokenizer`` carries the text-only Qwen2.5 template, which cannot take image parts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_SLOT = "<|vision_start|><|video_pad|><|vision_end|>"
QWEN_DEFAULT_SYSTEM_TEXT = "You are a helpful assistant."
# The system block the template adds when the first message is not a system one; the reference
# (GPT-Image-Edit's evaluation, app.py and serve/cli.py) removes it.
QWEN_DEFAULT_SYSTEM = f"{IM_START}system\n{QWEN_DEFAULT_SYSTEM_TEXT}{IM_END}\n"
ASSISTANT_ROLE = "assistant"


def _is_image(part: Mapping) -> bool:
    return part.get("type") == "image" or "image" in part or "image_url" in part


def _is_video(part: Mapping) -> bool:
    return part.get("type") == "video" or "video" in part


def _render_content(content, where: str) -> str:
    """One message's content: a string as is; a list of parts as image/video slots and texts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, Sequence):
        raise TypeError(f"{where} content must be a string or a list of parts, not {type(content).__name__}")
    out = []
    for j, part in enumerate(content):
        if not isinstance(part, Mapping):
            raise TypeError(f"{where} part {j} must be a dict like {{'type': 'text', 'text': ...}}, "
                            f"not {type(part).__name__}")
        if _is_image(part):
            out.append(IMAGE_SLOT)
        elif _is_video(part):
            out.append(VIDEO_SLOT)
        elif "text" in part:
            if not isinstance(part["text"], str):
                raise TypeError(f"{where} part {j} text must be a string, not {type(part['text']).__name__}")
            out.append(part["text"])
        # the template writes nothing for any other part; neither do we
    return "".join(out)


def render_qwen_prompt(
    messages: Sequence[Mapping], *, add_generation_prompt: bool = True, default_system: bool = True
) -> str:
    """The text Qwen2.5-VL's official chat template renders for ``messages``.

    ``messages``: ``[{"role": "user", "content": "text" | [{"type": "image"}, {"type": "text",
    "text": "..."}, ...]}, ...]`` (image parts may also carry ``"image": ...``, as the app's
    do). Each message is ``<|im_start|>{role}\\n{content}<|im_end|>\\n``, an image part is
    ``<|vision_start|><|image_pad|><|vision_end|>``; with ``add_generation_prompt`` the text
    ends with ``<|im_start|>assistant\\n``. When the first message is not a system one the
    template puts :data:`QWEN_DEFAULT_SYSTEM` first; ``default_system=False`` leaves it out,
    as the reference does (it cuts that first block off the rendered text).
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, not {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise TypeError(f"message {i} must be a dict with 'role' and 'content'")
        role = message["role"]
        if not isinstance(role, str) or not role:
            raise ValueError(f"message {i} role must be a non-empty string like 'user', not {role!r}")
        if i == 0 and role != "system" and default_system:
            out.append(QWEN_DEFAULT_SYSTEM)
        out.append(f"{IM_START}{role}\n{_render_content(message['content'], f'message {i}')}{IM_END}\n")
    if add_generation_prompt:
        out.append(f"{IM_START}{ASSISTANT_ROLE}\n")
    return "".join(out)
