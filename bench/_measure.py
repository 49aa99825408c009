"""What the benches share: how a measurement is taken, so that every figure means what a user sees.

- memory is the measured process's own, read from ``/proc/self/status`` of a fresh child per
  measurement: steady ``VmRSS`` after the work, peak ``VmHWM``, and the anonymous / file-backed
  split (``RssAnon`` / ``RssFile``). Never ``ru_maxrss``: a ``subprocess`` child inherits its
  parent's, so it reports the parent's peak when that is higher;
- sides are compared in interleaved pairs whose order alternates (AB, BA, AB, ...), so drift in
  machine load falls on both; each side reports its median and its spread ((max - min) / median),
  with a note when the spread exceeds 10%;
- a cold run drops the files' pages from the page cache (``fsync`` then ``posix_fadvise``
  DONTNEED; ``/proc/sys/vm/drop_caches`` when that left pages and we may write it) and checks with
  ``mincore`` that they are gone, and says so;
- every report starts with the machine: cores, load average (other work may run at the same
  time: the load average says how much), library versions and the date.
"""

from __future__ import annotations

import ctypes
import datetime
import importlib.metadata
import json
import mmap
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

SPREAD_NOTE = 0.10
_STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def proc_status() -> dict[str, int]:
    """This process's VmRSS, VmHWM, RssAnon and RssFile in bytes (Linux)."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            name, _, value = line.partition(":")
            if name in _STATUS_FIELDS:
                out[name] = int(value.split()[0]) * 1024
    return out


def report_child(result: dict, base: dict[str, int]) -> None:
    """Print a child's result as the last line of its output, with its memory beside ``base``
    (its status before the measured work): ``rss``/``hwm`` as read, ``anon``/``file`` as grown
    since ``base``."""
    now = proc_status()
    result.update(base_rss=base["VmRSS"], rss=now["VmRSS"], hwm=now["VmHWM"], anon=now["RssAnon"] - base["RssAnon"],
                  file=now["RssFile"] - base["RssFile"])
    print(json.dumps(result), flush=True)


def run_child(argv: Sequence[str], *, timeout: float = 1800) -> dict:
    """Run ``python argv...`` in a fresh process and return the JSON of its last output line."""
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"child {' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def interleaved(sides: dict[str, Callable[[], dict]], pairs: int) -> dict[str, list[dict]]:
    """``pairs`` rounds of every side, the order reversed every other round."""
    names = list(sides)
    results: dict[str, list[dict]] = {n: [] for n in names}
    for i in range(pairs):
        for name in names if i % 2 == 0 else reversed(names):
            results[name].append(sides[name]())
    return results


def median_spread(values: Iterable[float]) -> tuple[float, float]:
    """(median, (max - min) / median)."""
    v = list(values)
    med = statistics.median(v)
    return med, (max(v) - min(v)) / med if med else 0.0


def spread_note(spread: float) -> str:
    return f"  (spread {spread:.0%} > {SPREAD_NOTE:.0%}: noisy, read with care)" if spread > SPREAD_NOTE else ""


# ---------------------------------------------------------------------------------------------
# The page cache
# ---------------------------------------------------------------------------------------------

_libc = None


def resident_bytes(path: str | os.PathLike) -> tuple[int, int]:
    """(bytes of ``path`` in the page cache, file size), by ``mincore`` on a fresh mapping."""
    global _libc
    size = os.path.getsize(path)
    if size == 0:
        return 0, 0
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _libc.mmap.restype = ctypes.c_void_p
        _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        _libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = mmap.PAGESIZE
    pages = (size + page - 1) // page
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            return sum(b & 1 for b in vec) * page, size
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def cached_fraction(paths: Iterable[str | os.PathLike]) -> float:
    got = total = 0
    for p in paths:
        r, s = resident_bytes(p)
        got, total = got + r, total + s
    return got / total if total else 0.0


def drop_page_cache(paths: Sequence[str | os.PathLike]) -> str:
    """Evict ``paths`` from the page cache and say how far that went, checked with ``mincore``."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    how = "posix_fadvise(DONTNEED)"
    left = cached_fraction(paths)
    if left > 0.01 and os.access("/proc/sys/vm/drop_caches", os.W_OK):
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        how, left = "drop_caches", cached_fraction(paths)
    return f"{how}: {left:.1%} still cached" + ("" if left <= 0.01 else "  NOT COLD")


def warm_page_cache(paths: Sequence[str | os.PathLike]) -> float:
    """Read ``paths`` through the page cache; the fraction cached afterwards."""
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while fh.read(64 * 2**20):
                pass
    return cached_fraction(paths)


# ---------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------


def machine_line() -> str:
    """Cores, load average, libraries and date: the context every figure was measured in."""
    versions = []
    for name in ("torch", "diffusers", "transformers", "safetensors", "gguf"):
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"machine: {os.cpu_count()} cores ({platform.machine()}), load average {load} (1/5/15 min; other work may "
            f"share the machine), {platform.python_implementation()} {platform.python_version()}, {', '.join(versions)}, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


def disk_free(path: str | os.PathLike) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
