"""Writing files so that nothing is lost: the one atomic-write helper, and output-path checks.

A file is written under a temporary name in its own folder and renamed over the target only
once it is complete, so an interrupted or failed write never replaces a good file. The
temporary file is created with mode 0o666 filtered by the process umask (as ``open()`` does),
so outputs and checkpoints get the user's normal permissions, not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "check_output_path", "temporary_path"]


def temporary_path(path: str | os.PathLike, suffix: str = ".partial") -> Path:
    """A fresh hidden name beside ``path`` (same folder, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{suffix}")


def _create(tmp: Path) -> None:
    # O_EXCL: never follow or reuse someone else's file; 0o666 & ~umask: normal permissions
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def normal_file_mode() -> int:
    """What ``open()`` gives a new file: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, fsync: bool = False) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then rename it to ``path``.

    ``write`` may reopen ``tmp`` any way it likes (PIL's ``save``, ``safetensors.save_file``,
    ``torch.save``). The folder is created when missing. On any failure (an exception, Ctrl-C)
    the temporary file is removed and ``path`` is left as it was. ``fsync`` flushes the data
    to disk before the rename (for checkpoints that must survive a power cut).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path, path.suffix + ".partial")
    try:
        _create(tmp)
        write(tmp)
        # writers that replace the file (safetensors' save_file creates it 0600) get the normal mode back
        os.chmod(tmp, normal_file_mode())
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), fsync=fsync)


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def check_output_path(path: str | os.PathLike, what: str = "output") -> Path:
    """Check, before any work, that ``path`` can be written as a file: it is not a folder, its
    folder exists or can be made, and that folder is writable. Raises ``ValueError`` naming
    ``what`` and the reason."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} '{path}' is a directory; give a file name such as '{path / 'edit.png'}'")
    parent = path.parent
    existing = parent
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} '{path}' cannot be written: '{existing}' is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what} '{path}' cannot be written: the folder '{existing}' is not writable")
    probe = temporary_path(existing / "probe", ".probe")
    try:  # a read-only filesystem passes os.access as root; only a real write tells
        _create(probe)
    except OSError as exc:
        raise ValueError(f"{what} '{path}' cannot be written: {exc.strerror or exc}") from None
    else:
        os.unlink(probe)
    return path
