"""Reading instruction sets as rows: JSON (a list, or an object of rows), JSON lines, parquet.

Parquet needs ``pyarrow`` (or ``pandas`` with a parquet engine): it is optional
(``pip install "gpt-image-edit-nodes[eval]"``). JSON and JSONL always work, so a benchmark
exported to JSON needs nothing extra.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gie_core.files import read_text

PARQUET_HINT = (
    "reading parquet needs pyarrow: pip install 'gpt-image-edit-nodes[eval]' (or pip install pyarrow); "
    "JSON and JSONL instruction sets work without it"
)


class InstructionSetError(ValueError):
    """An instruction set that cannot be read, or a row that does not hold what it should."""


def read_json_rows(path: str | os.PathLike) -> list | dict:
    """A ``.json`` file (list or object) or a ``.jsonl`` file (one JSON value a line; blank lines skipped)."""
    p = Path(path)
    if p.is_dir():
        raise InstructionSetError(f"instruction set '{p}' is a folder; give the JSON/JSONL/parquet file")
    try:  # the one reader of the files users write: names the line and byte of text that is not UTF-8
        text = read_text(p, "instruction set")
    except ValueError as exc:
        raise InstructionSetError(str(exc)) from None
    if p.suffix.lower() == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InstructionSetError(f"{p}:{n} is not valid JSON: {exc.msg}") from None
        return rows
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InstructionSetError(f"{p} is not valid JSON: {exc.msg} (line {exc.lineno})") from None


def read_parquet_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a parquet file as dicts (image columns stay ``{"bytes": ..., "path": ...}``)."""
    p = Path(path)
    if not p.is_file():
        raise InstructionSetError(f"parquet file '{p}' does not exist")
    try:
        import pyarrow.parquet as pq  # optional: pyarrow (extra 'eval')
    except ImportError:
        pq = None
    if pq is not None:
        try:
            return pq.read_table(p).to_pylist()
        except Exception as exc:  # pyarrow raises its own error types for damaged files
            raise InstructionSetError(f"parquet file '{p}' could not be read: {exc}") from None
    try:
        import pandas as pd  # optional: pandas, the reader when pyarrow is missing
    except ImportError:
        raise InstructionSetError(f"'{p}': {PARQUET_HINT}") from None
    try:
        return pd.read_parquet(p).to_dict("records")
    except ImportError:
        raise InstructionSetError(f"'{p}': {PARQUET_HINT}") from None
    except Exception as exc:
        raise InstructionSetError(f"parquet file '{p}' could not be read: {exc}") from None


def read_rows(path: str | os.PathLike) -> list | dict:
    """Rows of one file, by its suffix: ``.json`` / ``.jsonl`` / ``.parquet``."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in (".json", ".jsonl"):
        return read_json_rows(p)
    if suffix == ".parquet":
        return read_parquet_rows(p)
    raise InstructionSetError(f"instruction set '{p}' must be a .json, .jsonl or .parquet file")


def table_files(path: str | os.PathLike, pattern: str = "*.parquet") -> list[Path]:
    """``path`` itself when it is a file, else the files under it matching ``pattern`` (sorted,
    searched recursively: a Hugging Face dataset snapshot keeps its shards under ``data/``)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.exists():
        raise InstructionSetError(f"instruction set '{p}' does not exist")
    files = sorted(f for f in p.rglob(pattern) if f.is_file())
    if not files:
        raise InstructionSetError(f"no {pattern} files under '{p}'")
    return files
