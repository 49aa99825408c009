"""Trainer options: dataclass sections, YAML/TOML config files and command-line overrides.

A run is configured by defaults, then a config file (``training/stage1.yaml``; YAML or TOML),
then the command line, later winning. Every option has a dotted name (``optim.lr``) usable as
``--optim.lr 1e-4`` (or ``--train.max-steps`` with dashes) or ``--set optim.lr=1e-4``. There
are no short or abbreviated flags: ``--steps`` could mean ``validation.steps`` or
``train.max_steps``, so it is refused, naming both. An unknown key, in a file or on the command
line, fails at start with its name and the nearest known ones.

``auto`` values are resolved per stage (stage 1: connector only, AdamW lr 1e-3; stage 2:
image-branch attention + connector, lr 1e-6, gradient checkpointing).

The names an option may take live in one table each, read by the trainer, the command line and
``gie-train plan``: :data:`OPTIMIZER_TABLE` (optimizers: package, default learning rates, state
size, how to build one) and :data:`STORAGE_DTYPE_TABLE` (how frozen weights are stored).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import importlib.util
import math
import os
import re
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from gie_core.checks import import_problem
from gie_core.constants import (
    DEFAULT_GUIDANCE,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    DTYPE_NAMES,
    GUIDANCE_RANGE,
    LOAD_DEFAULTS,
    METAQUERY_TOKENS,
    MIXED_PRECISION_DTYPES,
    SEED_RANGE,
    SIZE_MULTIPLE,
    STEPS_RANGE,
)
from gie_core.engine.modes import FUSION_MODE_TABLE, TRAINABLE_MODES, fusion_mode
from gie_core.files import read_text


class ConfigError(ValueError):
    """A config file or command-line option is unknown, malformed or inconsistent."""


def _opt(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


STAGES = (1, 2)
TRAINABLE_SETS = ("connector", "image_attention", "full", "lora")
MIXED_PRECISION = tuple(MIXED_PRECISION_DTYPES)
BUCKETING = ("ratio", "square")
REGION_WEIGHTING = ("auto", "on", "off")
WEIGHT_SCHEMES = ("log", "exp")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


# ------------------------------------------------------------------------------------------
# Optimizers: one row each (the trainer builds them from here; gie-train plan sizes their state)
# ------------------------------------------------------------------------------------------


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def _adamw_state(shape: tuple[int, ...]) -> int:
    return 2 * 4 * _numel(shape)  # exp_avg, exp_avg_sq in fp32


BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit state for smaller tensors (its min_8bit_size)
BNB_BLOCKSIZE = 256  # bitsandbytes' blockwise quantisation: one fp32 absmax per block, per state


def _adamw8bit_state(shape: tuple[int, ...]) -> int:
    n = _numel(shape)
    if n < BNB_MIN_8BIT_SIZE:
        return _adamw_state(shape)
    return 2 * (n + 4 * math.ceil(n / BNB_BLOCKSIZE)) + 2 * 256 * 4  # two uint8 states + absmax + two qmaps


def _adafactor_state(shape: tuple[int, ...]) -> int:
    if len(shape) >= 2:  # factored second moment: a row and a column vector
        return 4 * (_numel(shape[:-1]) + _numel(shape[:-2] + shape[-1:])) + 4
    return 4 * _numel(shape) + 4  # exp_avg_sq (no first moment: beta1 None) + RMS


def _prodigy_state(shape: tuple[int, ...]) -> int:
    return 4 * 4 * _numel(shape)  # exp_avg, exp_avg_sq, s, p0 in fp32


def _build_adamw(params, cfg: TrainConfig, **_):
    import torch  # start-up: gie-train --help and config checks run without loading torch

    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                             weight_decay=cfg.optim.weight_decay)


def _build_adamw8bit(params, cfg: TrainConfig, **_):
    import bitsandbytes as bnb  # optional: bitsandbytes (the bnb extra)

    return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                               weight_decay=cfg.optim.weight_decay, min_8bit_size=BNB_MIN_8BIT_SIZE)


def _build_adafactor(params, cfg: TrainConfig, **_):
    from transformers.optimization import Adafactor  # start-up: only a run with this optimizer needs it

    # a fixed learning rate (the schedule is optim.lr_scheduler's), no first moment (the memory saving)
    return Adafactor(params, lr=cfg.learning_rate, scale_parameter=False, relative_step=False, warmup_init=False,
                     beta1=None, weight_decay=cfg.optim.weight_decay)


def _build_prodigy(params, cfg: TrainConfig, sharded: bool = False, **_):
    from prodigyopt import Prodigy  # start-up: only a run with this optimizer needs it

    return Prodigy(params, lr=cfg.learning_rate, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay,
                   eps=cfg.optim.eps, fsdp_in_use=sharded)


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer ``optim.optimizer`` may name."""

    name: str
    package: str | None  # the module that must be importable (None: torch itself)
    install: str  # how to get it, for the error when it is missing
    lr: tuple[float, float]  # default learning rate in stage 1, stage 2
    state_bytes: Callable[[tuple[int, ...]], int]  # optimizer state of one trained tensor of this shape
    step_bytes_per_param: int  # transient bytes per trained parameter during step() (torch's foreach AdamW: a sqrt copy)
    build: Callable  # (params, cfg, sharded=False) -> torch.optim.Optimizer
    help: str

    @property
    def installed(self) -> bool:
        """Whether its package can be imported here (only a training run needs it; ``gie-train
        plan`` suggests only installed ones)."""
        return self.package is None or importlib.util.find_spec(self.package) is not None

    @property
    def missing(self) -> str:
        """Why it cannot run here ("" when it can)."""
        return "" if self.installed else f"{self.package} is not installed ({self.install})"

    def import_problem(self) -> str:
        """Why its installed package does not import ("" when it does): a wheel built for another
        torch or CUDA fails here, so a run says so before any weight is read instead of failing
        when the optimizer is built."""
        if self.package is None or not self.installed:
            return self.missing
        problem = import_problem(self.package, self.install)
        return f"{problem}, or use the default optimizer adamw" if problem else ""


OPTIMIZER_TABLE: dict[str, OptimizerSpec] = {
    o.name: o
    for o in (
        OptimizerSpec("adamw", None, "", (1e-3, 1e-6), _adamw_state, 4, _build_adamw,
                      "torch AdamW, fp32 state (8 bytes per trained parameter): the released config"),
        OptimizerSpec("adamw8bit", "bitsandbytes", "pip install 'gpt-image-edit-nodes[bnb]' (bitsandbytes)", (1e-3, 1e-6),
                      _adamw8bit_state, 0, _build_adamw8bit,
                      "bitsandbytes AdamW8bit, blockwise 8-bit state (about 2 bytes per trained parameter)"),
        OptimizerSpec("adafactor", "transformers", "pip install transformers", (1e-3, 1e-6), _adafactor_state, 0,
                      _build_adafactor,
                      "transformers Adafactor with a fixed learning rate and no first moment (factored state, a few bytes per row)"),
        OptimizerSpec("prodigy", "prodigyopt", "pip install prodigyopt", (1.0, 1.0), _prodigy_state, 4, _build_prodigy,
                      "prodigyopt Prodigy, learning rate found on the fly (lr 1.0; 16 bytes per trained parameter): the paper's stage 1"),
    )
}
OPTIMIZERS = tuple(OPTIMIZER_TABLE)


def optimizer_spec(name: str) -> OptimizerSpec:
    if name not in OPTIMIZER_TABLE:
        raise ConfigError(f"optim.optimizer is '{name}'; expected one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZER_TABLE[name]


# ------------------------------------------------------------------------------------------
# How frozen weights are stored
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StorageDtype:
    """A storage format of frozen weights (``memory.*_dtype``)."""

    name: str
    quantization: str | None  # the row of gie_core.weights.quantize.STORAGE_TABLE it uses (None: the compute dtype)
    bytes_per_element: int | None  # None: those of the compute dtype
    help: str


STORAGE_DTYPE_TABLE: dict[str, StorageDtype] = {
    s.name: s
    for s in (
        StorageDtype("auto", None, None, "the compute dtype of train.mixed_precision (the VAE: fp32); for the transformer, "
                     "an fp8 or GGUF model.init_transformer file stays as stored"),
        StorageDtype("fp8", "fp8", 1, "float8 e4m3fn, each layer upcast to the compute dtype while it runs (diffusers "
                     "layerwise casting; the layers gie_core.weights.quantize.FP8_KEEP names stay in the compute dtype)"),
    )
}
STORAGE_DTYPES = tuple(STORAGE_DTYPE_TABLE)


# ------------------------------------------------------------------------------------------
# Attention kernels of the training step (PyTorch's scaled-dot-product attention)
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionKernel:
    """One kernel of PyTorch's SDPA that ``train.attention_kernels`` may allow."""

    name: str
    backend: str  # the torch.nn.attention.SDPBackend member
    help: str


ATTENTION_KERNEL_TABLE: dict[str, AttentionKernel] = {
    k.name: k
    for k in (
        AttentionKernel("flash", "FLASH_ATTENTION", "FlashAttention-2 built into PyTorch (CUDA sm80+, and a CPU kernel)"),
        AttentionKernel("efficient", "EFFICIENT_ATTENTION", "memory-efficient attention (CUDA; takes attention masks)"),
        AttentionKernel("math", "MATH", "the plain PyTorch composite (any device; slowest, most memory)"),
        AttentionKernel("cudnn", "CUDNN_ATTENTION", "cuDNN's fused attention; PyTorch >= 2.10 prefers it on H100/H200/B200, "
                        "and its backward has crashed there in training (illegal memory access, mha_graph.execute; NaN "
                        "gradients at sequence lengths that are not multiples of 128, pytorch#196678): opt in only"),
    )
}
ATTENTION_KERNELS = tuple(ATTENTION_KERNEL_TABLE)
# The training default: every kernel but cuDNN, SDPA picking the fastest that fits each call.
DEFAULT_ATTENTION_KERNELS = ("flash", "efficient", "math")


@dataclass
class ModelOptions:
    kontext: str | None = _opt(None, "FLUX.1-Kontext-dev diffusers directory (VAE, CLIP, T5, tokenizers, scheduler, stock transformer)")
    gie: str | None = _opt(None, "GPT-Image-Edit checkpoint directory in the released layout (Qwen2.5-VL, connector, fine-tuned transformer)")
    qwen: str | None = _opt(None, "Qwen2.5-VL(-7B-Instruct) transformers directory, when no GPT-Image-Edit directory gives the encoder")
    init_transformer: str = _opt("auto", "transformer to start from: auto (gie if given, else kontext), kontext, gie, a .safetensors file (BFL or diffusers layout; "
                                 "an fp8 one stays fp8) or a .gguf file (stays quantised; stage 1 and LoRA)")
    init_connector: str = _opt("auto", "connector to start from: auto (gie's if given, else fresh), fresh, or a connector .safetensors / GPT-Image-Edit directory")
    mode: str = _opt("vlm", f"conditioning the connector is trained for: {', '.join(TRAINABLE_MODES)} (vlm = the reference's training)")
    num_queries: int = _opt(METAQUERY_TOKENS, "learned query tokens of a fresh connector for a mode with queries (metaquery)")


@dataclass
class DataOptions:
    data_txt: str | None = _opt(None, "data.txt: one 'image_root,annotation_json,region_weighting' line per source")
    resolution: int = _opt(512, "training side for 'square', or sqrt of the bucket area for 'ratio' (512: stage 1, 1024: stage 2)")
    bucketing: str = _opt("ratio", "ratio: aspect buckets of data.ratios (1:1, 3:2, 2:3); square: squash to resolution^2 like the reference")
    ratios: str = _opt("default", "bucket ratios: default (1:1, 3:2, 2:3), kontext, or a list such as '1:1,4:3,3:4'")
    batch_size: int = _opt(1, "pairs per batch per process (the released runs used 1)")
    num_workers: int = _opt(4, "data loading worker processes")
    shuffle: bool = _opt(True, "shuffle pairs (deterministically from train.seed and the epoch)")
    region_weighting: str = _opt("auto", "weight the changed region in the loss: auto (per data.txt line), on, off")
    cache_dir: str | None = _opt(None, "folder of precomputed features and latents (gie-train cache writes it)")
    use_cache: bool = _opt(False, "train from data.cache_dir: no encoder is loaded (Qwen still is for modes with learned queries: metaquery)")
    cache_dtype: str = _opt("bf16", "dtype features are cached in: bf16, fp16, fp32")


@dataclass
class TrainOptions:
    stage: int = _opt(1, "1: connector only; 2: connector + transformer")
    max_steps: int = _opt(1000, "optimizer steps to train for")
    seed: int = _opt(203, "seed of data order, noise and timesteps (resume replays them exactly)")
    trainable: str = _opt("auto", "stage 2 trainable transformer set: image_attention (released), full, lora; auto = connector (stage 1) / image_attention (stage 2)")
    train_connector: bool = _opt(True, "stage 2: train the connector along with the transformer")
    layers: list[int] | None = _opt(None, "image_attention: block indices to train (double blocks first, then single; default all)")
    mixed_precision: str = _opt(LOAD_DEFAULTS["trainer"].dtype, "no, bf16 or fp16 (trainable weights stay fp32, frozen ones are stored in this dtype)")
    gradient_checkpointing: bool | None = _opt(None, "recompute transformer activations in backward (default: on in stage 2, "
                                                  "with an fp8 transformer and with block swap)")
    gradient_accumulation: int = _opt(1, "micro-batches per optimizer step")
    guidance: float = _opt(1.0, "guidance embedding value during training (reference: 1.0)")
    logit_mean: float = _opt(0.0, "mean of the logit-normal timestep distribution")
    logit_std: float = _opt(1.0, "std of the logit-normal timestep distribution")
    weight_scheme: str = _opt("log", "region weight of changed pixels: log (log2(total/changed) + 1) or exp")
    overfit_batches: int = _opt(0, "debug: train on the first N batches only, with the same noise and timestep each time")
    attention_kernels: list[str] = _opt(list(DEFAULT_ATTENTION_KERNELS),
                                        "SDPA kernels the training step (forward and backward) may use, PyTorch picking "
                                        f"among them: {', '.join(ATTENTION_KERNELS)} (cuDNN is left out by default: its "
                                        "backward crashed in training on Hopper; validation edits use PyTorch's own choice)")


@dataclass
class OptimOptions:
    optimizer: str = _opt("adamw", "; ".join(f"{o.name}: {o.help}" for o in OPTIMIZER_TABLE.values()))
    lr: float | None = _opt(None, "learning rate (default: 1e-3 in stage 1, 1e-6 in stage 2; prodigy 1.0)")
    betas: list[float] = _opt([0.9, 0.99], "Adam betas")
    eps: float = _opt(1e-8, "Adam epsilon")
    weight_decay: float = _opt(0.0, "decoupled weight decay")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 = off)")
    lr_scheduler: str = _opt("constant", f"learning-rate schedule: {', '.join(LR_SCHEDULERS)}")
    warmup_steps: int = _opt(0, "warmup steps of the schedule")
    ema_decay: float = _opt(0.0, "EMA of the trained weights (0 = off; the released stage 1 used 0.999)")


@dataclass
class MemoryOptions:
    transformer_dtype: str = _opt("auto", f"storage of the frozen transformer weights: {', '.join(STORAGE_DTYPES)} (trained ones stay fp32)")
    encoder_dtype: str = _opt("auto", "storage of the frozen Qwen2.5-VL, T5 and CLIP when they are loaded (not cached): "
                              f"{', '.join(STORAGE_DTYPES)}")
    vae_dtype: str = _opt("auto", f"storage of the frozen VAE when it is loaded: {', '.join(STORAGE_DTYPES)} (auto: fp32)")
    resident_blocks: int | None = _opt(None, "block swap: keep this many transformer blocks (double blocks first, then single) "
                                       "on the GPU and stream the others from CPU memory in forward and backward "
                                       "(diffusers group offloading; blocks with trained weights always stay); none = no swap")


@dataclass
class LoraOptions:
    rank: int = _opt(16, "LoRA rank")
    alpha: float = _opt(16.0, "LoRA alpha (scale = alpha / rank)")
    dropout: float = _opt(0.0, "LoRA dropout")
    targets: list[str] = _opt(["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"], "module names LoRA adapts (peft target_modules)")


@dataclass
class CheckpointOptions:
    every: int = _opt(2000, "save a checkpoint every N steps (0 = only at the end)")
    keep_last: int = _opt(3, "checkpoints kept (older ones are deleted after a newer one is complete; 0 = keep all)")
    resume: str | None = _opt(None, "resume from 'latest' (in output_dir) or a checkpoint directory")


@dataclass
class ValidationOptions:
    every: int = _opt(0, "edit the validation pairs every N steps (0 = off)")
    pairs: list[dict] = _opt([], "list of {image: PATH, instruction: TEXT}")
    steps: int = _opt(DEFAULT_STEPS, "sampling steps of validation edits")
    guidance: float = _opt(DEFAULT_GUIDANCE, "guidance of validation edits")
    seed: int = _opt(DEFAULT_SEED, "noise seed of validation edits")


@dataclass
class LogOptions:
    every: int = _opt(10, "log the loss every N steps")
    tensorboard: bool = _opt(False, "write TensorBoard logs to output_dir/logs (needs the tensorboard package)")
    progress: bool = _opt(True, "show a progress bar with loss and speed")


@dataclass
class ExportOptions:
    dir: str | None = _opt(None, "where exported weights go (default output_dir/export)")
    at_end: bool = _opt(True, "export when training finishes")
    dtype: str = _opt("bf16", "dtype of exported weights: bf16, fp16, fp32")
    use_ema: bool = _opt(True, "export the EMA weights when optim.ema_decay > 0")
    transformer: bool = _opt(True, "stage 2: write transformer.safetensors (full diffusers state dict with the trained weights)")
    merge_lora: bool = _opt(False, "LoRA runs: also write transformer.safetensors with the LoRA merged in")
    released_dir: bool = _opt(False, "also write a full checkpoint directory in the released GPT-Image-Edit layout")


@dataclass
class TrainConfig:
    """All trainer options; sections are attributes (``config.optim.lr``)."""

    output_dir: str = _opt("runs/gie", "run folder: checkpoints/, validation/, logs/, export/")
    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataOptions = field(default_factory=DataOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    optim: OptimOptions = field(default_factory=OptimOptions)
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    lora: LoraOptions = field(default_factory=LoraOptions)
    checkpoint: CheckpointOptions = field(default_factory=CheckpointOptions)
    validation: ValidationOptions = field(default_factory=ValidationOptions)
    log: LogOptions = field(default_factory=LogOptions)
    export: ExportOptions = field(default_factory=ExportOptions)

    # --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def get(self, key: str) -> Any:
        obj = self
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj

    def set(self, key: str, value: Any, source: str = "command line") -> None:
        """Set a dotted option, coercing ``value`` (a string from the command line is parsed)."""
        spec = _option_specs().get(key)
        if spec is None:
            raise ConfigError(_unknown(key, source))
        owner = self
        parts = key.split(".")
        for part in parts[:-1]:
            owner = getattr(owner, part)
        setattr(owner, parts[-1], _coerce(value, spec.type, key, source))

    @property
    def trainable_set(self) -> str:
        """The resolved trainable transformer set (``connector`` = none of the transformer)."""
        t = self.train.trainable
        if t == "auto":
            return "connector" if self.train.stage == 1 else "image_attention"
        return t

    @property
    def learning_rate(self) -> float:
        if self.optim.lr is not None:
            return self.optim.lr
        return optimizer_spec(self.optim.optimizer).lr[self.train.stage - 1]

    @property
    def use_gradient_checkpointing(self) -> bool:
        """``train.gradient_checkpointing``, or by default: on in stage 2, and whenever frozen
        transformer weights are cast per layer or swapped (without recomputation the backward pass
        would keep every upcast or streamed-in weight alive until it runs, undoing the saving)."""
        g = self.train.gradient_checkpointing
        if g is not None:
            return g
        return self.train.stage == 2 or self.memory.transformer_dtype != "auto" or self.memory.resident_blocks is not None

    @property
    def trains_connector(self) -> bool:
        return self.train.stage == 1 or self.train.train_connector

    def check(self, for_training: bool = True) -> TrainConfig:
        """Reject inconsistent options, naming them (``for_training``: also what only a training
        run needs: its optimizer's package, data.txt, the model folders)."""
        self._check_choices()
        opt = optimizer_spec(self.optim.optimizer)
        # planning and exporting run no optimizer: only a training run needs its package
        if for_training and opt.missing:
            raise ConfigError(f"optim.optimizer is '{opt.name}' but {opt.missing}")
        if self.train.stage == 1 and self.trainable_set != "connector":
            raise ConfigError(
                f"train.trainable is '{self.train.trainable}' but stage 1 trains only the connector; "
                "use train.stage 2 to train transformer weights"
            )
        if self.train.stage == 2 and self.trainable_set == "connector" and not self.train.train_connector:
            raise ConfigError("stage 2 with train.trainable 'connector' and train.train_connector false trains nothing")
        self._check_numbers()
        if self.model.init_transformer == "gie" and not self.model.gie:
            raise ConfigError("model.init_transformer is 'gie' but model.gie (a GPT-Image-Edit directory) is not set")
        if fusion_mode(self.model.mode).queries and self.model.num_queries < 1:
            raise ConfigError(f"model.num_queries must be at least 1 for mode '{self.model.mode}' (it learns query tokens)")
        self._check_validation_pairs()
        if for_training:
            self._check_run_inputs()
        return self

    def _choice(self, key: str, choices) -> None:
        v = self.get(key)
        if v not in choices:
            raise ConfigError(f"{key} is '{v}'; expected one of {', '.join(map(str, choices))}")

    def _check_choices(self) -> None:
        """Every option with a fixed set of values (and the mode: one with a connector to train)."""
        self._choice("train.stage", STAGES)
        trainable_modes = [n for n, m in FUSION_MODE_TABLE.items() if m.trainable]  # the table, as it is now
        if self.model.mode not in trainable_modes:
            if self.model.mode not in FUSION_MODE_TABLE:
                raise ConfigError(f"model.mode is '{self.model.mode}'; expected one of {', '.join(trainable_modes)}")
            raise ConfigError(
                f"model.mode is '{self.model.mode}' but that mode has no connector to train; "
                f"expected one of {', '.join(trainable_modes)}"
            )
        self._choice("train.trainable", ("auto",) + TRAINABLE_SETS)
        self._choice("optim.optimizer", OPTIMIZERS)
        self._choice("train.mixed_precision", MIXED_PRECISION)
        for key in ("memory.transformer_dtype", "memory.encoder_dtype", "memory.vae_dtype"):
            self._choice(key, STORAGE_DTYPES)
        self._check_memory()
        self._check_attention_kernels()
        for key, choices in (("data.bucketing", BUCKETING), ("data.region_weighting", REGION_WEIGHTING),
                             ("train.weight_scheme", WEIGHT_SCHEMES), ("optim.lr_scheduler", LR_SCHEDULERS),
                             ("data.cache_dtype", DTYPE_NAMES), ("export.dtype", DTYPE_NAMES)):
            self._choice(key, choices)

    def _check_attention_kernels(self) -> None:
        kernels = self.train.attention_kernels
        expected = f"a list of one or more of {', '.join(ATTENTION_KERNELS)}"
        if not isinstance(kernels, list) or not kernels:
            raise ConfigError(f"train.attention_kernels is {kernels!r}; expected {expected}")
        for name in kernels:
            if name not in ATTENTION_KERNEL_TABLE:
                raise ConfigError(f"train.attention_kernels has '{name}'; expected {expected}")
        if len(set(kernels)) != len(kernels):
            raise ConfigError(f"train.attention_kernels {kernels} names a kernel twice")

    def _check_numbers(self) -> None:
        """Counts, ranges and rates."""
        for key in ("data.batch_size", "train.max_steps", "train.gradient_accumulation", "data.resolution", "lora.rank"):
            if self.get(key) < 1:
                raise ConfigError(f"{key} is {self.get(key)} but must be at least 1")
        for key in ("data.num_workers", "checkpoint.every", "checkpoint.keep_last", "validation.every", "train.overfit_batches",
                    "optim.warmup_steps", "log.every"):
            if self.get(key) < 0:
                raise ConfigError(f"{key} is {self.get(key)} but must be 0 or more")
        for key, (lo, hi) in (("validation.steps", STEPS_RANGE), ("validation.guidance", GUIDANCE_RANGE),
                              ("validation.seed", SEED_RANGE)):
            if not lo <= self.get(key) <= hi:
                raise ConfigError(f"{key} is {self.get(key)} but must be in {lo}..{hi}")
        if self.data.resolution % SIZE_MULTIPLE:
            raise ConfigError(f"data.resolution is {self.data.resolution} but must be a multiple of {SIZE_MULTIPLE}")
        if len(self.optim.betas) != 2:
            raise ConfigError(f"optim.betas must be two numbers, not {self.optim.betas}")
        if not 0.0 <= self.optim.ema_decay < 1.0:
            raise ConfigError(f"optim.ema_decay is {self.optim.ema_decay} but must be in [0, 1)")
        if not 0.0 <= self.lora.dropout < 1.0:
            raise ConfigError(f"lora.dropout is {self.lora.dropout} but must be in [0, 1)")
        if self.learning_rate <= 0:
            raise ConfigError(f"optim.lr is {self.learning_rate} but must be positive")

    def _check_validation_pairs(self) -> None:
        for i, pair in enumerate(self.validation.pairs):
            if not isinstance(pair, dict) or set(pair) != {"image", "instruction"}:
                raise ConfigError(f"validation.pairs[{i}] must be {{image: PATH, instruction: TEXT}}, not {pair!r}")
            if not isinstance(pair["image"], str) or not pair["image"].strip():
                raise ConfigError(f"validation.pairs[{i}].image must be a path, not {pair['image']!r}")
            if not isinstance(pair["instruction"], str) or not pair["instruction"].strip():
                raise ConfigError(f"validation.pairs[{i}].instruction must be a non-empty text, not {pair['instruction']!r}")

    def _check_run_inputs(self) -> None:
        """What a training run reads: data.txt, the Kontext folder, a Qwen2.5-VL, the cache folder."""
        if not self.data.data_txt:
            raise ConfigError("data.data_txt is not set (the data.txt listing image roots and annotation files)")
        if not self.model.kontext:
            raise ConfigError("model.kontext is not set (a FLUX.1-Kontext-dev diffusers directory: VAE, CLIP, T5, scheduler)")
        # Qwen runs when features are encoded on the fly, when learned queries read it, and for validation
        needs_qwen = not self.data.use_cache or fusion_mode(self.model.mode).queries or self.validation.every > 0
        if needs_qwen and not (self.model.gie or self.model.qwen):
            raise ConfigError("the Qwen2.5-VL encoder is needed: set model.gie (GPT-Image-Edit directory) or model.qwen")
        if self.data.use_cache and not self.data.cache_dir:
            raise ConfigError("data.use_cache is true but data.cache_dir is not set")

    def _check_memory(self) -> None:
        """The memory options against the rest (the distributed engine is checked by the trainer)."""
        for key in ("memory.transformer_dtype", "memory.encoder_dtype", "memory.vae_dtype"):
            if STORAGE_DTYPE_TABLE[self.get(key)].quantization and not _torch_has("float8_e4m3fn"):
                raise ConfigError(f"{key} is '{self.get(key)}' but this torch has no float8 dtypes (torch 2.1 or newer has them)")
        if self.memory.transformer_dtype != "auto" and self.trainable_set == "full":
            raise ConfigError(
                f"memory.transformer_dtype is '{self.memory.transformer_dtype}' but train.trainable 'full' trains every "
                "transformer weight: nothing frozen is left to store small"
            )
        resident = self.memory.resident_blocks
        if resident is None:
            return
        if resident < 0:
            raise ConfigError(f"memory.resident_blocks is {resident} but must be 0 or more (or none: no block swap)")
        t = self.trainable_set
        if t in ("full", "lora") or (t == "image_attention" and self.train.layers is None):
            raise ConfigError(
                f"memory.resident_blocks is {resident} but train.trainable '{t}' trains weights in every transformer "
                "block, and blocks with trained weights stay on the GPU: nothing could be swapped. Swap blocks in stage 1, "
                "or with train.layers naming the blocks that train; for LoRA use memory.transformer_dtype fp8"
            )
        if self.train.gradient_checkpointing is False:
            raise ConfigError(
                "memory.resident_blocks needs gradient checkpointing (train.gradient_checkpointing true or unset): without "
                "it the backward pass keeps every swapped-in block on the GPU until it runs"
            )

    # --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> TrainConfig:
        cfg = cls()
        cfg.update(data, source)
        return cfg

    def update(self, data: dict, source: str = "config") -> TrainConfig:
        """Apply a nested dict of options (a parsed config file); unknown keys fail, named."""
        for key, value in flatten(data, source):
            self.set(key, value, source)
        return self


def _torch_has(name: str) -> bool:
    import torch  # start-up: see _build_adamw

    return hasattr(torch, name)


# ------------------------------------------------------------------------------------------
# Option specs, coercion
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptionSpec:
    key: str
    type: Any
    default: Any
    help: str


_SPECS: dict[str, OptionSpec] | None = None


def _option_specs() -> dict[str, OptionSpec]:
    global _SPECS
    if _SPECS is None:
        specs = {}
        hints = get_type_hints(TrainConfig)
        for f in dataclasses.fields(TrainConfig):
            if dataclasses.is_dataclass(hints[f.name]):
                section_cls = hints[f.name]
                sub_hints = get_type_hints(section_cls)
                for sf in dataclasses.fields(section_cls):
                    default = sf.default if sf.default is not dataclasses.MISSING else sf.default_factory()
                    key = f"{f.name}.{sf.name}"
                    specs[key] = OptionSpec(key, sub_hints[sf.name], default, sf.metadata.get("help", ""))
            else:
                specs[f.name] = OptionSpec(f.name, hints[f.name], f.default, f.metadata.get("help", ""))
        _SPECS = specs
    return _SPECS


def option_names() -> list[str]:
    """Every dotted option name."""
    return list(_option_specs())


def _unknown(key: str, source: str) -> str:
    near = suggest_options(key, n=3)
    hint = f"; did you mean {', '.join(repr(n) for n in near)}?" if near else ""
    return f"unknown option '{key}' in {source}{hint}"


def flatten(data: Any, source: str, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dict -> [(dotted key, value)]; sections must be dicts, leaves are anything."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping of options, not {type(data).__name__}")
    out = []
    specs = _option_specs()
    sections = {k.split(".", 1)[0] for k in specs if "." in k}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if key in specs:
            out.append((key, v))
        elif not prefix and k in sections:
            if v is None:
                continue
            if not isinstance(v, dict):
                raise ConfigError(f"section '{key}' in {source} must be a mapping of options, not {v!r}")
            out.extend(flatten(v, source, key + "."))
        else:
            raise ConfigError(_unknown(key, source))
    return out


_NONE_WORDS = {"none", "null", "~", ""}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


def _coerce_list(value: Any, item_type: Any, key: str, source: str) -> list:
    """A list option: a list, a YAML list text ('[1, 2]') or comma-separated text ('1,2')."""
    bad = lambda what: ConfigError(f"{key} in {source} is {value!r} but must be {what}")  # noqa: E731
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise bad(f"a list ({exc})") from None
        elif item_type is dict:
            raise bad("a list of mappings, e.g. [{image: a.png, instruction: make it red}]")
        else:
            value = [v.strip() for v in text.split(",") if v.strip()]
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise bad("a list")
    return [_coerce(v, item_type, f"{key}[{i}]", source) for i, v in enumerate(value)]


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    bad = lambda what: ConfigError(f"{key} in {source} is {value!r} but must be {what}")  # noqa: E731
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
            return None
        return _coerce(value, inner[0], key, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        raise bad("true or false")
    if tp is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.strip())
            except ValueError:
                raise bad("an integer") from None
            if f.is_integer():
                return int(f)
        raise bad("an integer")
    if tp is float:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad("a number") from None
        raise bad("a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, Path):
            return str(value)
        raise bad("a string")
    if origin is list:
        return _coerce_list(value, args[0], key, source)
    if tp is dict:
        if isinstance(value, dict):
            return dict(value)
        raise bad("a mapping")
    raise ConfigError(f"{key}: unsupported option type {tp}")  # a programming error


# ------------------------------------------------------------------------------------------
# Files and the command line
# ------------------------------------------------------------------------------------------


def read_config_file(path: str | Path) -> dict:
    """A YAML (.yaml/.yml) or TOML (.toml) config file as a nested dict."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        text = read_text(p, "config file")
    except ValueError as exc:  # not UTF-8: the file and where
        raise ConfigError(str(exc)) from None
    if p.suffix.lower() == ".toml":
        try:
            import tomllib  # optional: Python 3.11+, else the tomli package
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib  # optional: tomli, the TOML reader on Python 3.10
            except ImportError:
                raise ConfigError(f"{p}: TOML configs need Python 3.11+ (or the tomli package); YAML works everywhere") from None
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p} is not valid TOML: {exc}") from None
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p} is not valid YAML: {exc}") from None
        return data or {}
    raise ConfigError(f"config file {p} must end in .yaml, .yml or .toml")


# An overlay config says in its opening comment what it is layered over ("layered over
# training/stage2.yaml"): gie-train reads that to say how to run it when it is given alone.
_LAYERED_OVER = re.compile(r"layered over\s+(\S+?\.(?:ya?ml|toml))\b")


def layered_over(path: str | Path) -> Path | None:
    """The config file that ``path`` says, in its opening comment lines, it is layered over
    (a path as written, found from the working directory or a folder above ``path``), or None."""
    p = Path(path)
    try:
        text = read_text(p, "config file")
    except ValueError:
        return None
    head = []
    for line in text.splitlines():
        if not line.lstrip().startswith("#"):
            break
        head.append(line)
    m = _LAYERED_OVER.search(" ".join(head))
    if not m:
        return None
    base = Path(m.group(1))
    for folder in (Path.cwd(), *p.resolve().parents):
        if (folder / base).is_file() and (folder / base).resolve() != p.resolve():
            return base if folder == Path.cwd() else Path(os.path.relpath(folder / base))
    return None


def missing_bases(paths: list[str]) -> list[tuple[str, Path]]:
    """(overlay, base) for each config file of ``paths`` (in order) that is layered over a file
    not given before it."""
    missing, given = [], []
    for path in paths:
        base = layered_over(path)
        if base is not None and base.resolve() not in given:
            missing.append((str(path), base))
        given.append(Path(path).resolve())
    return missing


def option_flags(key: str) -> list[str]:
    """The command-line flags of one option: its full dotted name, as written and with dashes
    (``--train.max_steps``, ``--train.max-steps``; ``--output_dir``, ``--output-dir``). There
    are no short forms: ``--steps`` could mean ``validation.steps`` or ``train.max_steps``, so
    every flag names its section."""
    flags = [f"--{key}"]
    dashed = f"--{key.replace('_', '-')}"
    if dashed != flags[0]:
        flags.append(dashed)
    return flags


def _flag_key(flag: str) -> str:
    """``--train.max-steps`` -> ``train.max_steps`` (not checked)."""
    return flag.lstrip("-").replace("-", "_")


def suggest_options(name: str, n: int = 4) -> list[str]:
    """Dotted option names a misspelt or short ``name`` (``steps``, ``optim.lrr``) may mean:
    same last part first, then last parts containing it, then close spellings."""
    name = _flag_key(name)
    names = option_names()
    leaf = name.rsplit(".", 1)[-1]
    found = [k for k in names if k.rsplit(".", 1)[-1] == leaf and k != name]
    if len(leaf) >= 3:
        found += [k for k in names if leaf in k.rsplit(".", 1)[-1] and k not in found and k != name]
    found += [k for k in difflib.get_close_matches(name, names, n=n, cutoff=0.6) if k not in found]
    if not found:
        found = difflib.get_close_matches(leaf, names, n=n, cutoff=0.5)
    return found[:n]


def add_config_arguments(parser: argparse.ArgumentParser, show_default: Callable[[str, Any], str]) -> None:
    """Add ``--config``, ``--set`` and one flag per option, its full dotted name (``--optim.lr``);
    ``show_default(help, default)`` gives an option's help with its default (the command line's rule).

    The parser must be built with ``allow_abbrev=False`` so a prefix is never taken for an option.
    """
    if getattr(parser, "allow_abbrev", False):
        raise ValueError("the gie-train parser must set allow_abbrev=False (a prefix must never pick an option)")
    parser.add_argument("--config", "-c", action="append", default=[], metavar="FILE",
                        help="YAML or TOML config file (several: later ones override earlier ones)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_options",
                        help="override any option, e.g. --set optim.lr=1e-4 (repeatable)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, spec in _option_specs().items():
        section = key.split(".", 1)[0] if "." in key else "run"
        group = groups.get(section) or parser.add_argument_group(f"{section} options")
        groups[section] = group
        group.add_argument(*option_flags(key), dest=f"opt:{key}", default=argparse.SUPPRESS, metavar="V",
                           help=show_default(spec.help, spec.default))


def config_from_args(args: argparse.Namespace, for_training: bool = True) -> TrainConfig:
    """Defaults, then each ``--config`` file, then option flags, then ``--set`` (in order)."""
    cfg = TrainConfig()
    for path in getattr(args, "config", []) or []:
        cfg.update(read_config_file(path), source=str(path))
    for name, value in vars(args).items():
        if name.startswith("opt:"):
            cfg.set(name[4:], value, "command line")
    for item in getattr(args, "set_options", []) or []:
        if "=" not in item:
            raise ConfigError(f"--set '{item}' must be KEY=VALUE, e.g. --set optim.lr=1e-4")
        key, value = item.split("=", 1)
        cfg.set(key.strip(), value, "--set")
    return cfg.check(for_training=for_training)


def reject_unknown_arguments(extras: list[str]) -> None:
    """Refuse the first unknown command-line flag, naming the options it may have meant (a short
    or partial name such as ``--steps`` is never guessed)."""
    for item in extras:
        if item.startswith("-") and len(item) > 1 and not item[1:2].isdigit():
            flag = item.split("=", 1)[0]
            near = suggest_options(flag)
            hint = f"; did you mean {', '.join('--' + k for k in near)}?" if near else ""
            raise ConfigError(
                f"unknown option '{flag}' on the command line{hint} "
                "(options are given by their full dotted name, e.g. --train.max_steps 100; gie-train --help lists them)"
            )
    if extras:
        raise ConfigError(f"unexpected command-line arguments: {' '.join(extras)}")


def load_config(*files: str | Path, overrides: dict | None = None, for_training: bool = True) -> TrainConfig:
    """Defaults, then ``files`` in order, then ``overrides`` ({"optim.lr": 1e-4} or nested)."""
    cfg = TrainConfig()
    for f in files:
        cfg.update(read_config_file(f), source=str(f))
    if overrides:
        for key, value in overrides.items():
            if isinstance(value, dict) and key in {k.split(".", 1)[0] for k in option_names()} and key not in option_names():
                cfg.update({key: value}, source="overrides")
            else:
                cfg.set(key, value, "overrides")
    return cfg.check(for_training=for_training)
