"""Image loading and conversions between PIL, ComfyUI tensors and model inputs, with input checks.

Every face loads files through :func:`load_image` (the CLI, the rewriter, the trainer's data), so
an image means the same everywhere:

- EXIF orientation is applied (a phone photo is edited the way it is shown);
- 16-bit and 32-bit greyscale (``I;16``, ``I``, ``F``) are scaled by their range (0-65535, or
  0-1 for floats), not clipped at 255;
- transparency is composited on a background colour (white unless told; ``--snap`` uses its
  pad colour), so the colours hidden under transparent pixels never reach the model. The
  output has no alpha: an edit redraws the whole image, so the input's alpha no longer
  describes it;
- CMYK, palette, greyscale and YCbCr images become RGB.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from gie_core.constants import (
    DEFAULT_BACKGROUND,
    DEFAULT_REFERENCE_RESAMPLE,
    MAX_IMAGE_SIDE,
    MIN_IMAGE_SIDE,
    PREFERRED_KONTEXT_RESOLUTIONS,
    REFERENCE_RESAMPLE_MODES,
    REFERENCE_RESIZE_MODES,
    SIZE_MULTIPLE,
)
from gie_core.imaging.ratio import parse_color

ImageLike = Image.Image | torch.Tensor | np.ndarray | Sequence[Image.Image]


def check_size(width: int, height: int, what: str = "image") -> None:
    """Reject images too small to encode or too large to be a sensible edit input."""
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ValueError(f"{what} is {width}x{height} but must be at least {MIN_IMAGE_SIDE} px a side")
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ValueError(f"{what} is {width}x{height} but must be at most {MAX_IMAGE_SIDE} px a side")


def to_tensor(image: ImageLike, what: str = "image") -> torch.Tensor:
    """Any accepted image form -> float32 [B, H, W, 3] in 0..1 (ComfyUI's IMAGE layout).

    Accepts a PIL RGB image (or a list of same-size ones), a uint8 HxWx3 array, or a float
    tensor [H, W, 3] / [B, H, W, 3] in 0..1. The declared range is trusted and the values are
    normalised exactly once (unlike the reference pipeline's min<0 heuristic).
    """
    if isinstance(image, Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)):
        if not image:
            raise ValueError(f"{what} list is empty")
        arrays = []
        for i, im in enumerate(image):
            if not isinstance(im, Image.Image):
                raise TypeError(f"{what}[{i}] is a {type(im).__name__}, expected a PIL image")
            check_size(im.width, im.height, what)
            arrays.append(np.asarray(to_rgb(im), dtype=np.float32) / 255.0)
        if len({a.shape for a in arrays}) != 1:
            raise ValueError(f"{what} list mixes sizes {sorted({a.shape[:2] for a in arrays})}; all must match")
        out = torch.from_numpy(np.stack(arrays))
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{what} array must be uint8 HxWx3 but is {image.dtype} {image.shape}")
        out = torch.from_numpy(image.astype(np.float32) / 255.0)[None]
    elif torch.is_tensor(image):
        out = image[None] if image.ndim == 3 else image
        if out.ndim != 4 or out.shape[-1] != 3 or out.shape[0] < 1:
            raise ValueError(f"{what} tensor must be [B, H, W, 3] (ComfyUI IMAGE) but is {tuple(image.shape)}")
        if not out.is_floating_point():
            raise ValueError(f"{what} tensor must be float in 0..1 but is {out.dtype}")
        check_size(out.shape[2], out.shape[1], what)  # before any copy: an 8000x8000 batch is refused cheaply
        out = out.float()
        if not bool(torch.isfinite(out).all()):
            raise ValueError(f"{what} holds NaN or infinite values; an image must be finite floats in 0..1")
    else:
        raise TypeError(f"{what} is a {type(image).__name__}; expected a PIL image, uint8 array or [B, H, W, 3] tensor")
    check_size(out.shape[2], out.shape[1], what)
    return out


def to_rgb(image: Image.Image, background=DEFAULT_BACKGROUND) -> Image.Image:
    """Any PIL image -> RGB: high-bit greyscale scaled by its range, transparency composited on
    ``background`` (a colour as :func:`gie_core.imaging.ratio.pad_to_ratio` takes it; 'edge' means white)."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        full = 1.0 if image.mode == "F" and float(np.nanmax(arr, initial=0.0)) <= 1.0 else 65535.0
        if image.mode == "F" and full == 65535.0:
            full = 255.0  # float images above 1 are taken as 0-255
        arr = np.nan_to_num(arr, nan=0.0, posinf=full, neginf=0.0)
        image = Image.fromarray(np.rint(np.clip(arr / full, 0.0, 1.0) * 255.0).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        fill = parse_color(background)
        fill = (255, 255, 255) if fill == "edge" else fill
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*fill, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path, what: str = "input image", background=DEFAULT_BACKGROUND) -> Image.Image:
    """Open an image file as RGB, with every check up front (see the module docstring).

    Raises ``ValueError`` naming ``what`` and the path for: a missing path, a folder, a file
    that is not an image, a truncated or damaged file, and a size outside
    ``MIN_IMAGE_SIDE..MAX_IMAGE_SIDE`` (checked from the header, before decoding pixels).
    """
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} '{p}' is a directory; give an image file (PNG, JPEG, WebP...)")
    if not p.exists():
        raise ValueError(f"{what} '{p}' does not exist")
    try:
        with Image.open(p) as im:
            check_size(im.width, im.height, f"{what} '{p}'")  # from the header: no pixels decoded yet
            im.load()
            im = ImageOps.exif_transpose(im)  # a copy, shown orientation, orientation tag dropped
            return to_rgb(im, background).copy()
    except UnidentifiedImageError:
        raise ValueError(f"{what} '{p}' is not an image file PIL can read") from None
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{what} '{p}' is too large to decode safely: {exc}") from None
    except (OSError, SyntaxError, EOFError) as exc:  # PIL raises these for truncated / damaged data
        raise ValueError(f"{what} '{p}' is truncated or damaged ({exc})") from None


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, H, W, 3] in 0..1 -> PIL images (rounded, like diffusers' postprocess)."""
    arr = (images.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def resize(images: torch.Tensor, width: int, height: int, resample: str = "lanczos") -> torch.Tensor:
    """Resize [B, H, W, 3] to width x height (lanczos: antialiased bicubic; nearest: nearest);
    a no-op (bit-exact) when the size already matches."""
    if images.shape[1] == height and images.shape[2] == width:
        return images
    x = images.permute(0, 3, 1, 2)
    if resample == "nearest":
        x = F.interpolate(x, size=(height, width), mode="nearest")
    else:
        x = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def resize_pil(image: Image.Image, width: int, height: int, resample: str = "lanczos") -> Image.Image:
    """LANCZOS resize as diffusers' VaeImageProcessor does for PIL inputs (or NEAREST)."""
    method = Image.NEAREST if resample == "nearest" else Image.LANCZOS
    return image if image.size == (width, height) else image.resize((width, height), method)


def preferred_kontext_size(width: int, height: int) -> tuple[int, int]:
    """The preferred Kontext resolution nearest in aspect to width x height (as the reference picks it)."""
    aspect = width / height
    _, w, h = min((abs(aspect - pw / ph), pw, ph) for pw, ph in PREFERRED_KONTEXT_RESOLUTIONS)
    return w, h


def reference_size(width: int, height: int, resize_to: str | tuple[int, int] = "preferred") -> tuple[int, int]:
    """The size a ``width x height`` reference is encoded at (sides floored to a multiple of 16).

    ``resize_to``: "preferred" (nearest of the 17 Kontext resolutions, as the reference does),
    "keep" (own size), or an explicit (width, height).
    """
    if resize_to == "preferred":
        w, h = preferred_kontext_size(width, height)
    elif resize_to == "keep":
        w, h = width, height
    elif isinstance(resize_to, (tuple, list)) and len(resize_to) == 2:
        w, h = int(resize_to[0]), int(resize_to[1])
    else:
        raise ValueError(
            f"reference resize '{resize_to}' is unknown; expected one of {', '.join(REFERENCE_RESIZE_MODES)} or (width, height)"
        )
    w, h = w // SIZE_MULTIPLE * SIZE_MULTIPLE, h // SIZE_MULTIPLE * SIZE_MULTIPLE
    if min(w, h) < SIZE_MULTIPLE:
        raise ValueError(f"reference image {width}x{height} is too small to encode ({w}x{h} after flooring to {SIZE_MULTIPLE})")
    return w, h


def prepare_reference(
    image: ImageLike,
    resize_to: str | tuple[int, int] = "preferred",
    what: str = "reference image",
    resample: str = DEFAULT_REFERENCE_RESAMPLE,
) -> torch.Tensor:
    """A reference image -> contiguous [B, 3, H, W] in [-1, 1] for VAE encoding.

    ``resize_to``: see :func:`reference_size`. ``resample``: "lanczos" (ours: PIL inputs are
    resized with LANCZOS exactly like diffusers, tensors with antialiased bicubic) or
    "nearest" (what upstream's evaluation did, to reproduce its published numbers).
    """
    if resample not in REFERENCE_RESAMPLE_MODES:
        raise ValueError(f"reference resample '{resample}' is unknown; expected one of {', '.join(REFERENCE_RESAMPLE_MODES)}")
    pil_list = [image] if isinstance(image, Image.Image) else image
    is_pil = isinstance(pil_list, (list, tuple)) and all(isinstance(p, Image.Image) for p in pil_list)
    tensor = to_tensor(image, what)
    w, h = reference_size(tensor.shape[2], tensor.shape[1], resize_to)
    if is_pil:
        tensor = to_tensor([resize_pil(to_rgb(p), w, h, resample) for p in pil_list], what)
    else:
        tensor = resize(tensor, w, h, resample)
    # contiguous NCHW: a channels-last view changes the VAE's rounding
    return (tensor.permute(0, 3, 1, 2) * 2.0 - 1.0).contiguous()  # [B, 3, H, W] in [-1, 1]
