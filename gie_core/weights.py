"""Streaming safetensors I/O.

Checkpoints here are tens of GB, so weights are read tensor by tensor with plain file reads
straight into their destination (no mmap of whole shards, no second full copy in memory), and
written atomically (a crash mid-save never replaces a good file with a half-written one).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)

FLOAT8_DTYPES = tuple(getattr(torch, a) for a in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, a))

# Index file names of sharded checkpoints, in the order we look for them.
_INDEX_NAMES = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")
_SINGLE_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")


class CheckpointError(ValueError):
    """A weights file or directory is missing, corrupt or of the wrong kind."""


_HAS_PREADV = hasattr(os, "preadv")


def _read_exact(fh, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = fh.read(n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class SafetensorsFile:
    """One safetensors file, read by explicit offsets.

    ``read(key)`` reads exactly that tensor's bytes; nothing else of the file is touched.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"weights file {self.path} does not exist")
        size = self.path.stat().st_size
        self._fh = open(self.path, "rb", buffering=0)
        self._lock = threading.Lock()
        try:
            head = _read_exact(self._fh, 8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path} is not a safetensors file: only {size} bytes")
            (header_len,) = struct.unpack("<Q", head)
            if header_len <= 0 or 8 + header_len > size or header_len > 100 * 1024 * 1024:
                raise CheckpointError(
                    f"{self.path} is not a valid safetensors file: header length {header_len} "
                    f"does not fit in a {size}-byte file"
                )
            try:
                header = json.loads(_read_exact(self._fh, header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"{self.path} is not a valid safetensors file: header is not JSON ({exc})") from None
            if not isinstance(header, dict):
                raise CheckpointError(f"{self.path} is not a valid safetensors file: header is not a JSON object")
            self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
            self._data_start = 8 + header_len
            data_len = size - self._data_start
            self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
            for key, info in header.items():
                try:
                    dtype = _DTYPES[info["dtype"]]
                    shape = tuple(int(s) for s in info["shape"])
                    begin, end = (int(o) for o in info["data_offsets"])
                except (KeyError, TypeError, ValueError):
                    raise CheckpointError(
                        f"{self.path} is not a valid safetensors file: bad or unsupported entry for '{key}': {info}"
                    ) from None
                numel = 1
                for s in shape:
                    numel *= s
                if not (0 <= begin <= end <= data_len) or end - begin != numel * dtype.itemsize:
                    raise CheckpointError(
                        f"{self.path} is truncated or corrupt: tensor '{key}' claims bytes {begin}..{end} "
                        f"but the data section is {data_len} bytes"
                    )
                self._entries[key] = (dtype, shape, begin, end)
        except BaseException:
            self._fh.close()
            raise

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][0]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def nbytes(self, key: str) -> int:
        _, _, begin, end = self._entries[key]
        return end - begin

    def read(self, key: str) -> torch.Tensor:
        """Read one tensor into fresh CPU memory (its stored dtype). Thread-safe: positional
        reads, so several tensors can be read at once."""
        dtype, shape, begin, end = self._entries[key]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        pos, offset = 0, self._data_start + begin
        while pos < len(view):
            if _HAS_PREADV:
                got = os.preadv(self._fh.fileno(), [view[pos:]], offset + pos)
            else:
                with self._lock:
                    self._fh.seek(offset + pos)
                    got = self._fh.readinto(view[pos:])
            if not got:
                raise CheckpointError(f"{self.path} is truncated: could not read tensor '{key}'")
            pos += got
        return buf.view(dtype).reshape(shape)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CheckpointReader:
    """A checkpoint made of one or more safetensors files, addressed by tensor name."""

    def __init__(self, files: Iterable[str | os.PathLike]):
        self.files = [SafetensorsFile(f) for f in files]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for k in f.keys():
                self._where[k] = f
        self.metadata = self.files[0].metadata if self.files else {}

    @classmethod
    def open(cls, path: str | os.PathLike) -> CheckpointReader:
        """Open a ``.safetensors`` file or a directory holding one (sharded or not)."""
        return cls(find_safetensors(path))

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def dtype(self, key: str) -> torch.dtype:
        return self._where[key].dtype(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def read(self, key: str) -> torch.Tensor:
        try:
            f = self._where[key]
        except KeyError:
            raise CheckpointError(f"tensor '{key}' is not in the checkpoint ({self.describe()})") from None
        return f.read(key)

    def nbytes(self, key: str) -> int:
        return self._where[key].nbytes(key)

    def iter_tensors(
        self, keys: Iterable[str], *, workers: int = 4, max_ahead_bytes: int = 512 * 2**20
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` in order while reading ahead on a few threads (file reads
        release the GIL), with at most ``max_ahead_bytes`` read but not yet consumed."""
        keys = list(keys)
        if workers <= 1 or len(keys) < 2:
            for k in keys:
                yield k, self.read(k)
            return
        from collections import deque

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gie-read") as pool:
            pending: deque = deque()
            ahead = 0
            nxt = 0
            while nxt < len(keys) or pending:
                while nxt < len(keys) and (not pending or ahead + self.nbytes(keys[nxt]) <= max_ahead_bytes):
                    k = keys[nxt]
                    pending.append((k, pool.submit(self.read, k)))
                    ahead += self.nbytes(k)
                    nxt += 1
                k, fut = pending.popleft()
                ahead -= self.nbytes(k)
                yield k, fut.result()

    def describe(self) -> str:
        if len(self.files) == 1:
            return str(self.files[0].path)
        return f"{len(self.files)} shards in {self.files[0].path.parent}"

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def find_safetensors(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint: the file itself, a directory's index shards,
    or its single ``model.safetensors`` / ``diffusion_pytorch_model.safetensors``."""
    p = Path(path)
    if p.is_file():
        if p.suffix != ".safetensors":
            raise CheckpointError(f"{p} is not a .safetensors file (only safetensors weights are loaded)")
        return [p]
    if not p.is_dir():
        raise CheckpointError(f"weights path {p} does not exist")
    for name in _INDEX_NAMES:
        index = p / name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (p / s).is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing)}")
            return [p / s for s in shards]
    for name in _SINGLE_NAMES:
        if (p / name).is_file():
            return [p / name]
    found = sorted(p.glob("*.safetensors"))
    if len(found) == 1:
        return found
    raise CheckpointError(
        f"{p} holds no safetensors weights (expected {_SINGLE_NAMES[0]}, {_SINGLE_NAMES[1]} or a sharded index)"
    )


@contextlib.contextmanager
def empty_weights():
    """Build modules with parameters on the meta device (buffers stay real, so rotary
    tables and similar non-persistent buffers keep their computed values)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        yield


def _keep_fp32(model: torch.nn.Module) -> tuple[str, ...]:
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    return tuple(keep)


def assign_weights(
    model: torch.nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    what: str = "checkpoint",
    strict: bool = True,
) -> torch.nn.Module:
    """Move ``(parameter name, tensor)`` pairs into a model built under :func:`empty_weights`.

    Floating tensors are cast to ``dtype`` (fp8-stored weights are upcast), except modules the
    model asks to keep in fp32 (T5's ``wo``). With ``strict`` every parameter must be given
    exactly once and no unknown name is accepted; errors name ``what`` was being loaded.
    """
    from accelerate.utils import set_module_tensor_to_device

    expected = dict(model.named_parameters())
    expected.update({n: b for n, b in model.named_buffers() if n in model.state_dict()})
    keep32 = _keep_fp32(model)
    seen: set[str] = set()
    unexpected: list[str] = []
    for name, tensor in tensors:
        if name not in expected:
            unexpected.append(name)
            continue
        want = tuple(expected[name].shape)
        if tuple(tensor.shape) != want:
            raise CheckpointError(
                f"{what}: tensor '{name}' has shape {tuple(tensor.shape)} but the model expects {want} "
                "(is this checkpoint for a different architecture?)"
            )
        target = dtype
        if keep32 and any(f".{k}." in f".{name}" for k in keep32) and dtype == torch.float16:
            target = torch.float32
        value = tensor.to(target) if tensor.is_floating_point() else tensor
        set_module_tensor_to_device(model, name, device, value=value, dtype=value.dtype)
        seen.add(name)
    if strict:
        missing = [n for n in expected if n not in seen]
        if unexpected or missing:
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
            raise CheckpointError(f"{what} does not match the model: " + "; ".join(parts))
    # Buffers were built on CPU; bring them along.
    for name, buf in list(model.named_buffers()):
        if buf.device.type != torch.device(device).type and not buf.is_meta:
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            module._buffers[attr] = buf.to(device)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise CheckpointError(f"{what}: {len(leftover)} parameters were never loaded (e.g. {leftover[0]})")
    return model


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a safetensors file via a temporary file in the same folder and an atomic rename."""
    from safetensors.torch import save_file

    from .files import atomic_write

    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(
        path, lambda tmp: save_file(contiguous, tmp, metadata=dict(metadata or {"format": "pt"})), fsync=True
    )
