"""Split a GPT-Image-Edit checkpoint into the single files ComfyUI users keep (``gie-convert``).

From the released ``final_checkpoint/`` folder (or a ``gie-train`` export) it writes:

- the fine-tuned Kontext transformer as one file in the BFL key layout, which ComfyUI's own
  Load Diffusion Model detects as FLUX (``diffusion_models/``): bf16, plain fp8 (e4m3fn), or
  ComfyUI's "scaled fp8" (a per-tensor ``scale_weight`` and a ``scaled_fp8`` marker);
- the Qwen2.5-VL as one file in the layout ComfyUI's Qwen2.5-VL text-encoder loader reads
  (``model.*``, ``visual.*``: the names of the released checkpoint; ``text_encoders/``),
  ``lm_head`` only when asked (instruction rewriting needs it);
- the connector as one small file whose metadata carries its configuration (``gie_connectors/``);
- the generate-or-answer task head, when the folder ships one (``task_head_final.pt``, a torch
  pickle read once with ``torch.load(weights_only=True)``), as safetensors (``gie_connectors/``).

Everything is streamed tensor by tensor (a fused tensor reads only its parts), never a whole
model in memory, and each file is written atomically: an interrupted conversion leaves no
partial file. Every file's safetensors metadata says what it is and where it came from.
:func:`compare_qwen` says whether the checkpoint's Qwen equals a stock Qwen2.5-VL file the user
already has (the released model's Qwen was frozen in training), so one file can serve both.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gie_core import __version__
from gie_core.engine.connector import Connector
from gie_core.files import atomic_write, check_output_path, existing_folder, free_space, human_size
from gie_core.weights.gguf import write_gguf
from gie_core.weights.loading import DTYPES, GIE_DENOISER_PREFIX, GIE_PROJECTOR_PREFIX, gie_config, released_qwen_key
from gie_core.constants import TASK_HEAD_PT
from gie_core.engine.taskhead import TaskHead
from gie_core.weights.parts import read_task_head_state, resolve_source, task_head_path
from gie_core.weights.single_file import (
    _BFL_DOUBLE_MODULES,
    _BFL_DOUBLE_QKV,
    _BFL_SINGLE_LINEAR1,
    _BFL_SINGLE_MODULES,
    _BFL_TOP_MODULES,
    read_upcast,
)
from gie_core.weights.reader import FLOAT8_DTYPES, CheckpointError, CheckpointReader

__all__ = [
    "CONVERT_PARTS",
    "DEFAULT_CONVERT_PARTS",
    "FORMATS",
    "ConversionSource",
    "QwenComparison",
    "bfl_transformer_plan",
    "compare_qwen",
    "convert",
    "open_source",
    "output_paths",
    "write_safetensors_streamed",
]

CONVERT_PARTS = ("transformer", "qwen", "connector", "task_head")
# what a conversion writes when no parts are named: these, and the task head when the source has one
DEFAULT_CONVERT_PARTS = ("transformer", "qwen", "connector")
# weight storage of the transformer and Qwen files (fp32 keeps a checkpoint's values exactly)
FORMATS = ("bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_scaled")
# the transformer also as GGUF (ComfyUI-GGUF's loader and ours read it; written with the gguf package)
GGUF_FORMATS = {"gguf_q8_0": "Q8_0"}
TRANSFORMER_FORMATS = FORMATS + tuple(GGUF_FORMATS)
_PLAIN = DTYPES  # the plain formats are the dtype names every door uses
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FOLDERS = {"transformer": "diffusion_models", "qwen": "text_encoders", "connector": "gie_connectors",
           "task_head": "gie_connectors"}
GENERATOR = "gpt-image-edit gie-convert"

_ST_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float64: "F64",
}


# --------------------------------------------------------------------------------------------
# A safetensors writer that never holds more than one tensor
# --------------------------------------------------------------------------------------------


@dataclass
class Entry:
    """One tensor of a file being written: its name, stored dtype and shape, and how to make it."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize


def write_safetensors_streamed(path: str | os.PathLike, entries: list[Entry], metadata: dict[str, str]) -> Path:
    """Write a safetensors file whose tensors are produced one at a time, atomically.

    The header (names, dtypes, shapes, offsets) is known up front, so each tensor is made,
    written and dropped in turn; peak memory is the largest tensor (plus its sources).
    """
    header: dict = {}
    offset = 0
    for e in entries:
        if e.dtype not in _ST_DTYPES:
            raise ValueError(f"tensor '{e.key}' has dtype {e.dtype}, which safetensors cannot store")
        header[e.key] = {"dtype": _ST_DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for e in entries:
                t = e.make()
                if t.dtype != e.dtype or tuple(t.shape) != tuple(e.shape):
                    raise RuntimeError(f"tensor '{e.key}' came out {t.dtype} {tuple(t.shape)}, not {e.dtype} {e.shape}")
                f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


# --------------------------------------------------------------------------------------------
# Where the weights come from
# --------------------------------------------------------------------------------------------


@dataclass
class ConversionSource:
    """A checked source: the released layout (one reader, prefixes) or a gie-train export."""

    path: Path
    kind: str  # "released" or "export"
    transformer: tuple[Path, str] | None  # (weights path, key prefix), diffusers key names
    qwen: Path | None  # released layout only: every tensor outside denoise_tower.*
    connector: tuple[Path, str] | None
    config: dict = field(default_factory=dict)  # the released config.json (flat Qwen fields + denoise_tower)
    task_head: Path | None = None  # task_head_final.pt / task_head.safetensors beside a released checkpoint

    def describe(self) -> str:
        return f"{self.path} ({'released GPT-Image-Edit checkpoint' if self.kind == 'released' else 'gie-train export'})"


def open_source(path: str | os.PathLike) -> ConversionSource:
    """Check what ``path`` is (no weight is read): a released checkpoint folder, or a
    ``gie-train`` export folder (``transformer.safetensors`` / ``connector.safetensors``, or its
    ``gpt-image-edit/`` released-layout folder)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"source {p} does not exist")
    if p.is_file():
        raise CheckpointError(
            f"source {p} is a file; gie-convert takes a GPT-Image-Edit checkpoint folder (the released "
            "final_checkpoint/) or a gie-train export folder"
        )
    if (p / "model_index.json").is_file():
        raise CheckpointError(
            f"source {p} is a diffusers pipeline folder (e.g. FLUX.1-Kontext-dev), not a GPT-Image-Edit checkpoint; "
            "stock Kontext single files come from Black Forest Labs / ComfyUI's model pages"
        )
    if (p / "config.json").is_file():
        folder = resolve_source(p)  # what the folder is, said by parts (raises naming it otherwise)
        if folder.kind != "gie_dir":
            raise CheckpointError(f"source {folder.describe()} is not a GPT-Image-Edit checkpoint; gie-convert takes the "
                                  "released final_checkpoint/ folder or a gie-train export folder")
        return ConversionSource(p, "released", (p, GIE_DENOISER_PREFIX), p, (p, GIE_PROJECTOR_PREFIX), gie_config(p),
                                task_head_path(p))
    if (p / "gpt-image-edit" / "config.json").is_file():
        return open_source(p / "gpt-image-edit")
    transformer = p / "transformer.safetensors"
    connector = p / "connector.safetensors"
    if transformer.is_file() or connector.is_file():
        return ConversionSource(
            p, "export", (transformer, "") if transformer.is_file() else None, None,
            (connector, "") if connector.is_file() else None,
        )
    raise CheckpointError(
        f"source {p} is neither a GPT-Image-Edit checkpoint folder (no config.json with denoise_tower) nor a "
        "gie-train export (no transformer.safetensors or connector.safetensors)"
    )


# --------------------------------------------------------------------------------------------
# Transformer: diffusers names -> BFL layout
# --------------------------------------------------------------------------------------------

_INV_TOP = {v: k for k, v in _BFL_TOP_MODULES.items()}
_INV_DOUBLE = {v: k for k, v in _BFL_DOUBLE_MODULES.items()}
_INV_SINGLE = {v: k for k, v in _BFL_SINGLE_MODULES.items()}
_DIFFUSERS_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)\.(weight|bias)$")


@dataclass
class PlanItem:
    """One BFL tensor: made from ``sources`` (diffusers names) by ``op``: copy, cat (rows), swap (halves)."""

    key: str
    sources: tuple[str, ...]
    op: str = "copy"


def bfl_transformer_plan(keys: Iterable[str]) -> list[PlanItem]:
    """How each BFL tensor is made from a diffusers ``FluxTransformer2DModel``'s tensors (the
    inverse of :func:`gie_core.weights.single_file.bfl_flux_key_to_diffusers`): q, k, v (and the MLP
    input of single blocks) are concatenated, the final modulation's halves swap back to BFL's
    (shift, scale) order, norm weights are called ``scale``. Every source key is used once."""
    keys = list(keys)
    have = set(keys)
    plan: list[PlanItem] = []
    used: set[str] = set()

    def add(key: str, sources: tuple[str, ...], op: str = "copy") -> None:
        missing = [s for s in sources if s not in have]
        if missing:
            raise CheckpointError(f"the transformer lacks '{missing[0]}' needed for BFL tensor '{key}'")
        plan.append(PlanItem(key, sources, op))
        used.update(sources)

    for key in keys:
        if key in used:
            continue
        module, _, param = key.rpartition(".")
        bfl_param = "scale" if module.endswith(("norm_q", "norm_k", "norm_added_q", "norm_added_k")) else param
        if module in _INV_TOP:
            add(f"{_INV_TOP[module]}.{param}", (key,))
            continue
        if module == "norm_out.linear":
            add(f"final_layer.adaLN_modulation.1.{param}", (key,), "swap")
            continue
        m = _DIFFUSERS_BLOCK.match(key)
        if m is None:
            raise CheckpointError(f"'{key}' is not a tensor of a diffusers FLUX transformer")
        kind, index, sub, param = m.groups()
        if kind == "transformer_blocks":
            base, bfl_base = f"transformer_blocks.{index}", f"double_blocks.{index}"
            if sub in _INV_DOUBLE:
                add(f"{bfl_base}.{_INV_DOUBLE[sub]}.{bfl_param}", (key,))
                continue
            for fused, parts in _BFL_DOUBLE_QKV.items():
                if sub in parts:
                    add(f"{bfl_base}.{fused}.{param}", tuple(f"{base}.{p}.{param}" for p in parts), "cat")
                    break
            else:
                raise CheckpointError(f"'{key}' is not a tensor of a diffusers FLUX transformer")
        else:
            base, bfl_base = f"single_transformer_blocks.{index}", f"single_blocks.{index}"
            if sub in _INV_SINGLE:
                add(f"{bfl_base}.{_INV_SINGLE[sub]}.{bfl_param}", (key,))
            elif sub in _BFL_SINGLE_LINEAR1:
                add(f"{bfl_base}.linear1.{param}", tuple(f"{base}.{p}.{param}" for p in _BFL_SINGLE_LINEAR1), "cat")
            else:
                raise CheckpointError(f"'{key}' is not a tensor of a diffusers FLUX transformer")
    return plan


# --------------------------------------------------------------------------------------------
# Storage formats
# --------------------------------------------------------------------------------------------


def _is_fp8_candidate(key: str, shape: tuple[int, ...], keep: tuple[str, ...]) -> bool:
    """Linear weights go to fp8; norms, biases, embeddings and convolutions stay bf16."""
    return key.endswith(".weight") and len(shape) == 2 and not key.startswith(keep)


def _storage_entries(
    key: str, shape: tuple[int, ...], make: Callable[[], torch.Tensor], fmt: str, keep: tuple[str, ...]
) -> list[Entry]:
    """The stored tensor(s) of one weight in ``fmt`` (fp8_scaled adds ``<layer>.scale_weight``)."""
    if fmt not in FORMATS:
        raise ValueError(f"format '{fmt}' is unknown; expected one of {', '.join(FORMATS)}")
    if fmt in _PLAIN or not _is_fp8_candidate(key, shape, keep):
        dtype = _PLAIN.get(fmt, torch.bfloat16)  # fp8 files keep their non-linear tensors in bf16
        return [Entry(key, dtype, shape, lambda: make().to(dtype))]
    if fmt == "fp8_e4m3fn":
        return [Entry(key, torch.float8_e4m3fn, shape, lambda: make().float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn))]
    cache: dict[str, torch.Tensor] = {}

    def scale() -> torch.Tensor:  # per-tensor: the largest magnitude maps to fp8's largest value
        w = make().float()
        cache["w"] = w
        return (w.abs().amax() / FP8_MAX).clamp(min=1e-12).reshape(())

    def weight() -> torch.Tensor:
        w = cache.pop("w")
        s = cache.pop("s")
        return (w / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)

    def scale_entry() -> torch.Tensor:
        s = scale()
        cache["s"] = s
        return s

    layer = key[: -len(".weight")]
    # the scale is written first, so the weight is read once and divided by it
    return [Entry(f"{layer}.scale_weight", torch.float32, (), scale_entry), Entry(key, torch.float8_e4m3fn, shape, weight)]


def _finish_entries(entries: list[Entry], fmt: str) -> list[Entry]:
    if fmt == "fp8_scaled":  # ComfyUI's marker: "this file is scaled fp8" (its dtype is the weights')
        entries = [Entry("scaled_fp8", torch.float8_e4m3fn, (0,), lambda: torch.empty(0, dtype=torch.float8_e4m3fn)), *entries]
    return entries


def _metadata(component: str, source: ConversionSource, fmt: str, **extra) -> dict[str, str]:
    return {
        "format": "pt",
        "gie_component": component,
        "gie_source": str(source.path.resolve()),
        "gie_source_kind": source.kind,
        "gie_storage": fmt,
        "gie_generator": f"{GENERATOR} {__version__}",
        **{k: (v if isinstance(v, str) else json.dumps(v)) for k, v in extra.items()},
    }


# --------------------------------------------------------------------------------------------
# The three parts
# --------------------------------------------------------------------------------------------


def _transformer_entries(reader: CheckpointReader, prefix: str, fmt: str) -> list[Entry]:
    keys = [k[len(prefix):] for k in reader.keys() if k.startswith(prefix)]
    if not keys:
        raise CheckpointError(f"{reader.describe()} holds no transformer weights (no '{prefix}*' tensors)")
    entries: list[Entry] = []
    for item in bfl_transformer_plan(keys):
        shapes = [reader.shape(prefix + s) for s in item.sources]
        shape = (sum(s[0] for s in shapes), *shapes[0][1:]) if item.op == "cat" else shapes[0]

        def make(item=item) -> torch.Tensor:
            parts = [read_upcast(reader, prefix + s) for s in item.sources]
            if item.op == "cat":
                return torch.cat(parts, dim=0)
            if item.op == "swap":  # diffusers (scale, shift) -> BFL (shift, scale)
                scale, shift = parts[0].chunk(2, dim=0)
                return torch.cat([shift, scale], dim=0)
            return parts[0]

        entries += _storage_entries(item.key, tuple(shape), make, fmt, keep=())
    return _finish_entries(entries, fmt)


def _qwen_keys(reader: CheckpointReader, lm_head: bool) -> list[str]:
    keys = [k for k in reader.keys() if not k.startswith("denoise_tower.")]
    if not lm_head:
        keys = [k for k in keys if not k.startswith("lm_head.")]
    return keys


def _qwen_entries(reader: CheckpointReader, fmt: str, lm_head: bool) -> list[Entry]:
    keys = _qwen_keys(reader, lm_head)
    if not any(k.startswith(("model.layers.", "model.language_model.layers.")) for k in keys):
        raise CheckpointError(f"{reader.describe()} holds no Qwen2.5-VL weights")
    if lm_head and "lm_head.weight" not in keys:
        raise CheckpointError(f"{reader.describe()} has no lm_head.weight to include")
    entries = []
    for key in keys:
        entries += _storage_entries(
            released_qwen_key(key), reader.shape(key), lambda key=key: read_upcast(reader, key), fmt,
            keep=("model.embed_tokens.", "lm_head."),  # embeddings stay bf16, as in ComfyUI's fp8 files
        )
    return _finish_entries(entries, fmt)


def _connector_entries(reader: CheckpointReader, prefix: str) -> tuple[list[Entry], dict]:
    keys = [k for k in reader.keys() if k.startswith(prefix)]
    if not keys:
        raise CheckpointError(f"{reader.describe()} holds no connector weights")
    entries = []
    names = {}
    for key in keys:
        name = key[len(prefix):]
        name = "denoise_projector." + name if name[0].isdigit() else name
        names[name] = key
        # small: kept in the checkpoint's own dtype, exactly
        entries.append(Entry(name, reader.dtype(key), reader.shape(key), lambda key=key: reader.read(key)))
    with torch.device("meta"):
        shapes = {n: torch.empty(reader.shape(k)) for n, k in names.items()}
        conn = Connector.from_state_dict(shapes)
    config = {
        "input_hidden_size": conn.input_hidden_size,
        "output_hidden_size": conn.output_hidden_size,
        "hidden_size": conn.denoise_projector[0].out_features,
        "type_embedding": conn.type_embedding is not None,
        "num_queries": 0 if conn.queries is None else conn.queries.shape[0],
        "modes": list(conn.modes),
    }
    return entries, config


# --------------------------------------------------------------------------------------------
# The whole conversion
# --------------------------------------------------------------------------------------------


def output_paths(out_dir: str | os.PathLike, name: str, parts=CONVERT_PARTS, transformer_format="bf16",
                 qwen_format="bf16", lm_head=False) -> dict[str, Path]:
    """Where each part goes under ``out_dir`` (a ComfyUI ``models`` folder, or any folder)."""
    out = Path(out_dir)
    suffix = ".gguf" if transformer_format in GGUF_FORMATS else ".safetensors"
    names = {
        "transformer": f"{name}-kontext-{transformer_format}{suffix}",
        "qwen": f"{name}-qwen2.5-vl-{qwen_format}{'-lm_head' if lm_head else ''}.safetensors",
        "connector": f"{name}-connector.safetensors",
        "task_head": f"{name}-task-head.safetensors",
    }
    return {p: out / FOLDERS[p] / names[p] for p in parts}


def convert(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    parts: Iterable[str] | None = None,
    transformer_format: str = "bf16",
    qwen_format: str = "bf16",
    lm_head: bool = False,
    name: str = "gpt-image-edit",
    overwrite: bool = False,
    progress: Callable[[str, Path], None] | None = None,
) -> dict[str, Path]:
    """Convert ``source`` (see :func:`open_source`) into single files under ``out_dir``.

    Everything is checked before a weight is read: the source, the parts it holds, the formats,
    existing outputs (kept unless ``overwrite``) and the free disk space. Returns the written
    paths by part. ``parts`` None: :data:`DEFAULT_CONVERT_PARTS`, and the task head when the
    source has one.
    """
    if parts is None:
        parts = DEFAULT_CONVERT_PARTS + (("task_head",) if open_source(source).task_head is not None else ())
    parts = tuple(dict.fromkeys(parts))
    unknown = [p for p in parts if p not in CONVERT_PARTS]
    if unknown or not parts:
        raise ValueError(f"parts {unknown or '[]'} unknown; expected some of {', '.join(CONVERT_PARTS)}")
    for what, fmt, allowed in (("transformer format", transformer_format, TRANSFORMER_FORMATS),
                               ("Qwen format", qwen_format, FORMATS)):
        if fmt not in allowed:
            raise ValueError(f"{what} '{fmt}' is unknown; expected one of {', '.join(allowed)}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"name '{name}' must be letters, digits, '.', '_' or '-' (it names the output files)")
    src = open_source(source)
    missing = [p for p in parts if getattr(src, p) is None]
    if missing:
        hint = " (a gie-train export has no Qwen: its Qwen is the base model's; keep the Qwen file you use)" if "qwen" in missing else ""
        if "task_head" in missing:
            hint += f" (the task head is {TASK_HEAD_PT} beside the released checkpoint's config.json)"
        raise CheckpointError(f"{src.describe()} has no {', '.join(missing)} to convert{hint}")
    paths = output_paths(out_dir, name, parts, transformer_format, qwen_format, lm_head)
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise ValueError(f"output {existing[0]} already exists; pass --overwrite to replace it")
    for p in paths.values():
        check_output_path(p, "output")

    written: dict[str, Path] = {}
    try:
        for part in parts:
            written[part] = _write_part(part, src, paths[part], transformer_format, qwen_format, lm_head)
            if progress is not None:
                progress(part, written[part])
    except KeyboardInterrupt:
        raise ConversionInterrupted(written, paths) from None
    return written


class ConversionInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`convert`: the message names the files already written (each complete)
    and says the one being written was not left behind."""

    def __init__(self, written: dict[str, Path], paths: dict[str, Path]):
        self.written = dict(written)
        done = ", ".join(str(p) for p in written.values())
        pending = [str(p) for part, p in paths.items() if part not in written]
        made = f"after writing {done}" if written else "before any file was written"
        super().__init__(f"{made}; {pending[0]} was not written (nothing partial is left)" if pending else made)


def _write_part(part: str, src, path: Path, transformer_format: str, qwen_format: str, lm_head: bool) -> Path:
    """Stream one part of ``src`` into ``path`` (atomic: complete, or nothing)."""
    if part == "transformer":
        wpath, prefix = src.transformer
        with CheckpointReader.open(wpath) as reader:
            gguf_type = GGUF_FORMATS.get(transformer_format)
            entries = _transformer_entries(reader, prefix, "fp32" if gguf_type else transformer_format)
            tower = src.config.get("denoise_tower", {})
            meta = _metadata("kontext_transformer", src, transformer_format, gie_layout="bfl",
                             **({"gie_transformer_config": tower["denoiser_config"]} if "denoiser_config" in tower else {}))
            _check_space(path, entries, 0.3 if gguf_type else 1.0)
            if gguf_type:
                return write_gguf(entries, path, gguf_type, metadata=meta)
            return write_safetensors_streamed(path, entries, meta)
    if part == "qwen":
        with CheckpointReader.open(src.qwen) as reader:
            entries = _qwen_entries(reader, qwen_format, lm_head)
            qwen_cfg = {k: v for k, v in src.config.items() if k != "denoise_tower"}
            meta = _metadata("qwen2.5-vl", src, qwen_format, gie_layout="comfyui", gie_lm_head=str(lm_head).lower(),
                             gie_qwen_config=qwen_cfg)
            _check_space(path, entries)
            return write_safetensors_streamed(path, entries, meta)
    if part == "task_head":
        return _write_task_head(src, path)
    wpath, prefix = src.connector
    with CheckpointReader.open(wpath) as reader:
        entries, cfg = _connector_entries(reader, prefix)
        meta = _metadata("connector", src, "as stored", gie_connector_config=cfg)
        mode = reader.metadata.get("gie_fusion_mode")
        meta["gie_fusion_mode"] = mode or ("vlm+t5" if src.kind == "released" else cfg["modes"][0])
        return write_safetensors_streamed(path, entries, meta)


def _write_task_head(src: ConversionSource, path: Path) -> Path:
    """The task head as safetensors (float32, as the app runs it): read once from the shipped
    ``.pt`` with ``torch.load(weights_only=True)`` (never unpickled otherwise) and checked."""
    try:
        head = TaskHead.from_state_dict(read_task_head_state(src.task_head), f"task head {src.task_head}")
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    state = {k: v.float().contiguous() for k, v in head.state_dict().items()}
    entries = [Entry(k, torch.float32, tuple(v.shape), lambda v=v: v) for k, v in state.items()]
    meta = _metadata("task_head", src, "fp32", gie_task_head_source=src.task_head.name,
                     gie_task_head_logits="answer,edit")
    return write_safetensors_streamed(path, entries, meta)


def _check_space(path: Path, entries: list[Entry], fraction: float = 1.0) -> None:
    need = int(sum(e.nbytes for e in entries) * fraction) + (1 << 20)
    free = free_space(path)
    if free is not None and free < need:
        raise ValueError(
            f"output {path} needs {human_size(need)} but only {human_size(free)} is free on that disk "
            f"({existing_folder(path)})"
        )


# --------------------------------------------------------------------------------------------
# Is the checkpoint's Qwen the stock one?
# --------------------------------------------------------------------------------------------


@dataclass
class QwenComparison:
    equal: bool
    compared: int
    differing: list[str]
    missing_in_stock: list[str]
    max_abs_diff: float
    note: str

    def summary(self) -> str:
        if self.equal:
            return f"equal: all {self.compared} Qwen2.5-VL tensors match the stock file ({self.note})"
        parts = []
        if self.differing:
            parts.append(f"{len(self.differing)} tensors differ (e.g. {self.differing[0]}, max |diff| {self.max_abs_diff:.3g})")
        if self.missing_in_stock:
            parts.append(f"{len(self.missing_in_stock)} tensors are missing from the stock file (e.g. {self.missing_in_stock[0]})")
        return "different: " + "; ".join(parts)


def compare_qwen(source: str | os.PathLike, stock_file: str | os.PathLike, *, lm_head: bool = False) -> QwenComparison:
    """Compare the checkpoint's Qwen2.5-VL with a stock file (e.g. ComfyUI's
    ``qwen_2.5_vl_7b.safetensors``), tensor by tensor. Equal means: same values after both are
    brought to the checkpoint's dtype (bit-exact for a bf16 stock file); for an fp8 stock file,
    the checkpoint's tensors are compared after the same fp8 rounding, and tensors stored at
    another precision are compared at the coarser one. ``lm_head`` is compared
    only when asked (stock text-encoder files usually leave it out)."""
    src = open_source(source)
    if src.qwen is None:
        raise CheckpointError(f"{src.describe()} has no Qwen2.5-VL to compare")
    stock_path = Path(stock_file)
    with CheckpointReader.open(src.qwen) as ours, CheckpointReader.open(stock_path) as stock:
        stock_keys = {k for k in stock.keys() if k != "scaled_fp8" and not k.endswith((".scale_weight", ".scale_input"))}
        if not any(k.startswith("model.layers.") for k in stock_keys):
            raise CheckpointError(f"{stock_path} is not a Qwen2.5-VL text-encoder file (no model.layers.* tensors)")
        differing, missing = [], []
        worst = 0.0
        compared = 0
        fp8_stock = False
        for key in _qwen_keys(ours, lm_head):
            name = released_qwen_key(key)
            if name not in stock_keys:
                missing.append(name)
                continue
            a = read_upcast(ours, key)
            b_raw = stock.dtype(name)
            b = read_upcast(stock, name)
            if a.shape != b.shape:
                differing.append(name)
                continue
            if b_raw in FLOAT8_DTYPES:  # compare at the stock file's precision
                fp8_stock = True
                scale_key = name[: -len(".weight")] + ".scale_weight"
                scale = stock.read(scale_key).float() if scale_key in stock else torch.tensor(1.0)
                a = ((a.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(b_raw).float() * scale)
            else:  # the coarser of the two precisions decides
                coarse = b_raw if b_raw.itemsize < a.dtype.itemsize else a.dtype
                a, b = a.to(coarse), b.to(coarse)
            diff = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
            compared += 1
            if diff != 0.0:
                differing.append(name)
                worst = max(worst, diff)
    note = "at the stock file's fp8 precision" if fp8_stock else "bit for bit at the coarser of the two dtypes"
    return QwenComparison(not differing and not missing, compared, differing, missing, worst, note)
