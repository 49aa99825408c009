"""PyTorch's CUDA allocator for training: less fragmentation, and the margin the plan assumes.

A training step allocates and frees blocks of many sizes: activations, recomputed layers,
upcast fp8 weights and optimizer temporaries. PyTorch's caching allocator keeps freed
fixed-size segments *reserved*, and fragmentation grows the reserved total past what is
allocated. On an H200, the stage-2 24 GB recipe peaked at 17.29 GiB allocated and 25.35 GiB
reserved (1.47x), which does not fit a 24 GB card. Expandable segments (one growing virtual
segment per stream) keep reserved memory close to allocated memory. So ``gie-train`` sets
``expandable_segments:True`` before torch initialises CUDA, unless the user set an allocator
configuration of their own, which it keeps and names.

``gie-train plan`` adds :data:`RESERVED_MARGIN` to its allocated-memory peak when it checks a
budget. That is the share of reserved memory above allocated memory it assumes with expandable
segments. It is an assumption until a GPU run measures it: the trainer logs the peak allocated
and reserved memory, and ``bench/gpu_check.py`` compares them with the plan.

Nothing here imports torch: the variable must be set before torch sets up CUDA.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import MutableMapping

__all__ = ["ALLOCATOR_SETTING", "ALLOC_CONF_VARIABLES", "RESERVED_MARGIN", "configure_allocator"]

ALLOCATOR_SETTING = "expandable_segments:True"
# torch 2.9 renamed PYTORCH_CUDA_ALLOC_CONF to PYTORCH_ALLOC_CONF (the old name is still read)
ALLOC_CONF_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
# reserved <= allocated x (1 + RESERVED_MARGIN) with expandable segments (the plan's budget check)
RESERVED_MARGIN = 0.10


def _variable_for_installed_torch() -> str:
    """The variable name the installed torch reads first (read from its metadata, no import)."""
    try:
        major, minor = (int(x) for x in importlib.metadata.version("torch").split("+")[0].split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return ALLOC_CONF_VARIABLES[0]
    return ALLOC_CONF_VARIABLES[0] if (major, minor) >= (2, 9) else ALLOC_CONF_VARIABLES[1]


def configure_allocator(environ: MutableMapping[str, str] | None = None) -> str:
    """Set :data:`ALLOCATOR_SETTING` in ``environ`` (default ``os.environ``) unless an allocator
    configuration is already there; returns the sentence to log: what was set, or what was kept."""
    env = os.environ if environ is None else environ
    for name in ALLOC_CONF_VARIABLES:
        if env.get(name, "").strip():
            return f"CUDA allocator: kept your {name}={env[name]} (gie-train sets {ALLOCATOR_SETTING} only when none is set)"
    name = _variable_for_installed_torch()
    env[name] = ALLOCATOR_SETTING
    torch = sys.modules.get("torch")  # only when already imported: importing it here would defeat the purpose
    if environ is None and torch is not None and torch.cuda.is_initialized():
        return (f"CUDA allocator: set {name}={ALLOCATOR_SETTING}, but CUDA was already initialised in this process, "
                "so it applies only to processes started from here")
    return (f"CUDA allocator: set {name}={ALLOCATOR_SETTING} (less fragmentation: reserved memory stays near allocated; "
            "set your own to override)")
