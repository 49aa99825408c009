"""Streaming safetensors I/O.

Checkpoints here are tens of GB, so weights are read tensor by tensor, never a second full copy
in memory, and written atomically (a crash mid-save never replaces a good file with a
half-written one).

How a load reads a file (each choice measured with ``bench/bench_loading.py`` against the
libraries' loaders, in fresh processes, warm and cold; see the README's "Speed and memory"):

- the files are memory-mapped and read front to back; the kernel is told so (``posix_fadvise``
  SEQUENTIAL) and asked to read ahead (WILLNEED, asynchronous, in 64 MB requests): every tensor of
  the load at once when they are kept as the files' pages, 256 MB ahead of the copying otherwise. A cold file then
  comes in at the disk's pace. (Mapping each tensor's or chunk's pages eagerly with
  ``madvise(MADV_POPULATE_READ)`` before copying was slower, warm by ~5% and cold, than letting
  the copy's threads fault them in; a read-ahead thread contended with the copying for the GIL;
  both were dropped.)
- when every tensor a load reads keeps its stored dtype on the CPU, the files stay mapped and
  the tensors *are* their pages (:meth:`SafetensorsFile.view`, copy-on-write: writes stay
  private); nothing is copied, and the pages are the bytes kept;
- any other load (a cast such as bf16 -> fp32, fp8 storage, a device other than the CPU) copies
  each tensor straight from the mapping into the tensor the model keeps, in its final dtype, and
  drops the source pages from the process right after (they stay in the page cache): in one
  ``.to()`` up to 256 MB (as fast as the libraries' per-tensor cast), in 4 MB chunks beyond
  that and for narrowing casts such as bf16 -> fp8 (:meth:`SafetensorsFile.copy_into`), so a
  load peaks at the bytes kept plus at most one widening tensor's source (<= 256 MB). The files are unmapped when the load ends.

A view is as aligned in memory as its tensor is in the file (8 bytes at least); CPU kernels may
then round the last bit of a result differently than on a 64-byte-aligned copy (as with any
memory-mapped loader).
"""

from __future__ import annotations

import contextlib
import functools
import json
import mmap
import os
import struct
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file

from gie_core.files import atomic_write

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

# Bytes of a file copied (and cast) per step into a tensor the model keeps: small beside any
# checkpoint, so the pages in flight stay out of peak memory; large enough that the per-step
# calls cost nothing measurable (bf16 -> fp8 of a 1.8 GB transformer: 4 MB chunks as fast as
# 16 MB ones, and the pages in flight 5 MB instead of 13 MB).
COPY_CHUNK_BYTES = 4 * 2**20
# A tensor up to this size is copied (and cast) in one step and its source pages dropped after:
# measured as fast as the libraries' per-tensor ``.to()``, while chunking every bf16 -> fp32 cast
# was ~15% slower; larger ones (Qwen's 1 GB token embeddings) and narrowing casts (bf16 -> fp8,
# where one tensor's source outweighs several kept ones) go in chunks, so a load peaks at the
# bytes kept plus at most this much of the source.
WHOLE_COPY_BYTES = 256 * 2**20
# Read-ahead requests (posix_fadvise WILLNEED) are at most this long: a cold 1.8 GB file asked for
# in one request came in ~30% slower than in 64 MB requests (256 MB ones were no better than one).
ADVISE_PIECE_BYTES = 64 * 2**20


def read_at(fh, view: memoryview, offset: int, lock: threading.Lock | None = None) -> int:
    """Fill ``view`` with the bytes of the (unbuffered) file ``fh`` from ``offset`` on, by
    positional reads (thread-safe; no memory map); returns how many bytes were read (fewer at
    the end of the file). Without ``os.preadv`` it seeks under ``lock``."""
    view = view.cast("B")
    pos = 0
    while pos < len(view):
        if _HAS_PREADV:
            got = os.preadv(fh.fileno(), [view[pos:]], offset + pos)
        else:
            with lock or contextlib.nullcontext():
                fh.seek(offset + pos)
                got = fh.readinto(view[pos:])
        if not got:
            break
        pos += got
    return pos


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
        self._size = size
        self._map: mmap.mmap | None = None
        self._map_base = 0  # the mapping's address in memory

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
        if read_at(self._fh, memoryview(buf.numpy()), self._data_start + begin, self._lock) < end - begin:
            raise CheckpointError(f"{self.path} is truncated: could not read tensor '{key}'")
        return buf.view(dtype).reshape(shape)

    def _mapping(self) -> mmap.mmap:
        if self._map is None:
            with self._lock:
                if self._map is None:
                    # copy-on-write: a view's tensor may be changed in place (training) without
                    # touching the file; its unchanged pages are shared with the page cache
                    mapping = mmap.mmap(self._fh.fileno(), self._size, access=mmap.ACCESS_COPY)
                    self._map_base = torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr()
                    self._map = mapping
        return self._map

    def aligned(self, key: str) -> bool:
        """Whether the tensor's bytes start at a multiple of its element size in the file (a
        view of a misaligned tensor would be slow or refused by some kernels)."""
        dtype, _, begin, _ = self._entries[key]
        return (self._data_start + begin) % dtype.itemsize == 0

    def view(self, key: str) -> torch.Tensor:
        """The tensor as a copy-on-write view of the file's bytes (no copy). It keeps the file
        mapped while it lives; writes to it stay in this process. Falls back to :meth:`read`
        for a tensor that is empty or misaligned in the file."""
        dtype, shape, begin, end = self._entries[key]
        if end == begin or not self.aligned(key):
            return self.read(key)
        flat = torch.frombuffer(self._mapping(), dtype=dtype, count=(end - begin) // dtype.itemsize,
                                offset=self._data_start + begin)
        return flat.reshape(shape)

    def advise_sequential(self) -> None:
        """Tell the kernel this file will be read front to back (it then reads further ahead)."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def advise_range(self, start: int, length: int) -> None:
        """Ask the kernel to read ``[start, start + length)`` of the file into the page cache
        (asynchronously; the page cache is not this process's memory), in requests of at most
        ``ADVISE_PIECE_BYTES``."""
        if length <= 0 or not hasattr(os, "posix_fadvise"):
            return
        for offset in range(start, start + length, ADVISE_PIECE_BYTES):
            os.posix_fadvise(self._fh.fileno(), offset, min(ADVISE_PIECE_BYTES, start + length - offset),
                             os.POSIX_FADV_WILLNEED)

    def _drop_pages(self, start: int, length: int) -> None:
        """Unmap the pages lying wholly inside ``[start, start + length)`` of the file from this
        process (they stay in the page cache)."""
        if self._map is None:
            return
        page = mmap.PAGESIZE
        first = -(-start // page) * page
        stop = (start + length) // page * page
        if stop > first and hasattr(self._map, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED, first, stop - first)

    def copy_into(self, key: str, out: torch.Tensor, *, chunk_bytes: int = COPY_CHUNK_BYTES) -> torch.Tensor:
        """Copy the tensor into ``out`` (a contiguous tensor of its shape, any dtype, any device),
        cast on the way, ``chunk_bytes`` of the file at a time straight from the mapping; each
        chunk's pages leave the process as soon as it is copied, so the copy costs the memory of
        ``out`` plus one chunk. Returns ``out``."""
        dtype, shape, begin, end = self._entries[key]
        if tuple(out.shape) != shape or not out.is_contiguous():
            raise ValueError(f"copy_into: '{key}' is {shape}, the destination {tuple(out.shape)} (contiguous expected)")
        if end == begin:
            return out
        if not self.aligned(key):
            return out.copy_(self.read(key))
        size = dtype.itemsize
        step = max(mmap.PAGESIZE, chunk_bytes // mmap.PAGESIZE * mmap.PAGESIZE) // size  # whole pages per chunk
        numel, flat, start = (end - begin) // size, out.view(-1), self._data_start + begin
        for i in range(0, numel, step):
            n = min(step, numel - i)
            offset = start + i * size
            src = torch.frombuffer(self._mapping(), dtype=dtype, count=n, offset=offset)
            flat[i:i + n].copy_(src)
            del src
            self._drop_pages(offset, n * size)
        return out

    def release(self, key: str) -> None:
        """Drop the mapped pages that lie wholly inside the tensor's bytes from this process
        (they stay in the page cache). Only for a tensor whose view nobody keeps: pages that
        were written to would be lost."""
        _, _, begin, end = self._entries[key]
        self._drop_pages(self._data_start + begin, end - begin)

    def release_view(self, tensor: torch.Tensor) -> bool:
        """Drop the pages wholly inside ``tensor``'s bytes from this process when ``tensor`` is a
        view of this file's current mapping (they stay in the page cache; a later read maps them
        again from the file), for a view whose bytes were read and are no longer needed. Anything
        else (a copy, another file's view) is left alone: False."""
        if self._map is None or tensor.device.type != "cpu" or tensor.numel() == 0:
            return False
        base = self._map_base
        start = tensor.data_ptr()
        nbytes = tensor.numel() * tensor.element_size()
        if not (base <= start and start + nbytes <= base + self._size) or not tensor.is_contiguous():
            return False
        self._drop_pages(start - base, nbytes)
        return True

    def unmap(self) -> None:
        """Forget this file's mapping: it leaves the process as soon as no view of it is left
        (at once after a load that copied every tensor). A later view maps the file again."""
        with self._lock:
            self._map = None

    def close(self) -> None:
        # The mapping is never closed explicitly: views (a loaded model's weights) hold a
        # reference to it, and it is unmapped when the last of them goes.
        self._map = None
        self._fh.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _ReadAhead:
    """Keeps the kernel reading the next tensors of a load into the page cache, up to
    ``max_ahead`` bytes beyond what the loader has consumed (``posix_fadvise`` WILLNEED on
    stretches of adjacent tensors: asynchronous, and page cache, not this process's memory), so
    the disk keeps reading while the loader maps or copies. Runs on the loader's own thread (a
    second Python thread would contend for the GIL with the copying)."""

    def __init__(self, reader: CheckpointReader, keys: list[str], max_ahead: int):
        self._spans = []  # (file, start, end) per key, in load order
        for k in keys:
            f = reader.file_of(k)
            _, _, begin, end = f._entries[k]
            self._spans.append((f, f._data_start + begin, f._data_start + end))
        self._max_ahead = max_ahead
        self._next = 0  # first span not asked for yet
        self._issued = self._consumed = 0
        self._advance()

    def _advance(self) -> None:
        if self._issued - self._consumed > self._max_ahead // 2 or self._next >= len(self._spans):
            return
        f, lo, hi = self._spans[self._next]
        while self._next < len(self._spans) and self._issued - self._consumed < self._max_ahead:
            g, start, end = self._spans[self._next]
            if g is not f or start > hi + mmap.PAGESIZE:  # another file, or a gap: ask for what we have
                f.advise_range(lo, hi - lo)
                f, lo = g, start
            hi = end
            self._issued += end - start
            self._next += 1
        f.advise_range(lo, hi - lo)

    def consumed(self, nbytes: int) -> None:
        self._consumed += nbytes
        self._advance()


class CheckpointReader:
    """A checkpoint made of one or more safetensors files, addressed by tensor name."""

    def __init__(self, files: Iterable[str | os.PathLike]):
        self.files = [SafetensorsFile(f) for f in files]
        self._number = {id(f): i for i, f in enumerate(self.files)}
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

    def file_of(self, key: str) -> SafetensorsFile:
        try:
            return self._where[key]
        except KeyError:
            raise CheckpointError(f"tensor '{key}' is not in the checkpoint ({self.describe()})") from None

    def load(self, key: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu", *,
             view: bool = True) -> torch.Tensor:
        """The tensor as a model will keep it: ``dtype`` (floating tensors only; None = as
        stored) on ``device``. With ``view`` and no cast on the CPU it is the file's own pages
        (:meth:`SafetensorsFile.view`); otherwise a new tensor copied straight from the mapped
        file, whose source pages then leave the process (in chunks beyond
        ``WHOLE_COPY_BYTES``: :meth:`SafetensorsFile.copy_into`)."""
        f = self.file_of(key)
        target = _target(f.dtype(key), dtype)
        device = torch.device(device)
        if view and device.type == "cpu" and target == f.dtype(key):
            return f.view(key)  # its pages come in as the kernel reads ahead (see iter_loaded)
        if f.nbytes(key) > WHOLE_COPY_BYTES or target.itemsize < f.dtype(key).itemsize:
            # chunks: a large tensor, or a narrowing cast (fp8) whose source would outweigh what is kept
            return f.copy_into(key, torch.empty(f.shape(key), dtype=target, device=device))
        source = f.view(key)
        out = source.to(device=device, dtype=target, copy=True)
        del source
        f.release(key)  # the source pages leave the process (they stay in the page cache)
        return out

    def release_view(self, tensor: torch.Tensor) -> bool:
        """:meth:`SafetensorsFile.release_view` on whichever file ``tensor`` is a view of."""
        return any(f.release_view(tensor) for f in self.files)

    def offset(self, key: str) -> tuple[int, int]:
        """(file number, byte offset) of a tensor: sorting by it reads the files front to back."""
        f = self.file_of(key)
        return self._number[id(f)], f._entries[key][2]

    def iter_loaded(
        self,
        keys: Iterable[str],
        dtype: torch.dtype | Mapping[str, torch.dtype | None] | None = None,
        device: torch.device | str = "cpu",
        *,
        read_ahead: bool = True,
        max_ahead_bytes: int = 256 * 2**20,
        consumed: Iterable[str] = (),
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` for ``keys`` in file order (front to back: the fastest way
        through a disk), each loaded by :meth:`load` in ``dtype`` (one dtype for every floating
        tensor, or one per key; None: as stored) on ``device``.

        The files stay mapped, their tensors being views of them, only when every tensor this
        call loads keeps its stored dtype on the CPU; otherwise (a cast, fp8 storage, another
        device) every tensor is copied and the files are unmapped at the end: nothing of a
        source that is not used as stored stays in memory. With ``read_ahead`` the kernel is
        asked to read the next tensors into the page cache, at most ``max_ahead_bytes`` ahead,
        while the current one is mapped or copied.

        ``consumed``: keys the caller turns into other tensors and then drops (fp8 compute's
        quantisation): they are views of the file whenever their dtype is the stored one on the
        CPU (the caller drops their pages as it goes), and they never keep the files mapped:
        a load that consumes any key copies every other tensor and unmaps the files."""
        keys = sorted(keys, key=self.offset)
        device = torch.device(device)
        consumed = set(consumed)
        targets = {k: _target(self.dtype(k), dtype.get(k) if isinstance(dtype, Mapping) else dtype) for k in keys}
        used = {id(self.file_of(k)): self.file_of(k) for k in keys}
        as_stored = device.type == "cpu" and not consumed and all(targets[k] == self.dtype(k) for k in keys)
        kept = set(used) if as_stored else set()
        for f in used.values():
            f.advise_sequential()
        if as_stored:
            max_ahead_bytes = sum(self.nbytes(k) for k in keys)  # every page is kept: ask for all of them now
        ahead = _ReadAhead(self, keys, max_ahead_bytes) if read_ahead else None
        try:
            for k in keys:
                tensor = self.load(k, targets[k], device, view=id(self.file_of(k)) in kept or k in consumed)
                if ahead is not None:
                    ahead.consumed(self.nbytes(k))
                yield k, tensor
        finally:
            for i, f in used.items():
                if i not in kept:
                    f.unmap()

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


def _target(stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor stored as ``stored`` is loaded in when ``dtype`` is asked for: floating
    tensors take it, others (and None) keep their own."""
    return dtype if dtype is not None and stored.is_floating_point else stored


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
    tables and similar non-persistent buffers keep their computed values), skipping
    transformers' weight initialisation (the weights are about to be loaded)."""
    with init_empty_weights(include_buffers=False), _no_init_weights():
        yield


def _no_init_weights():
    """transformers' ``no_init_weights`` (``transformers.initialization`` in 5.x, ``modeling_utils``
    in 4.x), or nothing when neither has it."""
    for where in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            module = __import__(where, fromlist=["no_init_weights"])
        except ImportError:
            continue
        if hasattr(module, "no_init_weights"):
            return module.no_init_weights()
    return contextlib.nullcontext()


def _keep_fp32(model: torch.nn.Module) -> tuple[str, ...]:
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    return tuple(keep)


def _weight_dtype(old: torch.Tensor, name: str, dtype: torch.dtype, keep32: tuple[str, ...]) -> torch.dtype:
    """The dtype :func:`assign_weights` gives a floating tensor for the model's ``old`` one."""
    if old.dtype in FLOAT8_DTYPES:
        return old.dtype  # a layer stored in fp8 (layerwise casting upcasts it at compute)
    if keep32 and dtype == torch.float16 and any(f".{k}." in f".{name}" for k in keep32):
        return torch.float32
    return dtype


def weight_dtypes(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Parameter/buffer name -> the dtype :func:`assign_weights` keeps it in, for a model built
    under :func:`empty_weights` and loaded in ``dtype``: what a reader loads each tensor in,
    so that nothing is cast twice."""
    keep32 = _keep_fp32(model)
    persistent = set(model.state_dict().keys())
    named = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n in persistent)]
    return {n: _weight_dtype(t, n, dtype, keep32) for n, t in named if t.is_floating_point()}


def stream_weights(
    model: torch.nn.Module,
    reader: CheckpointReader,
    names: Mapping[str, str],
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    what: str = "checkpoint",
    convert: Mapping[str, Callable[[torch.Tensor], list[tuple[str, torch.Tensor]]]] | None = None,
) -> torch.nn.Module:
    """Fill a model built under :func:`empty_weights` from ``reader``: ``names`` maps checkpoint
    keys to parameter names. Each tensor is read once, front to back through the files, straight
    into the dtype the model keeps it in (:func:`weight_dtypes`; a view of the file when that is
    its stored dtype on the CPU, see :meth:`CheckpointReader.iter_loaded`), then assigned
    (:func:`assign_weights`, strict). A parameter named in ``convert`` is read in ``dtype`` (a
    view of the file when stored so, whose pages its function drops as it goes) and handed to
    its function as it comes (see :func:`assign_weights`); the files are then unmapped."""
    convert = convert or {}
    wanted = weight_dtypes(model, dtype)
    per_key = {k: dtype if n in convert else wanted.get(n, dtype) for k, n in names.items()}
    consumed = [k for k, n in names.items() if n in convert]
    # a converter may drop the pages of what it has read, where that is a view of these files
    convert = {n: functools.partial(fn, release=reader.release_view) for n, fn in convert.items()}
    pairs = ((names[k], t) for k, t in reader.iter_loaded(names, per_key, device, consumed=consumed))
    return assign_weights(model, pairs, dtype=dtype, device=device, what=what, convert=convert)


def _converted(tensors: Iterable[tuple[str, torch.Tensor]], convert: Mapping[str, Callable],
               expected: Mapping[str, torch.Tensor], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """``(name, tensor, final)`` for :func:`assign_weights`: a tensor named in ``convert`` (and
    shaped as the model expects) is handed to its function in ``dtype``, as a loaded model would
    hold it, and replaced by what it returns (``final``: assigned as it is); others pass as they
    come (an unknown or misshapen one is reported by the caller, as any other)."""
    for name, tensor in tensors:
        fn = convert.get(name)
        if fn is None or name not in expected or tuple(tensor.shape) != tuple(expected[name].shape):
            yield name, tensor, False
            continue
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        outputs = fn(tensor)
        del tensor
        for out_name, out in outputs:
            yield out_name, out, True


def assign_weights(
    model: torch.nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    what: str = "checkpoint",
    strict: bool = True,
    convert: Mapping[str, Callable[[torch.Tensor], list[tuple[str, torch.Tensor]]]] | None = None,
) -> torch.nn.Module:
    """Move ``(parameter name, tensor)`` pairs into a model built under :func:`empty_weights`.

    ``convert``: ``{name: fn}``; such a tensor is handed to ``fn`` in ``dtype`` as it comes, and
    the ``(name, tensor)`` pairs it returns are assigned as they are (final dtypes, e.g. a float8
    weight and its scale: :func:`gie_core.weights.fp8_compute.fp8_compute_converters`), so a
    converting load never holds the whole model in ``dtype``.

    Floating tensors are cast to ``dtype`` (fp8-stored weights are upcast), except modules the
    model asks to keep in fp32 (T5's ``wo``) and parameters the model already stores in fp8
    (layers prepared by :func:`gie_core.weights.quantize.prepare_fp8_storage`), which keep their dtype.
    A tensor already in its final dtype on ``device`` is used as it is (no copy): pass views from
    :meth:`CheckpointReader.iter_loaded`. With ``strict`` every parameter must be given exactly
    once and no unknown name is accepted; errors name ``what`` was being loaded.
    """
    device = torch.device(device)
    expected = dict(model.named_parameters())
    persistent = set(model.state_dict().keys())
    expected.update({n: b for n, b in model.named_buffers() if n in persistent})
    keep32 = _keep_fp32(model)
    seen: set[str] = set()
    unexpected: list[str] = []
    for name, tensor, final in _converted(tensors, convert or {}, expected, dtype):
        old = expected.get(name)
        if old is None:
            unexpected.append(name)
            continue
        want = tuple(old.shape)
        if tuple(tensor.shape) != want:
            raise CheckpointError(
                f"{what}: tensor '{name}' has shape {tuple(tensor.shape)} but the model expects {want} "
                "(is this checkpoint for a different architecture?)"
            )
        target = tensor.dtype if final else _weight_dtype(old, name, dtype, keep32)
        value = tensor.to(device=device, dtype=target) if tensor.is_floating_point() else tensor.to(device)
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if attr in module._parameters:
            module._parameters[attr] = torch.nn.Parameter(value, requires_grad=old.requires_grad and value.is_floating_point())
        else:
            module._buffers[attr] = value
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
        if buf.device.type != device.type and not buf.is_meta:
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
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(
        path, lambda tmp: save_file(contiguous, tmp, metadata=dict(metadata or {"format": "pt"})), fsync=True
    )
