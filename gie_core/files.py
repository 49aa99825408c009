"""Reading and writing files so that nothing is lost and every problem names its file.

- :func:`read_text`: a text file the user wrote (a config, a job list, data.txt), as UTF-8, or a
  ``ValueError`` naming the file and where it is not UTF-8;
- :func:`atomic_write` (and ``_bytes`` / ``_text``): one file, complete or not at all;
- :func:`atomic_folder` / :func:`replace_folder`: one folder, complete or not at all;
- :func:`inside`: a path built from data (a benchmark row's key or category) that must stay in
  its folder, checked after every ``..`` and symlink is resolved;
- :func:`check_output_path`, :func:`free_space`, :func:`human_size`: output checks before any
  work, and a full disk (ENOSPC) reported as :class:`DiskFullError` naming the path.

A file is written under a temporary name in its own folder and renamed over the target only
once it is complete, so an interrupted or failed write never replaces a good file. The
temporary file is created with mode 0o666 filtered by the process umask (as ``open()`` does),
so outputs and checkpoints get the user's normal permissions, not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = [
    "DiskFullError",
    "atomic_folder",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_path",
    "describe_os_error",
    "disk_full",
    "existing_folder",
    "free_space",
    "human_size",
    "inside",
    "read_text",
    "replace_folder",
    "temporary_path",
]

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def read_text(path: str | os.PathLike, what: str) -> str:
    """The text of a file the user wrote (``what``: "config file", "job list", "data.txt" ...),
    read as UTF-8 (a leading byte-order mark is dropped). Raises ``ValueError`` naming ``what``,
    the file and, for a file that is not UTF-8, the line, column and byte offset of the first
    byte that is not, so the user can find it and save the file as UTF-8."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a folder, not a file") from None
    except OSError as exc:
        raise ValueError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
        offset = exc.start + start
        line = data.count(b"\n", 0, offset) + 1
        column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
        raise ValueError(
            f"{what} {path} is not UTF-8 text: byte 0x{data[offset]:02x} at line {line}, column {column} "
            f"(byte offset {offset}); save it as UTF-8"
        ) from None


def human_size(n: int | float) -> str:
    """A byte count for people: ``512 bytes``, ``3.4 MB``, ``12.5 GB`` (decimal units). A nonzero
    size never reads as zero (``0.00 GB``): the unit shrinks until the number shows."""
    n = float(n)
    if abs(n) < 1000:
        return f"{int(n)} byte{'' if int(n) == 1 else 's'}"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if round(abs(n), 1) < 999.5 or unit == "TB":
            return f"{n:.3g} {unit}" if abs(n) < 100 else f"{n:.0f} {unit}"
    raise AssertionError("unreachable")


def existing_folder(path: str | os.PathLike) -> Path:
    """The nearest folder of ``path`` that exists: its parent, or the parent's parent, ... (where
    a file will be written once its missing folders are made)."""
    existing = Path(path).parent
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    return existing


def free_space(path: str | os.PathLike) -> int | None:
    """Bytes free on the disk that ``path`` would be written to, or None where unknown."""
    try:
        return shutil.disk_usage(existing_folder(path)).free
    except OSError:
        return None


def describe_os_error(exc: OSError) -> str:
    """One line for a failed read or write: what went wrong and the path (a full disk's message
    names its path already)."""
    if isinstance(exc, DiskFullError):
        return str(exc.strerror)
    if exc.errno in _DISK_FULL and getattr(exc, "filename", None):
        return str(disk_full(exc.filename, exc).strerror)
    where = f" '{exc.filename}'" if getattr(exc, "filename", None) else ""
    return f"{exc.strerror or exc}{where}"


class DiskFullError(OSError):
    """Writing ``filename`` failed because its disk (or the user's quota) is full; the message
    names the path and the space left."""


def disk_full(path: str | os.PathLike, cause: OSError | None = None) -> DiskFullError:
    """The :class:`DiskFullError` for writing ``path`` (errno from ``cause``, else ENOSPC)."""
    free = free_space(path)
    left = f" ({human_size(free)} free there)" if free is not None else ""
    code = cause.errno if cause is not None and cause.errno in _DISK_FULL else errno.ENOSPC
    why = (cause.strerror if cause is not None else None) or os.strerror(code)
    return DiskFullError(code, f"the disk is full ({why}): could not write '{path}'{left}; free some space and run again",
                         str(path))


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
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, DiskFullError) and exc.errno in _DISK_FULL:
            raise disk_full(path, exc) from exc
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), fsync=fsync)


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def inside(root: str | os.PathLike, path: str | os.PathLike, what: str) -> Path:
    """``path`` (absolute, or relative to ``root``) once it is checked to lie inside ``root`` after
    ``..`` and symlinks are resolved (a symlinked subfolder that points elsewhere counts as
    outside). Raises ``ValueError`` naming ``what`` (e.g. the row it came from), the path and the
    folder. Check before writing: nothing is written outside ``root``."""
    root = Path(root)
    full = root / path
    base = root.resolve()
    target = full.resolve()
    if target != base and base not in target.parents:
        raise ValueError(f"{what}: '{path}' resolves to '{target}', outside the folder '{base}'; nothing was written there")
    return full


def check_output_path(path: str | os.PathLike, what: str = "output") -> Path:
    """Check, before any work, that ``path`` can be written as a file: it is not a folder, its
    folder exists or can be made, and that folder is writable. Raises ``ValueError`` naming
    ``what`` and the reason."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} '{path}' is a directory; give a file name such as '{path / 'edit.png'}'")
    existing = existing_folder(path)
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


def _fsync_path(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a folder; the rename still orders
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush every file under ``path`` and the folders themselves to disk."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def replace_folder(tmp: str | os.PathLike, final: str | os.PathLike, *, aside: str | os.PathLike | None = None,
                   fsync: bool = True) -> Path:
    """Put the finished folder ``tmp`` at ``final`` (a sibling), replacing what is there.

    ``tmp`` is flushed to disk first (``fsync``); an old ``final`` is renamed to ``aside`` (a
    hidden sibling by default), the new folder renamed into place, and only then is the old one
    removed. At every moment ``final`` is either the complete old folder, or the complete new
    one, or missing with the complete old one at ``aside`` (a crash between the two renames:
    see :func:`gie_core.train.checkpoint.recover`). If the second rename fails the old folder is
    put back.
    """
    tmp, final = Path(tmp), Path(final)
    if fsync:
        fsync_tree(tmp)
    old = None
    if final.exists():
        old = Path(aside) if aside is not None else temporary_path(final, ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None and not final.exists():
            os.replace(old, final)
        raise
    if fsync:
        _fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, *, fsync: bool = True,
                  keep_existing: Callable[[], bool] | None = None) -> Iterator[Path]:
    """Build a folder that appears at ``path`` complete or not at all.

    Yields a fresh, hidden temporary sibling folder (made with ``mkdir``: normal permissions);
    when the block ends without an error it replaces ``path`` (:func:`replace_folder`). On any
    error (or Ctrl-C) the temporary folder is removed and ``path`` is left as it was.
    ``keep_existing()``, asked once the block is done, may say to keep what is at ``path`` now
    (another process finished the same folder meanwhile); the new one is then dropped.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path, ".building")
    tmp.mkdir()
    try:
        yield tmp
        if keep_existing is None or not keep_existing():
            replace_folder(tmp, path, fsync=fsync)
    except OSError as exc:
        if not isinstance(exc, DiskFullError) and exc.errno in _DISK_FULL:
            raise disk_full(path, exc) from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
