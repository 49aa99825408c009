"""Lighter weights: the quantisation choices of each model part, as one table, and their wiring.

Every choice is a library's own mechanism, wired in, never a private copy:

- ``fp8``: weights stored as float8 (e4m3fn), each layer upcast to the compute dtype only while
  it runs (diffusers' layerwise casting, :func:`diffusers.hooks.apply_layerwise_casting`); for
  the Kontext transformer and for Qwen2.5-VL. About half the bytes of bf16.
- ``int8`` / ``nf4``: Qwen2.5-VL through bitsandbytes (transformers' ``BitsAndBytesConfig``);
  an optional extra (``pip install "gpt-image-edit-nodes[bnb]"``), made for CUDA GPUs.
- GGUF files (Q8_0, Q5/Q4 ...) of the Kontext transformer are a *file* choice, not an option:
  :mod:`gie_core.weights.gguf` loads them through diffusers' GGUF quantizer.

The table (:data:`QUANTIZATION_TABLE`) says which part takes which choice; the CLI, the
loaders and the nodes read it. Precision-critical small layers stay in the compute dtype (see
``FP8_KEEP``), as in ComfyUI's fp8 files.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

__all__ = [
    "FP8_KEEP",
    "adapters_in_compute_dtype",
    "QUANTIZATION_TABLE",
    "QWEN_QUANTIZATIONS",
    "TRANSFORMER_QUANTIZATIONS",
    "Quantization",
    "bnb_config",
    "check_quantization",
    "prepare_fp8_storage",
    "quantization",
]

PARTS = ("transformer", "qwen")


@dataclass(frozen=True)
class Quantization:
    """One row: how a part's weights are stored."""

    name: str
    parts: tuple[str, ...]  # the model parts that accept it
    kind: str  # "none", "layerwise" (diffusers layerwise casting) or "bnb" (bitsandbytes)
    storage: torch.dtype | None = None  # layerwise: the stored dtype
    bits: int = 0  # bnb: 8 or 4
    description: str = ""


QUANTIZATION_TABLE: tuple[Quantization, ...] = (
    Quantization("none", PARTS, "none", description="weights in the compute dtype (bf16 on GPUs)"),
    Quantization("fp8", PARTS, "layerwise", storage=torch.float8_e4m3fn,
                 description="float8 e4m3fn storage, each layer upcast while it runs (~0.5x the bytes of bf16)"),
    Quantization("int8", ("qwen",), "bnb", bits=8,
                 description="bitsandbytes LLM.int8 (optional extra 'bnb'; CUDA)"),
    Quantization("nf4", ("qwen",), "bnb", bits=4,
                 description="bitsandbytes 4-bit NF4, compute in the model dtype (optional extra 'bnb'; CUDA)"),
)
_BY_NAME = {q.name: q for q in QUANTIZATION_TABLE}
TRANSFORMER_QUANTIZATIONS: tuple[str, ...] = tuple(q.name for q in QUANTIZATION_TABLE if "transformer" in q.parts)
QWEN_QUANTIZATIONS: tuple[str, ...] = tuple(q.name for q in QUANTIZATION_TABLE if "qwen" in q.parts)

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


def quantization(name: str) -> Quantization:
    """The row of ``name``, or ``ValueError`` naming the choices."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"quantization '{name}' is unknown; expected one of {', '.join(_BY_NAME)}") from None


def check_quantization(part: str, name: str | None, device: torch.device | str | None = None) -> str:
    """``name`` checked for ``part`` ("transformer" or "qwen") on ``device``, before anything
    loads: a choice the part does not take, bitsandbytes missing or an unsupported device is a
    ``ValueError`` saying what to do. None means "none"."""
    name = "none" if name in (None, "") else name
    if part not in PARTS:
        raise ValueError(f"model part '{part}' is unknown; expected one of {', '.join(PARTS)}")
    q = quantization(name)
    if part not in q.parts:
        allowed = TRANSFORMER_QUANTIZATIONS if part == "transformer" else QWEN_QUANTIZATIONS
        raise ValueError(f"{part} quantization '{name}' is not available for the {part}; expected one of {', '.join(allowed)}"
                         + (" (GGUF transformers are chosen by the file: pass a .gguf file)" if part == "transformer" else ""))
    if q.kind == "layerwise" and not hasattr(torch, "float8_e4m3fn"):
        raise ValueError(f"{part} quantization '{name}' needs a torch with float8 dtypes (torch {torch.__version__} has none)")
    if q.kind == "bnb":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError(
                f"{part} quantization '{name}' needs bitsandbytes, which is not installed: "
                "pip install \"gpt-image-edit-nodes[bnb]\" (CUDA GPUs), or use 'fp8'"
            )
        dev = torch.device(device) if device is not None else None
        if dev is not None and dev.type not in ("cuda", "cpu"):
            raise ValueError(f"{part} quantization '{name}' (bitsandbytes) runs on CUDA GPUs, not on '{dev}'; use 'fp8'")
    return name


def prepare_fp8_storage(model: torch.nn.Module, compute_dtype: torch.dtype, part: str,
                        storage: torch.dtype | None = None) -> torch.nn.Module:
    """Store ``model``'s layers in float8 and upcast each to ``compute_dtype`` while it runs
    (diffusers' layerwise casting), keeping the layers of ``FP8_KEEP[part]``.

    Works on a model still on the meta device (built for streaming: the loader then assigns
    weights straight into fp8, never holding the model in bf16) and on a loaded one (each
    layer is cast in turn). Returns ``model``.
    """
    from diffusers.hooks import apply_layerwise_casting

    storage = storage or quantization("fp8").storage
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
    from transformers import BitsAndBytesConfig

    q = quantization(name)
    if q.kind != "bnb":
        raise ValueError(f"quantization '{name}' is not a bitsandbytes one")
    # transformers 5 matches from the module path's start ("model.visual"), 4.x anywhere ("visual")
    skip = ["lm_head", "model.visual", "visual"]
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=False, llm_int8_skip_modules=skip)
