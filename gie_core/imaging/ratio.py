"""Pad-and-crop around an aspect-ratio bucket, as in the GPT-Image-Edit data curation.

The source image is snapped to the nearest ratio bucket (1:1, 3:2, 2:3 by default) and padded
minimally, never resized, so the padded size has *exactly* that ratio. The edit runs on the
padded image; afterwards the padding is cropped away using the :class:`PadRecord` and the
result is resized back to the original size. Edits whose border still looks padded are
flagged by :func:`has_residual_padding` (the paper's 0.5% filter).

Images may be a ``PIL.Image`` (mode RGB), a numpy ``uint8`` array ``[H, W, 3]``, or a float
torch tensor in 0..1, either ``[H, W, 3]`` or a ComfyUI batch ``[B, H, W, 3]`` (all images of a
batch share one size, hence one record). Every function returns the type it was given.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from fractions import Fraction
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from gie_core.constants import (
    ASPECT_TOLERANCE,
    DEFAULT_RATIOS,
    MULTI_IMAGE_ANCHOR_PIXELS,
    MULTI_IMAGE_RATIOS,
    MULTI_IMAGE_STRIDE,
    PREFERRED_KONTEXT_RESOLUTIONS,
    RESIDUAL_PADDING_THRESHOLD,
    SIZE_MULTIPLE,
)

__all__ = [
    "RATIO_SETS",
    "PAD_COLORS",
    "PLACEMENTS",
    "RESAMPLE_MODES",
    "ASPECT_TOLERANCE",
    "aspect_fits",
    "parse_color",
    "PadRecord",
    "parse_ratios",
    "nearest_ratio",
    "pad_to_ratio",
    "plan_padding",
    "apply_padding",
    "crop_padding",
    "padding_mask",
    "residual_padding_fraction",
    "has_residual_padding",
    "multi_image_output_size",
]

Ratio = tuple[int, int]
ImageLike = Union[Image.Image, torch.Tensor, np.ndarray]


def _reduce(w: int, h: int) -> Ratio:
    g = math.gcd(w, h)
    return (w // g, h // g)


def _dedupe(pairs: Iterable[Ratio]) -> tuple[Ratio, ...]:
    seen: dict[Ratio, None] = {}
    for p in pairs:
        seen.setdefault(p, None)
    return tuple(seen)


# Named ratio sets, for dropdowns. "kontext" is the 17 Kontext training resolutions as reduced
# ratios (1184x880 -> 74:55).
RATIO_SETS: dict[str, tuple[Ratio, ...]] = {
    "default": _dedupe(_reduce(w, h) for w, h in DEFAULT_RATIOS),
    "kontext": _dedupe(_reduce(w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS),
}

PAD_COLORS: tuple[str, ...] = ("white", "black", "edge")
PLACEMENTS: tuple[str, ...] = ("center", "top", "bottom", "left", "right")
RESAMPLE_MODES: tuple[str, ...] = ("lanczos", "bicubic", "bilinear", "nearest")

_NAMED_COLORS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0)}
_PIL_RESAMPLE = {
    "lanczos": Image.Resampling.LANCZOS,
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}
_RATIO_TOKEN = re.compile(r"^\s*(\d+)\s*[:xX]\s*(\d+)\s*$")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------
# Ratios
# ---------------------------------------------------------------------------------------------


def _ratio_from_pair(pair: Any) -> Ratio:
    try:
        items = tuple(pair)
    except TypeError:
        raise TypeError(f"ratio {pair!r} must be a (width, height) pair of positive integers") from None
    if len(items) != 2 or not all(_is_int(v) for v in items):
        raise ValueError(f"ratio {pair!r} must be a (width, height) pair of positive integers")
    w, h = int(items[0]), int(items[1])
    if w <= 0 or h <= 0:
        raise ValueError(f"ratio {pair!r} must be a (width, height) pair of positive integers")
    return _reduce(w, h)


def parse_ratios(spec: Any) -> tuple[Ratio, ...]:
    """Parse a ratio-set spec into reduced ``(w, h)`` ratios, deduplicated, order kept.

    ``spec`` is ``"default"`` (1:1, 3:2, 2:3), ``"kontext"`` (the 17 Kontext resolutions as
    reduced ratios), a comma-separated string such as ``"1:1, 16:9,9:16"`` or ``"1024x768"``,
    or an iterable of ``(w, h)`` integer pairs.
    """
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key in RATIO_SETS:
            return RATIO_SETS[key]
        tokens = [t for t in re.split(r"[,;]", spec) if t.strip()]
        if not tokens:
            raise ValueError(
                f"ratios {spec!r} is empty; expected 'default', 'kontext' or a list like '1:1, 3:2'"
            )
        out = []
        for tok in tokens:
            m = _RATIO_TOKEN.match(tok)
            if m is None or int(m.group(1)) <= 0 or int(m.group(2)) <= 0:
                raise ValueError(f"ratio {tok.strip()!r} must be two positive integers like '3:2'")
            out.append(_reduce(int(m.group(1)), int(m.group(2))))
        return _dedupe(out)
    if isinstance(spec, Iterable) and not isinstance(spec, (bytes, Mapping)):
        items = list(spec)
        if not items:
            raise ValueError("ratios [] is empty; expected at least one (width, height) pair")
        return _dedupe(_ratio_from_pair(p) for p in items)
    raise TypeError(
        f"ratios {spec!r} (a {type(spec).__name__}) must be 'default', 'kontext', a string like "
        "'1:1, 3:2' or a list of (width, height) pairs"
    )


def _check_size(width: Any, height: Any) -> None:
    if not (_is_int(width) and _is_int(height)) or width <= 0 or height <= 0:
        raise ValueError(f"size {width!r}x{height!r} must be two positive integers")


def nearest_ratio(width: int, height: int, ratios: Any = "default") -> Ratio:
    """Return the reduced ratio of ``ratios`` closest to ``width:height`` in log-aspect distance.

    Distance is ``|log(width/height) - log(rw/rh)|``, compared exactly (rationally), so ties
    such as a square between 3:2 and 2:3 go to the earlier entry.
    """
    _check_size(width, height)
    best: Ratio | None = None
    best_d: Fraction | None = None
    for rw, rh in parse_ratios(ratios):
        # |log x| is monotone in max(x, 1/x); x = (W * rh) / (H * rw)
        a, b = width * rh, height * rw
        d = Fraction(max(a, b), min(a, b))
        if best_d is None or d < best_d:
            best, best_d = (rw, rh), d
    assert best is not None
    return best


# ---------------------------------------------------------------------------------------------
# Pad record
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PadRecord:
    """Exact pad parameters of one :func:`pad_to_ratio` call (pixels of padding per side).

    ``original_*`` is the input size, ``padded_*`` the output size, whose aspect is exactly
    ``ratio`` (reduced ``(w, h)``); ``left + original_width + right == padded_width`` and the
    same vertically. Serialises losslessly with :meth:`to_dict` / :meth:`to_json`.
    """

    original_width: int
    original_height: int
    padded_width: int
    padded_height: int
    left: int
    top: int
    right: int
    bottom: int
    ratio: Ratio

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name == "ratio":
                continue
            v = getattr(self, f.name)
            if not _is_int(v):
                raise TypeError(f"pad record field {f.name!r} is {v!r} but must be an integer")
            object.__setattr__(self, f.name, int(v))
            if v < 0 or (f.name.startswith(("original_", "padded_")) and v == 0):
                kind = "positive" if f.name.startswith(("original_", "padded_")) else "non-negative"
                raise ValueError(f"pad record field {f.name!r} is {v!r} but must be {kind}")
        r = self.ratio
        if isinstance(r, (str, bytes)) or not isinstance(r, Iterable):
            raise TypeError(f"pad record field 'ratio' is {r!r} but must be a (width, height) pair")
        r = tuple(r)
        if len(r) != 2 or not all(_is_int(v) and v > 0 for v in r):
            raise ValueError(
                f"pad record field 'ratio' is {self.ratio!r} but must be two positive integers"
            )
        object.__setattr__(self, "ratio", (int(r[0]), int(r[1])))
        if self.left + self.original_width + self.right != self.padded_width:
            raise ValueError(
                f"pad record has left {self.left} + original_width {self.original_width} + right "
                f"{self.right} != padded_width {self.padded_width}"
            )
        if self.top + self.original_height + self.bottom != self.padded_height:
            raise ValueError(
                f"pad record has top {self.top} + original_height {self.original_height} + bottom "
                f"{self.bottom} != padded_height {self.padded_height}"
            )
        rw, rh = self.ratio
        if self.padded_width * rh != self.padded_height * rw:
            raise ValueError(
                f"pad record padded size {self.padded_width}x{self.padded_height} does not have "
                f"its ratio {rw}:{rh}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (``ratio`` as a two-element list)."""
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        d["ratio"] = list(self.ratio)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "PadRecord":
        """Build a record from :meth:`to_dict` output; missing, unknown or bad fields raise."""
        if not isinstance(d, Mapping):
            raise TypeError(f"pad record {d!r} (a {type(d).__name__}) must be a dict")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d]
        unknown = sorted(str(k) for k in d if k not in names)
        if missing:
            raise ValueError(f"pad record {dict(d)!r} is missing fields {missing}")
        if unknown:
            raise ValueError(f"pad record {dict(d)!r} has unknown fields {unknown}; expected {names}")
        return cls(**{n: d[n] for n in names})

    def to_json(self) -> str:
        """Serialise to a JSON string (see :meth:`from_json`)."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> "PadRecord":
        """Parse a record from :meth:`to_json` output."""
        if not isinstance(s, (str, bytes, bytearray)):
            raise TypeError(f"pad record JSON {s!r} (a {type(s).__name__}) must be a string")
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"pad record JSON {s!r} is not valid JSON: {e}") from None
        return cls.from_dict(d)


# ---------------------------------------------------------------------------------------------
# Image plumbing: every image becomes a 4-D array [B, H, W, 3] (numpy uint8 or float tensor)
# ---------------------------------------------------------------------------------------------


def _to_batch(image: Any) -> tuple[str, Any]:
    """Return (kind, array [B, H, W, 3]); kind is 'pil', 'numpy', 'tensor3' or 'tensor4'."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(
                f"image mode is {image.mode!r} but must be 'RGB' (convert it with image.convert('RGB'))"
            )
        return "pil", np.array(image, dtype=np.uint8)[None]
    if isinstance(image, torch.Tensor):
        shape = tuple(image.shape)
        if image.ndim not in (3, 4) or shape[-1] != 3 or 0 in shape:
            raise ValueError(f"image tensor has shape {list(shape)} but must be [H, W, 3] or [B, H, W, 3]")
        if not image.is_floating_point():
            raise TypeError(f"image tensor has dtype {image.dtype} but must be floating point in 0..1")
        return ("tensor3", image[None]) if image.ndim == 3 else ("tensor4", image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image array has dtype {image.dtype} but must be uint8 [H, W, 3]")
        if image.ndim != 3 or image.shape[-1] != 3 or 0 in image.shape:
            raise ValueError(f"image array has shape {list(image.shape)} but must be [H, W, 3]")
        return "numpy", image[None]
    raise TypeError(
        f"image is a {type(image).__name__} but must be a PIL.Image (RGB), a float torch tensor "
        "[H, W, 3] / [B, H, W, 3] or a numpy uint8 array [H, W, 3]"
    )


def _from_batch(kind: str, arr: Any) -> ImageLike:
    if kind == "pil":
        return Image.fromarray(np.ascontiguousarray(arr[0]))
    if kind in ("numpy", "tensor3"):
        return arr[0]
    return arr


def parse_color(color: Any, allow_edge: bool = True) -> Union[str, tuple[int, int, int]]:
    expected = (
        "'white', 'black', " + ("'edge', " if allow_edge else "")
        + "'#rrggbb', 'r,g,b' or an (r, g, b) tuple of 0-255 integers"
    )
    if isinstance(color, str):
        key = color.strip().lower()
        if key == "edge":
            if not allow_edge:
                raise ValueError(f"color 'edge' is not a fixed colour here; expected {expected}")
            return "edge"
        if key in _NAMED_COLORS:
            return _NAMED_COLORS[key]
        if re.fullmatch(r"#[0-9a-f]{6}", key):
            return (int(key[1:3], 16), int(key[3:5], 16), int(key[5:7], 16))
        parts = key.split(",")
        if len(parts) == 3 and all(re.fullmatch(r"\s*\d+\s*", p) for p in parts):
            rgb = tuple(int(p) for p in parts)
            if all(0 <= v <= 255 for v in rgb):
                return rgb  # type: ignore[return-value]
        raise ValueError(f"color {color!r} is unknown; expected {expected}")
    if isinstance(color, (tuple, list)):
        if len(color) == 3 and all(_is_int(v) and 0 <= v <= 255 for v in color):
            return (int(color[0]), int(color[1]), int(color[2]))
        raise ValueError(f"color {color!r} is not a valid colour; expected {expected}")
    raise TypeError(f"color {color!r} (a {type(color).__name__}) must be {expected}")


def _offsets(placement: Any, dx: int, dy: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) for dx extra columns and dy extra rows."""
    key = placement.strip().lower() if isinstance(placement, str) else placement
    if key not in PLACEMENTS:
        raise ValueError(f"placement {placement!r} is unknown; expected one of {list(PLACEMENTS)}")
    # centred axes put the odd leftover pixel right/bottom
    left, top = dx // 2, dy // 2
    if key == "top":
        top = 0
    elif key == "bottom":
        top = dy
    elif key == "left":
        left = 0
    elif key == "right":
        left = dx
    return left, top, dx - left, dy - top


# ---------------------------------------------------------------------------------------------
# Pad and crop
# ---------------------------------------------------------------------------------------------


def plan_padding(width: int, height: int, ratios: Any = "default", placement: str = "center") -> PadRecord:
    """The :class:`PadRecord` :func:`pad_to_ratio` makes for a ``width x height`` image, without
    touching pixels (the request resolver sizes the output from it before anything loads)."""
    _check_size(width, height)
    rw, rh = nearest_ratio(width, height, ratios)
    k = max(-(-width // rw), -(-height // rh))
    PW, PH = rw * k, rh * k
    left, top, right, bottom = _offsets(placement, PW - width, PH - height)
    return PadRecord(width, height, PW, PH, left, top, right, bottom, (rw, rh))


def pad_to_ratio(
    image: ImageLike, ratios: Any = "default", color: Any = "white", placement: str = "center"
) -> tuple[ImageLike, PadRecord]:
    """Pad ``image`` minimally (no resizing) to the nearest ratio of ``ratios``.

    The padded size is the smallest ``(rw*k, rh*k)`` covering the image, with ``(rw, rh)`` the
    reduced :func:`nearest_ratio`; an image already at the ratio is returned unpadded (a copy).
    ``color`` is ``'white'``, ``'black'``, ``'edge'`` (replicate border pixels), ``'#rrggbb'``,
    ``'r,g,b'`` or an ``(r, g, b)`` tuple of 0-255 integers. ``placement`` is where the image
    sits: ``'center'`` (odd leftover pixel goes right/bottom), ``'top'``/``'bottom'``
    (horizontally centred) or ``'left'``/``'right'`` (vertically centred). Returns the padded
    image, of the input's type, and the :class:`PadRecord` (one per batch).
    """
    kind, arr = _to_batch(image)
    record = plan_padding(arr.shape[2], arr.shape[1], ratios, placement)
    return _from_batch(kind, _pad(arr, record, parse_color(color))), record


def apply_padding(image: ImageLike, record: PadRecord, color: Any = "white") -> ImageLike:
    """Pad ``image`` as ``record`` says (a record from :func:`plan_padding`, e.g. one a request was
    resolved with); the image must have the record's original size. Returns the input's type."""
    if not isinstance(record, PadRecord):
        raise TypeError(f"record is a {type(record).__name__} but must be a PadRecord")
    kind, arr = _to_batch(image)
    if (arr.shape[2], arr.shape[1]) != (record.original_width, record.original_height):
        raise ValueError(
            f"image is {arr.shape[2]}x{arr.shape[1]} but the pad record is for a "
            f"{record.original_width}x{record.original_height} image"
        )
    return _from_batch(kind, _pad(arr, record, parse_color(color)))


def _pad(arr, record: PadRecord, fill) -> Any:
    """The batch ``arr`` [B, H, W, 3] padded to the record's size with ``fill`` (an RGB tuple or 'edge')."""
    B, H, W, _ = arr.shape
    PW, PH, left, top = record.padded_width, record.padded_height, record.left, record.top
    is_tensor = isinstance(arr, torch.Tensor)
    if fill == "edge":
        # index map clamps each padded coordinate to the nearest source row/column
        if is_tensor:
            rows = (torch.arange(PH, device=arr.device) - top).clamp(0, H - 1)
            cols = (torch.arange(PW, device=arr.device) - left).clamp(0, W - 1)
        else:
            rows = np.clip(np.arange(PH) - top, 0, H - 1)
            cols = np.clip(np.arange(PW) - left, 0, W - 1)
        return arr[:, rows][:, :, cols]
    if is_tensor:
        out = torch.empty((B, PH, PW, 3), dtype=arr.dtype, device=arr.device)
        out[...] = torch.tensor([c / 255.0 for c in fill], dtype=arr.dtype, device=arr.device)
    else:
        out = np.empty((B, PH, PW, 3), dtype=np.uint8)
        out[...] = np.asarray(fill, dtype=np.uint8)
    out[:, top : top + H, left : left + W] = arr
    return out


def _round_div(num: int, den: int) -> int:
    """round(num / den) with halves up, in exact integer arithmetic."""
    return (2 * num + den) // (2 * den)


def _scaled_box(record: PadRecord, width: int, height: int) -> tuple[int, int, int, int]:
    """The original image's box (x0, y0, x1, y1) at ``width x height``, at least 1 px a side."""
    PW, PH = record.padded_width, record.padded_height
    x0 = _round_div(record.left * width, PW)
    y0 = _round_div(record.top * height, PH)
    x1 = _round_div((record.left + record.original_width) * width, PW)
    y1 = _round_div((record.top + record.original_height) * height, PH)
    x0, y0 = min(x0, width - 1), min(y0, height - 1)
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def aspect_fits(width: int, height: int, target_width: int, target_height: int) -> bool:
    """Whether ``width x height`` has the aspect of ``target_width x target_height``.

    The one aspect rule of the project (output sizes with ``--snap``, Crop Padding): within
    :data:`ASPECT_TOLERANCE`, or, for sizes in multiples of ``SIZE_MULTIPLE`` (every size the
    model makes), one side is the other's exact-aspect length rounded to the nearest multiple
    (off by at most half a multiple). That is what the size rules produce
    (:func:`gie_core.engine.request.resolve_output_size`) when the exact aspect has no size in
    multiples of 16, e.g. a 512-wide 3:2 output is 512x336.
    """
    tw, th = int(target_width), int(target_height)
    if abs((width * th) / (height * tw) - 1.0) <= ASPECT_TOLERANCE:
        return True
    if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        return False
    # |width - height*tw/th| <= m/2  or  |height - width*th/tw| <= m/2, in exact integers
    off2 = 2 * abs(width * th - height * tw)
    return off2 <= SIZE_MULTIPLE * th or off2 <= SIZE_MULTIPLE * tw


def _check_aspect(record: PadRecord, width: int, height: int) -> None:
    PW, PH = record.padded_width, record.padded_height
    if not aspect_fits(width, height, PW, PH):
        rw, rh = record.ratio
        raise ValueError(
            f"image is {width}x{height} but the pad record is for a {rw}:{rh} padded image "
            f"({PW}x{PH}); expected that aspect within {ASPECT_TOLERANCE:.0%} (or the nearest sizes in "
            f"multiples of {SIZE_MULTIPLE})"
        )


def crop_padding(image: ImageLike, record: PadRecord, resample: str = "lanczos") -> ImageLike:
    """Remove the padding described by ``record`` and return the image at its original size.

    ``image`` may have any resolution whose aspect is within 1% of the padded aspect; the
    record's offsets are scaled to it, the box rounded to the nearest pixel, cropped and resized
    to ``(original_width, original_height)``. At exactly the padded size the crop is exact and
    nothing is resized, so pad -> crop of an unedited image is bit-exact. PIL images and uint8
    arrays resize with PIL (``resample`` = lanczos/bicubic/bilinear/nearest); float tensors stay
    on their device and resize with ``F.interpolate`` (lanczos and bicubic both mean antialiased
    bicubic, bilinear is antialiased, nearest is nearest-exact), clamped to 0..1.
    """
    if not isinstance(record, PadRecord):
        raise TypeError(f"record is a {type(record).__name__} but must be a PadRecord")
    mode = resample.strip().lower() if isinstance(resample, str) else resample
    if mode not in RESAMPLE_MODES:
        raise ValueError(f"resample {resample!r} is unknown; expected one of {list(RESAMPLE_MODES)}")
    kind, arr = _to_batch(image)
    _, H, W, _ = arr.shape
    _check_aspect(record, W, H)
    ow, oh = record.original_width, record.original_height
    x0, y0, x1, y1 = _scaled_box(record, W, H)
    crop = arr[:, y0:y1, x0:x1]
    if (x1 - x0, y1 - y0) == (ow, oh):
        if kind == "pil":
            return _from_batch(kind, crop)
        # a copy, so the result never aliases the edited image
        return _from_batch(kind, crop.clone() if isinstance(crop, torch.Tensor) else crop.copy())
    if isinstance(crop, torch.Tensor):
        x = crop.permute(0, 3, 1, 2).to(torch.float32)  # [B, 3, h, w]
        if mode == "nearest":
            x = F.interpolate(x, size=(oh, ow), mode="nearest-exact")
        else:
            tmode = "bilinear" if mode == "bilinear" else "bicubic"
            x = F.interpolate(x, size=(oh, ow), mode=tmode, align_corners=False, antialias=True)
        out = x.clamp_(0.0, 1.0).permute(0, 2, 3, 1).to(crop.dtype).contiguous()  # [B, oh, ow, 3]
        return _from_batch(kind, out)
    pil = Image.fromarray(np.ascontiguousarray(crop[0]))
    resized = np.array(pil.resize((ow, oh), _PIL_RESAMPLE[mode]), dtype=np.uint8)[None]
    return _from_batch(kind, resized)


def padding_mask(record: PadRecord, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """Float mask ``[H, W]``: 1.0 on padding, 0.0 on the original image.

    At the padded size by default; with ``height`` and ``width`` the box is scaled
    proportionally and rounded as in :func:`crop_padding` (a size of another aspect stretches
    the mask; no aspect check is made, so latent-grid sizes work).
    """
    if not isinstance(record, PadRecord):
        raise TypeError(f"record is a {type(record).__name__} but must be a PadRecord")
    if (height is None) != (width is None):
        raise ValueError(f"mask size height={height!r}, width={width!r}: give both or neither")
    if height is None:
        height, width = record.padded_height, record.padded_width
    _check_size(width, height)
    x0, y0, x1, y1 = _scaled_box(record, width, height)
    mask = torch.ones((height, width), dtype=torch.float32)
    mask[y0:y1, x0:x1] = 0.0
    return mask


# ---------------------------------------------------------------------------------------------
# Residual padding (the paper's curation filter)
# ---------------------------------------------------------------------------------------------


def residual_padding_fraction(image: ImageLike, color: Any = "white", tolerance: float = 8) -> float:
    """Fraction of the image covered by border strips that still look like padding.

    From each edge, counts the consecutive full rows/columns in which at least 99% of pixels
    are within ``tolerance`` (0-255 scale, max over channels) of ``color`` ('edge' is rejected:
    it is no fixed colour). Returns the union area of the four strips over the image area.
    For a batch tensor, returns the maximum over the batch.
    """
    fill = parse_color(color, allow_edge=False)
    if not isinstance(tolerance, numbers.Real) or isinstance(tolerance, bool) or not 0 <= tolerance <= 255:
        raise ValueError(f"tolerance {tolerance!r} must be a number in 0..255")
    kind, arr = _to_batch(image)
    if isinstance(arr, torch.Tensor):
        px = arr.to(torch.float32) * 255.0
    else:
        px = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32)
    B, H, W, _ = px.shape
    c = torch.tensor(fill, dtype=torch.float32, device=px.device)
    close = (px - c).abs().amax(dim=-1) <= float(tolerance)  # [B, H, W]
    row_pad = close.sum(dim=2) * 100 >= 99 * W  # [B, H]
    col_pad = close.sum(dim=1) * 100 >= 99 * H  # [B, W]

    def run(flags: torch.Tensor) -> torch.Tensor:  # consecutive True from index 0, [B]
        return torch.cumprod(flags.to(torch.int64), dim=1).sum(dim=1)

    top, bottom = run(row_pad), run(row_pad.flip(1))
    left, right = run(col_pad), run(col_pad.flip(1))
    inner = (H - top - bottom).clamp(min=0) * (W - left - right).clamp(min=0)
    return float((1.0 - inner.to(torch.float64) / (H * W)).max())


def has_residual_padding(
    image: ImageLike,
    color: Any = "white",
    threshold: float = RESIDUAL_PADDING_THRESHOLD,
    tolerance: float = 8,
) -> tuple[bool, float]:
    """``(flagged, fraction)``: flagged when :func:`residual_padding_fraction` exceeds ``threshold``.

    The default threshold is the paper's 0.5%. For a batch tensor the fraction is the batch max.
    """
    if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool) or not 0 <= threshold <= 1:
        raise ValueError(f"threshold {threshold!r} must be a fraction in 0..1")
    frac = residual_padding_fraction(image, color=color, tolerance=tolerance)
    return frac > threshold, frac


# --------------------------------------------------------------------------------------------
# Output size of an edit with several input images
# --------------------------------------------------------------------------------------------


def multi_image_output_size(
    sizes: Iterable[tuple[int, int]],
    anchor_pixels: int = MULTI_IMAGE_ANCHOR_PIXELS,
    ratios: tuple[Ratio, ...] = MULTI_IMAGE_RATIOS,
    stride: int = MULTI_IMAGE_STRIDE,
) -> tuple[int, int]:
    """(width, height) of an edit of several images, as the reference app sizes it: the mean of
    the (width, height) ``sizes`` (truncated to integers), its nearest ratio of ``ratios``, and that
    ratio scaled by a whole factor to about ``anchor_pixels`` in multiples of ``stride``
    (``dynamic_resize(h, w, 'any_11ratio', anchor_pixels=1024*1024)`` of univa/utils/anyres_util.py).
    E.g. 1024x768 and 800x600 -> mean 912x684 (4:3) -> 1152x864."""
    sizes = [tuple(s) for s in sizes]
    if not sizes:
        raise ValueError("multi_image_output_size needs at least one (width, height)")
    for w, h in sizes:
        _check_size(w, h)
    mean_w = int(sum(w for w, _ in sizes) / len(sizes))
    mean_h = int(sum(h for _, h in sizes) / len(sizes))
    aspect = mean_w / mean_h
    rw, rh = min(ratios, key=lambda r: abs(r[0] / r[1] - aspect))  # the first of equally near ones
    base_w, base_h = rw * stride, rh * stride
    scale = max(1, round(math.sqrt(anchor_pixels / (base_w * base_h))))
    return base_w * scale // stride * stride, base_h * scale // stride * stride
