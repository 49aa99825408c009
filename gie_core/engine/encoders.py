"""Frozen encoders, each a single forward pass: Qwen2.5-VL (image + instruction), T5-XXL and CLIP-L pooled."""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Sequence

import torch
from PIL import Image

from gie_core.checks import check_int
from gie_core.engine.connector import QwenFeatures, TextFeatures
from gie_core.engine.conversation import QWEN_DEFAULT_SYSTEM, Conversation, render_qwen_prompt  # noqa: F401  (re-exported)
from gie_core.constants import ANSWER_MAX_NEW_TOKENS, ANSWER_MAX_NEW_TOKENS_RANGE, CLIP_MAX_LENGTH, QWEN_IMAGE_SIZE, T5_MAX_LENGTH
from gie_core.imaging.images import ImageLike, to_pil, to_tensor


def check_instruction(instruction: str) -> str:
    """An edit instruction must be a non-empty string."""
    if not isinstance(instruction, str):
        raise TypeError(f"instruction must be a string, not {type(instruction).__name__}")
    if not instruction.strip():
        raise ValueError("instruction is empty; describe the edit, e.g. 'make the sky a sunset'")
    return instruction


def _module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def torchvision_available() -> bool:
    """Whether torchvision imports (the stock Qwen processor needs it)."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401  # optional: torchvision; importing it is the probe
    except Exception:  # a torchvision built for another torch fails at import
        return False
    return True


def load_qwen_image_processor(path):
    """The Qwen2-VL image processor from ``path``: the stock one when torchvision imports,
    else the PIL backend (transformers 5) or the slow processor (transformers 4)."""
    import transformers  # start-up: transformers (~1 s) only once a Qwen2.5-VL loads

    if torchvision_available():
        return transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True)
    processor_cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    return processor_cls.from_pretrained(path, local_files_only=True)  # a processor: reads no weights


class QwenVLEncoder:
    """Encodes (image, instruction) with Qwen2.5-VL in the reference format.

    Text: ``<|im_start|>user\\n<|vision_start|><|image_pad|>x256<|vision_end|>{instruction}<|im_end|>\\n<|im_start|>assistant\\n``
    (image first, system block removed), image resized to 448x448. Features: the last hidden
    state after the final norm for every token.
    """

    def __init__(self, model, tokenizer, image_processor, processor=None, image_size: int = QWEN_IMAGE_SIZE):
        self.model = model  # Qwen2_5_VLForConditionalGeneration (lm_head kept for rewriting)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.processor = processor  # stock Qwen2_5_VLProcessor when torchvision is there
        self.image_size = image_size
        cfg = model.config
        self.image_token_id = cfg.image_token_id
        self.merge_size = cfg.vision_config.spatial_merge_size
        self._passes_token_types = "mm_token_type_ids" in inspect.signature(self._base_model().forward).parameters

    def _base_model(self):
        return self.model.model if hasattr(self.model, "model") else self.model

    def reset_positions(self) -> None:
        """Forget the mRoPE position deltas that generation caches on the model (on the outer
        model before transformers 4.52, on the inner one since); a stale value shifts positions."""
        for m in (self.model, getattr(self.model, "model", None)):
            if m is not None and hasattr(m, "rope_deltas"):
                m.rope_deltas = None

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return getattr(cfg, "text_config", cfg).hidden_size

    def prompt(self, instruction: str) -> str:
        """The chat text of the reference format (image first, generation prompt, no system block),
        rendered by :func:`gie_core.engine.conversation.render_qwen_prompt`, never by the tokenizer
        folder's own chat template (ComfyUI's bundled one is the text-only Qwen2.5 template)."""
        check_instruction(instruction)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
        return render_qwen_prompt(messages, default_system=False)

    def prepare_images(self, images: ImageLike) -> list[Image.Image]:
        """Any accepted image form -> PIL RGB images resized to the fixed square (PIL bicubic)."""
        pils = images if isinstance(images, (list, tuple)) and all(isinstance(i, Image.Image) for i in images) else None
        if pils is None:
            pils = to_pil(to_tensor(images))
        else:
            to_tensor(pils)  # validates mode and size
        return [self._square(p) for p in pils]

    def _square(self, image: Image.Image) -> Image.Image:
        s = self.image_size
        return image if image.size == (s, s) else image.resize((s, s), Image.BICUBIC)

    def inputs(self, images: ImageLike, instruction: str, text: str | None = None) -> dict:
        """Model inputs for a batch of images sharing one instruction (same length, no padding).

        ``text`` overrides the chat text (used by instruction rewriting).
        """
        pils = self.prepare_images(images)
        text = text if text is not None else self.prompt(instruction)
        return self._model_inputs([text] * len(pils), pils)

    def conversation_inputs(self, conversation: Conversation) -> dict:
        """Model inputs of a whole conversation: one prompt (:meth:`Conversation.prompt`) holding
        every image of it in order, each resized to the fixed square."""
        pils = [self._square(im) for im in conversation.images()]  # each checked when it joined; sizes may differ
        return self._model_inputs([conversation.prompt()], pils)

    def _model_inputs(self, texts: list[str], pils: list[Image.Image]) -> dict:
        """Tokens, pixels and grids of ``texts`` whose image slots take ``pils`` in order (each
        text's slots take the next images: one per text for a batch, all of them for one chat)."""
        if self.processor is not None and pils:
            enc = dict(self.processor(text=texts, images=pils, return_tensors="pt"))
        else:
            enc = {}
            pad = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
            if pils:
                vision = self.image_processor(images=pils, return_tensors="pt")
                enc["pixel_values"], enc["image_grid_thw"] = vision["pixel_values"], vision["image_grid_thw"]  # grid [N, 3]
                counts = iter((enc["image_grid_thw"].prod(-1) // self.merge_size**2).tolist())
                texts = [_expand_slots(t, pad, counts) for t in texts]
            enc = {**dict(self.tokenizer(texts, return_tensors="pt", padding=True)), **enc}
        ids = enc["input_ids"]
        n_img = int((ids == self.image_token_id).sum())
        expected = int(enc["image_grid_thw"].prod(-1).sum()) // self.merge_size**2 if pils else 0
        if n_img != expected:
            raise RuntimeError(f"Qwen input has {n_img} image tokens but the image(s) need {expected}")
        if self._passes_token_types:  # transformers 5 needs it for mRoPE positions; 4.x finds image tokens by id
            enc["mm_token_type_ids"] = (ids == self.image_token_id).to(torch.int32)
        else:
            enc.pop("mm_token_type_ids", None)
        return enc

    def encode(
        self, images: ImageLike, instruction: str, queries: torch.Tensor | None = None, *, grad: bool = False
    ) -> QwenFeatures:
        """Last hidden states [B, L, H] of (image, instruction); with ``queries`` [N, H] (MetaQuery)
        N learned tokens are appended to the input and their outputs come last. ``grad`` lets
        gradients flow (to trainable queries; the encoder's own weights stay frozen)."""
        with torch.set_grad_enabled(grad):
            return self._forward(self.inputs(images, instruction), queries)

    def encode_conversation(
        self, conversation: Conversation, queries: torch.Tensor | None = None, *, grad: bool = False
    ) -> QwenFeatures:
        """Last hidden states [1, L, H] of a conversation rendered as the reference app does (every
        image of it, the system block removed, the assistant prompt after a waiting user turn).
        A one-turn one-image conversation in the "edit" layout equals :meth:`encode` exactly."""
        with torch.set_grad_enabled(grad):
            return self._forward(self.conversation_inputs(conversation), queries)

    def _forward(self, enc: dict, queries) -> QwenFeatures:
        base = self._base_model()
        device = _module_device(base)
        kwargs = {k: v.to(device) for k, v in enc.items() if torch.is_tensor(v)}
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = kwargs["pixel_values"].to(next(base.parameters()).dtype)
        n_q = 0
        if queries is not None:
            n_q = queries.shape[0]
            pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            b = kwargs["input_ids"].shape[0]
            extra = torch.full((b, n_q), pad_id, dtype=kwargs["input_ids"].dtype, device=device)
            kwargs["input_ids"] = torch.cat([kwargs["input_ids"], extra], dim=1)
            kwargs["attention_mask"] = torch.cat([kwargs["attention_mask"], torch.ones_like(extra)], dim=1)
            if "mm_token_type_ids" in kwargs:
                kwargs["mm_token_type_ids"] = torch.cat([kwargs["mm_token_type_ids"], torch.zeros_like(extra, dtype=torch.int32)], dim=1)
            embeds = base.get_input_embeddings()(kwargs["input_ids"])
            embeds[:, -n_q:] = queries.to(device=device, dtype=embeds.dtype)
            kwargs["inputs_embeds"] = embeds
        self.reset_positions()  # stale deltas from a previous generate() would shift positions
        out = base(**kwargs, use_cache=False, return_dict=True)
        return QwenFeatures(out.last_hidden_state, num_queries=n_q, input_ids=enc["input_ids"])

    def role_token_position(self, input_ids: torch.Tensor, role: str = "assistant") -> int:
        """Where the last ``<|im_start|>{role}`` of a batch-1 prompt ends: the position of the role
        word's last token. For the generation prompt ``<|im_start|>assistant\n`` in Qwen2.5's
        vocabulary that is the one "assistant" token (id 77091) the app's task head reads; a
        tokenizer that splits the word (tiny test ones) gives its last piece."""
        start = self.tokenizer.convert_tokens_to_ids("<|im_start|>")
        word = self.tokenizer.encode(role, add_special_tokens=False)
        ids = input_ids.reshape(-1).tolist()
        for i in range(len(ids) - len(word), -1, -1):
            if ids[i] == start and ids[i + 1:i + 1 + len(word)] == word:
                return i + len(word)
        raise ValueError(f"the prompt has no '<|im_start|>{role}' for the task head to read; the conversation must "
                         "end with a user turn")

    @torch.no_grad()
    def answer(self, conversation: Conversation, max_new_tokens: int = ANSWER_MAX_NEW_TOKENS) -> str:
        """The model's text reply to the conversation's waiting user turn, generated greedily (the
        app generates with ``max_new_tokens=128`` and the default greedy decoding); the
        generated tokens only, special tokens removed. Reads the language-model head (a checkpoint
        folder's is read on first use; a single Qwen file must include it: ``gie-convert --lm-head``)."""
        from transformers import GenerationConfig  # start-up: transformers only once an answer is asked

        max_new_tokens = check_int("max new tokens", max_new_tokens, *ANSWER_MAX_NEW_TOKENS_RANGE)
        if not conversation.pending:
            raise ValueError("the conversation has no waiting user turn to answer; add the question first")
        if getattr(self.model, "lm_head", None) is None:
            raise ValueError("this Qwen2.5-VL has no language-model head, so it cannot answer; use the checkpoint "
                             "folder, or a Qwen file written with gie-convert --lm-head")
        enc = self.conversation_inputs(conversation)
        param = next(self.model.parameters())
        kwargs = {k: v.to(param.device) for k, v in enc.items() if torch.is_tensor(v)}
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = kwargs["pixel_values"].to(param.dtype)
        stop = self.stop_token_ids()
        tok = self.tokenizer
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=stop,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else stop[0], use_cache=True,
        )
        self.reset_positions()  # stale mRoPE deltas would shift the positions
        try:
            out = self.model.generate(**kwargs, generation_config=config)
        finally:
            self.reset_positions()  # and these would shift the next encode()
        return tok.decode(out[0, kwargs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def stop_token_ids(self) -> list[int]:
        """The ids that end a reply: ``<|im_end|>``, ``<|endoftext|>`` and the eos token."""
        tok, ids = self.tokenizer, []
        for t in ("<|im_end|>", "<|endoftext|>"):
            i = tok.convert_tokens_to_ids(t)
            if isinstance(i, int) and i != tok.unk_token_id and i not in ids:
                ids.append(i)
        if tok.eos_token_id is not None and tok.eos_token_id not in ids:
            ids.append(tok.eos_token_id)
        return ids


def _expand_slots(text: str, pad: str, counts) -> str:
    """``text`` with each image pad repeated by the next count of ``counts`` (its image's tokens)."""
    pieces = text.split(pad)
    out = [pieces[0]]
    for piece in pieces[1:]:
        n = next(counts, None)
        if n is None:
            raise RuntimeError("the Qwen prompt has more image slots than images")
        out.append(pad * n + piece)
    return "".join(out)


class TextEncoders:
    """T5-XXL (256 tokens, no mask) and CLIP-L pooled, as the Kontext pipeline encodes them."""

    def __init__(self, clip, clip_tokenizer, t5=None, t5_tokenizer=None, t5_max_length: int = T5_MAX_LENGTH):
        self.clip, self.clip_tokenizer = clip, clip_tokenizer
        self.t5, self.t5_tokenizer = t5, t5_tokenizer
        self.t5_max_length = t5_max_length

    @torch.no_grad()
    def clip_pooled(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP-L ``pooler_output`` [B, 768] of 77-token padded prompts."""
        ids = self.clip_tokenizer(
            list(texts), padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        return self.clip(ids.to(_module_device(self.clip)), output_hidden_states=False).pooler_output

    @torch.no_grad()
    def t5_tokens(self, texts: Sequence[str]) -> torch.Tensor:
        """T5 last hidden states [B, 256, 4096], padded/truncated, no attention mask (as the reference)."""
        if self.t5 is None:
            raise ValueError("no T5 encoder is loaded; load T5 or use fusion mode 'vlm'")
        ids = self.t5_tokenizer(
            list(texts), padding="max_length", max_length=self.t5_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return self.t5(ids.to(_module_device(self.t5)), output_hidden_states=False)[0]

    def encode(self, instruction: str, with_t5: bool = True) -> TextFeatures:
        """T5 tokens (when asked and loaded), CLIP(instruction) and CLIP("") pooled vectors."""
        check_instruction(instruction)
        pooled = self.clip_pooled([instruction, ""])
        t5 = self.t5_tokens([instruction]) if with_t5 else None
        return TextFeatures(t5=t5, pooled=pooled[:1], pooled_empty=pooled[1:])
