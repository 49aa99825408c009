"""What the pack's browser extension (``web/gie.js``) reads from the server, as plain data.

The extension carries no copy of a rule: it asks ComfyUI's server, where the pack registers the
routes of :data:`ROUTES` (``nodes/web_api.py``; ComfyUI also serves each under ``/api``):

- ``GET /gie/rules``: the fusion-mode table (:func:`gie_core.engine.modes.table_for_web`), the
  named ratio sets and the placements, i.e. every rule the extension draws with;
- ``GET /gie/pad_plan?width=&height=&ratios=&custom_ratios=&placement=``: the pad record Pad To
  Ratio will make for an image of that size with those widget values, computed by
  :func:`plan_pad_to_ratio`, the function the node itself pads with; a bad value answers
  HTTP 400 with ``{"error": ...}``, the message the node would raise.

Each route is a function ``(query) -> (HTTP status, JSON body)``, so it is tested (and served by
any HTTP glue) without ComfyUI.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from gie_core.engine.modes import table_for_web
from gie_core.imaging.ratio import PLACEMENTS, RATIO_SETS, PadRecord, plan_padding

DEFAULT_RATIO_SET = "default"
DEFAULT_PLACEMENT = "center"

Answer = tuple[int, dict[str, Any]]


def ratio_spec(ratios: str, custom_ratios: str | None = "") -> str:
    """The ratio set Pad To Ratio uses: ``custom_ratios`` when it is not blank, else the named set."""
    return custom_ratios if custom_ratios and custom_ratios.strip() else ratios


def plan_pad_to_ratio(
    width: int, height: int, ratios: str = DEFAULT_RATIO_SET, custom_ratios: str | None = "",
    placement: str = DEFAULT_PLACEMENT,
) -> PadRecord:
    """The pad record of Pad To Ratio for a ``width x height`` image and the node's widget values
    (no pixels touched). A bad ratio list or placement raises ValueError naming the bad entry."""
    return plan_padding(width, height, ratio_spec(ratios, custom_ratios), placement)


def rules() -> dict[str, Any]:
    """Every rule the extension draws with, as JSON data."""
    return {
        "fusion_modes": table_for_web(),
        "ratio_sets": {name: [list(r) for r in ratios] for name, ratios in RATIO_SETS.items()},
        "placements": list(PLACEMENTS),
    }


def _size_param(query: Mapping[str, str], name: str) -> int:
    text = query.get(name)
    try:
        value = int(str(text).strip())
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{name} {text!r} must be a positive integer (the image's {name} in pixels)")
    return value


def rules_answer(query: Mapping[str, str]) -> Answer:
    """``GET /gie/rules``."""
    return 200, rules()


def pad_plan_answer(query: Mapping[str, str]) -> Answer:
    """``GET /gie/pad_plan``: the pad record as :meth:`PadRecord.to_dict`, or HTTP 400 and
    ``{"error": message}`` (for a bad widget value, the message the node raises)."""
    try:
        record = plan_pad_to_ratio(
            _size_param(query, "width"),
            _size_param(query, "height"),
            query.get("ratios", DEFAULT_RATIO_SET),
            query.get("custom_ratios", ""),
            query.get("placement", DEFAULT_PLACEMENT),
        )
    except (ValueError, TypeError) as exc:
        return 400, {"error": str(exc)}
    return 200, record.to_dict()


ROUTES: dict[str, Callable[[Mapping[str, str]], Answer]] = {
    "/gie/rules": rules_answer,
    "/gie/pad_plan": pad_plan_answer,
}
