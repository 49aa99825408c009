"""GGUF Kontext transformers: reading them (diffusers' GGUF quantizer) and writing them (``gguf``).

A GGUF transformer keeps its weights in llama.cpp's block-quantised formats (Q8_0: ~8.5 bits
a weight, Q5_K/Q5_0: ~5.5, Q4_K/Q4_0: ~4.5) and dequantises each layer as it runs.

- :func:`load_gguf_transformer` loads the community FLUX.1-Kontext-dev files (QuantStack /
  city96: BFL key layout, as ComfyUI-GGUF reads them) and our own (``gie-convert``) into a
  diffusers ``FluxTransformer2DModel`` through ``from_single_file`` with a
  ``GGUFQuantizationConfig``: the quantised blocks stay quantised in memory, each
  ``GGUFLinear`` dequantises on the fly. The architecture is the shipped Kontext config with
  the sizes read from the tensor shapes (offline: a local config folder, never the hub); the
  BFL names are mapped with the size-aware converter of :mod:`gie_core.weights.single_file`, so tiny
  test files load through the same path as the real ones.
- :func:`write_gguf` writes a state dict (BFL layout for ComfyUI-GGUF) with the ``gguf``
  package, tensor by tensor, atomically. The ``gguf`` package quantises Q8_0, Q5_0/Q5_1 and
  Q4_0/Q4_1 (its Python code has no K-quant encoder; K-quant files come from llama.cpp tools
  and are read here all the same).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from gie_core.files import atomic_write
from gie_core.weights.loading import _dtype_kwarg
from gie_core.weights.reader import CheckpointError, read_at
from gie_core.weights.single_file import _flux_config_from_shapes, bfl_flux_key_to_diffusers

__all__ = ["GGUF_WRITE_TYPES", "gguf_metadata", "gguf_tensor_shapes", "is_gguf", "load_gguf_transformer", "open_checked", "read_gguf_tensors",
           "write_gguf"]

# What write_gguf can store: block quantisations the gguf package encodes, and plain floats.
GGUF_WRITE_TYPES: tuple[str, ...] = ("Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "BF16", "F16", "F32")
GGUF_SUFFIX = ".gguf"

# Tensors below this many elements, 1-D tensors (biases, norm scales) and rows that do not split
# into whole blocks stay unquantised (ComfyUI-GGUF's converter does the same).
QUANTIZE_MIN_ELEMENTS = 1024
# BFL tensors kept in F16 in quantised files: the input embedders, the timestep / guidance /
# pooled MLPs and the final layer (small and precision-critical; the same layers as fp8 keeps).
KEEP_F16_PREFIXES: tuple[str, ...] = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.",
                                      "x_embedder.", "context_embedder.", "time_text_embed.", "norm_out.", "proj_out.")
_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix; the magic number is checked on load)."""
    return str(path).lower().endswith(GGUF_SUFFIX)


def _check_file(path: Path) -> None:
    """The file exists and starts with the GGUF magic number (4 bytes read)."""
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file (it does not start with the GGUF magic number)")


def open_checked(path: str | os.PathLike):
    """A ``gguf.GGUFReader`` of a complete GGUF file (its header parses and every tensor's data
    lies inside the file), or a :class:`CheckpointError` naming the file and what is wrong: a
    truncated download otherwise fails deep inside numpy ("cannot reshape array")."""
    p = Path(path)
    _check_file(p)
    size = p.stat().st_size
    try:
        reader = gguf.GGUFReader(p)
    except (ValueError, IndexError, KeyError, OverflowError):  # numpy reading past the end of a cut file
        raise CheckpointError(
            f"{p} is truncated or damaged: its header or tensor data run past the end of the file ({size} bytes); "
            "download or convert it again"
        ) from None
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise CheckpointError(
                f"{p} is truncated: tensor '{tensor.name}' needs bytes up to {end} but the file has {size}; "
                "download or convert it again"
            )
    return reader


def gguf_metadata(path: str | os.PathLike) -> dict[str, object]:
    """The key/value metadata of a GGUF file (strings, numbers, booleans; arrays left out)."""
    reader = open_checked(path)
    out: dict[str, object] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or not field.types or field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        value = field.parts[field.data[0]]
        if field.types[0] == gguf.GGUFValueType.STRING:
            out[name] = bytes(value).decode("utf-8", "replace")
        else:
            out[name] = value.tolist()[0] if hasattr(value, "tolist") else value
    return out


# Plain (F16/F32) tensors cast while read go through a buffer of at most this many bytes, so a
# cast never holds a whole tensor twice (a community file keeps its final layer in F32: 75 MB).
CAST_CHUNK_BYTES = 4 * 2**20

# layout(key, rows) -> [(name, source rows)]: the tensors a file's tensor becomes, each made of
# some of its rows (dim 0) in order, e.g. a fused qkv weight split into q, k and v.
Layout = Callable[[str, int], list[tuple[str, torch.Tensor]]]


def _logical_shape(t) -> tuple[int, ...]:
    """A GGUF tensor's shape as a model sees it (numpy order; quantised rows in elements)."""
    shape = tuple(int(s) for s in t.data.shape)
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return shape
    return tuple(int(s) for s in gguf.quant_shape_from_byte_shape(shape, t.tensor_type))


def _runs(rows: torch.Tensor) -> list[tuple[int, int]]:
    """Row indices as (first, count) runs of consecutive rows (found with tensor ops: a 12B
    model's tensors have millions of rows in all)."""
    if rows.numel() == 0:
        return []
    breaks = (torch.nonzero(rows[1:] - rows[:-1] != 1).flatten() + 1).tolist()
    starts, ends = [0, *breaks], [*breaks, rows.numel()]
    return [(int(rows[a]), b - a) for a, b in zip(starts, ends)]


def gguf_tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Every tensor's logical shape in a complete GGUF file (:func:`open_checked`); no data read."""
    return {t.name: _logical_shape(t) for t in open_checked(path).tensors}


def read_gguf_tensors(path: Path, dtype: torch.dtype | None = None, layout: Layout | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a complete GGUF file (:func:`open_checked`) in fresh memory, as diffusers'
    ``load_gguf_checkpoint`` gives them (quantised blocks as its ``GGUFParameter``, F16/F32 as
    plain tensors, cast to ``dtype`` when given), or a :class:`CheckpointError` naming a
    quantisation diffusers cannot dequantise, before any tensor is read.

    ``layout`` renames and splits: each file tensor becomes the tensors it returns, each read
    straight from the file's rows into its own memory (a quantised row is whole blocks, so rows
    split as they do unquantised), never a fused copy split afterwards. F16/F32 tensors cast to
    ``dtype`` go through a buffer of at most ``CAST_CHUNK_BYTES``.

    Read front to back by positional reads with the kernel's read-ahead, never through the
    file's memory map: the file's pages never enter the process, so loading peaks at the bytes
    kept plus one cast buffer, and nothing of the file is mapped once the load returns."""
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES, GGUFParameter  # start-up: diffusers (~3 s)

    plain = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    tensors = sorted(open_checked(path).tensors, key=lambda t: int(t.data_offset))
    for t in tensors:
        if t.tensor_type not in plain and t.tensor_type not in SUPPORTED_GGUF_QUANT_TYPES:
            raise CheckpointError(
                f"{path}: tensor '{t.name}' is quantised as {t.tensor_type.name}, which diffusers cannot dequantise "
                f"(it reads {', '.join(q.name for q in SUPPORTED_GGUF_QUANT_TYPES)})"
            )
    state: dict[str, torch.Tensor] = {}
    with open(path, "rb", buffering=0) as fh:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)

        def read_rows(t, first: int, view: np.ndarray) -> None:
            row = int(t.data.nbytes) // int(t.data.shape[0])
            if read_at(fh, memoryview(view.reshape(-1)), int(t.data_offset) + first * row) < view.nbytes:
                raise CheckpointError(f"{path} is truncated: could not read tensor '{t.name}'")

        buffer = None
        for t in tensors:  # t.data maps the file; only its shape and dtype are read, never its pages
            shape, src_dtype = tuple(t.data.shape), t.data.dtype
            parts = layout(t.name, shape[0]) if layout is not None else [(t.name, torch.arange(shape[0]))]
            cast = t.tensor_type in plain and dtype is not None and torch.from_numpy(np.empty(0, src_dtype)).dtype != dtype
            for name, rows in parts:
                runs = _runs(rows)
                if not cast:
                    data = np.empty((len(rows), *shape[1:]), dtype=src_dtype)
                    at = 0
                    for first, count in runs:
                        read_rows(t, first, data[at:at + count])
                        at += count
                    weights = torch.from_numpy(data)
                    state[name] = weights if t.tensor_type in plain else GGUFParameter(weights, quant_type=t.tensor_type)
                    continue
                out = torch.empty((len(rows), *shape[1:]), dtype=dtype)
                per_row = int(np.prod(shape[1:], dtype=np.int64)) * src_dtype.itemsize
                step = max(1, CAST_CHUNK_BYTES // per_row)
                if buffer is None or buffer.nbytes < min(step, len(rows)) * per_row:
                    # one byte buffer for every cast (grown only for a row over CAST_CHUNK_BYTES)
                    buffer = np.empty(max(CAST_CHUNK_BYTES, per_row), dtype=np.uint8)
                at = 0
                for first, count in runs:
                    for i in range(0, count, step):
                        n = min(step, count - i)
                        chunk = buffer[:n * per_row].view(src_dtype).reshape(n, *shape[1:])
                        read_rows(t, first + i, chunk)
                        out[at:at + n].copy_(torch.from_numpy(chunk))
                        at += n
                state[name] = out
    return state


class _Shapes:
    """The reader interface the shape-to-config code of :mod:`gie_core.weights.single_file` reads
    (``keys``, ``shape``, ``in``) over a GGUF file's logical shapes."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]):
        self._shapes = shapes

    def keys(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]


def _strip(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def load_gguf_transformer(
    path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"
):
    """A FLUX.1 Kontext transformer from a GGUF file, its quantised layers kept quantised.

    ``dtype`` is the compute dtype (what each layer is dequantised to; unquantised tensors are
    stored in it). Keys in the BFL layout (with or without ComfyUI's ``model.diffusion_model.``
    prefix) or in diffusers' layout. Raises :class:`CheckpointError` for a file that is not a
    FLUX transformer or uses a quantisation diffusers cannot dequantise.
    """
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig  # start-up: diffusers' models (~4 s)

    p = Path(path)
    shapes = {_strip(k): v for k, v in gguf_tensor_shapes(p).items()}
    if "img_in.weight" in shapes:
        bfl = True
    elif "x_embedder.weight" in shapes:
        bfl = False
    else:
        first = ", ".join(list(shapes)[:3]) or "no tensors"
        raise CheckpointError(f"{p} is not a FLUX transformer GGUF file (its first tensors are {first})")
    config, mlp_hidden = _flux_config_from_shapes(_Shapes(shapes), "", p, bfl=bfl)
    inner = config["num_attention_heads"] * config["attention_head_dim"]

    def layout(key: str, rows: int) -> list[tuple[str, torch.Tensor]]:
        # the BFL -> diffusers mapping applied to row numbers: which rows of the file's tensor
        # make each diffusers tensor (split fused qkv / linear1, swap the final layer's halves)
        if not bfl:
            return [(_strip(key), torch.arange(rows))]
        return bfl_flux_key_to_diffusers(_strip(key), torch.arange(rows), inner_dim=inner, mlp_hidden_dim=mlp_hidden)

    state = read_gguf_tensors(p, dtype, layout)
    with tempfile.TemporaryDirectory(prefix="gie-gguf-config-") as cfg_dir:
        cfg = {k: v for k, v in config.items() if not k.startswith("_")}
        cfg["_class_name"] = "FluxTransformer2DModel"
        (Path(cfg_dir) / "config.json").write_text(json.dumps(cfg))
        try:
            model = FluxTransformer2DModel.from_single_file(
                state, config=cfg_dir, local_files_only=True, device=torch.device(device),
                quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
                **_dtype_kwarg(FluxTransformer2DModel, dtype),
            )
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{p} does not load as a FLUX transformer: {exc}") from None
    model._gie_quantization = "gguf"
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


@dataclass
class _Item:
    name: str
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]


def _items(tensors) -> list[_Item]:
    """A mapping name -> tensor, or entries with ``key``/``name``, ``shape`` and ``make()``
    (as :mod:`gie_core.weights.convert` plans a file), as a list of items made one at a time."""
    if isinstance(tensors, Mapping):
        return [_Item(k, tuple(v.shape), (lambda v=v: v)) for k, v in tensors.items()]
    out = []
    for e in tensors:
        name = getattr(e, "key", None) or getattr(e, "name", None)
        if name is None or not hasattr(e, "shape") or not callable(getattr(e, "make", None)):
            raise TypeError("write_gguf takes a mapping of tensors or entries with key, shape and make()")
        out.append(_Item(str(name), tuple(e.shape), e.make))
    return out


def _stored_type(item: _Item, qtype):
    """The GGML type one tensor is stored in under the file's ``qtype``."""
    T = gguf.GGMLQuantizationType
    n = 1
    for s in item.shape:
        n *= s
    if len(item.shape) <= 1:
        return T.F32
    if qtype in (T.F32, T.F16, T.BF16):
        return qtype
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if n < QUANTIZE_MIN_ELEMENTS or item.shape[-1] % block or item.name.startswith(KEEP_F16_PREFIXES):
        return T.F16
    return qtype


def _metadata_writer(writer, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_int64(key, value) if value < 0 or value >= 2**32 else writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_string(key, str(value))


def write_gguf(
    tensors: Mapping[str, torch.Tensor] | Iterable,
    path: str | os.PathLike,
    qtype: str = "Q8_0",
    metadata: Mapping[str, object] | None = None,
    *,
    arch: str = "flux",
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``tensors`` to a GGUF file at ``path``, quantising the large 2-D weights to ``qtype``.

    ``tensors``: a mapping name -> tensor, or entries with ``key``, ``shape`` and ``make()`` (each
    tensor is then made, quantised, written and dropped in turn: peak memory is one tensor).
    For ComfyUI-GGUF give the BFL key layout and ``arch="flux"`` (its ``general.architecture``).
    1-D tensors are stored F32; small tensors, rows that are not whole blocks and the embedder /
    final layers (``KEEP_F16_PREFIXES``) F16. ``metadata``: extra key/values (str, int, float,
    bool). The file appears complete or not at all (written beside, then renamed).
    ``progress(done, total)`` is called after each tensor.
    """
    if qtype not in GGUF_WRITE_TYPES:
        raise ValueError(f"GGUF type '{qtype}' cannot be written; expected one of {', '.join(GGUF_WRITE_TYPES)}")
    target = getattr(gguf.GGMLQuantizationType, qtype)
    items = _items(tensors)
    if not items:
        raise ValueError("write_gguf was given no tensors")
    names = [i.name for i in items]
    if len(set(names)) != len(names):
        raise ValueError("write_gguf was given the same tensor name twice")
    stored = [_stored_type(i, target) for i in items]

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(path=None, arch=arch)
        try:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            writer.add_file_type(_file_type(target))
            for key, value in (metadata or {}).items():
                _metadata_writer(writer, str(key), value)
            for item, t in zip(items, stored):
                byte_shape = gguf.quant_shape_to_byte_shape(item.shape, t) if t not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else item.shape
                np_dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(t, np.uint8)
                nbytes = int(np.prod(byte_shape)) * np.dtype(np_dtype).itemsize
                writer.add_tensor_info(item.name, byte_shape, np.dtype(np_dtype), nbytes, raw_dtype=t)
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for n, (item, t) in enumerate(zip(items, stored)):
                tensor = item.make()
                if tuple(tensor.shape) != item.shape:
                    raise ValueError(f"tensor '{item.name}' came out {tuple(tensor.shape)}, not {item.shape}")
                data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
                del tensor
                if t == gguf.GGMLQuantizationType.F32:
                    out = data
                elif t == gguf.GGMLQuantizationType.F16:
                    out = data.astype(np.float16)
                else:
                    out = gguf.quants.quantize(data, t)
                writer.write_tensor_data(out)
                del data, out
                if progress is not None:
                    progress(n + 1, len(items))
            writer.fout[0].flush()
            os.fsync(writer.fout[0].fileno())
        finally:
            writer.close()

    return atomic_write(path, write)


def _file_type(qtype) -> int:
    """``general.file_type`` (llama.cpp's LlamaFileType) of a file whose main type is ``qtype``."""
    names = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
             "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1"}
    return int(getattr(gguf.LlamaFileType, names[qtype.name]))
