"""A run folder: the benchmark's outputs in its own layout, plus this harness's records.

    OUT/                        outputs where the benchmark's scorer expects them (and, where that
                                scorer reads it beside them, each sample's source image: GEdit's
                                ``<key>_SRCIMG.png``)
    OUT/_gie_eval/run.json      what was run (benchmark, instruction set, filters, settings)
    OUT/_gie_eval/logs/generate.rank<N>.jsonl   one line per sample a process finished or failed
    OUT/_gie_eval/scores/       judgements.rank<N>.jsonl, scores.json, scores.csv, scores.md

Every process appends only to its own log, so many processes (and nodes sharing a folder)
never write the same file. Every path written or read here is checked to resolve inside the run
folder first (:func:`gie_core.files.inside`): a row's key or category, or a symlinked subfolder,
never leads a write elsewhere. A sample is done when its output file exists (written atomically)
and an ``ok`` record for it is in any of the logs; a missing source copy of a done sample is
written again on resume without loading any model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from gie_core.files import atomic_write_text, inside

RECORDS_DIR = "_gie_eval"
RUN_FILE = "run.json"
RUN_VERSION = 1


@dataclass(frozen=True)
class Shard:
    """This process's part of the samples: every ``num_processes``-th sample from ``process_index``."""

    process_index: int = 0
    num_processes: int = 1

    def take(self, items: list) -> list:
        """Deterministic split by position: together the shards hold every item exactly once."""
        return items[self.process_index :: self.num_processes]

    @property
    def is_main(self) -> bool:
        return self.process_index == 0


def current_shard():
    """(Shard, accelerate PartialState) of this process: under ``accelerate launch`` (or torchrun) the
    launcher's rank and world size, else a single process. Without a GPU the processes meet over
    gloo on the CPU (accelerate only does so when asked for the CPU)."""
    from accelerate import PartialState  # start-up: accelerate (~0.3 s) only for generate and score, not --help

    state = PartialState(cpu=not torch.cuda.is_available())
    return Shard(state.process_index, state.num_processes), state


def plain_cpu(device: torch.device) -> torch.device:
    """``device``, with any CPU named plain ``cpu`` (not ``cpu:0``).

    accelerate names a process's CPU ``cpu:0``. A model moved to ``cpu:0`` has every weight
    copied into fresh 64-byte-aligned memory, while on ``cpu`` the memory-mapped weights stay as
    aligned as they are in the file, and the CPU's matrix kernels (MKL) round the last bit of a
    result differently with the alignment: a pixel or two of an image then differed by one
    between a 1-process and a 2-process run. Every process therefore uses ``cpu`` itself.
    """
    return torch.device("cpu") if device.type == "cpu" else device


def process_device(state) -> str:
    """This process's device under a launcher: its GPU (``cuda:N``), or plain ``cpu``."""
    return str(plain_cpu(torch.device(state.device)))


def sample_seed(base_seed: int, key: str) -> int:
    """The noise seed of one sample: a hash of (base seed, sample key), so a sample gets the same
    image whichever process, shard or resume makes it. 64 bits, like every seed here."""
    digest = hashlib.sha256(f"{int(base_seed)}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


class RunFolder:
    """Paths and records of one run folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.records = self.root / RECORDS_DIR

    def path(self, rel: str | os.PathLike, what: str) -> Path:
        """``root / rel``, checked to resolve inside the run folder (``what`` names where ``rel``
        came from, e.g. a benchmark row); ``ValueError`` otherwise."""
        return inside(self.root, rel, what)

    def checked(self, path: str | os.PathLike, what: str) -> Path:
        """A path of this folder (built as ``root / ...``), checked to resolve inside it (a records
        folder symlinked elsewhere is refused)."""
        return self.path(Path(path).relative_to(self.root), what)

    def output(self, bench, sample) -> Path:
        """Where ``sample``'s output goes in ``bench``'s layout, checked to stay inside the run folder."""
        return self.path(bench.output_path(sample), f"{bench.name} sample '{sample.key}' (row {sample.index})")

    def source_copy(self, bench, sample) -> Path | None:
        """Where ``sample``'s source image is copied for ``bench``'s own scorer (checked like the
        output), or None when the benchmark needs no copy."""
        if bench.source_path is None:
            return None
        return self.path(bench.source_path(sample), f"{bench.name} sample '{sample.key}' (row {sample.index}) source copy")

    def check_outputs(self, bench, samples) -> None:
        """Every sample's output path (and source copy) resolves inside the run folder: a traversal in
        the data or a symlinked subfolder pointing elsewhere is refused before anything loads or is written."""
        for s in samples:
            self.output(bench, s)
            self.source_copy(bench, s)

    @property
    def run_file(self) -> Path:
        return self.records / RUN_FILE

    @property
    def logs(self) -> Path:
        return self.records / "logs"

    @property
    def scores(self) -> Path:
        return self.records / "scores"

    def log_file(self, kind: str, process_index: int) -> Path:
        folder = self.logs if kind == "generate" else self.scores
        return folder / f"{kind}.rank{process_index}.jsonl"

    def read_run(self) -> dict | None:
        """run.json, or None when the folder has none (e.g. outputs made by another tool)."""
        if not self.run_file.exists():
            return None
        try:
            return json.loads(self.run_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.run_file} is damaged ({exc.msg}); remove it to start the run afresh") from None

    def write_run(self, run: dict) -> None:
        atomic_write_text(self.checked(self.run_file, "run record"), json.dumps(run, indent=2, sort_keys=True) + "\n")

    def read_records(self, kind: str) -> list[dict]:
        """Every record of every process's ``kind`` log (a cut-off last line is ignored)."""
        folder = self.logs if kind == "generate" else self.scores
        out = []
        for f in sorted(folder.glob(f"{kind}.rank*.jsonl")) if folder.is_dir() else []:
            for line in f.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut off by a kill: that sample is simply not done
                if isinstance(rec, dict) and "key" in rec:
                    out.append(rec)
        return out

    def append_record(self, kind: str, process_index: int, record: dict) -> None:
        """Append one JSON line to this process's log and flush it to disk."""
        path = self.checked(self.log_file(kind, process_index), f"{kind} log")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())


def settings_mismatch(old: dict, new: dict) -> list[str]:
    """The settings that differ between a folder's recorded run and this one ("name: old -> new")."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
