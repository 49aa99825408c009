"""``gie-eval generate``: one edit per benchmark sample, in the layout the benchmark's scorer reads.

- Seeds are deterministic per sample (:func:`gie_core.eval.runs.sample_seed`), so a sample gets
  the same image whichever process makes it and however often the run is resumed.
- Resumable: a sample whose output exists and has an ``ok`` record is skipped; nothing is loaded
  when nothing is left to do.
- Where the benchmark's own scorer reads the source image beside each output (GEdit's
  ``<key>_SRCIMG.png``), that copy is written atomically before the output; a done sample whose
  copy is missing (a run made before copies were written, a deleted file) gets it on resume.
- A sample that fails (unreadable image, a size out of range, an error while sampling) is
  recorded with its reason and skipped; the next run tries it again.
- Sharded: every process takes every N-th sample of the whole set by position (``accelerate
  launch`` gives the rank and count), so the shards never overlap and together cover the set.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from PIL import Image
from tqdm import tqdm

from gie_core.constants import DEFAULT_TARGET_AREA, MAX_IMAGES_PER_TURN, SIZE_MULTIPLE
from gie_core.engine.conversation import Conversation
from gie_core.engine.modes import fusion_mode
from gie_core.checks import check_choice
from gie_core.engine.request import resolve_edit
from gie_core.engine.rewrite import check_rewrite_options, rewrite_instruction
from gie_core.eval.benchmarks import Benchmark, Sample, load_sample_image, multiturn_turn_output
from gie_core.eval.runs import RunFolder, Shard, sample_seed
from gie_core.files import atomic_write
from gie_core.imaging.images import preferred_kontext_size

GEOMETRIES = ("ours", "paper")


def paper_output_size(width: int, height: int, area: int = DEFAULT_TARGET_AREA) -> tuple[int, int]:
    """The output size upstream's evaluation scripts used: the reduced ratio of the preferred Kontext
    resolution nearest in aspect, scaled to ``area`` (1024x1024) and floored to multiples of 16.
    (Ours, ``--geometry ours``, is ~1 MP at the input's own aspect.)"""
    pw, ph = preferred_kontext_size(width, height)
    g = math.gcd(pw, ph)
    base_w, base_h = pw // g * SIZE_MULTIPLE, ph // g * SIZE_MULTIPLE
    scale = math.sqrt(area / (base_w * base_h))
    m = SIZE_MULTIPLE
    return max(m, int(base_w * scale)) // m * m, max(m, int(base_h * scale)) // m * m


@dataclass(frozen=True)
class GenerateSettings:
    """Everything that decides a sample's image (recorded in run.json; a resume must match it)."""

    mode: str
    steps: int
    guidance: float
    seed: int  # the base seed; each sample's seed is sample_seed(seed, key)
    width: int = 0  # 0 x 0 = by the geometry
    height: int = 0
    geometry: str = "ours"
    reference_resize: str = "preferred"
    reference_resample: str = "lanczos"
    rewrite: bool = False
    rewrite_max_tokens: int = 256
    dtype: str = "bf16"
    weights: dict = field(default_factory=dict)  # the model paths, connector, LoRAs (as given)

    def to_dict(self) -> dict:
        return asdict(self)

    def request(self, image: Image.Image, key: str, more_images=()):
        """The resolved edit request of one sample (checked like every edit request);
        ``more_images``: the (width, height) of its Image 2 (an automatic size is then the app's
        rule for several images, :func:`gie_core.imaging.ratio.multi_image_output_size`)."""
        width, height = self.width, self.height
        if self.geometry == "paper" and not (width or height):
            width, height = paper_output_size(image.width, image.height)
        return resolve_edit(
            image_width=image.width, image_height=image.height, more_images=more_images, mode=self.mode, steps=self.steps,
            guidance=self.guidance, seed=sample_seed(self.seed, key), width=width, height=height,
            reference_resize=self.reference_resize, reference_resample=self.reference_resample,
        )

    def check(self) -> None:
        """Check every setting before any weight loads (a 1024x1024 stand-in image for the sizes)."""
        check_choice("geometry", self.geometry, GEOMETRIES)
        self.request(Image.new("RGB", (1024, 1024)), "check")
        if self.rewrite:
            if not fusion_mode(self.mode).needs_qwen or not self.weights.get("model"):
                raise ValueError(
                    "--rewrite needs the Qwen2.5-VL of a GPT-Image-Edit checkpoint: give --model and a mode that uses the VLM (not 't5')"
                )
            check_rewrite_options(self.rewrite_max_tokens, 0.0, 0, 1.0)


@dataclass
class GenerateSummary:
    total: int  # samples in this process's shard
    done_before: int  # already finished by an earlier run
    made: int = 0
    failed: list[dict] = field(default_factory=list)  # this run's failure records


def done_keys(folder: RunFolder, bench: Benchmark, samples: list[Sample]) -> set[str]:
    """Keys finished by any process of any earlier run: an ``ok`` record and the output on disk."""
    by_key = {s.key: s for s in samples}
    ok = {r["key"] for r in folder.read_records("generate") if r.get("status") == "ok"}
    return {k for k in ok if k in by_key and folder.output(bench, by_key[k]).is_file()}


def write_source_copy(sample: Sample, bench: Benchmark, folder: RunFolder) -> None:
    """Write ``sample``'s judge source as a PNG where ``bench``'s own scorer reads it (atomically);
    nothing when the benchmark needs no copy."""
    path = folder.source_copy(bench, sample)
    if path is None:
        return
    source = load_sample_image(sample.judge_source, f"sample '{sample.key}' source image")
    atomic_write(path, lambda tmp: source.save(tmp, format="PNG"))


def _fill_source_copies(samples: list[Sample], bench: Benchmark, folder: RunFolder, done: set[str]) -> None:
    """Done samples whose source copy is missing get it (no model needed); one that cannot be
    written is made again with the samples left to do."""
    for s in samples:
        if s.key in done and (path := folder.source_copy(bench, s)) is not None and not path.is_file():
            try:
                write_source_copy(s, bench, folder)
            except (OSError, ValueError):
                done.discard(s.key)


def make_sample(pipe, sample: Sample, bench: Benchmark, folder: RunFolder, settings: GenerateSettings,
                record: dict) -> None:
    """Edit one sample into ``folder`` (written atomically), adding what happened to its ``record``.

    Raises when the sample cannot be made (the caller records the reason and goes on; a rewrite
    made before the failure stays in the record).
    """
    n_inputs = 1 + len(sample.more_images)
    if n_inputs > MAX_IMAGES_PER_TURN:
        raise ValueError(f"the sample has {n_inputs} input images; an edit takes at most {MAX_IMAGES_PER_TURN} "
                         "(Image 1 and an optional Image 2, as the reference app)")
    image = load_sample_image(sample.image, f"sample '{sample.key}' image")
    if settings.geometry == "paper" and bench.paper_input_size and image.size != bench.paper_input_size:
        image = image.resize(bench.paper_input_size, Image.LANCZOS)  # upstream's Complex-Edit squashed its inputs
    image2 = load_sample_image(sample.more_images[0], f"sample '{sample.key}' image 2") if sample.more_images else None
    request = settings.request(image, sample.key, [image2.size] if image2 is not None else ())
    if "turns" in sample.extra:
        return _make_turns(pipe, sample, bench, folder, settings, record, image, request)
    instruction = sample.instruction
    if settings.rewrite and image2 is not None:
        raise ValueError("instruction rewriting reads one image; this sample has two (run it without --rewrite)")
    if settings.rewrite:
        with pipe.on_device(pipe.qwen.model):
            rw = rewrite_instruction(pipe.qwen, image, instruction, max_new_tokens=settings.rewrite_max_tokens)
        instruction = rw.instruction
        record.update(rewritten=rw.instruction, rewrite_fell_back=rw.fell_back, rewrite_reason=rw.reason)
    out = pipe.edit(image, instruction, image2=image2, request=request).images[0]
    write_source_copy(sample, bench, folder)  # first: a sample is done once its output is on disk
    atomic_write(folder.output(bench, sample), lambda tmp: out.save(tmp, format="PNG"))
    record.update(status="ok", width=request.width, height=request.height)


def _make_turns(pipe, sample: Sample, bench: Benchmark, folder: RunFolder, settings: GenerateSettings,
                record: dict, image: Image.Image, request) -> None:
    """A multi-turn sample: its turns in order as one conversation (each edit conditions the next,
    as in the reference app), every turn's image written atomically, the last one last."""
    if settings.rewrite:
        raise ValueError("instruction rewriting reads one instruction; multi-turn samples run without --rewrite")
    conversation = Conversation()  # the first turn too: the conversation's layout from the start
    for n, text in enumerate(sample.extra["turns"], 1):
        result = pipe.edit(image if n == 1 else None, text, conversation=conversation, request=request)
        conversation, out = result.conversation, result.images[0]
        path = folder.path(multiturn_turn_output(sample, n), f"{bench.name} sample '{sample.key}' turn {n}")
        atomic_write(path, lambda tmp, out=out: out.save(tmp, format="PNG"))
    record.update(status="ok", width=request.width, height=request.height, turns=len(sample.extra["turns"]))


def run_generate(
    samples: list[Sample],
    bench: Benchmark,
    folder: RunFolder,
    settings: GenerateSettings,
    load_pipeline: Callable[[], object],
    *,
    shard: Shard = Shard(),
    progress: bool = True,
) -> GenerateSummary:
    """Edit this process's shard of ``samples`` into ``folder``; see the module docstring.

    ``load_pipeline()`` is called once, and only when there is something left to make. Every output
    path is checked to stay inside the run folder first (``ValueError`` naming the sample).
    """
    folder.check_outputs(bench, samples)
    mine = shard.take(samples)  # split the whole set first: the split never depends on progress
    done = done_keys(folder, bench, mine)
    _fill_source_copies(mine, bench, folder, done)
    todo = [s for s in mine if s.key not in done]
    summary = GenerateSummary(total=len(mine), done_before=len(mine) - len(todo))
    if not todo:
        return summary
    pipe = load_pipeline()
    bar = None
    if progress and shard.is_main:
        desc = f"{bench.name}" + (f" (process 1 of {shard.num_processes})" if shard.num_processes > 1 else "")
        bar = tqdm(total=len(todo), desc=desc, unit="edit", file=sys.stderr)
    try:
        for sample in todo:
            record = {
                "key": sample.key, "index": sample.index, "category": sample.category,
                "output": bench.output_path(sample), "instruction": sample.instruction,
                "seed": sample_seed(settings.seed, sample.key), "rank": shard.process_index,
            }
            started = time.monotonic()
            try:
                make_sample(pipe, sample, bench, folder, settings, record)
                summary.made += 1
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # one bad sample never stops the run: record it and go on
                record.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
                summary.failed.append(record)
            record["seconds"] = round(time.monotonic() - started, 3)
            folder.append_record("generate", shard.process_index, record)
            if bar is not None:
                bar.update(1)
                if summary.failed:
                    bar.set_postfix(failed=len(summary.failed))
    finally:
        if bar is not None:
            bar.close()
    return summary
