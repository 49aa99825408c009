"""Checkpoint folders: atomic commits, keep-last-K, finding the one to resume.

A checkpoint is written into ``checkpoint-<step>.tmp`` and renamed to ``checkpoint-<step>`` only
once complete (``trainer_state.json`` is its last file), so a crash or kill mid-save leaves the
previous checkpoints untouched; a leftover ``.tmp`` is never resumed from and is removed by the
next save. Older checkpoints are pruned only after a newer one is committed.

Every file the trainer writes (checkpoint files, exports, the feature cache, validation images,
json records) goes through :func:`gie_core.files.atomic_write` (:func:`save_safetensors` here for
tensors), so it appears complete or not at all, with the user's normal permissions (0o666 and
folders 0o777, less the umask), never ``mkstemp``'s 0600.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from safetensors.torch import save_file

from gie_core.files import atomic_write, atomic_write_text, replace_folder

STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
EMA_FILE = "ema.safetensors"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointNotFound(FileNotFoundError):
    """``checkpoint.resume`` names nothing resumable."""


def save_safetensors(
    tensors: Mapping, path: str | os.PathLike, metadata: Mapping[str, str] | None = None, *, fsync: bool = True
) -> Path:
    """Write a safetensors file atomically with normal permissions (:func:`gie_core.files.atomic_write`),
    flushed to disk before the rename unless ``fsync`` is false."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = dict(metadata or {"format": "pt"})

    def write(tmp: Path) -> None:
        mode = os.stat(tmp).st_mode & 0o777  # atomic_write made it 0o666 less the umask
        save_file(contiguous, str(tmp), metadata=meta)
        os.chmod(tmp, mode)  # safetensors >= 0.8 writes its files 0600 whatever the umask

    return atomic_write(path, write, fsync=fsync)


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def resolve_resume(resume: str | None, root: str | os.PathLike) -> Path | None:
    """``None`` -> None; ``latest`` -> the newest complete checkpoint under ``root`` (None if there
    is none yet: a fresh start); a path -> that checkpoint, which must be complete."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(root)
    p = Path(resume)
    if not p.is_dir():
        raise CheckpointNotFound(f"checkpoint.resume {p} does not exist")
    if not is_complete(p):
        raise CheckpointNotFound(f"checkpoint.resume {p} is not a complete checkpoint (no {STATE_FILE}); it may be a save that was interrupted")
    return p


def read_state(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text(encoding="utf-8"))


def recover(root: str | os.PathLike) -> None:
    """Tidy after a crash: restore a checkpoint set aside by an interrupted overwrite, drop
    unfinished ``.tmp`` saves."""
    root = Path(root)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.endswith(".old") and _NAME.match(p.name[:-4]):
            final = root / p.name[:-4]
            if not final.exists() and is_complete(p):
                os.replace(p, final)
            else:
                shutil.rmtree(p, ignore_errors=True)
        elif p.name.endswith(".tmp") and _NAME.match(p.name[:-4]):
            shutil.rmtree(p, ignore_errors=True)


def begin(root: str | os.PathLike, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of ``step`` (main process only)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{checkpoint_name(step)}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def write_state(tmp: Path, state: dict) -> None:
    """Write ``trainer_state.json`` (the completion marker: write it last)."""
    atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=2, default=str))


def commit(tmp: Path) -> Path:
    """Make the finished ``tmp`` folder the checkpoint, atomically (main process only)."""
    final = tmp.with_name(tmp.name[: -len(".tmp")])
    if not is_complete(tmp):
        raise RuntimeError(f"checkpoint {tmp} is incomplete and was not committed")
    # the old folder is set aside as checkpoint-<step>.old (restored by recover() after a crash)
    return replace_folder(tmp, final, aside=final.with_name(final.name + ".old"), fsync=True)


def prune(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return []
    found = list_checkpoints(root)
    removed = []
    for _, p in found[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed
