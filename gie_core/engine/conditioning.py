"""The conditioning a Kontext transformer takes: context tokens plus a pooled vector.

It converts to and from ComfyUI's native ``CONDITIONING`` layout (a list of
``[tensor[B, L, D], {"pooled_output": tensor[B, P], ...}]``) without importing ComfyUI, so our
connector output drives native Flux nodes and our sampler accepts native Flux conditioning.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class Conditioning:
    """``context`` [B, L, D] (D = the transformer's joint_attention_dim) and ``pooled`` [B, P]."""

    context: torch.Tensor
    pooled: torch.Tensor
    extra: dict = field(default_factory=dict)  # e.g. {"guidance": 3.5} from ComfyUI's FluxGuidance

    def __post_init__(self):
        if self.context.ndim != 3:
            raise ValueError(f"conditioning context must be [batch, tokens, dim] but is {tuple(self.context.shape)}")
        if self.pooled.ndim != 2:
            raise ValueError(f"conditioning pooled vector must be [batch, dim] but is {tuple(self.pooled.shape)}")
        if self.pooled.shape[0] not in (1, self.context.shape[0]) and self.context.shape[0] != 1:
            raise ValueError(
                f"conditioning batch sizes differ: context has {self.context.shape[0]}, pooled has {self.pooled.shape[0]}"
            )

    @property
    def batch_size(self) -> int:
        return max(self.context.shape[0], self.pooled.shape[0])

    def to(self, device=None, dtype=None) -> Conditioning:
        return replace(self, context=self.context.to(device=device, dtype=dtype), pooled=self.pooled.to(device=device, dtype=dtype))

    def expand(self, batch_size: int) -> Conditioning:
        """Repeat a batch-1 conditioning to ``batch_size`` (or check it already has that size)."""
        def grow(t: torch.Tensor, what: str) -> torch.Tensor:
            if t.shape[0] == batch_size:
                return t
            if t.shape[0] == 1:
                return t.expand(batch_size, *t.shape[1:])
            raise ValueError(f"conditioning {what} has batch {t.shape[0]} but {batch_size} images are being made")

        return replace(self, context=grow(self.context, "context"), pooled=grow(self.pooled, "pooled"))

    # --- ComfyUI's CONDITIONING list -------------------------------------------------
    def to_comfy(self) -> list:
        """``[[context, {"pooled_output": pooled, **extra}]]`` (ComfyUI's native layout)."""
        return [[self.context, {"pooled_output": self.pooled, **self.extra}]]

    @classmethod
    def from_comfy(cls, cond: list) -> Conditioning:
        """Accept ComfyUI's CONDITIONING with one entry (what FluxGuidance, ReferenceLatent and
        ConditioningConcat give). Several entries (ConditioningCombine, area/mask conditioning)
        mean "run each and blend the predictions" to native samplers; this sampler does not
        blend, so they are refused rather than given another meaning."""
        if not isinstance(cond, (list, tuple)) or not cond:
            raise ValueError("conditioning must be a non-empty list of [tensor, dict] pairs (ComfyUI CONDITIONING)")
        for i, entry in enumerate(cond):
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and torch.is_tensor(entry[0]) and isinstance(entry[1], dict)):
                raise ValueError(f"conditioning entry {i} must be [tensor, dict]")
        if len(cond) > 1:
            raise ValueError(
                f"conditioning has {len(cond)} entries (ConditioningCombine or area conditioning): native samplers run "
                "each entry and blend their predictions, which this sampler does not do. Join the prompts with "
                "Conditioning (Concat) instead, or sample with native KSampler"
            )
        context, info = cond[0]
        pooled = info.get("pooled_output")
        if pooled is None:
            raise ValueError("conditioning has no 'pooled_output' (a FLUX model needs the CLIP pooled vector)")
        unsupported = sorted(k for k in ("area", "mask", "strength", "start_percent", "end_percent", "control")
                             if k in info and not _default_setting(k, info[k]))
        if unsupported:
            raise ValueError(
                f"conditioning sets {', '.join(unsupported)}, which this sampler does not apply; remove the node that "
                "sets it, or sample with native KSampler"
            )
        return cls(context, pooled, {k: v for k, v in info.items() if k != "pooled_output"})


def _default_setting(key: str, value) -> bool:
    """Whether a ComfyUI conditioning setting has its no-op value (then ignoring it changes nothing)."""
    return {"strength": value == 1.0, "start_percent": value == 0.0, "end_percent": value == 1.0}.get(key, value is None)
