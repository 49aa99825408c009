"""Many edits, one load: a list of jobs (image + instruction [+ seeds]) run on one pipeline.

Models load once; each job is encoded once (Qwen-VL, T5, CLIP, the reference) and sampled for
each of its seeds; every output is written atomically, so an output file that exists is
complete, and a rerun skips the outputs that exist (resume after a kill or a crash).

Job lists (:func:`read_jobs`):

- a JSON Lines (``.jsonl``) or JSON (``.json``, a list) file of records
  ``{"image": "a.png", "instruction": "make it winter", "seed": 7}`` (or ``"seeds": [1, 2]``;
  optional ``"name"`` for the output file names, ``"negative"`` for true CFG and ``"image2"`` for
  a second input image, the reference app's Image 2);
- a tab-separated text file (``.tsv`` / ``.txt``): ``image<TAB>instruction[<TAB>seeds]`` per
  line, ``#`` comments and blank lines skipped;
- a folder: each image with a same-named ``.txt`` beside it holding its instruction.

Image paths are relative to the job file's folder. Outputs are
``OUT_DIR/<name>_s<seed>.png`` (``..._s<seed>_<i>.png`` for a batch of several images); the name
is the record's ``name`` or the image's file stem (``-2``, ``-3`` ... added when that is taken; a
given name is never changed, and two jobs given one name are refused).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gie_core.checks import check_int
from gie_core.constants import MAX_SEEDS, SEED_RANGE
from gie_core.files import read_text

__all__ = [
    "EditJob",
    "JobOutput",
    "JobsInterrupted",
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
    image2: Path | None = None  # a second input image (the app's Image 2)


@dataclass
class JobOutput:
    """The files one (job, seed) writes, and whether they all exist already."""

    job: EditJob
    seed: int
    paths: list[Path] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return all(p.is_file() for p in self.paths)


def _seed_range(part: str, text: str, what: str) -> range:
    """'0-3' -> range(0, 4). A range that goes down, or holds more than MAX_SEEDS seeds (a typo
    such as 1-100000 must not start a day-long run), is refused saying the rule."""
    lo, _, hi = part.partition("-")
    try:
        a, b = int(lo), int(hi)
    except ValueError:
        raise ValueError(f"{what} '{text}': '{part}' is not a seed or a range such as 0-3") from None
    if b < a:
        raise ValueError(f"{what} '{text}': '{part}' goes down; a range must go from low to high, e.g. {b}-{a}")
    if b - a + 1 > MAX_SEEDS:
        raise ValueError(f"{what} '{text}': '{part}' is {b - a + 1} seeds but at most {MAX_SEEDS} are allowed "
                         f"(seeds are whole numbers from {SEED_RANGE[0]} to {SEED_RANGE[1]})")
    return range(a, b + 1)


def _seed_values(text: str, what: str) -> list:
    """The seeds of a text such as '1,2,5-8' (not yet range-checked)."""
    values: list = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            raise ValueError(f"{what} '{text}' has an empty entry")
        if "-" in part[1:]:  # a range 'a-b' ('-3' alone is a negative seed, refused by the range check)
            values.extend(_seed_range(part, text, what))
        else:
            values.append(_one_seed(part, text, what))
    return values


def _one_seed(part: str, text: str, what: str) -> int:
    try:
        return int(part)
    except ValueError:
        raise ValueError(f"{what} '{text}': '{part}' is not a seed or a range such as 0-3") from None


def parse_seeds(text: str | int | Sequence[int], what: str = "seeds") -> tuple[int, ...]:
    """'7', '1,2,3', '0-3' (inclusive, low to high) or a list -> seeds, each in ``SEED_RANGE``, no
    repeats, at most ``MAX_SEEDS`` of them."""
    if isinstance(text, bool):
        raise ValueError(f"{what} is {text!r} but must be whole numbers")
    if isinstance(text, int):
        values: list = [text]
    elif isinstance(text, (list, tuple)):
        values = list(text)
    elif isinstance(text, str):
        values = _seed_values(text, what)
    else:
        raise ValueError(f"{what} is {text!r} but must be a seed, a list of seeds or a text such as '1,2,3'")
    if not values:
        raise ValueError(f"{what} is empty")
    if len(values) > MAX_SEEDS:
        raise ValueError(f"{what} name {len(values)} seeds but at most {MAX_SEEDS} are allowed")
    seeds = tuple(check_int(what, v, *SEED_RANGE) for v in values)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{what} repeat a seed: {', '.join(map(str, seeds))}")
    return seeds


def _job_name(name: str, where: str) -> str:
    if not _NAME.match(name) or name in (".", ".."):
        raise ValueError(f"{where}: output name '{name}' must be a plain file name (letters, digits, . _ - and spaces)")
    return name


def _record_job(rec, base: Path, where: str, default_seeds: tuple[int, ...]) -> EditJob:
    """One record -> a job; its name is "" unless the record gives one (see :func:`_named`)."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: a job must be an object with 'image' and 'instruction', not {type(rec).__name__}")
    unknown = set(rec) - {"image", "image2", "instruction", "seed", "seeds", "name", "negative"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; a job has image, instruction, "
                         "image2, seed or seeds, name, negative")
    if not isinstance(rec.get("image"), str) or not rec["image"]:
        raise ValueError(f"{where}: 'image' must be a path")
    if "image2" in rec and (not isinstance(rec["image2"], str) or not rec["image2"]):
        raise ValueError(f"{where}: 'image2' must be a path (a second input image)")
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
    image2 = (base / rec["image2"]).expanduser() if "image2" in rec else None
    name = _job_name(str(rec["name"]), where) if rec.get("name") is not None else ""
    return EditJob(image, rec["instruction"], seeds, name, negative, where, image2)


class _Problems(list):
    """The problems of one job list, gathered so that one run reports them all."""

    def check(self, where_prefix: str, fn: Callable, *args):
        """``fn(*args)``, or None with its ValueError recorded."""
        try:
            return fn(*args)
        except ValueError as exc:
            self.append(f"{where_prefix}{exc}")
            return None

    def raise_any(self, src: Path) -> None:
        if len(self) == 1:
            raise ValueError(self[0])
        if self:
            lines = "\n  ".join(self)
            raise ValueError(f"job list {src} has {len(self)} problems (nothing was run):\n  {lines}")


def _folder_jobs(src: Path, default_seeds: tuple[int, ...], problems: _Problems) -> list[EditJob]:
    images = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise ValueError(f"job folder {src} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    jobs = []
    for img in images:
        txt = img.with_suffix(".txt")
        if not txt.is_file():
            problems.append(f"job folder {src}: {img.name} has no instruction file {txt.name} beside it")
            continue
        instruction = problems.check("", read_text, txt, "instruction file")
        if instruction is None:
            continue
        if not instruction.strip():
            problems.append(f"{txt}: the instruction is empty")
            continue
        jobs.append(EditJob(img, instruction.strip(), default_seeds, "", None, str(img)))
    return jobs


def _file_records(src: Path, text: str, problems: _Problems) -> list[tuple[str, object]]:
    """(where, record) of each job of a job file; malformed lines are recorded in ``problems``."""
    suffix = src.suffix.lower()
    if suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{src} is not valid JSON: {exc}") from None
        if not isinstance(records, list):
            raise ValueError(f"{src} must hold a JSON list of jobs")
        return [(f"{src}: job {i + 1}", r) for i, r in enumerate(records)]
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        where = f"{src}:{n}"
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if suffix == ".jsonl":
            try:
                found.append((where, json.loads(line)))
            except json.JSONDecodeError as exc:
                problems.append(f"{where} is not valid JSON: {exc}")
            continue
        fields = line.rstrip("\n").split("\t")
        if len(fields) not in (2, 3):
            problems.append(f"{where}: expected 'image<TAB>instruction[<TAB>seeds]', found {len(fields)} field(s)")
            continue
        rec = {"image": fields[0].strip(), "instruction": fields[1].strip()}
        if len(fields) == 3 and fields[2].strip():
            rec["seeds"] = fields[2].strip()
        found.append((where, rec))
    return found


def _named(jobs: list[EditJob], problems: _Problems) -> list[EditJob]:
    """Every job with its output name: the names a list gives are reserved first (two jobs given
    one name is a problem naming both), then each other job takes its image's stem, or the stem
    with ``-2``, ``-3`` ... where that is taken (by any job: names are compared ignoring case).
    The same list always gets the same names, so a rerun finds its outputs."""
    given: dict[str, EditJob] = {}
    for job in jobs:
        if job.name:
            first = given.setdefault(job.name.lower(), job)
            if first is not job:
                problems.append(f"{job.where}: output name '{job.name}' is given to {first.where} already")
    used = set(given)
    named = []
    for job in jobs:
        name = job.name
        if not name:
            name, k = job.image.stem, 2
            while name.lower() in used:
                name, k = f"{job.image.stem}-{k}", k + 1
            used.add(name.lower())
        named.append(dataclasses.replace(job, name=name))
    return named


def read_jobs(source: str | os.PathLike, *, default_seeds: Sequence[int] = (42,),
              check: Callable[[EditJob], object] | None = None) -> list[EditJob]:
    """The jobs of a job file or folder (see the module docstring), each with its seeds
    (``default_seeds`` where a job names none) and a unique output name. ``check(job)``, when
    given, is called for each job (e.g. to read its image); it raises ``ValueError`` for a bad one.

    Every problem of the list (malformed lines, missing instruction files, names given twice,
    what ``check`` refuses) is gathered and reported in one ``ValueError`` naming each file,
    line and field, before any work."""
    default_seeds = parse_seeds(list(default_seeds))
    src = Path(source)
    problems = _Problems()
    if src.is_dir():
        jobs = _folder_jobs(src, default_seeds, problems)
    elif src.is_file():
        if src.suffix.lower() not in JOB_FILE_SUFFIXES:
            raise ValueError(f"job list {src} must be a folder or a {', '.join(JOB_FILE_SUFFIXES)} file")
        records = _file_records(src, read_text(src, "job list"), problems)
        jobs = [job for where, rec in records
                if (job := problems.check("", _record_job, rec, src.parent, where, default_seeds)) is not None]
    else:
        raise ValueError(f"job list {src} does not exist")
    if not jobs and not problems:
        raise ValueError(f"job list {src} holds no jobs")
    jobs = _named(jobs, problems)
    if check is not None:
        for job in jobs:
            problems.check(f"{job.where}: ", check, job)
    problems.raise_any(src)
    return jobs


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


class JobsInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`run_jobs`; the message says how many images this run wrote and where
    (every one of them complete), and how to resume."""

    def __init__(self, written: int, total: int, out_dir: Path):
        self.written, self.total, self.out_dir = written, total, out_dir
        made = f"after writing {written} of {total} images" if written else f"before any of {total} images was written"
        super().__init__(f"{made} to {out_dir}; run the same command again to resume")


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
    its image (``job.image``; for a job with ``image2`` it is also called with a job whose
    ``image`` is that second image); ``save(image, path)`` writes one output atomically; ``progress(done, total)``
    counts sampling steps across every job; ``written(path)`` is told of each file. Returns the
    number of (job, seed) items run. Ctrl-C raises :class:`JobsInterrupted` (a
    ``KeyboardInterrupt``) counting the images this run wrote.
    """
    todo = [item for item in plan if not item.done]
    if not todo:
        return 0
    for item in todo:
        for path in item.paths:
            remove_stale_temporaries(path)
    saved: list[Path] = []

    def keep(image, path: Path) -> None:
        save(image, path)
        saved.append(path)
        if written is not None:
            written(path)

    try:
        _render_all(pipe, todo, requests, load_image, keep, progress, interrupt)
    except KeyboardInterrupt:
        raise JobsInterrupted(len(saved), sum(len(item.paths) for item in todo), todo[0].paths[0].parent) from None
    return len(todo)


def _render_all(pipe, todo: Sequence[JobOutput], requests, load_image, keep, progress, interrupt) -> None:
    """Encode each job once and render each of its seeds, saving every image with ``keep``."""
    steps_each = {item.job: requests[item.job].steps for item in todo}
    total = sum(steps_each[item.job] for item in todo)
    done_steps = 0
    by_job: dict[EditJob, list[JobOutput]] = {}
    for item in todo:
        by_job.setdefault(item.job, []).append(item)
    for job, items in by_job.items():
        image2 = load_image(dataclasses.replace(job, image=job.image2)) if job.image2 is not None else None
        encoded = pipe.encode(load_image(job), job.instruction, image2=image2, request=requests[job],
                              negative_instruction=job.negative)
        for item in items:
            base = done_steps

            def step(done, _total, base=base):
                if progress is not None:
                    progress(base + done, total)

            result = pipe.render(encoded, seed=item.seed, progress=step, interrupt=interrupt)
            for image, path in zip(result.images, item.paths):
                keep(image, path)
            done_steps = base + steps_each[job]
            if progress is not None:
                progress(done_steps, total)
