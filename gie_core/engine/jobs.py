"""Many edits, one load: a list of jobs (image + instruction [+ seeds]) run on one pipeline.

Models load once; each job is encoded once (Qwen-VL, T5, CLIP, the reference) and sampled for
each of its seeds; every output is written atomically, so an output file that exists is
complete, and a rerun skips the outputs that exist (resume after a kill or a crash).

Job lists (:func:`read_jobs`):

- a JSON Lines (``.jsonl``) or JSON (``.json``, a list) file of records
  ``{"image": "a.png", "instruction": "make it winter", "seed": 7}`` (or ``"seeds": [1, 2]``;
  optional ``"name"`` for the output file names and ``"negative"`` for true CFG);
- a tab-separated text file (``.tsv`` / ``.txt``): ``image<TAB>instruction[<TAB>seeds]`` per
  line, ``#`` comments and blank lines skipped;
- a folder: each image with a same-named ``.txt`` beside it holding its instruction.

Image paths are relative to the job file's folder. Outputs are
``OUT_DIR/<name>_s<seed>.png`` (``..._s<seed>_<i>.png`` for a batch of several images); the name
is the record's ``name`` or the image's file stem (``-2``, ``-3`` ... added when two jobs share one).
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gie_core.constants import SEED_RANGE

__all__ = [
    "EditJob",
    "JobOutput",
    "IMAGE_SUFFIXES",
    "parse_seeds",
    "plan_outputs",
    "read_jobs",
    "remove_stale_temporaries",
    "run_jobs",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
JOB_FILE_SUFFIXES = (".jsonl", ".json", ".tsv", ".txt")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]*$")


@dataclass(frozen=True)
class EditJob:
    """One image and instruction, and the seeds to make of it."""

    image: Path
    instruction: str
    seeds: tuple[int, ...]
    name: str
    negative: str | None = None
    where: str = ""  # "file:line" (or the image path) for messages


@dataclass
class JobOutput:
    """The files one (job, seed) writes, and whether they all exist already."""

    job: EditJob
    seed: int
    paths: list[Path] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return all(p.is_file() for p in self.paths)


def parse_seeds(text: str | int | Sequence[int], what: str = "seeds") -> tuple[int, ...]:
    """'7', '1,2,3', '0-3' (inclusive) or a list -> seeds, each in the seed range, no repeats."""
    from gie_core.checks import check_int

    if isinstance(text, bool):
        raise ValueError(f"{what} is {text!r} but must be whole numbers")
    if isinstance(text, int):
        values: list = [text]
    elif isinstance(text, (list, tuple)):
        values = list(text)
    elif isinstance(text, str):
        values = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                raise ValueError(f"{what} '{text}' has an empty entry")
            lo, dash, hi = part.partition("-")
            try:
                if dash and lo:
                    a, b = int(lo), int(hi)
                    if b < a or b - a >= 10000:
                        raise ValueError
                    values.extend(range(a, b + 1))
                else:
                    values.append(int(part))
            except ValueError:
                raise ValueError(f"{what} '{text}': '{part}' is not a seed or a range such as 0-3") from None
    else:
        raise ValueError(f"{what} is {text!r} but must be a seed, a list of seeds or a text such as '1,2,3'")
    if not values:
        raise ValueError(f"{what} is empty")
    seeds = tuple(check_int(what, v, *SEED_RANGE) for v in values)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{what} repeat a seed: {', '.join(map(str, seeds))}")
    return seeds


def _job_name(name: str, where: str) -> str:
    if not _NAME.match(name) or name in (".", ".."):
        raise ValueError(f"{where}: output name '{name}' must be a plain file name (letters, digits, . _ - and spaces)")
    return name


def _record_job(rec, base: Path, where: str, default_seeds: tuple[int, ...]) -> EditJob:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: a job must be an object with 'image' and 'instruction', not {type(rec).__name__}")
    unknown = set(rec) - {"image", "instruction", "seed", "seeds", "name", "negative"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; a job has image, instruction, "
                         "seed or seeds, name, negative")
    if not isinstance(rec.get("image"), str) or not rec["image"]:
        raise ValueError(f"{where}: 'image' must be a path")
    if not isinstance(rec.get("instruction"), str) or not rec["instruction"].strip():
        raise ValueError(f"{where}: 'instruction' must be a non-empty text")
    if "seed" in rec and "seeds" in rec:
        raise ValueError(f"{where}: give 'seed' or 'seeds', not both")
    seeds = default_seeds
    if "seed" in rec or "seeds" in rec:
        seeds = parse_seeds(rec.get("seeds", rec.get("seed")), f"{where}: seeds")
    negative = rec.get("negative")
    if negative is not None and not isinstance(negative, str):
        raise ValueError(f"{where}: 'negative' must be a text")
    image = (base / rec["image"]).expanduser()
    name = _job_name(str(rec["name"]), where) if rec.get("name") is not None else image.stem
    return EditJob(image, rec["instruction"], seeds, name, negative, where)


def read_jobs(source: str | os.PathLike, *, default_seeds: Sequence[int] = (42,)) -> list[EditJob]:
    """The jobs of a job file or folder (see the module docstring), each with its seeds
    (``default_seeds`` where a job names none). Output names are made unique. Raises
    ``ValueError`` naming the file, line and field for anything malformed (before any work)."""
    default_seeds = parse_seeds(list(default_seeds))
    src = Path(source)
    jobs: list[EditJob] = []
    if src.is_dir():
        images = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise ValueError(f"job folder {src} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        for img in images:
            txt = img.with_suffix(".txt")
            if not txt.is_file():
                raise ValueError(f"job folder {src}: {img.name} has no instruction file {txt.name} beside it")
            instruction = txt.read_text(encoding="utf-8").strip()
            if not instruction:
                raise ValueError(f"{txt}: the instruction is empty")
            jobs.append(EditJob(img, instruction, default_seeds, img.stem, None, str(img)))
    elif src.is_file():
        suffix = src.suffix.lower()
        if suffix not in JOB_FILE_SUFFIXES:
            raise ValueError(f"job list {src} must be a folder or a {', '.join(JOB_FILE_SUFFIXES)} file")
        base = src.parent
        text = src.read_text(encoding="utf-8")
        if suffix == ".json":
            try:
                records = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{src} is not valid JSON: {exc}") from None
            if not isinstance(records, list):
                raise ValueError(f"{src} must hold a JSON list of jobs")
            jobs = [_record_job(r, base, f"{src}: job {i + 1}", default_seeds) for i, r in enumerate(records)]
        else:
            for n, line in enumerate(text.splitlines(), 1):
                where = f"{src}:{n}"
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                if suffix == ".jsonl":
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{where} is not valid JSON: {exc}") from None
                else:
                    fields = line.rstrip("\n").split("\t")
                    if len(fields) not in (2, 3):
                        raise ValueError(f"{where}: expected 'image<TAB>instruction[<TAB>seeds]', found {len(fields)} field(s)")
                    rec = {"image": fields[0].strip(), "instruction": fields[1].strip()}
                    if len(fields) == 3 and fields[2].strip():
                        rec["seeds"] = fields[2].strip()
                jobs.append(_record_job(rec, base, where, default_seeds))
    else:
        raise ValueError(f"job list {src} does not exist")
    if not jobs:
        raise ValueError(f"job list {src} holds no jobs")
    # unique output names, stable for the same list (so a rerun finds its outputs)
    seen: set[str] = set()
    unique = []
    for job in jobs:
        name, k = job.name, 2
        while name.lower() in seen:
            name, k = f"{job.name}-{k}", k + 1
        seen.add(name.lower())
        unique.append(EditJob(job.image, job.instruction, job.seeds, name, job.negative, job.where))
    return unique


def plan_outputs(jobs: Iterable[EditJob], out_dir: str | os.PathLike, batch: int = 1, suffix: str = ".png") -> list[JobOutput]:
    """Every (job, seed) and the files it writes under ``out_dir``."""
    out = Path(out_dir)
    plan = []
    for job in jobs:
        for seed in job.seeds:
            stem = f"{job.name}_s{seed}"
            paths = [out / f"{stem}{suffix}"] if batch == 1 else [out / f"{stem}_{i}{suffix}" for i in range(batch)]
            plan.append(JobOutput(job, seed, paths))
    return plan


def remove_stale_temporaries(path: Path) -> int:
    """Delete what a killed earlier run left beside ``path``: the hidden temporary files of
    :func:`gie_core.files.atomic_write` (``.<name>.<random>.<suffix>.partial``; a kill -9 gives
    no chance to clean up). The output itself is never partial. Returns how many were removed."""
    removed = 0
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.partial"):
        try:
            tmp.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def run_jobs(
    pipe,
    plan: Sequence[JobOutput],
    requests: dict[EditJob, object],
    *,
    load_image: Callable[[EditJob], object],
    save: Callable[[object, Path], None],
    progress: Callable[[int, int], None] | None = None,
    written: Callable[[Path], None] | None = None,
    interrupt: Callable[[], bool] | None = None,
) -> int:
    """Run the (job, seed) items of ``plan`` whose outputs are missing on ``pipe`` (an
    :class:`gie_core.engine.pipeline.EditPipeline`), encoding each job once for all its seeds.

    ``requests``: each job's resolved request (checked before loading); ``load_image(job)`` reads
    its image; ``save(image, path)`` writes one output atomically; ``progress(done, total)``
    counts sampling steps across every job; ``written(path)`` is told of each file. Returns the
    number of (job, seed) items run.
    """
    todo = [item for item in plan if not item.done]
    if not todo:
        return 0
    for item in todo:
        for path in item.paths:
            remove_stale_temporaries(path)
    steps_each = {item.job: requests[item.job].steps for item in todo}
    total = sum(steps_each[item.job] for item in todo)
    done_steps = 0
    by_job: dict[EditJob, list[JobOutput]] = {}
    for item in todo:
        by_job.setdefault(item.job, []).append(item)
    for job, items in by_job.items():
        encoded = pipe.encode(load_image(job), job.instruction, request=requests[job], negative_instruction=job.negative)
        for item in items:
            base = done_steps

            def step(done, _total, base=base):
                if progress is not None:
                    progress(base + done, total)

            result = pipe.render(encoded, seed=item.seed, progress=step, interrupt=interrupt)
            for image, path in zip(result.images, item.paths):
                save(image, path)
                if written is not None:
                    written(path)
            done_steps = base + steps_each[job]
            if progress is not None:
                progress(done_steps, total)
    return len(todo)
