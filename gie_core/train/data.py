"""Training data: ``data.txt``, annotation files, aspect buckets, region weights, the dataset.

``data.txt`` lists one source per line, ``image_root,annotation_json,region_weighting``
(all three fields; ``true``/``false``; relative paths are taken from the data.txt folder, else
the working directory). A line with another number of fields is refused, naming ``file:line``. An annotation file holds edit records in either schema:

- GPT-Image-Edit's: ``{"image": [source, target], "conversations": [{"from": "human",
  "value": "<image>\\n{instruction}"}, {"from": "gpt", "value": "<gen_image>"}]}``;
- the dataset card's metadata: ``{"input": source, "output": target, "instruction": ...}``,

as a JSON list or as JSON lines (one record per line). Image paths are relative to the image
root. Malformed records, missing files, unreadable images and images too small or too large
(``MIN_IMAGE_SIDE``..``MAX_IMAGE_SIDE``) are reported and skipped, with a count at the end; a
run never stops for one bad sample.

Images are read by :func:`gie_core.imaging.images.load_image`, as every other face reads them: EXIF
orientation applied (sizes and buckets are those of the image as shown), 16-bit greyscale
scaled by its range, transparency composited on white.

A pair whose source and target differ in size (as shown) is *trained*, not skipped: both are
fitted to the bucket of the target (``ratio``: cover and centre-crop; ``square``: squashed), and
the pair is reported once as a warning (kind ``size mismatch``, naming both sizes), counted
apart from the skipped samples.

Buckets: the data was generated at 1:1, 3:2 and 2:3, so by default each pair is resized (cover
and centre-crop, no distortion) to the bucket of its ratio at about ``resolution^2`` pixels;
``square`` squashes every image to ``resolution x resolution`` as the reference did.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageChops, UnidentifiedImageError

from gie_core.constants import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, QWEN_IMAGE_SIZE, SIZE_MULTIPLE
from gie_core.files import atomic_write_text, read_text
from gie_core.imaging.images import load_image
from gie_core.imaging.ratio import nearest_ratio, parse_ratios

logger = logging.getLogger("gie_core.train")

IMAGE_TOKEN = "<image>"


class DataError(ValueError):
    """data.txt or an annotation file cannot be used at all (a setup error, not a bad sample)."""


# ------------------------------------------------------------------------------------------
# Problems: reported, counted, never fatal
# ------------------------------------------------------------------------------------------


class ProblemLog:
    """Bad samples seen during a run: each is logged (the first ``max_logged``) and counted.

    Problems are skipped samples (:meth:`report`); warnings (:meth:`warn`) are pairs that train
    but look wrong (a source and target of different sizes). Each (kind, where) counts once.
    """

    def __init__(self, max_logged: int = 20):
        self.max_logged = max_logged
        self.counts: Counter[str] = Counter()
        self.warnings: Counter[str] = Counter()
        self.seen: set[tuple[str, str]] = set()
        self.skipped_batches = 0  # batches none of whose bucket's pairs loaded (see skip_batch)
        self._skipped_in_a_row = 0
        self._lock = threading.Lock()

    def _add(self, counter: Counter, kind: str, where: str) -> int | None:
        with self._lock:
            if (kind, where) in self.seen:
                return None
            self.seen.add((kind, where))
            counter[kind] += 1
            return sum(self.counts.values()) + sum(self.warnings.values())

    def _log(self, n: int | None, text: str, *args) -> None:
        if n is None:
            return
        if n <= self.max_logged:
            logger.warning(text, *args)
        elif n == self.max_logged + 1:
            logger.warning("more data problems are being reported; the counts are given at the end")

    def report(self, kind: str, where: str, reason: str) -> None:
        """Record one skipped sample (``kind``: missing image, unreadable image, image too small,
        malformed record, ...); the same (kind, where) is counted once."""
        self._log(self._add(self.counts, kind, where), "skipping %s: %s (%s)", kind, where, reason)

    def warn(self, kind: str, where: str, reason: str) -> None:
        """Record one pair that is trained but looks wrong; counted once per (kind, where)."""
        self._log(self._add(self.warnings, kind, where), "warning, %s: %s (%s)", kind, where, reason)

    def extend(self, items: Iterable[tuple[str, str, str]]) -> None:
        for kind, where, reason in items:
            self.report(kind, where, reason)

    def skip_batch(self, batch: dict, batches_per_epoch: int, data: str | os.PathLike) -> bool:
        """Whether to skip ``batch`` (a :func:`collate` result): true for a batch none of whose
        pairs could be loaded, nor any stand-in from its bucket (a bad pair alone in its bucket).
        Such a batch is counted and logged, and the run goes on, as for any bad sample; when a
        whole epoch of batches in a row is skipped, no pair of ``data`` loads at all and
        :class:`DataError` says so, naming it."""
        if not batch.get("skipped"):
            self._skipped_in_a_row = 0
            return False
        self.skipped_batches += 1
        self._skipped_in_a_row += 1
        w, h = batch["bucket"]
        if self._skipped_in_a_row >= batches_per_epoch:
            raise DataError(f"no pair of {data} could be loaded: {self._skipped_in_a_row} batches in a row were "
                            f"skipped, a whole epoch ({self.summary()}); check the images it lists")
        n = len(self.counts) + self.skipped_batches
        self._log(n, "skipping a batch of the %dx%d bucket: none of its pairs could be loaded", w, h)
        return True

    @property
    def total(self) -> int:
        """Skipped samples (warnings are not counted here)."""
        return sum(self.counts.values())

    @property
    def total_warnings(self) -> int:
        return sum(self.warnings.values())

    def summary(self) -> str:
        parts = []
        if self.counts:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.counts.items()))
            parts.append(f"skipped {self.total} bad samples: {kinds}")
        else:
            parts.append("no bad samples")
        if self.skipped_batches:
            parts.append(f"skipped {self.skipped_batches} batch{'es' if self.skipped_batches > 1 else ''} "
                         "whose bucket had no pair that loads")
        if self.warnings:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.warnings.items()))
            parts.append(f"trained {self.total_warnings} pairs with warnings: {kinds}")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "warnings": dict(self.warnings), "seen": sorted(list(s) for s in self.seen),
                "skipped_batches": self.skipped_batches}

    def load_dict(self, d: dict) -> None:
        self.counts = Counter(d.get("counts", {}))
        self.warnings = Counter(d.get("warnings", {}))
        self.seen = {tuple(s) for s in d.get("seen", [])}
        self.skipped_batches = int(d.get("skipped_batches", 0))


# ------------------------------------------------------------------------------------------
# data.txt and annotations
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSource:
    """One line of data.txt."""

    image_root: Path
    annotation: Path
    region_weighting: bool
    line: int = 0


def _read_text(path: Path, what: str) -> str:
    try:
        return read_text(path, what)
    except ValueError as exc:  # not UTF-8 (the file, line and byte named) or unreadable
        raise DataError(str(exc)) from None


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    beside = base / p
    return beside if beside.exists() or not p.exists() else p


DATA_TXT_FORMAT = "image_root,annotation_json,region_weighting"


def read_data_txt(path: str | os.PathLike) -> list[DataSource]:
    """Parse data.txt: ``image_root,annotation_json,region_weighting`` per line (``#`` comments and
    blank lines ignored). Any other line is refused with ``file:line``, what it holds and what is
    expected: a run must not silently train without the region weighting a line was meant to set."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data.txt {p} does not exist")
    sources = []
    for n, raw in enumerate(_read_text(p, "data.txt").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{p}:{n}"
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3:
            raise DataError(
                f"{where}: expected 3 comma-separated fields '{DATA_TXT_FORMAT}' (e.g. 'images,edits.json,false') "
                f"but found {len(fields)}: {raw.strip()!r}"
            )
        if not fields[0] or not fields[1]:
            missing = "image_root" if not fields[0] else "annotation_json"
            raise DataError(f"{where}: {missing} is empty; expected '{DATA_TXT_FORMAT}' but found {raw.strip()!r}")
        flag = fields[2].lower()
        if flag not in ("true", "false"):
            raise DataError(f"{where}: region_weighting is {fields[2]!r} but must be true or false ('{DATA_TXT_FORMAT}')")
        root, ann = _resolve(fields[0], p.parent), _resolve(fields[1], p.parent)
        if not ann.is_file():
            raise DataError(f"{where}: annotation file {ann} does not exist")
        if not root.is_dir():
            raise DataError(f"{where}: image root {root} is not a directory")
        sources.append(DataSource(root, ann, flag == "true", n))
    if not sources:
        raise DataError(f"{p} lists no data sources (expected '{DATA_TXT_FORMAT}' lines)")
    return sources


@dataclass(frozen=True)
class EditRecord:
    """One training pair: edit ``source`` by ``instruction`` into ``target``."""

    source: Path
    target: Path
    instruction: str
    region_weighting: bool = False

    @property
    def key(self) -> str:
        """A stable id of the pair (cache file names)."""
        text = f"{self.source}\0{self.target}\0{self.instruction}"
        return hashlib.sha1(text.encode("utf-8")).hexdigest()[:24]


def strip_image_tokens(text: str) -> str:
    """The instruction without its ``<image>`` placeholders (the engine places the image first);
    the rest of the text, newlines included, is kept as written."""
    return re.sub(r"\s*" + re.escape(IMAGE_TOKEN) + r"\s*", " ", text).strip()


def instruction_from_conversations(conversations) -> str:
    """The first human turn without its ``<image>`` placeholders."""
    if not isinstance(conversations, list):
        raise ValueError("'conversations' must be a list of turns")
    for turn in conversations:
        if isinstance(turn, dict) and turn.get("from") in ("human", "user"):
            value = turn.get("value")
            if not isinstance(value, str):
                raise ValueError("the human turn has no text 'value'")
            return strip_image_tokens(value)
    raise ValueError("'conversations' has no human turn")


def parse_record(obj, image_root: Path, region_weighting: bool) -> EditRecord:
    """One annotation record (either schema) -> EditRecord; ValueError says what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"record is a {type(obj).__name__}, not an object")
    if "image" in obj or "conversations" in obj:
        images = obj.get("image")
        if isinstance(images, str):
            images = [images]
        if not isinstance(images, list) or len(images) != 2 or not all(isinstance(i, str) and i for i in images):
            n = len(images) if isinstance(images, list) else 0
            raise ValueError(f"'image' must be [source, target] but has {n} path(s)")
        source, target = images
        instruction = instruction_from_conversations(obj.get("conversations"))
    elif {"input", "output", "instruction"} <= set(obj):
        source, target, instruction = obj["input"], obj["output"], obj["instruction"]
        if not all(isinstance(v, str) for v in (source, target, instruction)):
            raise ValueError("'input', 'output' and 'instruction' must be strings")
        instruction = strip_image_tokens(instruction)
    else:
        raise ValueError("record has neither 'image' + 'conversations' nor 'input' + 'output' + 'instruction'")
    if not instruction:
        raise ValueError("the instruction is empty")
    return EditRecord(image_root / source, image_root / target, instruction, region_weighting)


def _iter_annotation_objects(path: Path, problems: ProblemLog):
    """Yield (where, object) from a JSON list/object file or a JSON-lines file."""
    text = _read_text(path, "annotation file")  # a file not UTF-8 is a setup error: its instructions would be garbled
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, list):
            for i, obj in enumerate(data):
                yield f"{path} record {i}", obj
            return
    lines = text.splitlines()
    if stripped.startswith("[") and len(lines) > 1:
        raise DataError(f"{path} starts like a JSON list but is not valid JSON (and not JSON lines)")
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.report("malformed record", f"{path} line {n}", f"not valid JSON: {exc.msg}")
            continue
        if isinstance(obj, list):  # a one-line JSON list
            for i, o in enumerate(obj):
                yield f"{path} line {n} record {i}", o
        else:
            yield f"{path} line {n}", obj


def read_annotations(source: DataSource, problems: ProblemLog) -> list[EditRecord]:
    """All usable records of one data.txt line; malformed ones are reported and skipped."""
    records = []
    for where, obj in _iter_annotation_objects(source.annotation, problems):
        try:
            records.append(parse_record(obj, source.image_root, source.region_weighting))
        except ValueError as exc:
            problems.report("malformed record", where, str(exc))
    return records


def read_dataset(data_txt: str | os.PathLike, problems: ProblemLog, region_weighting: str = "auto") -> list[EditRecord]:
    """Every record of every source in data.txt (``region_weighting`` on/off overrides the lines)."""
    records: list[EditRecord] = []
    for src in read_data_txt(data_txt):
        recs = read_annotations(src, problems)
        if region_weighting != "auto":
            flag = region_weighting == "on"
            recs = [EditRecord(r.source, r.target, r.instruction, flag) for r in recs]
        logger.info("%d pairs from %s", len(recs), src.annotation)
        records.extend(recs)
    return records


# ------------------------------------------------------------------------------------------
# Buckets
# ------------------------------------------------------------------------------------------


def bucket_size(ratio: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(width, height) of about ``resolution^2`` pixels at exactly ``ratio`` when the sides allow
    (3:2 at 512 -> 624x416, at 1024 -> 1248x832), sides multiples of 16."""
    rw, rh = ratio
    unit_w, unit_h = rw * SIZE_MULTIPLE, rh * SIZE_MULTIPLE
    n = round(math.sqrt(resolution * resolution / (unit_w * unit_h)))
    if n >= 1:
        return unit_w * n, unit_h * n
    # a ratio too lopsided for exact multiples: nearest sides, each a multiple of 16
    w = max(SIZE_MULTIPLE, round(resolution * math.sqrt(rw / rh) / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    h = max(SIZE_MULTIPLE, round(resolution * math.sqrt(rh / rw) / SIZE_MULTIPLE) * SIZE_MULTIPLE)
    return w, h


def bucket_for(width: int, height: int, bucketing: str, resolution: int, ratios="default") -> tuple[int, int]:
    """The training size of an image of ``width x height``."""
    if bucketing == "square":
        return resolution, resolution
    return bucket_size(nearest_ratio(width, height, ratios), resolution)


def bucket_sizes(resolution: int, ratios="default") -> list[tuple[int, int]]:
    """Every bucket of a ratio set at ``resolution``."""
    return [bucket_size(r, resolution) for r in parse_ratios(ratios)]


def fit_to_bucket(image: Image.Image, width: int, height: int, bucketing: str) -> Image.Image:
    """Resize to ``width x height``: ``square`` squashes (the reference), ``ratio`` covers and
    centre-crops (no distortion; the crop is tiny for images made at the bucket's ratio)."""
    if image.size == (width, height):
        return image
    if bucketing == "square":
        return image.resize((width, height), Image.LANCZOS)
    w0, h0 = image.size
    scale = max(width / w0, height / h0)
    rw, rh = max(width, round(w0 * scale)), max(height, round(h0 * scale))
    resized = image.resize((rw, rh), Image.LANCZOS)
    left, top = (rw - width) // 2, (rh - height) // 2
    return resized.crop((left, top, left + width, top + height))


# EXIF orientations that swap width and height (transpose, 90 degrees, transverse, 270 degrees)
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
INDEX_VERSION = 2  # bump when scan_sizes' results change meaning (v2: sizes as shown, size warnings)


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of the image *as shown* (EXIF orientation applied), from the header only."""
    with Image.open(path) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112)
        except Exception:  # noqa: BLE001 - a broken EXIF block: the pixels decide at load time
            orientation = None
    return (h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)


class ImageProblem(ValueError):
    """A training image that cannot be used; ``kind`` is its problem-log kind."""

    def __init__(self, kind: str, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.kind, self.path, self.reason = kind, path, reason


def _check_image(path: Path) -> tuple[str, str] | None:
    """(kind, reason) when the image cannot be used, from its header only; else None.

    Kinds: ``missing image`` (no file), ``unreadable image`` (a folder, not an image, a damaged
    header), ``image too small`` / ``image too large`` (outside MIN_IMAGE_SIDE..MAX_IMAGE_SIDE).
    """
    if path.is_dir():
        return "unreadable image", "a directory, not an image file"
    if not path.is_file():
        return "missing image", "no such file"
    try:
        w, h = _image_size(path)
    except UnidentifiedImageError:
        return "unreadable image", "not an image file PIL can read"
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        return "unreadable image", f"{type(exc).__name__}: {exc}"
    if min(w, h) < MIN_IMAGE_SIDE:
        return "image too small", f"{w}x{h} is smaller than {MIN_IMAGE_SIDE} px a side"
    if max(w, h) > MAX_IMAGE_SIDE:
        return "image too large", f"{w}x{h} is larger than {MAX_IMAGE_SIDE} px a side"
    return None


def size_mismatch(source_size: tuple[int, int], target_size: tuple[int, int]) -> str | None:
    """The warning for a pair whose source and target differ in size (as shown), else None."""
    if tuple(source_size) == tuple(target_size):
        return None
    (sw, sh), (tw, th) = source_size, target_size
    return f"source is {sw}x{sh} but target is {tw}x{th}; both are fitted to the target's bucket"


def scan_sizes(
    records: Sequence[EditRecord], problems: ProblemLog, index_dir: str | os.PathLike | None = None, threads: int = 16
) -> list[tuple[int, int] | None]:
    """Target sizes (as shown) of every record: None for a pair with a missing, unreadable, too
    small or too large image (reported as skipped); a pair whose source and target sizes differ
    is kept and warned about once. Image headers are read once; the result is kept in
    ``index_dir`` for later runs (and its problems and warnings replayed from there)."""
    digest = hashlib.sha1(f"v{INDEX_VERSION}\n".encode())
    for r in records:
        digest.update(f"{r.source}\0{r.target}\n".encode("utf-8"))
    cache_file = Path(index_dir) / f"sizes-{digest.hexdigest()[:20]}.json" if index_dir else None
    if cache_file is not None and cache_file.is_file():
        try:
            saved = json.loads(cache_file.read_text(encoding="utf-8"))
            if len(saved["sizes"]) == len(records):
                for kind, where, reason in saved.get("problems", []):
                    problems.report(kind, where, reason)
                for kind, where, reason in saved.get("warnings", []):
                    problems.warn(kind, where, reason)
                return [tuple(s) if s else None for s in saved["sizes"]]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            pass

    def one(rec: EditRecord):
        for path in (rec.source, rec.target):
            bad = _check_image(path)
            if bad:
                return None, (bad[0], str(path), bad[1]), None
        src, tgt = _image_size(rec.source), _image_size(rec.target)
        mismatch = size_mismatch(src, tgt)
        warning = ("size mismatch", f"{rec.source} -> {rec.target}", mismatch) if mismatch else None
        return tgt, None, warning

    with ThreadPoolExecutor(max(1, threads)) as pool:
        results = list(pool.map(one, records))
    sizes, found, warned = [], [], []
    for size, problem, warning in results:
        sizes.append(size)
        if problem:
            found.append(problem)
            problems.report(*problem)
        if warning:
            warned.append(warning)
            problems.warn(*warning)
    if cache_file is not None:
        data = {"sizes": [list(s) if s else None for s in sizes], "problems": found, "warnings": warned}
        atomic_write_text(cache_file, json.dumps(data))
    return sizes


def usable_pairs(
    records: Sequence[EditRecord], problems: ProblemLog, bucketing: str, resolution: int, ratios="default",
    index_dir: str | os.PathLike | None = None,
) -> tuple[list[EditRecord], list[tuple[int, int]]]:
    """The records whose images pass the header checks (:func:`scan_sizes`, for every bucketing,
    so bad files and size mismatches are reported before training starts) and their buckets."""
    sizes = scan_sizes(records, problems, index_dir)
    keep = [i for i, s in enumerate(sizes) if s is not None]
    return [records[i] for i in keep], [bucket_for(*sizes[i], bucketing, resolution, ratios) for i in keep]


# ------------------------------------------------------------------------------------------
# Region weights (the reference's "log" scheme, without OpenCV)
# ------------------------------------------------------------------------------------------

# cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
_ELLIPSE_5 = torch.tensor(
    [[0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]], dtype=torch.float32
)


def close_holes(mask: torch.Tensor) -> torch.Tensor:
    """Morphological closing of a bool mask [H, W] with the 5x5 ellipse (dilate, then erode;
    the border neither grows nor erodes the mask, as OpenCV's defaults)."""
    k = _ELLIPSE_5[None, None]
    m = mask.float()[None, None]
    dilated = F.conv2d(m, k, padding=2) > 0
    padded = F.pad(dilated.float(), (2, 2, 2, 2), value=1.0)
    eroded = F.conv2d(padded, k) >= k.sum() - 0.5
    return eroded[0, 0]


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected component labels of a bool mask [H, W] (0 = background, else the largest flat
    index + 1 in the component), by label propagation with pointer jumping."""
    h, w = mask.shape
    flat = torch.arange(1, h * w + 1, dtype=torch.float64).reshape(h, w)
    labels = torch.where(mask, flat, torch.zeros((), dtype=torch.float64))
    while True:
        grown = F.max_pool2d(labels[None, None], 3, stride=1, padding=1)[0, 0]
        grown = torch.where(mask, grown, torch.zeros((), dtype=torch.float64))
        # pointer jumping: adopt the label of the pixel your label points at
        idx = (grown.long() - 1).clamp(min=0).flatten()
        jumped = torch.where(mask.flatten(), labels.flatten()[idx].maximum(grown.flatten()), torch.zeros((), dtype=torch.float64))
        jumped = jumped.reshape(h, w)
        if torch.equal(jumped, labels):
            return labels.long()
        labels = jumped


def drop_small_components(mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keep the 8-connected components whose area is at least ``fraction`` of the masked area."""
    total = int(mask.sum())
    if total == 0:
        return mask
    labels = connected_components(mask)
    ids, counts = torch.unique(labels[labels > 0], return_counts=True)
    keep = ids[counts >= fraction * total]
    return torch.isin(labels, keep) & mask


class RegionTooSmall(ValueError):
    """The changed region is too small a part of the image to weight (the reference drops such pairs)."""


def region_weight_map(
    source: Image.Image,
    target: Image.Image,
    scheme: str = "log",
    *,
    threshold: int = 18,
    component_fraction: float = 0.3,
    min_area: float = 0.001,
    factor: int = 8,
) -> torch.Tensor:
    """Loss weights [1, H/8, W/8] that emphasise where ``target`` differs from ``source``.

    As the reference: pixels whose grey difference is >= 18 form the mask; small holes are
    closed; components under 30% of the masked area are dropped; the mask is max-pooled 8x
    (VAE resolution) and closed again. Masked latents weigh ``log2(total/masked) + 1``
    (``exp``: ``2^(sqrt(total/masked) - 1)``), the rest 1. A pair with no change weighs 1
    everywhere; a change below 0.1% of the image raises :class:`RegionTooSmall`.
    """
    diff = np.asarray(ImageChops.difference(source, target).convert("L"))
    mask = torch.from_numpy(diff >= threshold)
    mask = close_holes(mask)
    mask = drop_small_components(mask, component_fraction)
    ratio = float(mask.float().mean())
    if ratio == 0.0:
        mask = torch.ones_like(mask)
    elif ratio < min_area:
        raise RegionTooSmall(f"the changed region is {ratio:.4%} of the image (below {min_area:.1%})")
    small = F.max_pool2d(mask.float()[None, None], factor, stride=factor)[0, 0] > 0
    small = close_holes(small)
    x = small.numel() / max(int(small.sum()), 1)
    if scheme == "log":
        weight = math.log2(x) + 1
    elif scheme == "exp":
        weight = 2 ** (x**0.5 - 1)
    else:
        raise ValueError(f"region weight scheme '{scheme}' is unknown; expected log or exp")
    weight = round(weight, 6)
    return torch.where(small, torch.tensor(weight, dtype=torch.float32), torch.tensor(1.0))[None]


# ------------------------------------------------------------------------------------------
# Dataset
# ------------------------------------------------------------------------------------------


def load_rgb(path: Path, what: str = "training image") -> Image.Image:
    """Open a training image as RGB through :func:`gie_core.imaging.images.load_image` (EXIF orientation,
    16-bit, transparency on white, as every face loads images). Raises :class:`ImageProblem` with
    the problem-log kind for a missing, unreadable, too small or too large file."""
    path = Path(path)
    bad = _check_image(path)  # the kind, from the header (cheap), as the scan reports it
    if bad:
        raise ImageProblem(bad[0], path, bad[1])
    try:
        return load_image(path, what=what)
    except ValueError as exc:  # damaged pixel data behind a readable header
        raise ImageProblem("unreadable image", path, str(exc)) from None


def pil_to_unit_range(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float32 in [-1, 1] (the VAE's input range)."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    return arr.permute(2, 0, 1) * 2.0 - 1.0


class EditDataset(torch.utils.data.Dataset):
    """Pairs at their bucket size; a pair that fails to load is replaced by the next pair of the
    same bucket (so batches stay full and processes stay in step) and reported in the item. When
    no pair of the bucket loads (a bad pair alone in its bucket), the item says so (``unloadable``)
    and :func:`collate` marks its batch ``skipped`` (see :meth:`ProblemLog.skip_batch`)."""

    MAX_REPLACEMENTS = 64

    def __init__(
        self,
        records: Sequence[EditRecord],
        buckets: Sequence[tuple[int, int]],
        *,
        bucketing: str = "ratio",
        weight_scheme: str = "log",
        cache=None,
        qwen_size: int = QWEN_IMAGE_SIZE,
    ):
        if len(records) != len(buckets):
            raise ValueError("records and buckets differ in length")
        self.records, self.buckets = list(records), list(buckets)
        self.bucketing, self.weight_scheme = bucketing, weight_scheme
        self.cache = cache  # a cache.FeatureCache, or None to load images
        self.qwen_size = qwen_size
        self.members: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(self.buckets):
            self.members.setdefault(b, []).append(i)
        self._position = {i: n for b, idx in self.members.items() for n, i in enumerate(idx)}

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> dict:
        """Load one pair (raises on any problem)."""
        rec = self.records[index]
        width, height = self.buckets[index]
        if self.cache is not None:
            return {"index": index, "key": rec.key, "instruction": rec.instruction, "cached": self.cache.read(rec, (width, height))}
        src, tgt = load_rgb(rec.source), load_rgb(rec.target)
        # a source of another size than its target (warned about by scan_sizes) is fitted to the same bucket
        src_fit = fit_to_bucket(src, width, height, self.bucketing)
        tgt_fit = fit_to_bucket(tgt, width, height, self.bucketing)
        weight = region_weight_map(src_fit, tgt_fit, self.weight_scheme) if rec.region_weighting else None
        s = self.qwen_size
        qwen_image = src if src.size == (s, s) else src.resize((s, s), Image.BICUBIC)  # as QwenVLEncoder does
        return {
            "index": index,
            "key": rec.key,
            "instruction": rec.instruction,
            "source": pil_to_unit_range(src_fit),
            "target": pil_to_unit_range(tgt_fit),
            "qwen_image": qwen_image,
            "region_weight": weight,
        }

    def __getitem__(self, index: int) -> dict:
        bad = []
        members = self.members[self.buckets[index]]
        pos = self._position[index]
        for attempt in range(min(len(members), self.MAX_REPLACEMENTS)):
            i = members[(pos + attempt) % len(members)]
            try:
                item = self.load(i)
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError, KeyError) as exc:
                bad.append(_load_problem(exc, self.records[i]))
            else:
                item["bad"] = bad
                return item
        return {"index": index, "unloadable": True, "bucket": self.buckets[index], "bad": bad}


def _load_problem(exc: Exception, rec: EditRecord) -> tuple[str, str, str]:
    """(kind, where, reason) of a pair that failed to load, for the problem log."""
    if isinstance(exc, ImageProblem):
        return exc.kind, str(exc.path), exc.reason
    if isinstance(exc, FileNotFoundError):
        return "missing image", str(getattr(exc, "filename", None) or rec.source), "no such file"
    if isinstance(exc, RegionTooSmall):
        return "region too small", str(rec.target), str(exc)
    if isinstance(exc, KeyError):  # not in the feature cache
        return "not cached", str(rec.target), str(exc)
    where = getattr(exc, "filename", None) or f"{rec.source} / {rec.target}"
    return "unreadable image", str(where), f"{type(exc).__name__}: {exc}"


def collate(items: list[dict]) -> dict:
    """Stack a batch of one bucket; PIL images and strings stay lists. A batch with a pair that
    could not be loaded nor replaced is ``{"skipped": True, "bucket", "bad"}`` (never trained)."""
    bad = [b for it in items for b in it["bad"]]
    unloadable = [it for it in items if it.get("unloadable")]
    if unloadable:
        return {"skipped": True, "bucket": unloadable[0]["bucket"], "bad": bad, "index": [it["index"] for it in items]}
    out: dict = {
        "skipped": False,
        "index": [it["index"] for it in items],
        "key": [it["key"] for it in items],
        "instruction": [it["instruction"] for it in items],
        "bad": bad,
    }
    if "cached" in items[0]:
        out["cached"] = [it["cached"] for it in items]
        return out
    out["source"] = torch.stack([it["source"] for it in items])
    out["target"] = torch.stack([it["target"] for it in items])
    out["qwen_image"] = [it["qwen_image"] for it in items]
    weights = [it["region_weight"] for it in items]
    if any(w is not None for w in weights):
        h, w = out["target"].shape[2] // 8, out["target"].shape[3] // 8
        out["region_weight"] = torch.stack([wt if wt is not None else torch.ones(1, h, w) for wt in weights])
    else:
        out["region_weight"] = None
    return out


@dataclass(frozen=True)
class Shard:
    """This process's part of one global batch."""

    indices: list[int]  # dataset indices this process loads (never empty)
    offset: int  # position of indices[0] in the global batch
    real: int  # how many of them count: 0 for a stand-in when the batch has fewer pairs than processes
    total: int  # pairs in the global batch
    processes: int

    @property
    def loss_scale(self) -> float:
        """Factor on this process's mean loss so that the processes' average gradient is the
        gradient of the global batch's mean loss (1.0 when every process has as many pairs)."""
        return self.real * self.processes / self.total


class BucketBatches:
    """Deterministic global batches of one bucket each, per epoch, split across processes.

    A global batch holds ``batch_size x num_replicas`` pairs (fewer at the end of a bucket). Which
    pairs form it depends only on (seed, epoch, global batch size), never on the number of
    processes: one process with ``data.batch_size 2`` trains on exactly the batches two
    processes with ``data.batch_size 1`` do, so the runs (and a checkpoint resumed on another
    number of processes) agree. Each process takes a contiguous slice of every global batch; a
    short last batch is split as evenly as it goes, and a process it does not reach loads a
    stand-in pair whose loss counts zero (:attr:`Shard.loss_scale`), so every process steps.

    A resumed run replays the order exactly: it skips the batches already done without loading them.
    """

    def __init__(self, buckets: Sequence[tuple[int, int]], batch_size: int, *, seed: int, shuffle: bool = True,
                 num_replicas: int = 1, rank: int = 0):
        self.buckets = list(buckets)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.groups: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(self.buckets):
            self.groups.setdefault(b, []).append(i)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    def global_batches(self, epoch: int) -> list[list[int]]:
        """Every process's batches of ``epoch`` together (the same for any number of processes
        with the same global batch size)."""
        rng = random.Random(f"{self.seed}:{epoch}")
        size = self.global_batch_size
        batches = []
        for bucket in sorted(self.groups):
            idx = list(self.groups[bucket])
            if self.shuffle:
                rng.shuffle(idx)
            batches.extend(idx[i:i + size] for i in range(0, len(idx), size))
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def shard(self, batch: list[int]) -> Shard:
        """This process's part of the global ``batch``."""
        n, r = len(batch), self.num_replicas
        sizes = [n // r + (1 if k < n % r else 0) for k in range(r)]
        offset = sum(sizes[:self.rank])
        mine = batch[offset:offset + sizes[self.rank]]
        if not mine:  # fewer pairs than processes: a stand-in that counts zero
            return Shard([batch[0]], 0, 0, n, r)
        return Shard(mine, offset, len(mine), n, r)

    def shards(self, epoch: int) -> list[Shard]:
        """This process's parts of the global batches of ``epoch``."""
        return [self.shard(b) for b in self.global_batches(epoch)]

    def epoch(self, epoch: int) -> list[list[int]]:
        """This process's batches of ``epoch`` (dataset indices)."""
        return [s.indices for s in self.shards(epoch)]

    def __len__(self) -> int:
        return sum(math.ceil(len(v) / self.global_batch_size) for v in self.groups.values())
