"""How a part's weights are stored: the one table of storage kinds, and their mechanics.

:data:`STORAGE_TABLE` is the only place a storage kind is described: its name, what it does,
which parts and which sources take it, what it needs (a package, a device, loading straight onto
the run device). :mod:`gie_core.weights.parts` checks every choice against it before a weight is
read and dispatches; the low-level loaders below parts apply a row's ``method``. Every method is a
library's own mechanism, wired in, never a private copy:

- ``compute``: weights in the compute dtype (bf16/fp16/fp32);
- ``layerwise``: weights stored in ``store`` (float8 e4m3fn), each layer upcast to the compute
  dtype only while it runs (diffusers' layerwise casting, :func:`diffusers.hooks.apply_layerwise_casting`);
- ``bnb``: bitsandbytes int8 / nf4 through transformers' ``BitsAndBytesConfig`` (an optional
  extra, made for CUDA GPUs), quantised while loading onto the run device;
- ``gguf``: a GGUF file's own block quantisation (Q8_0, Q5/Q4 ...), kept as stored and dequantised
  per layer by diffusers' GGUF quantizer (:mod:`gie_core.weights.gguf`).

Precision-critical small layers stay in the compute dtype under fp8 (see ``FP8_KEEP``), as in
ComfyUI's fp8 files. (fp8 compute, i.e. fp8 matmuls, is not implemented: no row pretends it is.)
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

__all__ = [
    "FP8_KEEP",
    "NO_QUANTIZATION",
    "STORAGE_TABLE",
    "Storage",
    "adapters_in_compute_dtype",
    "bnb_config",
    "package_available",
    "prepare_fp8_storage",
    "quantize_choices",
    "storage",
]

# Every part :mod:`gie_core.weights.parts` loads.
ALL_PARTS = ("transformer", "qwen", "t5", "clip", "vae", "connector", "lora", "task_head")
WEIGHT_PARTS = tuple(p for p in ALL_PARTS if p != "lora")  # a LoRA takes its transformer's storage
# Kinds of sources (see gie_core.weights.parts.Source).
ALL_SOURCES = ("gie_dir", "kontext_dir", "qwen_dir", "file", "gguf")
TENSOR_SOURCES = tuple(s for s in ALL_SOURCES if s != "gguf")


@dataclass(frozen=True)
class Storage:
    """One row: a way a part's weights are stored."""

    name: str
    description: str
    parts: tuple[str, ...]  # the parts that accept it
    sources: tuple[str, ...]  # the source kinds it applies to
    method: str  # "auto", "compute", "layerwise", "bnb" or "gguf" (see the module docstring)
    store: torch.dtype | None = None  # compute: the dtype itself; layerwise: the stored dtype
    bits: int = 0  # bnb: 8 or 4
    package: str = ""  # an optional package it needs
    devices: tuple[str, ...] = ()  # device types it runs on (empty: any)
    run_device: bool = False  # loads straight onto the run device (its weights cannot move afterwards)
    quantizes: bool = False  # a "lighter weights" choice the faces offer beside "none"


STORAGE_TABLE: dict[str, Storage] = {
    s.name: s
    for s in (
        Storage("auto", "the compute dtype; a GGUF file as stored", ALL_PARTS, ALL_SOURCES, "auto"),
        Storage("bf16", "bfloat16 weights, computed in bfloat16", WEIGHT_PARTS, TENSOR_SOURCES, "compute", torch.bfloat16),
        Storage("fp16", "float16 weights, computed in float16", WEIGHT_PARTS, TENSOR_SOURCES, "compute", torch.float16),
        Storage("fp32", "float32 weights, computed in float32", WEIGHT_PARTS, TENSOR_SOURCES, "compute", torch.float32),
        Storage("fp8", "float8 e4m3fn storage, each layer upcast while it runs (~0.5x the bytes of bf16)",
                ("transformer", "qwen"), TENSOR_SOURCES, "layerwise", torch.float8_e4m3fn, quantizes=True),
        Storage("int8", "bitsandbytes LLM.int8 (optional extra 'bnb'; CUDA)", ("qwen",), ("gie_dir",), "bnb", bits=8,
                package="bitsandbytes", devices=("cuda", "cpu"), run_device=True, quantizes=True),
        Storage("nf4", "bitsandbytes 4-bit NF4, compute in the model dtype (optional extra 'bnb'; CUDA)", ("qwen",),
                ("gie_dir",), "bnb", bits=4, package="bitsandbytes", devices=("cuda", "cpu"), run_device=True,
                quantizes=True),
        Storage("gguf", "a GGUF file's block quantisation, kept as stored, dequantised per layer", ("transformer",),
                ("gguf",), "gguf", package="gguf"),
    )
}
# The word the faces (gie-edit --quantize-*, the loader nodes' *_quantize) use for "no quantisation".
NO_QUANTIZATION = "none"


def storage(name: str | None) -> Storage:
    """The row of ``name`` ("none" and None mean "auto"), or ``ValueError`` naming the choices."""
    key = "auto" if name in (None, "", NO_QUANTIZATION) else name
    try:
        return STORAGE_TABLE[key]
    except KeyError:
        raise ValueError(f"quantization '{name}' is unknown; expected one of "
                         f"{', '.join((NO_QUANTIZATION, *STORAGE_TABLE))}") from None


def quantize_choices(part: str) -> tuple[str, ...]:
    """What the faces offer for ``part``'s "quantize" option: "none" and the lighter rows."""
    return (NO_QUANTIZATION, *(s.name for s in STORAGE_TABLE.values() if s.quantizes and part in s.parts))


def package_available(name: str) -> bool:
    """Whether an optional package is installed (without importing it)."""
    return importlib.util.find_spec(name) is not None


# Layers kept in the compute dtype under fp8 storage (regular expressions searched in module
# names). Transformer: the input embedders, the timestep/guidance/pooled MLPs, the final
# modulation and projection (small and precision-critical); every block's attention, MLP and
# modulation layers are stored in fp8, as in ComfyUI's fp8 Kontext files. Qwen: the token
# embeddings and output head (as in ComfyUI's fp8 Qwen files) and the vision patch embedding.
FP8_KEEP: dict[str, tuple[str, ...]] = {
    "transformer": ("pos_embed", "^x_embedder$", "^context_embedder$", "^time_text_embed", "^norm_out", "^proj_out$",
                    "norm_q", "norm_k", "norm_added_q", "norm_added_k"),
    "qwen": ("embed_tokens", "lm_head", "patch_embed", "norm"),
}


def prepare_fp8_storage(model: torch.nn.Module, compute_dtype: torch.dtype, part: str,
                        storage: torch.dtype | None = None) -> torch.nn.Module:
    """Store ``model``'s layers in float8 and upcast each to ``compute_dtype`` while it runs
    (diffusers' layerwise casting), keeping the layers of ``FP8_KEEP[part]``.

    Works on a model still on the meta device (built for streaming: the loader then assigns
    weights straight into fp8, never holding the model in bf16) and on a loaded one (each
    layer is cast in turn). Returns ``model``.
    """
    from diffusers.hooks import apply_layerwise_casting  # start-up: diffusers (~3 s)

    storage = storage or STORAGE_TABLE["fp8"].store
    if compute_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError("the compute dtype of fp8 storage must be bf16, fp16 or fp32")
    apply_layerwise_casting(model, storage_dtype=storage, compute_dtype=compute_dtype,
                            skip_modules_pattern=FP8_KEEP[part], skip_modules_classes=None)
    model._gie_quantization = "fp8"
    model._gie_compute_dtype = compute_dtype
    return model


def adapters_in_compute_dtype(model: torch.nn.Module) -> int:
    """Put LoRA adapter weights loaded into an fp8-stored model back in the compute dtype.

    peft gives a new adapter its base layer's dtype, which under fp8 storage is float8: small
    low-rank weights that would lose their precision and cannot be multiplied on every device.
    Adapters are tiny, so they stay in the compute dtype. Returns how many tensors were cast."""
    if getattr(model, "_gie_quantization", None) != "fp8":
        return 0
    compute = getattr(model, "_gie_compute_dtype", torch.bfloat16)
    cast = 0
    for module in model.modules():
        names = tuple(getattr(module, "adapter_layer_names", ())) + tuple(getattr(module, "other_param_names", ()))
        for name in names:
            holder = getattr(module, name, None)
            if not isinstance(holder, torch.nn.Module):
                continue
            for p in holder.parameters():
                if p.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                    p.data = p.data.to(compute)
                    cast += 1
    return cast


def bnb_config(name: str, compute_dtype: torch.dtype):
    """transformers' ``BitsAndBytesConfig`` of a bnb row (the output head and vision tower
    stay in ``compute_dtype``)."""
    from transformers import BitsAndBytesConfig  # start-up: transformers (~1 s)

    q = storage(name)
    if q.method != "bnb":
        raise ValueError(f"quantization '{name}' is not a bitsandbytes one")
    # transformers 5 matches from the module path's start ("model.visual"), 4.x anywhere ("visual")
    skip = ["lm_head", "model.visual", "visual"]
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=False, llm_int8_skip_modules=skip)
