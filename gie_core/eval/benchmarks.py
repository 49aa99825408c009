"""The benchmarks' instruction sets in their published on-disk forms, and their output layouts.

One row per benchmark in :data:`BENCHMARKS` (how to read it, where each output goes, which
judging rubric fits it): the CLI, the generator, the scorer and the comparison all read it.

| benchmark | instruction set | outputs (what its own scorer reads) |
| --- | --- | --- |
| ``imgedit`` | ImgEdit-Bench single-turn JSON: ``{key: {"id": image path, "prompt", "edit_type"}}`` + image folder | ``OUT/<key>.png`` |
| ``gedit`` | GEdit-Bench rows (parquet shards of ``stepfun-ai/GEdit-Bench``, or JSON/JSONL): ``key, task_type, instruction, instruction_language, input_image[, input_image_raw, Intersection_exist]`` | ``OUT/fullset/<task_type>/<language>/<key>.png`` + the source as ``<key>_SRCIMG.png`` beside it |
| ``complex-edit`` | Complex-Edit rows (parquet, an image folder's ``metadata.jsonl``, or JSON/JSONL): ``image``, ``edit.compound[level-1].compound_instruction`` | ``OUT/<index:05d>.png`` (one folder per level and image type) |
| ``imgedit-multiturn`` | ImgEdit's Multi-Turn suite: JSON ``{key: {"id": image path, "turn1", "turn2"[, "turn3"]}}``, one file per category (a folder of them reads all; the category is the file's stem) | ``OUT/<category>/<key>_turn<N>.png`` for every turn (upstream judges them by hand) |
| ``omnicontext`` | OmniContext rows (parquet or JSON/JSONL): ``key, task_type, instruction, input_images`` (SINGLE = ``single_character``, ``single_object`` by default; the MULTIPLE and SCENE tasks with ``--task-types``: up to two input images a sample) | ``OUT/fullset/<task_type>/<key>.png`` |
| ``jsonl`` | your own JSONL (or JSON list): ``{"image", "instruction"[, "key", "category", "mask"]}`` | ``OUT/<key>.png`` |

Image fields may be a path (relative to the instruction set's folder, or to ``images``), or a
Hugging Face image struct ``{"bytes": ..., "path": ...}`` as parquet shards hold them.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from gie_core.imaging.images import check_size, load_image, to_rgb
from gie_core.eval.tables import InstructionSetError, read_json_rows, read_rows, table_files

ImageRef = str | bytes  # a file path, or the encoded bytes of an image

# Every value from a data file that names a file or folder of the run (keys, task types, languages):
# letters, digits and . _ - only, so never a folder separator, an absolute path or "..".
_SAFE_PATH_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")

OMNICONTEXT_SINGLE = ("single_character", "single_object")
# the in-context tasks with several input images (OmniGen2's OmniContext dataset card names them);
# a sample runs when it has at most MAX_IMAGES_PER_TURN images (Image 1 and Image 2)
OMNICONTEXT_MULTIPLE = ("multiple_character", "multiple_object", "multiple_character_object")
OMNICONTEXT_SCENE = ("scene_character", "scene_object", "scene_character_object")
GEDIT_LANGUAGES = ("en", "cn")
COMPLEX_EDIT_LEVELS = range(1, 9)
COMPLEX_EDIT_IMAGE_TYPES = ("real", "syn")


@dataclass
class Sample:
    """One edit of a benchmark."""

    key: str  # unique in the set; names the output file
    instruction: str
    image: ImageRef  # the image to edit
    category: str  # what scores are grouped by (edit type, task type, complexity level)
    index: int  # position in the instruction set (fixes the shard and the order)
    language: str = "en"
    reference: ImageRef | None = None  # the source image the judge compares with, when not ``image``
    mask: ImageRef | None = None  # optional edit mask (white = edited) for the similarity metrics
    more_images: tuple[ImageRef, ...] = ()  # further input images (OmniContext's multi-image tasks), in order
    extra: dict = field(default_factory=dict)  # benchmark fields worth keeping (e.g. Intersection_exist)

    @property
    def judge_source(self) -> ImageRef:
        return self.reference if self.reference is not None else self.image


@dataclass(frozen=True)
class SelectOptions:
    """Which part of an instruction set to run (recorded with the run, so scoring reads the same)."""

    images: str | None = None  # folder that relative image paths are under (default: the set's folder)
    language: str = "en"  # GEdit: en, cn or all (the paper reports GEdit-EN)
    complexity: int = 8  # Complex-Edit level 1-8 (the paper reports level 8)
    image_type: str = "real"  # Complex-Edit split when a dataset folder is given: real or syn
    task_types: tuple[str, ...] = ()  # keep only these categories; "all" keeps every one (OmniContext default: SINGLE)
    limit: int = 0  # first N samples after the filters (0 = all)

    def to_dict(self) -> dict:
        return {
            "images": self.images, "language": self.language, "complexity": self.complexity,
            "image_type": self.image_type, "task_types": list(self.task_types), "limit": self.limit,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SelectOptions:
        return cls(
            images=d.get("images"), language=d.get("language", "en"), complexity=int(d.get("complexity", 8)),
            image_type=d.get("image_type", "real"), task_types=tuple(d.get("task_types", ())),
            limit=int(d.get("limit", 0)),
        )


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: how its instruction set is read, where its outputs go, how it is judged."""

    name: str
    title: str
    rubric: str  # the default judging rubric (gie_core.eval.judge.RUBRICS)
    load: Callable[[Path, SelectOptions], list[Sample]]
    output_path: Callable[[Sample], str]  # relative to the run folder, '/'-separated
    layout: str  # the layout in words, for help texts
    # upstream's evaluation squashed this benchmark's inputs to this size first (--geometry paper only)
    paper_input_size: tuple[int, int] | None = None
    # where the judge's source image is copied for the benchmark's own scorer (relative like
    # output_path), or None when that scorer reads the benchmark's own files
    source_path: Callable[[Sample], str] | None = None
    # named subsets whose averages the benchmark also reports: (name, does this sample belong)
    subsets: tuple[tuple[str, Callable[[Sample], bool]], ...] = ()


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _image_ref(value, base: Path, what: str) -> ImageRef:
    """A path (relative to ``base``), bytes, or a Hugging Face image struct -> path or bytes."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if data:
            return bytes(data)
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value.strip():
        p = Path(value)
        return str(p if p.is_absolute() else base / p)
    raise InstructionSetError(f"{what} has no image (expected a path or an image struct with bytes/path)")


def _field(row: dict, names: tuple[str, ...], what: str, required: bool = True):
    for n in names:
        if n in row and row[n] is not None and row[n] != "":
            return row[n]
    if required:
        raise InstructionSetError(f"{what} has no '{names[0]}' field (it has: {', '.join(sorted(map(str, row)))})")
    return None


def check_path_part(value, what: str, name: str = "key") -> str:
    """``value`` (the ``name`` field of a data file's row ``what``) as one file or folder name of the
    run folder; anything that could leave its folder (``/``, ``\\``, ``..``, an absolute path, an
    empty name) is refused, naming the row, the field and the value."""
    value = str(value)
    if not _SAFE_PATH_PART.match(value) or ".." in value:
        kind = "an output file" if name == "key" else "an output folder"
        raise InstructionSetError(
            f"{what}: {name} '{value}' cannot name {kind}; a {name} may hold letters, digits, '.', '_' and '-' "
            "(no folders, no '..')"
        )
    return value


def _instruction(value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InstructionSetError(f"{what} has an empty instruction")
    return value.strip()


def _as_rows(data, path: Path) -> list[dict]:
    if isinstance(data, dict):
        data = data.get("data", data.get("rows", data))
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise InstructionSetError(f"{path} must hold a list of rows (JSON objects)")
    return data


def _rows_of(path: Path, pattern: str = "*.parquet") -> tuple[list[dict], Path]:
    """Rows of a file or of every shard under a folder, and the folder relative paths are under."""
    files = table_files(path, pattern)
    rows: list[dict] = []
    for f in files:
        rows.extend(_as_rows(read_rows(f), f))
    return rows, (path if path.is_dir() else path.parent)


def _finish(samples: list[Sample], sel: SelectOptions, what: str) -> list[Sample]:
    if sel.task_types and "all" not in sel.task_types:
        wanted = set(sel.task_types)
        samples = [s for s in samples if s.category in wanted]
    seen: set[str] = set()
    for s in samples:
        if s.key in seen:
            raise InstructionSetError(f"{what}: key '{s.key}' appears twice; every sample needs its own key")
        seen.add(s.key)
    if sel.limit:
        samples = samples[: sel.limit]
    if not samples:
        raise InstructionSetError(f"{what}: no samples left after the filters ({sel.to_dict()})")
    return samples


# --------------------------------------------------------------------------------------------
# ImgEdit-Bench (single turn)
# --------------------------------------------------------------------------------------------


def load_imgedit(path: Path, sel: SelectOptions) -> list[Sample]:
    """ImgEdit-Bench single-turn JSON: ``{key: {"id": relative image path, "prompt", "edit_type"}}``;
    images under ``sel.images`` (its ``Benchmark/singleturn`` folder) or the JSON's folder."""
    data = read_json_rows(path)
    if not isinstance(data, dict):
        raise InstructionSetError(f"{path} must be an ImgEdit JSON object of key -> {{id, prompt, edit_type}}")
    base = Path(sel.images) if sel.images else path.parent
    samples = []
    for i, (key, item) in enumerate(data.items()):
        what = f"{path.name} entry '{key}'"
        if not isinstance(item, dict):
            raise InstructionSetError(f"{what} must be an object with id, prompt and edit_type")
        samples.append(Sample(
            key=check_path_part(key, what), instruction=_instruction(_field(item, ("prompt", "instruction"), what), what),
            image=_image_ref(_field(item, ("id", "image"), what), base, what),
            category=str(_field(item, ("edit_type",), what, required=False) or "all"), index=i,
        ))
    return _finish(samples, sel, str(path))


# --------------------------------------------------------------------------------------------
# GEdit-Bench
# --------------------------------------------------------------------------------------------


def load_gedit(path: Path, sel: SelectOptions) -> list[Sample]:
    """GEdit-Bench rows: a parquet file or the dataset folder (its shards), or JSON/JSONL rows.
    ``input_image_raw`` (the original) is edited when present, else ``input_image``; the judge
    compares with ``input_image``, the source image GEdit's own scorer uses."""
    if sel.language not in (*GEDIT_LANGUAGES, "all"):
        raise InstructionSetError(f"GEdit language '{sel.language}' is unknown; expected en, cn or all")
    if path.is_file() and path.suffix.lower() in (".json", ".jsonl"):
        rows, base = _as_rows(read_json_rows(path), path), path.parent
    else:
        rows, base = _rows_of(path)
    base = Path(sel.images) if sel.images else base
    samples = []
    for i, row in enumerate(rows):
        what = f"GEdit row {i}"
        key = check_path_part(_field(row, ("key",), what), what)
        language = check_path_part(_field(row, ("instruction_language", "language"), what, required=False) or "en",
                                   what, "instruction_language")
        category = check_path_part(_field(row, ("task_type",), what), what, "task_type")
        if sel.language != "all" and language != sel.language:
            continue
        source = _image_ref(_field(row, ("input_image", "input_image_raw", "image"), what), base, what)
        raw = row.get("input_image_raw")
        image = _image_ref(raw, base, what) if raw else source
        samples.append(Sample(
            key=key, instruction=_instruction(_field(row, ("instruction",), what), what), image=image,
            reference=source if raw else None, category=category, index=i, language=language, extra={"intersection_exist": bool(row.get("Intersection_exist", False))},
        ))
    return _finish(samples, sel, f"GEdit set {path}")


def gedit_output(sample: Sample) -> str:
    return f"fullset/{sample.category}/{sample.language}/{sample.key}.png"


def gedit_source(sample: Sample) -> str:
    """The source image beside the output, where Step1X-Edit's ``test_gedit_score.py`` and
    GPT-Image-Edit's ``step2_gedit_bench.py`` read it (``<key>_SRCIMG.png``)."""
    return f"fullset/{sample.category}/{sample.language}/{sample.key}_SRCIMG.png"


def gedit_intersection(sample: Sample) -> bool:
    """GEdit's "Intersection" subset: the rows with ``Intersection_exist`` set
    (``calculate_statistics.py`` averages them apart)."""
    return bool(sample.extra.get("intersection_exist"))


# --------------------------------------------------------------------------------------------
# Complex-Edit
# --------------------------------------------------------------------------------------------


def _complex_edit_files(path: Path, image_type: str) -> list[Path]:
    if path.is_file():
        return [path]
    for pattern in (f"test/{image_type}/metadata.jsonl", f"**/test_{image_type}-*.parquet", f"**/test_{image_type}*.parquet"):
        found = sorted(f for f in path.glob(pattern) if f.is_file())
        if found:
            return found
    raise InstructionSetError(
        f"Complex-Edit folder '{path}' has neither test/{image_type}/metadata.jsonl nor test_{image_type}-*.parquet shards"
    )


def load_complex_edit(path: Path, sel: SelectOptions) -> list[Sample]:
    """Complex-Edit rows (``image`` or ``file_name``, ``edit.compound[level-1].compound_instruction``),
    from a parquet shard, the dataset folder (``test/<type>/metadata.jsonl`` or ``test_<type>-*.parquet``)
    or JSON/JSONL. Keys are the row's position, zero-padded to 5 digits, as its scorer sorts them."""
    if sel.complexity not in COMPLEX_EDIT_LEVELS:
        raise InstructionSetError(f"Complex-Edit complexity is {sel.complexity} but must be 1-8")
    if sel.image_type not in COMPLEX_EDIT_IMAGE_TYPES:
        raise InstructionSetError(f"Complex-Edit image type '{sel.image_type}' is unknown; expected real or syn")
    rows: list[dict] = []
    for f in _complex_edit_files(path, sel.image_type):
        rows.extend(_as_rows(read_rows(f), f))
        base = f.parent
    base = Path(sel.images) if sel.images else base
    samples = []
    for i, row in enumerate(rows):
        what = f"Complex-Edit row {i}"
        edit = row.get("edit")
        if isinstance(edit, str):
            try:
                edit = json.loads(edit)
            except json.JSONDecodeError:
                edit = None
        levels = None
        if isinstance(edit, dict) and isinstance(edit.get("compound"), list):
            levels = [c.get("compound_instruction") if isinstance(c, dict) else c for c in edit["compound"]]
        elif isinstance(row.get("instructions"), list):
            levels = row["instructions"]
        if not levels or len(levels) < sel.complexity:
            raise InstructionSetError(f"{what} has no level-{sel.complexity} compound instruction")
        samples.append(Sample(
            key=f"{i:05d}", instruction=_instruction(levels[sel.complexity - 1], what),
            image=_image_ref(_field(row, ("image", "file_name", "input_image"), what), base, what),
            category=f"complexity-{sel.complexity}", index=i,
        ))
    return _finish(samples, sel, f"Complex-Edit set {path}")


# --------------------------------------------------------------------------------------------
# ImgEdit Multi-Turn
# --------------------------------------------------------------------------------------------

_TURN = re.compile(r"^turn(\d+)$")


def load_imgedit_multiturn(path: Path, sel: SelectOptions) -> list[Sample]:
    """ImgEdit's Multi-Turn suite (``Benchmark/Multiturn/Multiturn_readme.md`` of PKU-YuanGroup/ImgEdit):
    JSON ``{key: {"id": image path, "turn1": ..., "turn2": ..., "turn3": ...}}``, one file per
    category (content understanding, content memory, version backtracking); ``path`` is one file or
    a folder of them, the category is a file's stem. The turns run in order as one conversation
    (``Sample.extra["turns"]``); the sample's instruction is its last turn. Images under
    ``sel.images`` or the JSON's folder."""
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not files:
        raise InstructionSetError(f"{path} holds no .json files of ImgEdit multi-turn instructions")
    samples = []
    for f in files:
        data = read_json_rows(f)
        if not isinstance(data, dict):
            raise InstructionSetError(f"{f} must be an ImgEdit JSON object of key -> {{id, turn1, turn2, ...}}")
        category = check_path_part(f.stem, f"{f.name}", "category")
        base = Path(sel.images) if sel.images else f.parent
        for key, item in data.items():
            what = f"{f.name} entry '{key}'"
            if not isinstance(item, dict):
                raise InstructionSetError(f"{what} must be an object with id, turn1, turn2, ...")
            numbered = sorted((int(m.group(1)), v) for k, v in item.items() if (m := _TURN.match(k)))
            if [n for n, _ in numbered] != list(range(1, len(numbered) + 1)) or not numbered:
                raise InstructionSetError(f"{what} must have turn1, turn2, ... in sequence")
            turns = [_instruction(v, f"{what} turn {n}") for n, v in numbered]
            plain = check_path_part(key, what)
            samples.append(Sample(
                key=f"{category}_{plain}", instruction=turns[-1], image=_image_ref(_field(item, ("id", "image"), what), base, what),
                category=category, index=len(samples), extra={"turns": turns, "turn_key": plain},
            ))
    return _finish(samples, sel, f"ImgEdit multi-turn set {path}")


def multiturn_turn_output(sample: Sample, turn: int) -> str:
    """Where turn ``turn`` (1-based) of a multi-turn sample is written."""
    return f"{sample.category}/{sample.extra['turn_key']}_turn{turn}.png"


def multiturn_output(sample: Sample) -> str:
    """A multi-turn sample's output: its last turn (written last, so the sample is done once it exists)."""
    return multiturn_turn_output(sample, len(sample.extra["turns"]))


# --------------------------------------------------------------------------------------------
# OmniContext
# --------------------------------------------------------------------------------------------


def load_omnicontext(path: Path, sel: SelectOptions) -> list[Sample]:
    """OmniContext rows (``key, task_type, instruction, input_images``) from parquet shards or JSON/JSONL.
    Only the SINGLE tasks (one reference image, what the paper reports) are kept unless
    ``task_types`` says otherwise; the MULTIPLE and SCENE tasks' further images are
    ``Sample.more_images`` (the edit takes Image 1 and Image 2, as the reference app does; a
    sample with more is recorded as failed when generated, naming the limit)."""
    if path.is_file() and path.suffix.lower() in (".json", ".jsonl"):
        rows, base = _as_rows(read_json_rows(path), path), path.parent
    else:
        rows, base = _rows_of(path)
    base = Path(sel.images) if sel.images else base
    samples = []
    for i, row in enumerate(rows):
        what = f"OmniContext row {i}"
        images = _field(row, ("input_images", "input_image", "image"), what)
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise InstructionSetError(f"{what} has no input image")
        refs = [_image_ref(im, base, what) for im in images]
        samples.append(Sample(
            key=check_path_part(_field(row, ("key",), what), what), instruction=_instruction(_field(row, ("instruction",), what), what),
            image=refs[0], category=check_path_part(_field(row, ("task_type",), what), what, "task_type"), index=i,
            language=str(row.get("instruction_language") or "en"), extra={"n_input_images": len(refs)},
            more_images=tuple(refs[1:]),
        ))
    if not sel.task_types:
        sel = SelectOptions(**{**sel.__dict__, "task_types": OMNICONTEXT_SINGLE})
    return _finish(samples, sel, f"OmniContext set {path}")


def omnicontext_output(sample: Sample) -> str:
    return f"fullset/{sample.category}/{sample.key}.png"


# --------------------------------------------------------------------------------------------
# Your own set
# --------------------------------------------------------------------------------------------


def load_jsonl(path: Path, sel: SelectOptions) -> list[Sample]:
    """A JSONL (or JSON list) of ``{"image", "instruction"[, "key", "category", "mask", "language"]}``;
    paths relative to the file's folder (or ``images``); keys default to the line number."""
    rows = _as_rows(read_rows(path), path)
    base = Path(sel.images) if sel.images else path.parent
    samples = []
    for i, row in enumerate(rows):
        what = f"{path.name} row {i + 1}"
        key = row.get("key", row.get("id"))
        key = check_path_part(key if key not in (None, "") else f"{i:05d}", what)
        mask = row.get("mask")
        samples.append(Sample(
            key=key, instruction=_instruction(_field(row, ("instruction", "prompt"), what), what),
            image=_image_ref(_field(row, ("image", "input_image", "source"), what), base, what),
            category=str(row.get("category") or row.get("task_type") or "all"), index=i,
            language=str(row.get("language") or "en"), mask=_image_ref(mask, base, what) if mask else None,
        ))
    return _finish(samples, sel, str(path))


def _key_png(sample: Sample) -> str:
    return f"{sample.key}.png"


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("imgedit", "ImgEdit-Bench (single turn)", "imgedit", load_imgedit, _key_png, "OUT/<key>.png"),
        Benchmark("gedit", "GEdit-Bench", "viescore", load_gedit, gedit_output,
                  "OUT/fullset/<task_type>/<language>/<key>.png (+ <key>_SRCIMG.png)",
                  source_path=gedit_source, subsets=(("intersection", gedit_intersection),)),
        Benchmark("complex-edit", "Complex-Edit", "complex-edit", load_complex_edit, _key_png, "OUT/<index:05d>.png",
                  paper_input_size=(1024, 1024)),
        Benchmark("imgedit-multiturn", "ImgEdit Multi-Turn (judged by hand upstream; a judge here reads the last "
                  "turn against the source)", "viescore", load_imgedit_multiturn, multiturn_output,
                  "OUT/<category>/<key>_turn<N>.png"),
        Benchmark("omnicontext", "OmniContext", "omnicontext", load_omnicontext, omnicontext_output,
                  "OUT/fullset/<task_type>/<key>.png"),
        Benchmark("jsonl", "your own JSONL set", "viescore", load_jsonl, _key_png, "OUT/<key>.png"),
    )
}


def benchmark(name: str) -> Benchmark:
    """The benchmark called ``name``; an unknown name is refused with the list of known ones."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ValueError(f"benchmark '{name}' is unknown; expected one of {', '.join(BENCHMARKS)}") from None


def load_samples(name: str, path: str | os.PathLike, sel: SelectOptions | None = None) -> list[Sample]:
    """The samples of benchmark ``name`` read from ``path``, filtered by ``sel``, in the set's order."""
    return benchmark(name).load(Path(path), sel or SelectOptions())


def load_sample_image(ref: ImageRef, what: str) -> Image.Image:
    """A sample's image as RGB, read like ``gie-edit`` reads its input (EXIF, 16-bit, alpha; sizes checked)."""
    if isinstance(ref, bytes):
        try:
            with Image.open(io.BytesIO(ref)) as im:
                check_size(im.width, im.height, what)
                im.load()
                return to_rgb(ImageOps.exif_transpose(im)).copy()
        except UnidentifiedImageError:
            raise ValueError(f"{what} holds bytes that are not an image PIL can read") from None
        except (OSError, SyntaxError, EOFError) as exc:
            raise ValueError(f"{what} is truncated or damaged ({exc})") from None
    return load_image(ref, what)
