"""fp8 that computes in fp8: the mechanics of the ``fp8_e4m3fn_fast`` storage row.

Layerwise casting (the ``fp8`` row) halves the bytes but upcasts every weight to bf16 before
each matmul: on an H200 a forward took 1.12x as long as bf16. On GPUs with fp8 tensor cores
(compute capability 8.9 and newer: Ada, Hopper, Blackwell) this row runs each linear layer as
one scaled fp8 matmul, ``torch._scaled_mm``, the kernel that ComfyUI's ``fp8_e4m3fn_fast`` and
torchao's float8 training call. It is PyTorch's own kernel, not one written here:

- the weight is float8 e4m3fn with one fp32 scale per tensor (``w ~ w_fp8 * scale``). A
  scaled-fp8 single file (ours from ``gie-convert --format fp8_scaled``, or ComfyUI's with a
  ``scaled_fp8`` marker and ``<layer>.scale_weight`` / ``.weight_scale``) keeps its stored scale.
  The loaders upcast such a file and :func:`prepare_fp8_compute` divides by that same scale
  again, so the stored fp8 values come back bit for bit (the test checks this). Other sources
  get ``scale = amax(|w|) / 448``;
- the input gets a dynamic per-tensor scale (``amax(|x|) / 448``) and is clamped to e4m3's
  range before it is cast;
- the bias is added by the kernel, and the output is in the input's dtype;
- the backward pass (LoRA or connector gradients flowing through a frozen fp8 base) multiplies
  by the upcast weight: gradients stay in bf16.

Where ``_scaled_mm`` cannot run (the CPU, older GPUs, widths that are not multiples of 16), a
layer upcasts its weight per call, as layerwise casting does, and
:func:`fp8_compute_unavailable` gives the note that says why. The precision-critical layers of
:data:`gie_core.weights.quantize.FP8_KEEP` stay in the compute dtype, as under ``fp8``.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from gie_core.weights.quantize import FP8_KEEP

logger = logging.getLogger(__name__)

__all__ = [
    "FP8",
    "FP8_MAX",
    "MIN_CAPABILITY",
    "Fp8Linear",
    "fp8_compute_converters",
    "fp8_compute_unavailable",
    "fp8_linear",
    "prepare_fp8_compute",
    "quantize_per_tensor",
    "set_fp8_matmul",
]

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
MIN_CAPABILITY = (8, 9)  # fp8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.x, 12.x)
MATMUL_MODES = ("auto", "scaled_mm", "cast")  # auto: scaled_mm where it can run, else cast


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def fp8_compute_unavailable(device: torch.device | str | None) -> str | None:
    """Why fp8 matmuls cannot run on ``device`` (None when they can): then each layer is upcast
    per call instead (the layerwise-casting path)."""
    dev = torch.device(device if device is not None else "cpu")
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no _scaled_mm"
    if dev.type != "cuda":
        return (f"fp8 matmuls run on CUDA GPUs of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer; "
                f"on {dev.type} each fp8 layer is upcast while it runs, as 'fp8' storage does")
    cap = _capability(dev.index if dev.index is not None else torch.cuda.current_device())
    if cap < MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name(dev)} has compute capability {cap[0]}.{cap[1]}; fp8 matmuls need "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ada, Hopper, Blackwell), so each fp8 layer is "
                "upcast while it runs, as 'fp8' storage does")
    return None


# Elements of a weight quantised per step, through one fp32 buffer: the working memory stays at
# 4 MB (a whole 12B-model projection in fp32 would be ~190 MB on top of its weights).
QUANTIZE_CHUNK_ELEMENTS = 2**20


def quantize_per_tensor(weight: torch.Tensor, scale: torch.Tensor | float | None = None, *,
                        release: Callable[[torch.Tensor], object] | None = None,
                        work: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_fp8, scale)`` with ``w ~ w_fp8 * scale``; ``scale`` None: ``amax(|w|) / 448``. The
    scale is an fp32 scalar tensor on the weight's device. Computed in chunks of rows
    (``(w / scale).clamp(-448, 448)`` in fp32, then float8), never a whole fp32 copy;
    ``release(chunk)`` is called on each chunk of ``weight`` once it is read (a loader drops a
    mapped file's pages there: :meth:`gie_core.weights.reader.CheckpointReader.release_view`).
    ``work``: an fp32 buffer of ``QUANTIZE_CHUNK_ELEMENTS`` on the weight's device to compute in
    (a loader quantising layer after layer reuses one: a new 4 MB buffer per layer, freed between
    the kept fp8 weights, would leave holes in the heap)."""
    w = weight.detach()
    rows = w.reshape(w.shape[0], -1) if w.ndim > 1 else w.reshape(-1, 1)
    step = max(1, QUANTIZE_CHUNK_ELEMENTS // max(1, rows.shape[1]))
    release = release or (lambda chunk: None)
    need = min(step, rows.shape[0]) * rows.shape[1]
    if work is None or work.numel() < need or work.device != w.device:
        work = torch.empty(need, dtype=torch.float32, device=w.device)
    work = work.view(-1)[:need].view(-1, rows.shape[1])
    if scale is None:
        amax = torch.zeros((), dtype=torch.float32, device=w.device)
        for i in range(0, rows.shape[0], step):  # |w| in the fp32 buffer (exact): no temporary per chunk
            chunk = work[:min(step, rows.shape[0] - i)]
            amax = torch.maximum(amax, chunk.copy_(rows[i:i + step]).abs_().amax())
            release(rows[i:i + step])
        scale = (amax / FP8_MAX).clamp(min=1e-12)
    scale = torch.as_tensor(scale, dtype=torch.float32, device=w.device).reshape(())
    out = torch.empty(rows.shape, dtype=FP8, device=w.device)
    for i in range(0, rows.shape[0], step):
        chunk = work[:min(step, rows.shape[0] - i)]  # one fp32 buffer for every chunk
        chunk.copy_(rows[i:i + step]).div_(scale).clamp_(-FP8_MAX, FP8_MAX)
        out[i:i + step].copy_(chunk)
        release(rows[i:i + step])
    return out.reshape(w.shape), scale


def _quantize_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A dynamic per-tensor scale for activations ``x`` [M, K], clamped to e4m3's range."""
    scale = (x.detach().abs().amax().float() / FP8_MAX).clamp(min=1e-12)
    return (x * (1.0 / scale).to(x.dtype)).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


@functools.lru_cache(maxsize=None)
def _note_once(why: str) -> None:
    """Log each reason fp8 compute falls back to upcasting once per process."""
    logger.warning("fp8_e4m3fn_fast: %s", why)


class _ScaledMatmul(torch.autograd.Function):
    """``x @ (w_fp8 * scale).T + bias`` as one fp8 matmul; the backward to ``x`` (and the bias)
    in ``x``'s dtype with the upcast weight (the fp8 weight itself is frozen)."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias):  # x [M, K], weight [N, K] fp8, scale fp32 []
        x_fp8, x_scale = _quantize_input(x)
        out = torch._scaled_mm(x_fp8, weight.t(), scale_a=x_scale, scale_b=scale,
                               bias=bias.to(x.dtype) if bias is not None else None, out_dtype=x.dtype)
        ctx.save_for_backward(weight, scale)
        ctx.dtype, ctx.has_bias = x.dtype, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):  # grad [M, N]
        weight, scale = ctx.saved_tensors
        grad_x = grad.to(ctx.dtype) @ (weight.to(ctx.dtype) * scale.to(ctx.dtype)) if ctx.needs_input_grad[0] else None
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_b


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight * scale, bias)`` computed as a scaled fp8 matmul (any leading dims)."""
    lead = x.shape[:-1]
    out = _ScaledMatmul.apply(x.reshape(-1, x.shape[-1]), weight, scale, bias)
    return out.reshape(*lead, weight.shape[0])


class Fp8Linear(nn.Linear):
    """A frozen linear layer stored in float8 e4m3fn with a per-tensor scale, computing as a
    scaled fp8 matmul where the device can (:func:`fp8_compute_unavailable`), else upcasting
    its weight per call. A subclass of ``nn.Linear``, so peft's LoRA wraps it as any linear."""

    matmul: str = "auto"  # one of MATMUL_MODES (set_fp8_matmul changes it per model)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype,
                    scale: torch.Tensor | float | None = None) -> Fp8Linear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        weight, scale = quantize_per_tensor(linear.weight, scale)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
        layer.register_buffer("weight_scale", scale)
        layer.compute_dtype = compute_dtype
        return layer

    def _use_scaled_mm(self, x: torch.Tensor) -> bool:
        if self.matmul != "auto":
            return self.matmul == "scaled_mm"
        why = fp8_compute_unavailable(x.device)
        if why is None and x.dtype not in (torch.bfloat16, torch.float16):
            why = f"fp8 matmuls here compute in bf16 or fp16, and this run computes in {str(x.dtype).replace('torch.', '')}"
        if why is None and (self.in_features % 16 or self.out_features % 16):
            why = f"a {self.in_features}->{self.out_features} layer is not a multiple of 16 wide, as fp8 matmuls need"
        if why is not None:
            _note_once(why)
        return why is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_scaled_mm(x):
            return fp8_linear(x, self.weight, self.weight_scale, self.bias)
        weight = self.weight.to(x.dtype) * self.weight_scale.to(x.dtype)  # the layerwise-casting path
        return F.linear(x, weight, self.bias.to(x.dtype) if self.bias is not None else None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8_e4m3fn x per-tensor scale"


def prepare_fp8_compute(model: nn.Module, compute_dtype: torch.dtype, part: str = "transformer",
                        scales: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """Replace ``model``'s linear layers by :class:`Fp8Linear` (the layers of ``FP8_KEEP[part]``
    stay in ``compute_dtype``). ``scales``: ``{layer name: per-tensor scale}`` stored with the
    weights (:func:`gie_core.weights.single_file.stored_weight_scales`), so a scaled-fp8 file's values come back as stored.

    On a loaded model each layer is quantised in turn. On a model built on the meta device (for
    streaming) the layers are only replaced: :func:`fp8_compute_converters` then gives the
    loader what turns each weight into fp8 and its scale as it is read, so the model is never
    held in ``compute_dtype``. Returns ``model``."""
    if compute_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError("the compute dtype of fp8 compute must be bf16, fp16 or fp32")
    keep = [re.compile(p) for p in FP8_KEEP[part]]
    scales = scales or {}
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and not any(p.search(name) for p in keep)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8Linear.from_linear(linear, compute_dtype, scales.get(name)))
    model._gie_quantization = "fp8_e4m3fn_fast"
    model._gie_compute_dtype = compute_dtype
    return model


def fp8_compute_converters(model: nn.Module, scales: Mapping[str, torch.Tensor] | None = None
                           ) -> dict[str, Callable[[torch.Tensor], list[tuple[str, torch.Tensor]]]]:
    """For a model prepared by :func:`prepare_fp8_compute` on the meta device: ``{weight name:
    convert}``, where ``convert(weight, release=None)`` (the weight as read, in the compute dtype;
    ``release(chunk)`` after each chunk is read, see :func:`quantize_per_tensor`) gives the
    layer's float8 weight and its scale (``scales``: the stored ones, as given to
    ``prepare_fp8_compute``), the same values as quantising a loaded model. For
    :func:`gie_core.weights.reader.assign_weights` (``convert=``)."""
    scales = scales or {}
    out = {}
    work: dict[torch.device, torch.Tensor] = {}  # one fp32 buffer per device for every layer

    for name, module in model.named_modules():
        if isinstance(module, Fp8Linear):
            prefix = f"{name}." if name else ""

            def convert(weight: torch.Tensor, release: Callable[[torch.Tensor], object] | None = None, prefix=prefix,
                        scale=scales.get(name)) -> list[tuple[str, torch.Tensor]]:
                if weight.device not in work:
                    work[weight.device] = torch.empty(QUANTIZE_CHUNK_ELEMENTS, dtype=torch.float32, device=weight.device)
                fp8, s = quantize_per_tensor(weight, scale, release=release, work=work[weight.device])
                return [(f"{prefix}weight", fp8), (f"{prefix}weight_scale", s)]

            out[f"{prefix}weight"] = convert
    return out


def set_fp8_matmul(model: nn.Module, mode: str) -> int:
    """Force how ``model``'s fp8 layers multiply: "scaled_mm", "cast" (upcast per call) or
    "auto" (the default). Returns how many layers it set (benchmarks and tests compare both)."""
    if mode not in MATMUL_MODES:
        raise ValueError(f"fp8 matmul mode '{mode}' is unknown; expected one of {', '.join(MATMUL_MODES)}")
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    for layer in layers:
        layer.matmul = mode
    return len(layers)
