"""Models loaded as separate parts, as a node graph wires them, and where each part runs.

``EditPipeline`` owns every part at once. A node graph instead loads the Kontext
transformer, the VAE, the text encoders and the Qwen-VL encoder in different nodes, keeps them
between runs and hands them from node to node; each part then carries its own
:class:`Placement`: the device it computes on and whether it waits there or on the CPU
between uses. Memory hooks (make room on the device, empty the cache) are passed in, so a
host such as ComfyUI can evict its own models first; nothing here imports it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from gie_core.constants import OFFLOAD_MODES

MakeRoomFn = Callable[[int, torch.device], None]  # (bytes needed, device)
EmptyCacheFn = Callable[[], None]


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers as they are stored (what moving it to a device
    costs): fp8, GGUF blocks and bitsandbytes packs count as held, not as they compute."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if not t.is_meta)


def _module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` name the same device when no index is given (the current one)."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else 0
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index


def fixed_device(module: torch.nn.Module) -> bool:
    """Whether a module must stay on the device it was loaded to (bitsandbytes-quantised models
    cannot be moved)."""
    return bool(getattr(module, "_gie_fixed_device", False) or getattr(module, "is_loaded_in_4bit", False)
                or getattr(module, "is_loaded_in_8bit", False))


def _default_empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Placement:
    """Where a loaded model computes and where it waits between uses.

    ``offload``: ``none`` (moves to the device on first use and stays: fastest, needs memory
    for every part at once), ``model`` (visits the device only while in use, waits on the CPU),
    ``sequential`` (as ``model``; a diffusers transformer also streams its blocks to the device
    one at a time: the mode for cards smaller than the transformer).
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        offload: str = "none",
        *,
        make_room: MakeRoomFn | None = None,
        empty_cache: EmptyCacheFn | None = None,
    ):
        if offload not in OFFLOAD_MODES:
            raise ValueError(f"offload mode '{offload}' is unknown; expected one of {', '.join(OFFLOAD_MODES)}")
        self.device = torch.device(device)
        self.offload = offload
        self.make_room = make_room
        self.empty_cache = empty_cache or _default_empty_cache

    def __repr__(self) -> str:
        return f"Placement(device={self.device}, offload={self.offload})"

    def _streams(self, module: torch.nn.Module) -> bool:
        return self.offload == "sequential" and self.device.type != "cpu" and hasattr(module, "enable_group_offload")

    def _bring(self, module: torch.nn.Module) -> bool:
        """Put ``module`` on the device; True when it was moved (so it may go back)."""
        if getattr(module, "_gie_group_offloaded", False) or fixed_device(module):
            return False
        if self._streams(module):
            module.enable_group_offload(
                onload_device=self.device,
                offload_device=torch.device("cpu"),
                offload_type="block_level",
                num_blocks_per_group=1,
                use_stream=self.device.type == "cuda",
            )
            module._gie_group_offloaded = True
            return False
        if same_device(_module_device(module), self.device):
            return False
        if self.make_room is not None and self.device.type != "cpu":
            self.make_room(module_bytes(module), self.device)
        module.to(self.device)
        return True

    @contextlib.contextmanager
    def use(self, *modules: torch.nn.Module | None) -> Iterator[torch.device]:
        """Modules on the device for a block; with offload ``model``/``sequential`` they return
        to the CPU afterwards (also when the block raises). Yields the device."""
        moved = []
        try:
            for m in modules:
                if m is not None and self._bring(m):
                    moved.append(m)
            yield self.device
        finally:
            if self.offload != "none" and moved:
                for m in moved:
                    m.to("cpu")
                self.empty_cache()

    def unload(self, *modules: torch.nn.Module | None) -> None:
        """Send modules back to the CPU now (streamed transformers already wait there)."""
        moved = False
        for m in modules:
            if m is None or getattr(m, "_gie_group_offloaded", False) or fixed_device(m):
                continue
            if _module_device(m).type != "cpu":
                m.to("cpu")
                moved = True
        if moved:
            self.empty_cache()


def torch_modules(obj: Any) -> list[torch.nn.Module]:
    """The torch modules inside a loaded part (a module itself, ``TextEncoders``, ``QwenVLEncoder``)."""
    if obj is None:
        return []
    if isinstance(obj, torch.nn.Module):
        return [obj]
    found = []
    for name in ("model", "clip", "t5"):
        m = getattr(obj, name, None)
        if isinstance(m, torch.nn.Module):
            found.append(m)
    return found


@dataclass
class PlacedModel:
    """A loaded part (VAE, connector, text encoders, Qwen-VL encoder) and its placement."""

    model: Any
    placement: Placement
    source: str = ""

    def modules(self) -> list[torch.nn.Module]:
        return torch_modules(self.model)

    def use(self):
        return self.placement.use(*self.modules())

    def unload(self) -> None:
        self.placement.unload(*self.modules())


@dataclass
class KontextModel:
    """A Kontext transformer with its scheduler, placement and the LoRAs to apply to it.

    ``loras`` is a tuple of ``(adapter name, strength)`` activated for each run (see
    :mod:`gie_core.weights.lora`); a copy with another LoRA list shares the transformer.
    ``transformer`` is None when the loader was told to skip it.
    """

    transformer: torch.nn.Module | None
    scheduler: Any
    placement: Placement
    loras: tuple[tuple[str, float], ...] = ()
    source: str = ""
    info: dict = field(default_factory=dict)

    def with_lora(self, adapter_name: str, strength: float) -> KontextModel:
        """A shallow copy with one more LoRA (the transformer is shared, not cloned)."""
        return replace(self, loras=self.loras + ((adapter_name, float(strength)),))

    def require_transformer(self) -> torch.nn.Module:
        if self.transformer is None:
            raise ValueError(
                f"this Kontext model ({self.source or 'loader'}) was loaded without its transformer; "
                "turn on load_transformer in the loader or use another model input"
            )
        return self.transformer



__all__ = [
    "KontextModel",
    "Placement",
    "PlacedModel",
    "fixed_device",
    "module_bytes",
    "torch_modules",
]
