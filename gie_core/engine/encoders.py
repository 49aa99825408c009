"""Frozen encoders, each a single forward pass: Qwen2.5-VL (image + instruction), T5-XXL and CLIP-L pooled."""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Sequence

import torch
from PIL import Image

from gie_core.engine.connector import QwenFeatures, TextFeatures
from gie_core.engine.conversation import QWEN_DEFAULT_SYSTEM, render_qwen_prompt  # noqa: F401  (re-exported)
from gie_core.constants import CLIP_MAX_LENGTH, QWEN_IMAGE_SIZE, T5_MAX_LENGTH
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
        s = self.image_size
        return [p if p.size == (s, s) else p.resize((s, s), Image.BICUBIC) for p in pils]

    def inputs(self, images: ImageLike, instruction: str, text: str | None = None) -> dict:
        """Model inputs for a batch of images sharing one instruction (same length, no padding).

        ``text`` overrides the chat text (used by instruction rewriting).
        """
        pils = self.prepare_images(images)
        text = text if text is not None else self.prompt(instruction)
        if self.processor is not None:
            enc = self.processor(text=[text] * len(pils), images=pils, return_tensors="pt")
            enc = dict(enc)
        else:
            vision = self.image_processor(images=pils, return_tensors="pt")
            grid = vision["image_grid_thw"]  # [B, 3]
            counts = (grid.prod(-1) // self.merge_size**2).tolist()
            pad = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
            texts = [text.replace(pad, pad * n, 1) for n in counts]
            enc = dict(self.tokenizer(texts, return_tensors="pt", padding=True))
            enc["pixel_values"] = vision["pixel_values"]
            enc["image_grid_thw"] = grid
        ids = enc["input_ids"]
        n_img = int((ids[0] == self.image_token_id).sum())
        expected = int(enc["image_grid_thw"][0].prod()) // self.merge_size**2
        if n_img != expected:
            raise RuntimeError(f"Qwen input has {n_img} image tokens but the image needs {expected}")
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
            return self._encode(images, instruction, queries)

    def _encode(self, images, instruction, queries) -> QwenFeatures:
        enc = self.inputs(images, instruction)
        base = self._base_model()
        device = _module_device(base)
        kwargs = {k: v.to(device) for k, v in enc.items() if torch.is_tensor(v)}
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
        return QwenFeatures(out.last_hidden_state, num_queries=n_q)


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
