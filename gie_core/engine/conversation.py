"""Qwen2.5-VL prompts, rendered in one place, and the reference app's conversations.

:func:`render_qwen_prompt` writes the text the official Qwen2.5-VL chat template
(``chat_template.json`` of Qwen2.5-VL-Instruct) writes for a list of chat messages. The
encoder, instruction rewriting, the judge and the trainer all render through it, so a prompt
never depends on whichever chat template a tokenizer folder carries: ComfyUI's bundled
``qwen25_tokenizer`` carries the text-only Qwen2.5 template, which cannot take image parts.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image

from gie_core.constants import (
    CONVERSATION_FORMAT,
    CONVERSATION_LAYOUTS,
    CONVERSATION_MODEL,
    CONVERSATION_VERSION,
    DEFAULT_CONVERSATION_LAYOUT,
    MAX_CONVERSATION_IMAGES,
    MAX_IMAGES_PER_TURN,
    TEXT_TO_IMAGE_SIZE,
)
from gie_core.files import atomic_write_text, read_text
from gie_core.imaging.images import check_size, to_pil, to_rgb, to_tensor

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


# --------------------------------------------------------------------------------------------
# Conversations: the reference app's chat, turn by turn
# --------------------------------------------------------------------------------------------

USER, ASSISTANT = "user", ASSISTANT_ROLE
ROLES = (USER, ASSISTANT)


class ConversationError(ValueError):
    """A conversation (or conversation file) that cannot be used: the message says why."""


def _image_list(images) -> list:
    """A turn's images as a list: one image (PIL, or a ComfyUI tensor [H, W, 3]), a batch tensor
    [B, H, W, 3] (B images), or a sequence of images; None or () for none."""
    if images is None:
        return []
    if isinstance(images, Image.Image):
        return [images]
    if torch.is_tensor(images):
        return [images[i] for i in range(images.shape[0])] if images.ndim == 4 else [images]
    return list(images)


def _check_layout(layout: str) -> str:
    if layout not in CONVERSATION_LAYOUTS:
        raise ConversationError(f"conversation layout '{layout}' is unknown; expected one of {', '.join(CONVERSATION_LAYOUTS)}")
    return layout


def _as_rgb(image, what: str) -> Image.Image:
    """One image of a turn as a PIL RGB image (a PIL image in any mode, or a ComfyUI/array image of
    batch 1), its size checked."""
    if isinstance(image, Image.Image):
        rgb = to_rgb(image)
        check_size(*rgb.size, what)
        return rgb
    tensor = to_tensor(image, what)
    if tensor.shape[0] != 1:
        raise ConversationError(f"{what} is a batch of {tensor.shape[0]} images; give one image per slot")
    return to_pil(tensor)[0]


@dataclass(frozen=True)
class Turn:
    """One turn: the user's text and images, or the assistant's image (an edit) or text (an answer)."""

    role: str
    text: str = ""
    images: tuple[Image.Image, ...] = ()

    def __post_init__(self):
        if self.role not in ROLES:
            raise ConversationError(f"turn role '{self.role}' is unknown; expected one of {', '.join(ROLES)}")
        if not isinstance(self.text, str):
            raise ConversationError(f"turn text must be a string, not {type(self.text).__name__}")
        if self.role == ASSISTANT and (len(self.images) > 1 or (self.images and self.text)):
            raise ConversationError("an assistant turn is one image (an edit) or one text (an answer, maybe empty)")

    def content(self, layout: str = DEFAULT_CONVERSATION_LAYOUT) -> list[dict]:
        """The turn's message parts as the app builds them: the text part (when there is text) and
        one image part per image, text first ("app") or images first ("edit")."""
        text = [{"type": "text", "text": self.text}] if self.text else []
        images = [{"type": "image", "image": im} for im in self.images]
        return images + text if layout == "edit" else text + images


@dataclass(frozen=True)
class Conversation:
    """An immutable chat with the reference app's rules: user turns carry text and up to
    :data:`MAX_IMAGES_PER_TURN` images, each assistant turn is an edited image or an answer; every
    image, in order, goes to Qwen2.5-VL (448x448) and to Kontext as a condition image.

    ``layout`` orders a user turn's parts (:data:`CONVERSATION_LAYOUTS`): "app" as app.py (text,
    then images), "edit" as the evaluation scripts (images, then text: a one-turn one-image
    conversation then renders exactly today's edit prompt). Each ``add_*`` returns a new
    conversation; this one is never changed.
    """

    turns: tuple[Turn, ...] = ()
    layout: str = DEFAULT_CONVERSATION_LAYOUT

    def __post_init__(self):
        _check_layout(self.layout)
        if not isinstance(self.turns, tuple):
            object.__setattr__(self, "turns", tuple(self.turns))

    # --- building -----------------------------------------------------------------------
    def add_user(self, text: str = "", images: Sequence = ()) -> Conversation:
        """This conversation with a user turn: ``text`` and 0-:data:`MAX_IMAGES_PER_TURN` images."""
        if not isinstance(text, str):
            raise ConversationError(f"the turn's text must be a string, not {type(text).__name__}")
        images = _image_list(images)
        if len(images) > MAX_IMAGES_PER_TURN:
            raise ConversationError(
                f"a turn takes at most {MAX_IMAGES_PER_TURN} images (Image 1 and an optional Image 2), got {len(images)}")
        if not text.strip() and not images:
            raise ConversationError("the turn is empty; give an instruction or a question (and up to "
                                    f"{MAX_IMAGES_PER_TURN} images)")
        if self.turns and self.turns[-1].role == USER:
            raise ConversationError("the last turn is the user's and has no reply yet; add the assistant's image "
                                    "or answer first")
        total = len(self.images()) + len(images)
        if total > MAX_CONVERSATION_IMAGES:
            raise ConversationError(
                f"the conversation would hold {total} images but at most {MAX_CONVERSATION_IMAGES} are kept (each is a "
                "Kontext condition image); start a new conversation")
        pils = tuple(_as_rgb(im, f"image {i + 1} of the turn") for i, im in enumerate(images))
        return replace(self, turns=self.turns + (Turn(USER, text, pils),))  # as typed: the app does not strip

    def _reply(self, turn: Turn) -> Conversation:
        if not self.turns or self.turns[-1].role != USER:
            raise ConversationError("the assistant can only reply to a user turn; add the user's turn first")
        return replace(self, turns=self.turns + (turn,))

    def add_assistant_image(self, image) -> Conversation:
        """This conversation with the assistant's edited image as the reply to the last user turn."""
        total = len(self.images()) + 1
        if total > MAX_CONVERSATION_IMAGES:
            raise ConversationError(f"the conversation would hold {total} images but at most "
                                    f"{MAX_CONVERSATION_IMAGES} are kept; start a new conversation")
        return self._reply(Turn(ASSISTANT, "", (_as_rgb(image, "the assistant's image"),)))

    def add_assistant_text(self, text: str) -> Conversation:
        """This conversation with the assistant's answer (text) as the reply to the last user turn."""
        if not isinstance(text, str):
            raise ConversationError(f"the answer must be a string, not {type(text).__name__}")
        return self._reply(Turn(ASSISTANT, text))

    # --- reading ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.turns)

    def images(self) -> list[Image.Image]:
        """Every image of the conversation in order (users' and the assistant's edits): what
        Qwen2.5-VL sees and what Kontext is conditioned on (as univa/serve/cli.py keeps them)."""
        return [im for turn in self.turns for im in turn.images]

    @property
    def pending(self) -> bool:
        """Whether the last turn is the user's (it waits for an edit or an answer)."""
        return bool(self.turns) and self.turns[-1].role == USER

    def current_turn(self) -> Turn:
        """The last user turn (the one being answered)."""
        for turn in reversed(self.turns):
            if turn.role == USER:
                return turn
        raise ConversationError("the conversation has no user turn yet")

    def sizing_images(self) -> list[Image.Image]:
        """The images an automatic output size follows: the last user turn's that had images (the
        waiting turn's when it has any; the app keeps its size sliders until new images come);
        empty when no user turn had one (see :meth:`sizing_sizes`)."""
        for turn in reversed(self.turns):
            if turn.role == USER and turn.images:
                return list(turn.images)
        return []

    def sizing_sizes(self) -> list[tuple[int, int]]:
        """The (width, height) an automatic output size follows: those of the last user turn that had
        images (the waiting turn's when it has any; the app keeps its size sliders until new images
        come), or :data:`TEXT_TO_IMAGE_SIZE` when no user turn had one (the app's text to image)."""
        return [im.size for im in self.sizing_images()] or [TEXT_TO_IMAGE_SIZE]

    def check_edit_fits(self) -> None:
        """Refuse, before any work, a waiting turn whose edited image would not fit the
        conversation (:data:`MAX_CONVERSATION_IMAGES`)."""
        n = len(self.images())
        if n + 1 > MAX_CONVERSATION_IMAGES:
            raise ConversationError(f"the conversation holds {n} images; its edit would make {n + 1} but at most "
                                    f"{MAX_CONVERSATION_IMAGES} are kept (each is a Kontext condition image); start a "
                                    "new conversation")

    def messages(self) -> list[dict]:
        """The chat messages as the app builds them (image parts carry the PIL image)."""
        return [{"role": t.role, "content": t.content(self.layout)} for t in self.turns]

    def prompt(self) -> str:
        """The Qwen2.5-VL text of the conversation as the app renders it: the chat template with
        the system block removed and, when a user turn waits, the assistant prompt after it."""
        if not self.turns:
            raise ConversationError("the conversation is empty; add a user turn first")
        return render_qwen_prompt(self.messages(), add_generation_prompt=self.pending, default_system=False)

    # --- files --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain JSON data: the format, version and model, the layout, and each turn's role, text
        and images (PNG, base64)."""
        return {
            "format": CONVERSATION_FORMAT, "version": CONVERSATION_VERSION, "model": CONVERSATION_MODEL,
            "layout": self.layout,
            "turns": [{"role": t.role, "text": t.text, "images": [_png_b64(im) for im in t.images]} for t in self.turns],
        }

    @classmethod
    def from_dict(cls, data, where: str = "conversation") -> Conversation:
        """A conversation from :meth:`to_dict`'s data; anything else raises naming ``where``."""
        if not isinstance(data, Mapping) or data.get("format") != CONVERSATION_FORMAT:
            raise ConversationError(f"{where} is not a GPT-Image-Edit conversation (no \"format\": "
                                    f"\"{CONVERSATION_FORMAT}\")")
        if data.get("version") != CONVERSATION_VERSION:
            raise ConversationError(f"{where} is conversation format version {data.get('version')!r}; this release "
                                    f"reads version {CONVERSATION_VERSION}")
        if data.get("model") != CONVERSATION_MODEL:
            raise ConversationError(f"{where} was written for model {data.get('model')!r}; this model renders "
                                    f"{CONVERSATION_MODEL!r} conversations")
        turns = data.get("turns")
        if not isinstance(turns, list):
            raise ConversationError(f"{where} has no list of turns")
        conv = cls((), _check_layout(data.get("layout", DEFAULT_CONVERSATION_LAYOUT)))
        for i, t in enumerate(turns):
            if not isinstance(t, Mapping) or not isinstance(t.get("images", []), list):
                raise ConversationError(f"{where} turn {i + 1} must be {{\"role\", \"text\", \"images\": [...]}}")
            images = [_png_from_b64(b, f"{where} turn {i + 1} image {j + 1}") for j, b in enumerate(t.get("images", []))]
            try:
                if t.get("role") == USER:
                    conv = conv.add_user(t.get("text", ""), images)
                elif t.get("role") == ASSISTANT and len(images) == 1 and not t.get("text"):
                    conv = conv.add_assistant_image(images[0])
                elif t.get("role") == ASSISTANT and not images:
                    conv = conv.add_assistant_text(t.get("text", ""))
                else:
                    raise ConversationError(f"role {t.get('role')!r} with {len(images)} image(s) is not a turn")
            except ConversationError as exc:
                raise ConversationError(f"{where} turn {i + 1}: {exc}") from None
        return conv

    def save(self, path: str | os.PathLike) -> Path:
        """Write the conversation to ``path`` (JSON) atomically: the old file stays whole until the
        new one is complete."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Conversation:
        """Read a conversation file; a missing, corrupt or foreign file raises naming it."""
        p = Path(path)
        text = read_text(p, "conversation file")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConversationError(f"conversation file {p} is not valid JSON (line {exc.lineno}: {exc.msg}); "
                                    "it is corrupt or not a conversation file") from None
        return cls.from_dict(data, f"conversation file {p}")


def _png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _png_from_b64(data, what: str) -> Image.Image:
    if not isinstance(data, str):
        raise ConversationError(f"{what} must be a base64 PNG string")
    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as im:
            im.load()
            return im.convert("RGB")
    except (ValueError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ConversationError(f"{what} is not a readable image ({exc})") from None
