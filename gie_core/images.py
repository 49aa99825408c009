"""Image conversions between PIL, ComfyUI tensors and model inputs, with input checks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .constants import DEFAULT_TARGET_AREA, MAX_IMAGE_SIDE, MIN_IMAGE_SIDE, PREFERRED_KONTEXT_RESOLUTIONS, SIZE_MULTIPLE

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
            if im.mode != "RGB":
                raise ValueError(f"{what} has mode {im.mode} but an RGB image is expected (convert it to RGB first)")
            arrays.append(np.asarray(im, dtype=np.float32) / 255.0)
        if len({a.shape for a in arrays}) != 1:
            raise ValueError(f"{what} list mixes sizes {sorted({a.shape[:2] for a in arrays})}; all must match")
        out = torch.from_numpy(np.stack(arrays))
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{what} array must be uint8 HxWx3 but is {image.dtype} {image.shape}")
        out = torch.from_numpy(image.astype(np.float32) / 255.0)[None]
    elif torch.is_tensor(image):
        out = image[None] if image.ndim == 3 else image
        if out.ndim != 4 or out.shape[-1] != 3:
            raise ValueError(f"{what} tensor must be [B, H, W, 3] (ComfyUI IMAGE) but is {tuple(image.shape)}")
        if not out.is_floating_point():
            raise ValueError(f"{what} tensor must be float in 0..1 but is {out.dtype}")
        out = out.float()
    else:
        raise TypeError(f"{what} is a {type(image).__name__}; expected a PIL image, uint8 array or [B, H, W, 3] tensor")
    check_size(out.shape[2], out.shape[1], what)
    return out


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, H, W, 3] in 0..1 -> PIL images (rounded, like diffusers' postprocess)."""
    arr = (images.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def resize(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Resize [B, H, W, 3] to width x height; a no-op (bit-exact) when the size already matches."""
    if images.shape[1] == height and images.shape[2] == width:
        return images
    x = images.permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(0, 1).permute(0, 2, 3, 1)


def resize_pil(image: Image.Image, width: int, height: int) -> Image.Image:
    """LANCZOS resize as diffusers' VaeImageProcessor does for PIL inputs."""
    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)


def preferred_kontext_size(width: int, height: int) -> tuple[int, int]:
    """The preferred Kontext resolution nearest in aspect to width x height (as the reference picks it)."""
    aspect = width / height
    _, w, h = min((abs(aspect - pw / ph), pw, ph) for pw, ph in PREFERRED_KONTEXT_RESOLUTIONS)
    return w, h


def auto_output_size(width: int, height: int, area: int = DEFAULT_TARGET_AREA) -> tuple[int, int]:
    """About ``area`` pixels at the aspect of width x height, sides floored to a multiple of 16."""
    aspect = width / height
    w = round(math.sqrt(area * aspect))
    h = round(math.sqrt(area / aspect))
    return max(SIZE_MULTIPLE, w // SIZE_MULTIPLE * SIZE_MULTIPLE), max(SIZE_MULTIPLE, h // SIZE_MULTIPLE * SIZE_MULTIPLE)


def check_output_size(width: int, height: int) -> None:
    """Output sides must be positive multiples of 16 (8x VAE, 2x2 packing)."""
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v <= 0 or v % SIZE_MULTIPLE:
            raise ValueError(f"output {name} is {v} but must be a positive multiple of {SIZE_MULTIPLE}")
    if max(width, height) > MAX_IMAGE_SIDE:
        raise ValueError(f"output size {width}x{height} is larger than {MAX_IMAGE_SIDE} px a side")


def prepare_reference(image: ImageLike, resize_to: str | tuple[int, int] = "preferred", what: str = "reference image") -> torch.Tensor:
    """A reference image -> [B, 3, H, W] in [-1, 1] for VAE encoding.

    ``resize_to``: "preferred" (nearest of the 17 Kontext resolutions, as the reference does),
    "keep" (own size, floored to a multiple of 16), or an explicit (width, height).
    PIL inputs are resized with LANCZOS exactly like diffusers; tensors with antialiased bicubic.
    """
    pil_list = [image] if isinstance(image, Image.Image) else image
    is_pil = isinstance(pil_list, (list, tuple)) and all(isinstance(p, Image.Image) for p in pil_list)
    tensor = to_tensor(image, what)
    h0, w0 = tensor.shape[1], tensor.shape[2]
    if resize_to == "preferred":
        w, h = preferred_kontext_size(w0, h0)
    elif resize_to == "keep":
        w, h = w0, h0
    elif isinstance(resize_to, (tuple, list)) and len(resize_to) == 2:
        w, h = int(resize_to[0]), int(resize_to[1])
    else:
        raise ValueError(f"reference resize '{resize_to}' is unknown; expected 'preferred', 'keep' or (width, height)")
    w, h = w // SIZE_MULTIPLE * SIZE_MULTIPLE, h // SIZE_MULTIPLE * SIZE_MULTIPLE
    if is_pil:
        tensor = to_tensor([resize_pil(p, w, h) for p in pil_list], what)
    else:
        tensor = resize(tensor, w, h)
    return tensor.permute(0, 3, 1, 2) * 2.0 - 1.0  # [B, 3, H, W] in [-1, 1]
