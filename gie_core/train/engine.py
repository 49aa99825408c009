"""What the distributed engine of a launch can do with this trainer, decided before weights load.

accelerate runs the trainer as one process, DDP (``MULTI_GPU`` / ``MULTI_CPU``), DeepSpeed ZeRO-2 /
ZeRO-3 or FSDP. This module holds the rules that differ between them: which memory options each
takes (:func:`check_engine`), that DeepSpeed and FSDP need accelerators
(:func:`check_requested_engine`), and whether a checkpoint resumes on another number of
processes (:func:`check_resharding`, :data:`RESHARDABLE`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import accelerate
import torch

from gie_core.train.config import TrainConfig

logger = logging.getLogger("gie_core.train")

# Whether a checkpoint written by one number of processes loads on another, per accelerate
# distributed type. The trained weights are always whole (trainable.safetensors); what differs is
# the optimizer state: whole for one process and DDP; FSDP writes torch.distributed.checkpoint
# shards, which load on any number of processes; DeepSpeed's ZeRO files hold one optimizer
# partition per process and load only on as many.
RESHARDABLE = {"NO": True, "MULTI_CPU": True, "MULTI_GPU": True, "MULTI_XPU": True, "MULTI_NPU": True,
               "MULTI_MLU": True, "MULTI_MUSA": True, "MULTI_HPU": True, "FSDP": True, "DEEPSPEED": False}
# Engines accelerate enables only on accelerators: launched on CPUs it silently trains plain DDP.
_REQUESTED_ENGINES = {"ACCELERATE_USE_DEEPSPEED": "DEEPSPEED", "ACCELERATE_USE_FSDP": "FSDP"}


def zero_stage(accelerator) -> int:
    """The DeepSpeed ZeRO stage of ``accelerator`` (0 when it does not run DeepSpeed)."""
    if accelerator.distributed_type.name != "DEEPSPEED":
        return 0
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def check_requested_engine() -> None:
    """Refuse a DeepSpeed / FSDP launch (``accelerate launch --config_file ...``) on a machine
    without accelerators, before anything heavy is imported or read: accelerate would refuse FSDP
    there and silently train a DeepSpeed config as plain data parallel."""
    requested = [engine for env, engine in _REQUESTED_ENGINES.items() if os.environ.get(env, "false").lower() == "true"]
    if requested and not _accelerator_available():
        raise ValueError(_engine_needs_accelerator(requested[0]))


def _accelerator_available() -> bool:
    accel = getattr(torch, "accelerator", None)
    return bool(accel.is_available()) if accel is not None else torch.cuda.is_available()


def _engine_needs_accelerator(engine: str) -> str:
    name = {"DEEPSPEED": "DeepSpeed", "FSDP": "FSDP"}[engine]
    return (f"this launch asked accelerate for {name}, but accelerate {accelerate.__version__} runs {name} only on "
            "accelerators (CUDA, XPU, NPU, ...) and this machine has none: on CPUs it refuses FSDP and would silently "
            "train a DeepSpeed config as plain data parallel. Launch on GPUs; on CPUs run data parallel without the "
            "config: torchrun --nproc_per_node N -m gie_core.cli.train ...")


def check_engine(cfg: TrainConfig, accelerator, memory) -> None:
    """Refuse, before any weight is read, what the distributed engine of this launch cannot do."""
    kind = accelerator.distributed_type.name
    for env, wanted in _REQUESTED_ENGINES.items():
        if os.environ.get(env, "false").lower() == "true" and kind != wanted:
            raise ValueError(_engine_needs_accelerator(wanted))
    if kind == "FSDP" and memory.transformer in ("fp8", "gguf"):
        raise ValueError(
            f"memory.transformer_dtype: an {memory.transformer} transformer cannot be sharded by FSDP (it flattens each "
            "block's weights into one tensor of one dtype); use DeepSpeed ZeRO-2 (training/accelerate_deepspeed_zero2.yaml), "
            "DDP or one GPU"
        )
    if memory.resident_blocks is not None and kind in ("FSDP", "DEEPSPEED"):
        raise ValueError(f"memory.resident_blocks (block swap) cannot run under {kind}, which places and shards the whole "
                         "model itself; use DDP or one GPU, or drop block swap")
    if kind == "DEEPSPEED" and zero_stage(accelerator) == 3 and memory.transformer in ("fp8", "gguf"):
        raise ValueError(f"memory.transformer_dtype: an {memory.transformer} transformer cannot be partitioned by ZeRO-3; "
                         "use ZeRO-2 (training/accelerate_deepspeed_zero2.yaml)")


def _engine_family(kind: str) -> str:
    return kind if kind in ("DEEPSPEED", "FSDP") else "DDP"  # one process and DDP store the same files


def check_resharding(state: dict, path: Path, cfg: TrainConfig, processes: int, engine_now: str) -> None:
    """Whether the checkpoint at ``path`` (its ``trainer_state.json`` is ``state``) resumes on
    ``processes`` processes of the accelerate distributed type ``engine_now``: under the engine
    that wrote it, with the same global batch, on another number of processes only where that
    engine can load its optimizer state there (:data:`RESHARDABLE`). Raises ``ValueError`` saying
    why not and what to do."""
    n_then, n_now = state.get("num_processes", 1), processes
    saved = state.get("config", {}).get("data", {})
    then = state.get("global_batch", saved.get("batch_size", cfg.data.batch_size) * n_then)
    now = cfg.data.batch_size * n_now
    if then != now:
        hint = f"; set data.batch_size {then // n_now} to resume on {n_now} processes" if then % n_now == 0 else ""
        raise ValueError(
            f"cannot resume from {path}: it trained with a global batch of {then} (data.batch_size "
            f"{saved.get('batch_size')} x {n_then} processes) but this run has {now} (data.batch_size "
            f"{cfg.data.batch_size} x {n_now}){hint}"
        )
    engine = state.get("distributed_type") or ("NO" if n_then == 1 else "MULTI_GPU")  # version-1 states
    kind = engine_now
    if _engine_family(engine) != _engine_family(kind):
        raise ValueError(f"cannot resume from {path}: it was written by {engine} and this run uses {kind} (they store "
                         f"the optimizer state differently); resume under {engine}")
    if n_then == n_now:
        return
    if not RESHARDABLE.get(engine, False):
        raise ValueError(
            f"cannot resume from {path} on {n_now} processes: it was written by {n_then} {engine} processes, whose "
            "ZeRO optimizer files hold one partition per process and load only on as many. Resume with "
            f"{n_then} processes, or convert it with DeepSpeed's ds_to_universal.py and load it as a universal checkpoint"
        )
    logger.info("resuming a %d-process %s checkpoint on %d processes (global batch %d)", n_then, engine, n_now, now)
