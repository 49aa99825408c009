"""Faster sampling from the field's libraries: step caching, attention backends, regional compile.

- **Step caching** (:data:`CACHE_TABLE`): diffusers' cache hooks skip work in steps whose
  result barely changes. One name and one value per method (``magcache:0.06``), off by default.
  Each row names its diffusers config, its value (a threshold or an interval), the value's
  default (diffusers' own) and range. The sampler wraps every transformer call in
  ``transformer.cache_context(...)`` (the hooks need it; diffusers' FluxKontextPipeline opens
  none).
- **Attention backends** (:data:`ATTENTION_TABLE`): diffusers' attention dispatcher; ``sdpa``
  (PyTorch's scaled-dot-product attention) by default, flash / sage / cuDNN / xformers when
  installed and on a CUDA device.
- **Regional compile**: ``torch.compile`` of the repeated transformer blocks
  (diffusers' ``compile_repeated_blocks``), compiled once per loaded transformer.

A choice this machine cannot run (a backend not installed, compile without a compiler, a cache
method this diffusers lacks) is never an error: :meth:`Acceleration.effective` returns the
default in its place and a note saying why, which the CLI prints and the library logs. A name
or value that does not exist *is* an error (``ValueError``), raised before any weight loads.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from gie_core.checks import check_float, check_int

logger = logging.getLogger(__name__)

__all__ = [
    "ATTENTION_BACKENDS",
    "ATTENTION_TABLE",
    "CACHE_METHODS",
    "CACHE_TABLE",
    "DEFAULT_ATTENTION",
    "NO_CACHE",
    "Acceleration",
    "AttentionBackend",
    "CacheMethod",
    "StepCache",
    "accelerated",
    "cache_choice",
    "parse_cache",
    "resolve_acceleration",
]

NO_CACHE = "none"
DEFAULT_ATTENTION = "sdpa"


# --------------------------------------------------------------------------------------------
# Step caching
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheMethod:
    """One step-caching method of diffusers and the single value we expose for it."""

    name: str
    title: str
    config: str  # the diffusers.hooks config class
    value_name: str  # what the value means
    value_field: str  # the config field it sets
    default: float  # diffusers' default for that field
    low: float
    high: float
    integer: bool
    help: str
    min_psnr_db: float = 30.0  # the bound its output keeps from the uncached one at the default (tested)


CACHE_TABLE: tuple[CacheMethod, ...] = (
    CacheMethod("fbcache", "First-Block Cache", "FirstBlockCacheConfig", "threshold", "threshold", 0.05, 0, 1, False,
                "skip the remaining blocks when the first block's residual changed less than THRESHOLD (relative)"),
    CacheMethod("magcache", "MagCache", "MagCacheConfig", "threshold", "threshold", 0.06, 0, 1, False,
                "skip whole steps while the accumulated residual-magnitude error (FLUX's calibrated ratios) stays under THRESHOLD"),
    CacheMethod("taylorseer", "TaylorSeer", "TaylorSeerCacheConfig", "interval", "cache_interval", 5, 1, 50, True,
                "compute attention every INTERVAL steps and predict it in between with a Taylor series"),
    CacheMethod("fastercache", "FasterCache", "FasterCacheConfig", "interval", "spatial_attention_block_skip_range", 2, 2, 50, True,
                "reuse each attention output for INTERVAL-1 steps (guidance-distilled mode)"),
)
_CACHE_BY_NAME = {m.name: m for m in CACHE_TABLE}
CACHE_METHODS: tuple[str, ...] = tuple(_CACHE_BY_NAME)


def cache_method(name: str) -> CacheMethod:
    try:
        return _CACHE_BY_NAME[name]
    except KeyError:
        raise ValueError(f"cache method '{name}' is unknown; expected {NO_CACHE} or one of {', '.join(CACHE_METHODS)}") from None


@dataclass(frozen=True)
class StepCache:
    """A checked step-cache choice: the method and its value."""

    method: str
    value: float

    @property
    def row(self) -> CacheMethod:
        return _CACHE_BY_NAME[self.method]

    def __str__(self) -> str:
        v = int(self.value) if self.row.integer else f"{self.value:g}"
        return f"{self.method}:{v}"


def check_cache(method: str, value: float | None = None) -> StepCache:
    """``method`` and ``value`` (None: the method's default) as a :class:`StepCache`, or
    ``ValueError`` naming what is wrong."""
    row = cache_method(method)
    if value is None:
        value = row.default
    what = f"{row.name} {row.value_name}"
    if row.integer:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        value = check_int(what, value, int(row.low), int(row.high))
    else:
        value = check_float(what, value, row.low, row.high)
    return StepCache(row.name, float(value))


def parse_cache(spec) -> StepCache | None:
    """``None`` / "" / "none" -> no cache; "NAME" -> the method at its default; "NAME:VALUE";
    a :class:`StepCache` as it is. ``ValueError`` for an unknown name or a bad value."""
    if spec is None or isinstance(spec, StepCache):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"cache is {spec!r} but must be a string such as 'magcache' or 'magcache:0.1'")
    text = spec.strip().lower()
    if text in ("", NO_CACHE):
        return None
    name, sep, raw = text.partition(":")
    if not sep:
        return check_cache(name)
    try:
        value = float(raw)
    except ValueError:
        row = cache_method(name)
        raise ValueError(f"cache '{spec}': {row.value_name} '{raw}' is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"cache '{spec}': {cache_method(name).value_name} must be a finite number")
    return check_cache(name, value)


def cache_choice(method: str | None, value: float | None = None) -> StepCache | None:
    """A cache from a method name and a value given apart (a node's two widgets): "none" / None
    -> no cache; ``value`` None or 0 -> the method's default."""
    if method in (None, "", NO_CACHE):
        return None
    return check_cache(method, None if value in (None, 0) else value)


def _diffusers_version() -> str:
    """The installed diffusers' version, read from its package metadata (no import)."""
    return importlib.metadata.version("diffusers")


def cache_unavailable(method: str) -> str | None:
    """Why the installed diffusers cannot run ``method`` (None when it can)."""
    row = cache_method(method)
    try:
        hooks = importlib.import_module("diffusers.hooks")
    except ImportError as exc:  # pragma: no cover - diffusers is a dependency
        return f"diffusers' hooks do not import ({exc})"
    if not hasattr(hooks, row.config):
        return f"{row.title} is not in diffusers {_diffusers_version()} (no diffusers.hooks.{row.config})"
    return None


def _cache_config(cache: StepCache, steps: int, current_timestep: Callable[[], float], dtype: torch.dtype):
    """The diffusers config object of one run."""
    hooks = importlib.import_module("diffusers.hooks")
    row = cache.row
    value = int(cache.value) if row.integer else float(cache.value)
    cls = getattr(hooks, row.config)
    if row.name == "fbcache":
        return cls(threshold=value)
    if row.name == "magcache":
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS  # start-up: diffusers (~3 s)

        # FLUX's calibrated ratios (28 steps), resampled by diffusers to this run's step count
        return cls(threshold=value, num_inference_steps=steps, mag_ratios=FLUX_MAG_RATIOS)
    if row.name == "taylorseer":
        return cls(cache_interval=value, taylor_factors_dtype=dtype)
    if row.name == "fastercache":
        return cls(spatial_attention_block_skip_range=value, is_guidance_distilled=True,
                   current_timestep_callback=current_timestep, attention_weight_callback=lambda _module: 0.5,
                   tensor_format="BCHW")
    raise AssertionError(row.name)


# --------------------------------------------------------------------------------------------
# Attention backends
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionBackend:
    """One attention backend of diffusers' dispatcher, under our name."""

    name: str
    backend: str  # diffusers' AttentionBackendName value
    needs_cuda: bool
    package: str  # what to install ("" = part of torch)
    help: str
    module: str = ""  # the module it installs, when not the package's name with "_" for "-"

    @property
    def import_name(self) -> str:
        return self.module or self.package.replace("-", "_")


ATTENTION_TABLE: tuple[AttentionBackend, ...] = (
    AttentionBackend("sdpa", "native", False, "", "PyTorch scaled-dot-product attention (default; picks flash/efficient kernels itself)"),
    AttentionBackend("flash", "flash", True, "flash-attn", "FlashAttention 2 (pip install flash-attn)"),
    AttentionBackend("flash3", "_flash_3", True, "flash-attn-3", "FlashAttention 3, Hopper GPUs (flash_attn_interface)",
                     "flash_attn_interface"),
    AttentionBackend("sage", "sage", True, "sageattention", "SageAttention, 8-bit attention (pip install sageattention)"),
    AttentionBackend("cudnn", "_native_cudnn", True, "", "PyTorch's cuDNN attention kernel"),
    AttentionBackend("xformers", "xformers", True, "xformers", "xFormers memory-efficient attention"),
)
_ATTENTION_BY_NAME = {a.name: a for a in ATTENTION_TABLE}
ATTENTION_BACKENDS: tuple[str, ...] = tuple(_ATTENTION_BY_NAME)


def attention_backend(name: str) -> AttentionBackend:
    try:
        return _ATTENTION_BY_NAME[name]
    except KeyError:
        raise ValueError(f"attention backend '{name}' is unknown; expected one of {', '.join(ATTENTION_BACKENDS)}") from None


def attention_unavailable(name: str, device: torch.device | str | None) -> str | None:
    """Why ``name`` cannot run here on ``device`` (None when it can)."""
    row = attention_backend(name)
    if row.name == DEFAULT_ATTENTION:
        return None
    try:
        dispatch = importlib.import_module("diffusers.models.attention_dispatch")
        backend = dispatch.AttentionBackendName(row.backend)
    except (ImportError, ValueError):
        return f"diffusers {_diffusers_version()} has no '{row.backend}' attention backend"
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if row.needs_cuda and dev.type != "cuda":
        return f"it runs on CUDA GPUs and this run is on {dev.type}"
    try:
        dispatch._check_attention_backend_requirements(backend)
    except (RuntimeError, ImportError) as exc:
        if row.package and importlib.util.find_spec(row.import_name) is not None:
            # installed, yet diffusers could not import it: usually a wheel built for another torch / CUDA
            return (f"{row.package} is installed but does not import with torch {torch.__version__} (a wheel built "
                    f"for another torch or CUDA?); install one built for this torch")
        return str(exc).rstrip(".")
    return None


# --------------------------------------------------------------------------------------------
# Regional compile
# --------------------------------------------------------------------------------------------


def compile_unavailable(device: torch.device | str | None, transformer=None) -> str | None:
    """Why ``torch.compile`` of the transformer blocks cannot run here (None when it can)."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if transformer is not None and not hasattr(transformer, "compile_repeated_blocks"):
        return "this diffusers has no regional compilation (compile_repeated_blocks)"
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "torch.compile on CUDA needs triton, which is not installed"
    elif dev.type == "cpu":
        if not any(shutil.which(cc) for cc in ("c++", "g++", "clang++", "cl")):
            return "torch.compile on the CPU needs a C++ compiler (none found on PATH)"
    else:
        return f"torch.compile is not supported here on {dev.type}"
    return None


# --------------------------------------------------------------------------------------------
# The choices of one run
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Acceleration:
    """The speed choices of a run: a step cache (None = off), an attention backend and whether
    the transformer blocks are compiled. ``notes``: why a choice fell back to the default."""

    cache: StepCache | None = None
    attention: str = DEFAULT_ATTENTION
    compile: bool = False
    notes: tuple[str, ...] = field(default=(), compare=False)

    def effective(self, device: torch.device | str | None, transformer=None, *, log: bool = True) -> Acceleration:
        """The choices this machine can run on ``device``: each one it cannot is replaced by
        its default, with a note saying why (also logged as a warning unless ``log`` is off,
        for callers that show the notes themselves)."""
        notes = list(self.notes)
        cache, attention, compile_ = self.cache, self.attention, self.compile
        if cache is not None:
            why = cache_unavailable(cache.method)
            if why:
                notes.append(f"step cache '{cache}' is not available ({why}); sampling without a cache")
                cache = None
        why = attention_unavailable(attention, device)
        if why:
            notes.append(f"attention backend '{attention}' is not available ({why}); using {DEFAULT_ATTENTION}")
            attention = DEFAULT_ATTENTION
        if compile_:
            why = compile_unavailable(device, transformer)
            if why:
                notes.append(f"compile is not available ({why}); running uncompiled")
                compile_ = False
        for note in notes[len(self.notes):] if log else ():
            logger.warning(note)
        return Acceleration(cache, attention, compile_, tuple(notes))


def resolve_acceleration(cache=None, attention: str | None = DEFAULT_ATTENTION, compile: bool = False) -> Acceleration:
    """Check the speed choices (names, values), with no model and no device needed. Raises
    ``ValueError`` for an unknown cache method, attention backend or a value out of range."""
    step_cache = parse_cache(cache)
    attention = DEFAULT_ATTENTION if attention in (None, "") else str(attention).strip().lower()
    attention_backend(attention)
    if not isinstance(compile, bool):
        raise ValueError(f"compile is {compile!r} but must be true or false")
    return Acceleration(step_cache, attention, compile)


# --------------------------------------------------------------------------------------------
# Applying them around the step loop
# --------------------------------------------------------------------------------------------

_CACHE_KEY = "_gie_cache_key"
_COMPILED = "_gie_compiled_blocks"


def _set_compiled(transformer, on: bool) -> None:
    """Compile the repeated blocks once (kept for later runs: compiling is the slow part), or
    put the eager blocks back."""
    compiled = getattr(transformer, _COMPILED, False)
    if on and not compiled:
        transformer.compile_repeated_blocks(fullgraph=False)
        setattr(transformer, _COMPILED, True)
    elif not on and compiled:
        for block in transformer.modules():
            if block.__class__.__name__ in getattr(transformer, "_repeated_blocks", ()):
                block._compiled_call_impl = None
        setattr(transformer, _COMPILED, False)


def _set_cache(transformer, cache: StepCache | None, steps: int, timestep_fn, dtype) -> bool:
    """Enable ``cache`` on the transformer for this run; hooks left by an earlier compiled run
    with the same settings are reused (their state reset), so compiled blocks are not traced
    again. Returns whether a cache is on."""
    if not hasattr(transformer, "enable_cache"):
        return False
    key = (str(cache), steps, str(dtype)) if cache is not None else None
    ours = getattr(transformer, _CACHE_KEY, None)
    if getattr(transformer, "is_cache_enabled", False) and ours is None:
        if cache is not None:
            raise ValueError("the transformer already has a step cache enabled by its owner; disable it first")
        return False  # the caller's own cache: leave it alone
    if ours is not None and ours != key:
        transformer.disable_cache()
        setattr(transformer, _CACHE_KEY, None)
        ours = None
    if cache is None:
        return False
    if ours is None:
        transformer.enable_cache(_cache_config(cache, steps, timestep_fn, dtype))
        setattr(transformer, _CACHE_KEY, key)
    else:
        transformer._reset_stateful_cache()
    return True


class AcceleratedRun:
    """What :func:`accelerated` yields: wrap each transformer call in :meth:`call`."""

    def __init__(self, transformer, caching: bool, steps: int):
        self.transformer = transformer
        self.caching = caching
        self.steps = steps
        self.timestep = 1000.0
        self._context_fields = set()
        if caching:
            try:
                from diffusers.hooks.hooks import CacheContext  # start-up: diffusers (~3 s); also the probe (older diffusers lack it)

                self._context_fields = set(inspect.signature(CacheContext).parameters)
            except (ImportError, TypeError, ValueError):
                self._context_fields = set()

    def call(self, name: str, step_index: int, timestep: torch.Tensor):
        """The context of one transformer call (``name`` "cond" or "uncond")."""
        if not self.caching:
            return contextlib.nullcontext()  # nothing read from the device: no sync per step
        self.timestep = float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep)
        info = {"step_index": step_index, "num_inference_steps": self.steps, "timestep": self.timestep,
                "sigma": self.timestep / 1000.0}
        return self.transformer.cache_context(name, **{k: v for k, v in info.items() if k in self._context_fields})


@contextlib.contextmanager
def accelerated(transformer, acceleration: Acceleration | None, *, steps: int, device=None) -> Iterator[AcceleratedRun]:
    """Apply ``acceleration`` to ``transformer`` for one sampling run of ``steps`` steps: compile
    the blocks (once), enable the step cache, run under the attention backend. Choices the
    machine cannot run fall back to the defaults (see :meth:`Acceleration.effective`)."""
    acc = (acceleration or Acceleration()).effective(device, transformer)
    dtype = next(transformer.parameters()).dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        dtype = torch.bfloat16  # fp8 / quantised storage computes in bf16
    if acc.compile or getattr(transformer, _COMPILED, False):
        _set_compiled(transformer, acc.compile)
    run = None

    def current_timestep() -> float:
        return run.timestep if run is not None else 1000.0

    caching = _set_cache(transformer, acc.cache, steps, current_timestep, dtype)
    run = AcceleratedRun(transformer, caching, steps)
    if acc.attention != DEFAULT_ATTENTION:
        from diffusers.models.attention_dispatch import attention_backend as use_backend  # start-up: diffusers (~3 s)

        backend = use_backend(attention_backend(acc.attention).backend)
    else:
        backend = contextlib.nullcontext()
    try:
        with backend:
            yield run
    finally:
        if caching and getattr(transformer, _COMPILED, False):
            transformer._reset_stateful_cache()  # hooks kept for the next compiled run, no activations
        elif caching:
            transformer.disable_cache()  # the transformer is left as it was found
            setattr(transformer, _CACHE_KEY, None)
