"""The task head: does a turn want an edited image or a text answer?

GPT-Image-Edit's demo (``app.py``, ``univa/serve/cli.py``) ships ``task_head_final.pt`` beside the
checkpoint: ``Sequential(Linear(3584, 10240), SiLU, Dropout(0.3), Linear(10240, 2))``. It reads
Qwen2.5-VL's last hidden state at the last ``assistant`` token of the prompt (id 77091, the
generation prompt's) and gives two logits: [answer, edit]; the app edits when
``logits[0] < logits[1]``. Its switches force either ("Enhance Generation" / "Enhance
Understanding"): :func:`route` takes ``"auto" | "edit" | "answer"``. Without a head, ``auto``
means edit (what this pack did before it knew the head) and the note says so.

The weights load through :mod:`gie_core.weights.parts` (``load_part("task_head", ...)``), from
safetensors, or from the shipped ``.pt`` with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gie_core.checks import check_choice
from gie_core.constants import DEFAULT_ROUTE, ROUTE_MODES
from gie_core.engine.connector import QwenFeatures

ANSWER, EDIT = "answer", "edit"
TASK_HEAD_KEYS = ("0.weight", "0.bias", "3.weight", "3.bias")


class TaskHead(nn.Sequential):
    """``Linear(hidden -> inner), SiLU, Dropout, Linear(inner -> 2)``: the app's ``nn.Sequential``,
    so its state-dict names (``0.*``, ``3.*``) are the shipped file's."""

    def __init__(self, hidden_size: int = 3584, inner_size: int = 10240, dropout: float = 0.3):
        super().__init__(nn.Linear(hidden_size, inner_size), nn.SiLU(), nn.Dropout(dropout), nn.Linear(inner_size, 2))
        self.eval()

    @property
    def hidden_size(self) -> int:
        return self[0].in_features

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], where: str = "task head") -> TaskHead:
        """A head whose sizes come from the tensors (a ``module.`` prefix, as DDP saves, is dropped)."""
        state = {k.removeprefix("module."): v for k, v in state.items()}
        if sorted(state) != sorted(TASK_HEAD_KEYS):
            raise ValueError(f"{where} must hold exactly {', '.join(TASK_HEAD_KEYS)} (the app's Sequential); "
                             f"it holds {', '.join(sorted(state)[:8]) or 'nothing'}")
        for k, v in state.items():
            if not torch.is_tensor(v) or not v.is_floating_point():
                raise ValueError(f"{where}: {k} is not a floating-point tensor")
        inner, hidden = state["0.weight"].shape
        if tuple(state["3.weight"].shape) != (2, inner):
            raise ValueError(f"{where}: layers do not chain to two logits ({hidden}->{inner}, then "
                             f"{tuple(state['3.weight'].shape)})")
        head = cls(hidden, inner)
        head.load_state_dict(state, strict=True)
        return head.eval().requires_grad_(False)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[2] logits (answer, edit) of one hidden state [H], in the head's dtype (float32 as loaded:
        the app runs its head in float32 on ``hidden.float()``)."""
        weight = self[0].weight
        return self(hidden.reshape(1, -1).to(device=weight.device, dtype=weight.dtype))[0].float()


@dataclass(frozen=True)
class Route:
    """What a turn does: ``decision`` "edit" or "answer", why (``note``), and the head's logits
    (answer, edit) when it was asked."""

    decision: str
    note: str
    logits: tuple[float, float] | None = None


def assistant_hidden(features: QwenFeatures, position: int) -> torch.Tensor:
    """The last hidden state [H] at ``position`` of a batch-1 encoding: the generation prompt's
    ``assistant`` token (see :meth:`gie_core.engine.encoders.QwenVLEncoder.role_token_position`), as
    the app picks ``hidden[input_ids == 77091][-1]``."""
    if features.hidden.shape[0] != 1:
        raise ValueError(f"the task head reads one conversation, not a batch of {features.hidden.shape[0]}")
    return features.hidden[0, position]


def check_route(mode: str) -> str:
    """``mode`` if it is one of :data:`ROUTE_MODES`, else a ValueError naming them."""
    return check_choice("route", mode, ROUTE_MODES)


def route(mode: str = DEFAULT_ROUTE, head: TaskHead | None = None, hidden: torch.Tensor | None = None) -> Route:
    """Decide a turn: ``mode`` "edit" / "answer" force it; "auto" asks ``head`` about ``hidden``
    (the assistant-token state, :func:`assistant_hidden`) and edits when logit[0] < logit[1], as
    the app does; with no head, "auto" edits and the note says why."""
    mode = check_route(mode)
    if mode != "auto":
        return Route(mode, f"{mode} (asked for)")
    if head is None:
        return Route(EDIT, "edit: the checkpoint has no task head (task_head_final.pt / task_head.safetensors), "
                           "so 'auto' edits; choose 'answer' to get a text reply")
    if hidden is None:
        raise ValueError("route 'auto' with a task head needs the assistant-token hidden state")
    logits = head.logits(hidden)
    answer, edit = float(logits[0]), float(logits[1])
    decision = EDIT if answer < edit else ANSWER
    return Route(decision, f"{decision}: the task head says {decision} (logits answer {answer:.3f}, edit {edit:.3f})",
                 (answer, edit))
