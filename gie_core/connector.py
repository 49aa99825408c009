"""The fusion connector: Qwen2.5-VL features -> Kontext context tokens, and the fusion modes.

The released connector ("denoise_projector") is ``Linear(3584 -> 12288) -> SiLU -> Linear(12288 -> 4096)``
(its config calls it ``mlp2x_gelu``, but it is SiLU). Its parameter names here match the
checkpoint's (``denoise_projector.0.weight`` ...), so released weights load without renaming.

Modes (the paper's Table 5):
- ``vlm``: projected Qwen tokens only, pooled = CLIP("") (what training saw);
- ``t5``: stock Kontext conditioning (T5 tokens, pooled = CLIP(instruction));
- ``vlm+t5``: projected VLM tokens then T5 tokens, pooled = CLIP(instruction) (released model's benchmarks);
- ``vlm+t5+type``: as vlm+t5 with a learned type embedding added per source (for new connectors);
- ``metaquery``: N learned query tokens appended to the Qwen input; only their outputs are kept
  and projected (for new connectors); pooled = CLIP("").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .conditioning import Conditioning
from .constants import FUSION_MODES, METAQUERY_TOKENS


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is a known fusion mode, else raise naming the choices."""
    if mode not in FUSION_MODES:
        raise ValueError(f"fusion mode '{mode}' is unknown; expected one of {', '.join(FUSION_MODES)}")
    return mode


class Connector(nn.Module):
    """Projects Qwen hidden states (``input_hidden_size``) to the transformer's context width."""

    def __init__(
        self,
        input_hidden_size: int,
        output_hidden_size: int,
        hidden_size: int | None = None,
        *,
        type_embedding: bool = False,
        num_queries: int = 0,
    ):
        super().__init__()
        hidden_size = hidden_size or 3 * output_hidden_size
        self.input_hidden_size = input_hidden_size
        self.output_hidden_size = output_hidden_size
        self.denoise_projector = nn.Sequential(
            nn.Linear(input_hidden_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, output_hidden_size),
        )
        # [2, D]: row 0 is added to VLM tokens, row 1 to T5 tokens
        self.type_embedding = nn.Parameter(torch.zeros(2, output_hidden_size)) if type_embedding else None
        # [N, Qwen hidden]: learned query embeddings appended to the Qwen input (MetaQuery)
        self.queries = nn.Parameter(torch.randn(num_queries, input_hidden_size) * 0.02) if num_queries else None

    @classmethod
    def for_mode(cls, mode: str, input_hidden_size: int, output_hidden_size: int, num_queries: int = METAQUERY_TOKENS) -> Connector:
        """A fresh connector with the extra parameters ``mode`` needs (for training new ones)."""
        check_mode(mode)
        return cls(
            input_hidden_size,
            output_hidden_size,
            type_embedding=mode == "vlm+t5+type",
            num_queries=num_queries if mode == "metaquery" else 0,
        )

    @property
    def modes(self) -> tuple[str, ...]:
        """The fusion modes this connector's parameters support."""
        modes = ["vlm", "t5", "vlm+t5"]
        if self.type_embedding is not None:
            modes.append("vlm+t5+type")
        if self.queries is not None:
            modes.append("metaquery")
        return tuple(modes)

    def forward(self, vlm_hidden: torch.Tensor) -> torch.Tensor:
        """[B, L, input_hidden] -> [B, L, output_hidden]."""
        weight = self.denoise_projector[0].weight
        return self.denoise_projector(vlm_hidden.to(device=weight.device, dtype=weight.dtype))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> Connector:
        """Build a connector whose shapes come from the tensors themselves."""
        try:
            w0, w2 = state["denoise_projector.0.weight"], state["denoise_projector.2.weight"]
        except KeyError:
            raise ValueError(
                "connector weights must contain 'denoise_projector.0.weight' and 'denoise_projector.2.weight' "
                f"(found {', '.join(sorted(state)[:6])})"
            ) from None
        hidden, inp = w0.shape
        out, hidden2 = w2.shape
        if hidden2 != hidden:
            raise ValueError(f"connector layers do not chain: first is {inp}->{hidden}, second is {hidden2}->{out}")
        num_queries = state["queries"].shape[0] if "queries" in state else 0
        conn = cls(inp, out, hidden, type_embedding="type_embedding" in state, num_queries=num_queries)
        conn.load_state_dict(state, strict=True)
        return conn


@dataclass
class QwenFeatures:
    """Last hidden states of every token of the Qwen2.5-VL input, [B, L, H]."""

    hidden: torch.Tensor
    num_queries: int = 0  # > 0 when MetaQuery tokens were appended at the end


@dataclass
class TextFeatures:
    """T5 tokens [B, 256, 4096] and the CLIP pooled vectors of the instruction and of ""."""

    t5: torch.Tensor | None
    pooled: torch.Tensor
    pooled_empty: torch.Tensor | None = None


def fuse(
    mode: str,
    connector: Connector | None,
    vlm: QwenFeatures | None,
    text: TextFeatures | None,
) -> Conditioning:
    """Build the Kontext conditioning of one fusion mode. Shapes: context [B, L_vlm (+ L_t5), D]."""
    check_mode(mode)
    if mode != "t5":
        if connector is None or vlm is None:
            raise ValueError(f"fusion mode '{mode}' needs the connector and Qwen-VL features")
        if mode not in connector.modes:
            raise ValueError(
                f"fusion mode '{mode}' needs parameters this connector does not have; it supports {', '.join(connector.modes)}"
            )
    if mode != "vlm" and mode != "metaquery" and (text is None or text.t5 is None):
        raise ValueError(f"fusion mode '{mode}' needs T5 features (connect the T5 encoding)")
    if text is None:
        raise ValueError(f"fusion mode '{mode}' needs the CLIP pooled vector (connect the T5/CLIP encoding)")

    if mode == "t5":
        return Conditioning(text.t5, text.pooled)

    hidden = vlm.hidden
    if mode == "metaquery":
        if vlm.num_queries <= 0:
            raise ValueError("fusion mode 'metaquery' needs Qwen-VL features encoded with the connector's queries")
        hidden = hidden[:, -vlm.num_queries:]  # [B, N, H]: only the query outputs are kept
    projected = connector(hidden)  # [B, L_vlm, D]

    if mode in ("vlm", "metaquery"):
        if text.pooled_empty is None:
            raise ValueError(f"fusion mode '{mode}' needs CLIP(\"\") as the pooled vector; encode it with the text encoders")
        pooled = text.pooled_empty.expand(projected.shape[0], -1) if text.pooled_empty.shape[0] == 1 else text.pooled_empty
        return Conditioning(projected, pooled.to(device=projected.device, dtype=projected.dtype))

    t5 = text.t5.to(device=projected.device, dtype=projected.dtype)
    if t5.shape[-1] != projected.shape[-1]:
        raise ValueError(f"T5 features are {t5.shape[-1]}-wide but the connector outputs {projected.shape[-1]}")
    if t5.shape[0] != projected.shape[0]:
        if t5.shape[0] == 1:
            t5 = t5.expand(projected.shape[0], -1, -1)
        elif projected.shape[0] == 1:
            projected = projected.expand(t5.shape[0], -1, -1)
        else:
            raise ValueError(f"Qwen-VL features have batch {projected.shape[0]} but T5 features have {t5.shape[0]}")
    if mode == "vlm+t5+type":
        te = connector.type_embedding.to(projected.dtype)
        projected = projected + te[0]
        t5 = t5 + te[1]
    context = torch.cat([projected, t5], dim=1)  # [B, L_vlm + L_t5, D]: VLM first, T5 after
    pooled = text.pooled.to(device=context.device, dtype=context.dtype)
    return Conditioning(context, pooled)
