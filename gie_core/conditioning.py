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
        """Accept ComfyUI's CONDITIONING; several entries are concatenated along tokens
        (all must share the pooled vector's batch)."""
        if not isinstance(cond, (list, tuple)) or not cond:
            raise ValueError("conditioning must be a non-empty list of [tensor, dict] pairs (ComfyUI CONDITIONING)")
        contexts, pooled, extra = [], None, {}
        for i, entry in enumerate(cond):
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and torch.is_tensor(entry[0]) and isinstance(entry[1], dict)):
                raise ValueError(f"conditioning entry {i} must be [tensor, dict]")
            contexts.append(entry[0])
            if pooled is None:
                pooled = entry[1].get("pooled_output")
            extra.update({k: v for k, v in entry[1].items() if k != "pooled_output"})
        if pooled is None:
            raise ValueError("conditioning has no 'pooled_output' (a FLUX model needs the CLIP pooled vector)")
        return cls(torch.cat(contexts, dim=1) if len(contexts) > 1 else contexts[0], pooled, extra)
