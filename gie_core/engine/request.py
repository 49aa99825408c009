"""One edit request, resolved once, at the edge, before any weight is read.

The rules every face shares live here and nowhere else: the output size (auto, one side 0 =
follow the aspect, explicit), the batch rules, the reference resize, the aspect an output
must keep when the input is padded to a ratio; the range checks themselves are
:mod:`gie_core.checks`. ``gie-edit``, :meth:`gie_core.engine.pipeline.EditPipeline.edit` and the
ComfyUI Kontext Sampler node all call :func:`resolve_edit`, and the :class:`EditRequest` it
returns is the run: it travels whole to :func:`gie_core.engine.sampler.sample` and the step loop,
which trust it and check nothing again.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from gie_core.checks import check_choice, check_float, check_int
from gie_core.constants import (
    BATCH_RANGE,
    DEFAULT_GUIDANCE,
    DEFAULT_REFERENCE_METHOD,
    DEFAULT_REFERENCE_RESAMPLE,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    DEFAULT_TARGET_AREA,
    DEFAULT_TRUE_CFG,
    GUIDANCE_RANGE,
    MAX_IMAGE_SIDE,
    MAX_IMAGES_PER_TURN,
    REFERENCE_METHODS,
    REFERENCE_RESAMPLE_MODES,
    REFERENCE_RESIZE_MODES,
    SEED_RANGE,
    SIZE_MULTIPLE,
    STEPS_RANGE,
    TRUE_CFG_RANGE,
)
from gie_core.engine.acceleration import DEFAULT_ATTENTION, Acceleration, resolve_acceleration
from gie_core.engine.modes import DEFAULT_FUSION_MODE, fusion_mode
from gie_core.imaging.images import check_size, reference_size
from gie_core.imaging.ratio import (
    PadRecord,
    aspect_fits,
    multi_image_output_size,
    parse_color,
    parse_ratios,
    plan_padding,
)

__all__ = [
    "EditRequest",
    "auto_output_size",
    "check_output_size",
    "resolve_batch",
    "resolve_device",
    "resolve_edit",
    "resolve_output_size",
]


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------


def check_output_size(width: int, height: int) -> None:
    """Output sides must be positive multiples of 16 (8x VAE, 2x2 packing), at most MAX_IMAGE_SIDE."""
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0 or v % SIZE_MULTIPLE:
            raise ValueError(f"output {name} is {v} but must be a positive multiple of {SIZE_MULTIPLE}")
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ValueError(f"output size {width}x{height} is larger than {MAX_IMAGE_SIDE} px a side")


def auto_output_size(width: int, height: int, area: int = DEFAULT_TARGET_AREA) -> tuple[int, int]:
    """About ``area`` pixels at the aspect of width x height, in multiples of 16.

    The long side is floored to a multiple of 16 (so the area stays at most about ``area``)
    and the short side is its exact-aspect length rounded to the nearest multiple, which
    :func:`gie_core.imaging.ratio.aspect_fits` accepts. The long side is capped at MAX_IMAGE_SIDE.
    """
    m = SIZE_MULTIPLE
    aspect = width / height
    landscape = aspect >= 1
    long_exact = math.sqrt(area * aspect) if landscape else math.sqrt(area / aspect)
    long_side = min(MAX_IMAGE_SIDE, max(m, round(long_exact) // m * m))
    short_exact = long_side / aspect if landscape else long_side * aspect
    short_side = min(MAX_IMAGE_SIDE, max(m, round(short_exact / m) * m))
    return (long_side, short_side) if landscape else (short_side, long_side)


def resolve_output_size(
    width: int | None,
    height: int | None,
    aspect_width: int,
    aspect_height: int,
    area: int = DEFAULT_TARGET_AREA,
) -> tuple[int, int]:
    """The output size. ``None`` or 0 = auto: both -> about ``area`` pixels at the aspect of
    ``aspect_width x aspect_height``; one -> that side follows the aspect (rounded to a multiple of
    16). Explicit sides must be multiples of 16."""
    width, height = width or 0, height or 0
    check_int("output width", width, 0, MAX_IMAGE_SIDE)
    check_int("output height", height, 0, MAX_IMAGE_SIDE)
    m = SIZE_MULTIPLE
    if width == 0 and height == 0:
        return auto_output_size(aspect_width, aspect_height, area)
    if width == 0:
        width = max(m, round(height * aspect_width / aspect_height / m) * m)
    elif height == 0:
        height = max(m, round(width * aspect_height / aspect_width / m) * m)
    check_output_size(int(width), int(height))
    return int(width), int(height)


def resolve_batch(n_images: int, batch_size: int) -> int:
    """How many images one run makes: ``batch_size`` per single image; with a batch of
    ``n_images`` images, one edit each (``batch_size`` must then be 1 or ``n_images``)."""
    batch_size = check_int("batch size", batch_size, *BATCH_RANGE)
    if n_images > 1 and batch_size not in (1, n_images):
        raise ValueError(
            f"the image is a batch of {n_images} but batch size is {batch_size}; with a batch of images use "
            f"batch size 1 (one edit per image) or {n_images}"
        )
    total = n_images if n_images > 1 else batch_size
    if total > BATCH_RANGE[1]:
        raise ValueError(f"{total} images would be made but at most {BATCH_RANGE[1]} are made in one run")
    return total


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A usable torch device: ``None`` = CUDA when present, else MPS, else CPU. A named device
    that this torch build or machine lacks is refused (before anything loads)."""
    if device is None or device == "":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device '{device}' is not a torch device; expected cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device '{device}' was asked for but no CUDA GPU is available "
                f"(torch {torch.__version__}{'' if torch.version.cuda else ', a CPU-only build'}); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device '{device}' does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise ValueError(f"device '{device}' was asked for but MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise ValueError(f"device '{device}' is not supported; expected cpu, cuda, cuda:N or mps")
    return dev


# --------------------------------------------------------------------------------------------
# The whole request
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditRequest:
    """Every value of one edit run, checked: what :func:`resolve_edit` returns and what
    :func:`gie_core.engine.sampler.sample` and its step loop read (whole, never re-spelled).
    Sizes are in pixels. Tensors (conditioning, reference latents), the instruction and the
    callbacks (progress, interrupt, previews) are not values of a run and travel beside it."""

    mode: str  # fusion mode (see gie_core.engine.modes)
    width: int  # output size
    height: int
    steps: int
    guidance: float
    seed: int
    batch_size: int  # images made in one run (already combined with the image batch)
    n_images: int  # images in the input batch
    true_cfg: float
    reference_resize: str | tuple[int, int]
    reference_resample: str
    reference_width: int  # the size the reference is VAE-encoded at
    reference_height: int
    input_width: int  # the input as given
    input_height: int
    pad: PadRecord | None = None  # set when snapping: the input is padded to this record first
    pad_color: str | tuple = "white"
    reference_method: str = DEFAULT_REFERENCE_METHOD  # how several references are placed
    cfg_batch: bool = True  # true CFG: positive and negative in one batch when their lengths match
    acceleration: Acceleration = Acceleration()  # step cache, attention backend, compiled blocks
    more_images: tuple[tuple[int, int], ...] = ()  # (width, height) of the turn's other input images (Image 2)

    @property
    def do_true_cfg(self) -> bool:
        return self.true_cfg > 1.0

    @property
    def edited_width(self) -> int:
        """Width of the image the model edits (the padded one when snapping)."""
        return self.pad.padded_width if self.pad else self.input_width

    @property
    def edited_height(self) -> int:
        return self.pad.padded_height if self.pad else self.input_height


def resolve_edit(
    *,
    image_width: int,
    image_height: int,
    n_images: int = 1,
    mode: str = DEFAULT_FUSION_MODE,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    seed: int = DEFAULT_SEED,
    width: int | None = None,
    height: int | None = None,
    area: int = DEFAULT_TARGET_AREA,
    batch_size: int = 1,
    true_cfg: float = DEFAULT_TRUE_CFG,
    has_negative: bool = True,
    snap=None,
    pad_color="white",
    placement: str = "center",
    reference_resize: str | tuple[int, int] = "preferred",
    reference_resample: str = DEFAULT_REFERENCE_RESAMPLE,
    reference_method: str = DEFAULT_REFERENCE_METHOD,
    cfg_batch: bool = True,
    cache=None,
    attention: str = DEFAULT_ATTENTION,
    compile: bool = False,
    more_images=(),
) -> EditRequest:
    """Check every input and work out the run, with no model and no pixels needed.

    These keywords are the one list of a run's options and their defaults: every face (and
    :meth:`gie_core.engine.pipeline.EditPipeline.edit`'s ``**options``) passes its values here.

    ``image_width``/``image_height``/``n_images``: the input image (batch) as given.
    ``width``/``height``: None or 0 = auto (see :func:`resolve_output_size`); the aspect is the
    input's, or the padded image's when ``snap`` (a ratio set) is given. ``has_negative``:
    whether a negative conditioning exists (the CLI always makes one: " " by default).
    ``reference_method``: how several references are placed ("index" or "offset", see
    :func:`gie_core.engine.sampler.reference_tokens`). ``cfg_batch``: with true CFG, run the
    positive and negative predictions as one batch when their token counts match (off halves
    activation memory on small cards). ``cache`` ("NAME[:VALUE]", a
    :class:`gie_core.engine.acceleration.StepCache` or None), ``attention`` and ``compile``: the
    speed choices of :mod:`gie_core.engine.acceleration` (names and values checked here; what this
    machine cannot run falls back to the default when sampling, with a note).
    ``more_images``: the (width, height) of the other input images of the turn (the app's Image
    2): with them an automatic output size is the app's rule for several images
    (:func:`gie_core.imaging.ratio.multi_image_output_size`); each image is a reference at its own
    size, so snapping (which pads one image) and a batch of input images are refused.
    """
    acceleration = resolve_acceleration(cache, attention, compile)
    mode = fusion_mode(mode).name
    steps = check_int("steps", steps, *STEPS_RANGE)
    guidance = check_float("guidance", guidance, *GUIDANCE_RANGE)
    seed = check_int("seed", seed, *SEED_RANGE)
    true_cfg = check_float("true CFG scale", true_cfg, *TRUE_CFG_RANGE)
    if true_cfg > 1.0 and not has_negative:
        raise ValueError(f"true CFG scale is {true_cfg:g} but no negative conditioning is given (1 turns true CFG off)")
    n_images = check_int("image batch", n_images, 1, None)
    check_size(image_width, image_height, "input image")
    total = resolve_batch(n_images, batch_size)
    if isinstance(reference_resize, str):
        check_choice("reference resize", reference_resize, REFERENCE_RESIZE_MODES)
    check_choice("reference resample", reference_resample, REFERENCE_RESAMPLE_MODES)
    check_choice("reference method", reference_method, REFERENCE_METHODS)
    if not isinstance(cfg_batch, bool):
        raise ValueError(f"cfg batch is {cfg_batch!r} but must be true or false")
    more_images = _check_more_images(more_images, n_images, snap)
    sizes = _resolve_sizes(image_width, image_height, width, height, area, snap, pad_color, placement, reference_resize,
                           more_images)
    return EditRequest(
        mode=mode, steps=steps, guidance=guidance, seed=seed, batch_size=total,
        n_images=n_images, true_cfg=true_cfg, reference_resize=reference_resize,
        reference_resample=reference_resample, input_width=image_width, input_height=image_height,
        pad_color=pad_color, reference_method=reference_method, cfg_batch=cfg_batch, acceleration=acceleration,
        more_images=more_images, **sizes,
    )


def _check_more_images(more_images, n_images: int, snap) -> tuple[tuple[int, int], ...]:
    """The other input images' sizes, checked: at most MAX_IMAGES_PER_TURN images in all, each a
    usable size; no snapping and no image batch beside them."""
    sizes = tuple(tuple(s) for s in more_images or ())
    if not sizes:
        return ()
    if len(sizes) + 1 > MAX_IMAGES_PER_TURN:
        raise ValueError(f"an edit takes at most {MAX_IMAGES_PER_TURN} input images (Image 1 and an optional Image 2), "
                         f"got {len(sizes) + 1}")
    for i, size in enumerate(sizes, start=2):
        if len(size) != 2:
            raise ValueError(f"image {i} size must be (width, height), not {size!r}")
        check_size(*size, f"input image {i}")
    if n_images > 1:
        raise ValueError(f"image 1 is a batch of {n_images} images; with a second image, edit one image at a time")
    if snap:
        raise ValueError("snap pads one input image to a ratio; it cannot be used with a second image (each "
                         "image is placed at its own size)")
    return sizes


def _resolve_sizes(image_width, image_height, width, height, area, snap, pad_color, placement, reference_resize,
                   more_images=()) -> dict:
    """The run's geometry: the pad record when snapping, the output size and the reference size
    (the ``EditRequest`` fields ``pad``, ``width``, ``height``, ``reference_width``/``_height``).
    With ``more_images`` an automatic size is the reference app's rule for several images, anchored
    at ``area`` (the app's 1024*1024 by default)."""
    area = check_int("target area", area, SIZE_MULTIPLE * SIZE_MULTIPLE, MAX_IMAGE_SIDE * MAX_IMAGE_SIDE)
    record = None
    if snap:
        parse_ratios(snap)  # a bad list fails here, naming the bad entry
        parse_color(pad_color)
        record = plan_padding(image_width, image_height, snap, placement)
    edited_w, edited_h = (record.padded_width, record.padded_height) if record else (image_width, image_height)
    if record is not None:
        check_size(edited_w, edited_h, "padded input image")
    out_w, out_h = resolve_output_size(width, height, edited_w, edited_h, area)
    if more_images and not (width or height):
        out_w, out_h = multi_image_output_size([(image_width, image_height), *more_images], anchor_pixels=area)
    if record is not None and not aspect_fits(out_w, out_h, edited_w, edited_h):
        rw, rh = record.ratio
        raise ValueError(
            f"output size {out_w}x{out_h} does not have the {rw}:{rh} aspect the image is padded to; "
            f"use an automatic size, one side 0, or a {rw}:{rh} size (e.g. {rw * 16 * 4}x{rh * 16 * 4})"
        )
    ref_w, ref_h = reference_size(edited_w, edited_h, reference_resize)
    return dict(pad=record, width=out_w, height=out_h, reference_width=ref_w, reference_height=ref_h)
