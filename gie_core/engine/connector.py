"""The fusion connector: Qwen2.5-VL features -> Kontext context tokens, and the fusion modes.

The released connector ("denoise_projector") is ``Linear(3584 -> 12288) -> SiLU -> Linear(12288 -> 4096)``
(its config calls it ``mlp2x_gelu``, but it is SiLU). Its parameter names here match the
checkpoint's (``denoise_projector.0.weight`` ...), so released weights load without renaming.

The fusion modes (the paper's Table 5) and what each needs are the table in :mod:`gie_core.engine.modes`;
:func:`fuse` builds a mode's conditioning by reading its row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gie_core.engine.conditioning import Conditioning
from gie_core.constants import METAQUERY_TOKENS
from gie_core.engine.modes import check_mode, fusion_mode, modes_with

__all__ = ["Connector", "QwenFeatures", "TextFeatures", "fuse", "check_mode"]


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
        spec = fusion_mode(mode)
        return cls(
            input_hidden_size,
            output_hidden_size,
            type_embedding=spec.type_embedding,
            num_queries=num_queries if spec.queries else 0,
        )

    @property
    def modes(self) -> tuple[str, ...]:
        """The fusion modes this connector's parameters support."""
        return modes_with(queries=self.queries is not None, type_embedding=self.type_embedding is not None)

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
    input_ids: torch.Tensor | None = None  # [B, L - num_queries] the token ids (the task head finds its token)


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
    """Build the Kontext conditioning of one fusion mode, as its row in :mod:`gie_core.engine.modes` says.

    Shapes: context [B, L_vlm (+ L_t5), D] (VLM tokens first, T5 after), pooled [B, P].
    """
    spec = fusion_mode(mode)
    if spec.needs_qwen:
        if connector is None or vlm is None:
            raise ValueError(f"fusion mode '{mode}' needs the connector and Qwen-VL features")
        if mode not in connector.modes:
            raise ValueError(
                f"fusion mode '{mode}' needs parameters this connector does not have; it supports {', '.join(connector.modes)}"
            )
    if spec.needs_t5 and (text is None or text.t5 is None):
        raise ValueError(f"fusion mode '{mode}' needs T5 features (connect the T5 encoding)")
    if text is None:
        raise ValueError(f"fusion mode '{mode}' needs the CLIP pooled vector (connect the T5/CLIP encoding)")
    if spec.pooled_from == "empty" and text.pooled_empty is None:
        raise ValueError(f"fusion mode '{mode}' needs CLIP(\"\") as the pooled vector; encode it with the text encoders")
    pooled = text.pooled if spec.pooled_from == "instruction" else text.pooled_empty

    parts = []  # [B_i, L_i, D] in order: VLM tokens first, T5 after
    if spec.needs_qwen:
        hidden = vlm.hidden
        if spec.queries:
            if vlm.num_queries <= 0:
                raise ValueError(f"fusion mode '{mode}' needs Qwen-VL features encoded with the connector's queries")
            hidden = hidden[:, -vlm.num_queries:]  # [B, N, H]: only the query outputs are kept
        parts.append(connector(hidden))  # [B, L_vlm, D]
    if spec.needs_t5:
        t5 = text.t5
        if parts:
            t5 = t5.to(device=parts[0].device, dtype=parts[0].dtype)
            if t5.shape[-1] != parts[0].shape[-1]:
                raise ValueError(f"T5 features are {t5.shape[-1]}-wide but the connector outputs {parts[0].shape[-1]}")
        parts.append(t5)
    batch = max(p.shape[0] for p in parts)
    for i, p in enumerate(parts):
        if p.shape[0] != batch:
            if p.shape[0] != 1:
                raise ValueError(
                    f"Qwen-VL features have batch {parts[0].shape[0]} but T5 features have {parts[-1].shape[0]}"
                )
            parts[i] = p.expand(batch, -1, -1)
    if spec.type_embedding:
        te = connector.type_embedding.to(parts[0].dtype)  # [2, D]: row 0 VLM, row 1 T5
        parts = [p + te[i] for i, p in enumerate(parts)]
    context = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    if pooled.shape[0] == 1 and batch > 1 and spec.pooled_from == "empty":
        pooled = pooled.expand(batch, -1)
    return Conditioning(context, pooled.to(device=context.device, dtype=context.dtype) if spec.needs_qwen else pooled)
