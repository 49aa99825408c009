"""Fitting a run in GPU memory: how frozen weights are stored, which blocks are swapped.

Everything here wires in the libraries' own pieces:

- **small frozen weights**: the frozen Kontext transformer (and Qwen2.5-VL / T5 / CLIP / VAE when
  they are loaded, i.e. not cached) stored in float8, each layer upcast to the compute dtype only
  while it runs: diffusers' layerwise casting (:func:`diffusers.hooks.apply_layerwise_casting`),
  the same rule the engine's fp8 loading uses (:data:`gie_core.weights.quantize.FP8_KEEP`). Layers that
  hold trained weights (the image-branch attention set, LoRA adapters) are never cast: they stay
  fp32 masters. A GGUF or fp8 ``model.init_transformer`` file stays as stored. Gradients flow
  through the cast layers (stage 1 trains the connector through the fp8 transformer).
- **block swap**: transformer blocks without trained weights beyond the first
  ``memory.resident_blocks`` live in CPU memory and visit the GPU while they run, in forward and
  in the backward recomputation: diffusers' group offloading
  (:func:`diffusers.hooks.apply_group_offloading`, block level, one block per group).

Both need gradient checkpointing to save memory while training: without it autograd keeps the
upcast (or swapped-in) weights of every layer alive until the backward pass reaches it, so the
config turns it on with either (:attr:`TrainConfig.use_gradient_checkpointing`).

Transfers are synchronous. diffusers' stream prefetching follows the forward order: during a
checkpointed backward, which recomputes blocks in reverse, each block would prefetch the one it
follows, and those would stay on the GPU until the next forward: every block would end up
resident. The plan (``gie-train plan``) counts one swapped block on the GPU at a time.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.hooks import apply_group_offloading, apply_layerwise_casting
from torch import nn

from gie_core.train.config import STORAGE_DTYPE_TABLE, TrainConfig
from gie_core.weights.parts import resolve_source
from gie_core.weights.quantize import FP8_KEEP, STORAGE_TABLE
from gie_core.weights.reader import FLOAT8_DTYPES, CheckpointReader

logger = logging.getLogger("gie_core.train")

# Modules that are not part of a diffusers/transformers block pattern but must stay in the
# compute dtype under fp8 storage, per part (the transformer's and Qwen's rows come from
# gie_core.weights.quantize.FP8_KEEP, the engine's own rule).
_DIFFUSERS_DEFAULT_KEEP = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")
EXTRA_FP8_KEEP: dict[str, tuple[str, ...]] = {
    "t5": ("shared", "norm", "relative_attention_bias"),  # embeddings, norms, position buckets
    "clip": ("embeddings", "norm"),
    "vae": ("^encoder.conv_in$", "^decoder.conv_in$", "norm", "quant_conv"),
}


@dataclass(frozen=True)
class MemorySettings:
    """The memory options of a run, resolved (files read for their storage, defaults applied)."""

    transformer: str  # "compute", "fp8" (layerwise casting) or "gguf" (the file's block quantisation)
    encoders: str  # "compute" or "fp8": Qwen2.5-VL, T5, CLIP when loaded
    vae: str  # "fp32" or "fp8"
    checkpointing: bool
    resident_blocks: int | None  # None: no block swap

    @property
    def transformer_cast(self) -> bool:
        return self.transformer == "fp8"


def transformer_file_storage(path: str | os.PathLike) -> str | None:
    """How a ``model.init_transformer`` file stores its block weights: "gguf", "fp8" (plain or
    ComfyUI-scaled float8 safetensors), or None (bf16/fp16/fp32). Reads the header only; what
    the file is, :func:`gie_core.weights.parts.resolve_source` says."""
    p = Path(path).expanduser()
    if not p.is_file():
        return None
    if resolve_source(p, "transformer").kind == "gguf":
        return "gguf"
    with CheckpointReader.open(p) as reader:
        weights = [k for k in reader.keys() if k.endswith(".weight") and len(reader.shape(k)) == 2 and "blocks." in k]
        if weights and all(reader.dtype(k) in FLOAT8_DTYPES for k in weights[:16]):
            return "fp8"
    return None


def resolve_memory(cfg: TrainConfig) -> MemorySettings:
    """The run's :class:`MemorySettings` (reads at most a transformer file's header)."""
    m = cfg.memory
    transformer = "fp8" if STORAGE_DTYPE_TABLE[m.transformer_dtype].quantization else "compute"
    src = cfg.model.init_transformer
    if src not in ("auto", "kontext", "gie"):
        stored = transformer_file_storage(src)
        if stored == "gguf":
            if m.transformer_dtype != "auto":
                raise ValueError(f"model.init_transformer {src} is a GGUF file (its own quantisation); "
                                 f"memory.transformer_dtype must be auto, not '{m.transformer_dtype}'")
            transformer = "gguf"
        elif stored == "fp8" and m.transformer_dtype == "auto":
            transformer = "fp8"  # keep the file's precision: an upcast copy would double the bytes for nothing
    if transformer == "gguf" and cfg.trainable_set not in ("connector", "lora"):
        raise ValueError(f"model.init_transformer {src} is a GGUF file: its quantised layers cannot train; "
                         f"train.trainable '{cfg.trainable_set}' needs a bf16/fp16/fp32 or fp8 safetensors transformer")
    if transformer == "gguf" and (cfg.export.merge_lora or cfg.export.released_dir):
        raise ValueError(f"model.init_transformer {src} is a GGUF file: export.merge_lora and export.released_dir would "
                         "write its whole transformer, which stays quantised here; export the LoRA and connector only")
    checkpointing = cfg.use_gradient_checkpointing
    if cfg.train.gradient_checkpointing is None and transformer != "compute":
        checkpointing = True
    encoders = "fp8" if STORAGE_DTYPE_TABLE[m.encoder_dtype].quantization else "compute"
    vae = "fp8" if STORAGE_DTYPE_TABLE[m.vae_dtype].quantization else "fp32"
    return MemorySettings(transformer, encoders, vae, checkpointing, m.resident_blocks)


# --------------------------------------------------------------------------------------------
# fp8 storage
# --------------------------------------------------------------------------------------------


def fp8_keep(part: str) -> tuple[str, ...]:
    """Module-name patterns kept in the compute dtype under fp8 storage for ``part``."""
    return tuple(FP8_KEEP.get(part, ())) + EXTRA_FP8_KEEP.get(part, ()) + (
        _DIFFUSERS_DEFAULT_KEEP if part not in FP8_KEEP else ())


def trained_module_patterns(module: nn.Module) -> tuple[str, ...]:
    """``^name$`` of every leaf module of ``module`` that holds a trained parameter (LoRA adapter
    layers, the image-branch attention set): such a layer must never be cast to fp8 storage."""
    out = []
    for name, sub in module.named_modules():
        if name and any(p.requires_grad for p in sub.parameters(recurse=False)):
            out.append(f"^{re.escape(name)}$")
    return tuple(out)


def _first_weight_module(module: nn.Module) -> tuple[str, ...]:
    """The module owning ``module``'s first parameter: kept in the compute dtype so code that reads
    a model's dtype from its first weight (``next(model.parameters()).dtype``) keeps working."""
    first = next(iter(module.named_parameters()), None)
    if first is None:
        return ()
    return (f"^{re.escape(first[0].rsplit('.', 1)[0])}$",) if "." in first[0] else ()


def store_fp8(module: nn.Module, part: str, compute_dtype: torch.dtype) -> nn.Module:
    """Store ``module``'s frozen layers in float8, upcast per layer to ``compute_dtype`` while they
    run (diffusers' layerwise casting). Layers with trained weights, the ``part``'s keep list and
    the first layer stay as they are. Returns ``module``."""
    keep = fp8_keep(part) + trained_module_patterns(module) + _first_weight_module(module)
    apply_layerwise_casting(module, storage_dtype=STORAGE_TABLE["fp8"].store, compute_dtype=compute_dtype,
                            skip_modules_pattern=keep, skip_modules_classes=None)
    return module


def is_layerwise_cast(module: nn.Module) -> bool:
    """Whether diffusers' layerwise casting is applied somewhere in ``module``."""
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is not None and registry.get_hook("layerwise_casting") is not None:
            return True
    return False


# --------------------------------------------------------------------------------------------
# Block swap
# --------------------------------------------------------------------------------------------


def transformer_blocks(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer's blocks in execution order (double blocks, then single blocks), named as
    in its state dict; ``train.layers`` and ``memory.resident_blocks`` number them this way."""
    blocks = [(f"transformer_blocks.{i}", b) for i, b in enumerate(transformer.transformer_blocks)]
    blocks += [(f"single_transformer_blocks.{i}", b) for i, b in enumerate(transformer.single_transformer_blocks)]
    return blocks


def swappable_blocks(transformer: nn.Module, resident: int) -> list[tuple[str, nn.Module]]:
    """The blocks block swap streams: those after the first ``resident`` that train nothing."""
    return [(n, b) for i, (n, b) in enumerate(transformer_blocks(transformer))
            if i >= resident and not any(p.requires_grad for p in b.parameters())]


def place_with_swap(model: nn.Module, transformer: nn.Module, resident: int, device: torch.device) -> list[str]:
    """Put ``model`` on ``device`` except the swappable blocks of ``transformer`` (a submodule of
    ``model``), which stay in CPU memory and are hooked to visit ``device`` while they run
    (diffusers group offloading, block level). Returns the swapped block names."""
    swapped = swappable_blocks(transformer, resident)
    skip = {id(b) for _, b in swapped}
    _move_except(model, torch.device(device), skip)
    if swapped:
        holder = nn.Module()  # group offloading groups the blocks of a ModuleList; this one lists the swapped blocks
        holder.blocks = nn.ModuleList([b for _, b in swapped])
        apply_group_offloading(holder, onload_device=torch.device(device), offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1, use_stream=False)
    return [n for n, _ in swapped]


def _move_except(module: nn.Module, device: torch.device, skip: set[int]) -> None:
    if id(module) in skip:
        return
    for child in module.children():
        _move_except(child, device, skip)
    for name, p in module.named_parameters(recurse=False):
        if p.device != device:
            p.data = p.data.to(device)
            if p.grad is not None:
                p.grad = p.grad.to(device)
    for name, b in module.named_buffers(recurse=False):
        if b is not None and b.device != device:
            module._buffers[name] = b.to(device)


def swapped_block_names(transformer: nn.Module) -> list[str]:
    """Names of the blocks that carry a group-offloading hook (block swap)."""
    out = []
    for name, block in transformer_blocks(transformer):
        registry = getattr(block, "_diffusers_hook", None)
        if registry is not None and registry.get_hook("group_offloading") is not None:
            out.append(name)
    return out


def frozen_names(module: nn.Module) -> list[str]:
    """Names of ``module``'s frozen parameters and of all its buffers (DDP is told to ignore
    them: they never change, fp8 ones cannot be broadcast by every backend, and swapped ones are
    not on the training device)."""
    names = [n for n, p in module.named_parameters() if not p.requires_grad]
    return names + [n for n, _ in module.named_buffers()]


def storage_bytes(tensors: Iterable[torch.Tensor]) -> dict[torch.dtype, int]:
    """Bytes per dtype of ``tensors`` as stored (each storage counted once)."""
    seen: set[int] = set()
    out: dict[torch.dtype, int] = {}
    for t in tensors:
        key = id(t)
        if key in seen:
            continue
        seen.add(key)
        out[t.dtype] = out.get(t.dtype, 0) + t.numel() * t.element_size()
    return out


# ------------------------------------------------------------------------------------------
# What a run used (logged per log step and at the end)
# ------------------------------------------------------------------------------------------

GIB = 2**30


@dataclass(frozen=True)
class PeakMemory:
    """The peaks since the run started on a CUDA device (bytes; torch's max_memory_*)."""

    allocated: int
    reserved: int

    def __str__(self) -> str:
        return (f"peak GPU memory {self.allocated / GIB:.2f} GiB allocated, {self.reserved / GIB:.2f} GiB reserved "
                f"(reserved/allocated {self.reserved / max(self.allocated, 1):.2f})")


def peak_memory(device: torch.device) -> PeakMemory | None:
    """The peak allocated and reserved memory of ``device`` so far; None off CUDA (nothing is reserved there)."""
    if torch.device(device).type != "cuda":
        return None
    return PeakMemory(torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device))


def describe_peak_memory(device: torch.device) -> str:
    """The sentence the trainer logs: both peaks on CUDA, "none" elsewhere."""
    peak = peak_memory(device)
    return str(peak) if peak is not None else f"peak GPU memory: none (this run trains on {torch.device(device).type})"
