"""The fusion modes as one table: what each mode needs and how its conditioning is built.

Every face reads this table: :func:`gie_core.engine.connector.fuse`, the connector's supported modes,
the pipeline (which parts to load and encode), the trainer (which features to cache and
encode), the ComfyUI nodes (tooltips, required inputs) and the web extension (which inputs the
Fusion Connector shows; ``web/gie.js`` fetches :func:`table_for_web` from the server, see
:mod:`gie_core.engine.web_rules`). A new mode is one row here plus its connector code.

The modes are the paper's Table 5:

- ``vlm``: projected Qwen tokens only, pooled = CLIP("") (what training saw);
- ``t5``: stock Kontext conditioning (T5 tokens, pooled = CLIP(instruction));
- ``vlm+t5``: projected VLM tokens then T5 tokens, pooled = CLIP(instruction) (the released
  model's benchmarks);
- ``vlm+t5+type``: as vlm+t5 with a learned type embedding added per source;
- ``metaquery``: learned query tokens appended to the Qwen input; only their outputs are kept
  and projected; pooled = CLIP("").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

POOLED_SOURCES = ("instruction", "empty")  # CLIP(instruction) or CLIP("")


@dataclass(frozen=True)
class FusionMode:
    """One fusion mode's needs."""

    name: str
    needs_qwen: bool  # Qwen2.5-VL features of (image, instruction), projected by the connector
    needs_t5: bool  # T5 tokens of the instruction, appended after the VLM tokens (or alone)
    pooled_from: str  # "instruction": CLIP(instruction); "empty": CLIP("")
    queries: bool  # learned query tokens join the Qwen input; only their outputs are kept
    type_embedding: bool  # a learned embedding is added per source (row 0 VLM, row 1 T5)
    trainable: bool  # a connector can be trained for it (t5 has no connector)
    summary: str

    def __post_init__(self):
        if self.pooled_from not in POOLED_SOURCES:
            raise ValueError(f"fusion mode {self.name}: pooled_from must be one of {POOLED_SOURCES}")
        if self.queries and not self.needs_qwen:
            raise ValueError(f"fusion mode {self.name}: learned queries need the Qwen input")

    @property
    def needs_connector(self) -> bool:
        return self.needs_qwen


FUSION_MODE_TABLE: dict[str, FusionMode] = {
    m.name: m
    for m in (
        FusionMode("vlm", True, False, "empty", False, False, True,
                   "Qwen tokens only, pooled CLIP('') (the reference's training)"),
        FusionMode("t5", False, True, "instruction", False, False, False,
                   "stock Kontext: T5 tokens, pooled CLIP(instruction)"),
        FusionMode("vlm+t5", True, True, "instruction", False, False, True,
                   "projected Qwen tokens then T5 tokens, pooled CLIP(instruction) (released model)"),
        FusionMode("vlm+t5+type", True, True, "instruction", False, True, True,
                   "as vlm+t5 plus a learned type embedding per source (connectors trained for it)"),
        FusionMode("metaquery", True, False, "empty", True, False, True,
                   "learned queries read Qwen; only their outputs, pooled CLIP('') (connectors trained for it)"),
    )
}

FUSION_MODES: tuple[str, ...] = tuple(FUSION_MODE_TABLE)
TRAINABLE_MODES: tuple[str, ...] = tuple(n for n, m in FUSION_MODE_TABLE.items() if m.trainable)
DEFAULT_FUSION_MODE = "vlm+t5"  # the released model's
# the mode for a stock Kontext model (no GPT-Image-Edit checkpoint): the one that needs no Qwen
STOCK_FUSION_MODE = next(n for n, m in FUSION_MODE_TABLE.items() if not m.needs_qwen)


def fusion_mode(name: str) -> FusionMode:
    """The table row of ``name``; an unknown name raises naming the choices."""
    try:
        return FUSION_MODE_TABLE[name]
    except (KeyError, TypeError):
        raise ValueError(f"fusion mode '{name}' is unknown; expected one of {', '.join(FUSION_MODES)}") from None


def check_mode(name: str) -> str:
    """Return ``name`` if it is a known fusion mode, else raise naming the choices."""
    return fusion_mode(name).name


def modes_with(*, queries: bool = False, type_embedding: bool = False) -> tuple[str, ...]:
    """The modes a connector with (or without) learned queries / a type embedding supports."""
    return tuple(
        n for n, m in FUSION_MODE_TABLE.items()
        if (not m.queries or queries) and (not m.type_embedding or type_embedding)
    )


def table_for_web() -> dict[str, dict]:
    """The table as plain JSON data (what ``web/gie.js`` reads from ``GET /gie/rules``)."""
    return {n: {k: v for k, v in asdict(m).items() if k not in ("name", "summary")} for n, m in FUSION_MODE_TABLE.items()}


def tooltip() -> str:
    """One line per mode, for dropdown tooltips and --help."""
    return " ".join(f"{n}: {m.summary}." for n, m in FUSION_MODE_TABLE.items())
