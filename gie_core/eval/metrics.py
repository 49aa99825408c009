"""Reference-free metrics: how much of the source survives outside the edited region.

The benchmarks ship no masks, so the edited region is estimated: both images (the output
resized to the source's size) are cut into a grid of cells about 1/32 of the long side; a cell
whose mean absolute difference exceeds ``threshold`` is edited, and edited cells grow by one
cell to cover their borders. Everything else is "outside": small drifts there (colour shifts,
texture loss, a redrawn background just under the threshold) lower the scores, the intended
change does not. A sample with a ``mask`` (white = edited) uses it instead.

- ``psnr_outside`` (dB, capped at 100) and ``ssim_outside`` (11-px Gaussian window), plain torch;
- ``edited_fraction``: the share of the image counted as edited;
- ``embed_cosine_outside`` (optional): cosine similarity of a vision model's image embeddings
  (DINOv2, CLIP or SigLIP vision tower, by path) of source and output with the edited region
  greyed out in both.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from gie_core.weights.loading import require_safetensors
from gie_core.weights.reader import CheckpointError

PSNR_CAP = 100.0
DEFAULT_THRESHOLD = 0.1  # mean |difference| of a cell, in 0..1 (~25 levels of 255)
GRID_CELLS = 32  # cells along the long side


def to_array(image: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """PIL -> float tensor [3, H, W] in 0..1, resized (bicubic) to ``size`` = (w, h) when given."""
    image = image.convert("RGB")
    if size is not None and image.size != size:
        image = image.resize(size, Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def estimate_edited_mask(source: torch.Tensor, output: torch.Tensor, threshold: float = DEFAULT_THRESHOLD,
                         cells: int = GRID_CELLS) -> torch.Tensor:
    """Bool [H, W], True where the output is judged edited (see the module docstring)."""
    _, h, w = source.shape
    cell = max(1, round(max(h, w) / cells))
    diff = (source - output).abs().mean(0, keepdim=True)[None]  # [1, 1, H, W]
    coarse = F.avg_pool2d(diff, cell, stride=cell, ceil_mode=True)  # [1, 1, h', w']
    edited = (coarse > threshold).float()
    edited = F.max_pool2d(edited, 3, stride=1, padding=1)  # grow by one cell
    return F.interpolate(edited, scale_factor=cell, mode="nearest")[0, 0, :h, :w] > 0.5


def masked_psnr(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> float | None:
    """PSNR (data range 1) over the pixels where ``keep`` is True; None when none are kept."""
    if not bool(keep.any()):
        return None
    mse = ((a - b) ** 2)[:, keep].mean().item()
    return PSNR_CAP if mse <= 10 ** (-PSNR_CAP / 10) else min(PSNR_CAP, 10 * math.log10(1.0 / mse))


def _gaussian(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # [1, 1, k, k]


def ssim_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel SSIM [H, W] (mean over channels), Gaussian 11 px / sigma 1.5, data range 1."""
    c1, c2 = 0.01**2, 0.03**2
    k = _gaussian()
    x, y = a[:, None], b[:, None]  # [3, 1, H, W]: channels as a batch
    pad = k.shape[-1] // 2

    def blur(t):
        return F.conv2d(F.pad(t, (pad, pad, pad, pad), mode="replicate"), k)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.mean(0)[0]


def masked_ssim(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> float | None:
    """Mean SSIM over the pixels where ``keep`` is True; None when none are kept."""
    if not bool(keep.any()):
        return None
    return ssim_map(a, b)[keep].mean().item()


def load_mask(ref, size: tuple[int, int]) -> torch.Tensor:
    """A mask image (white = edited) as bool [H, W] at ``size`` = (w, h)."""
    im = Image.open(io.BytesIO(ref)) if isinstance(ref, bytes) else Image.open(ref)
    with im:
        arr = np.asarray(im.convert("L").resize(size, Image.NEAREST))
    return torch.from_numpy(arr > 127)


def similarity_outside(source: Image.Image, output: Image.Image, mask=None,
                       threshold: float = DEFAULT_THRESHOLD) -> tuple[dict, torch.Tensor]:
    """({psnr_outside, ssim_outside, edited_fraction}, the kept-region mask [H, W]) of one sample;
    the output is compared at the source's size."""
    a, b = to_array(source), to_array(output, source.size)
    edited = load_mask(mask, source.size) if mask is not None else estimate_edited_mask(a, b, threshold)
    keep = ~edited
    metrics = {
        "psnr_outside": masked_psnr(a, b, keep),
        "ssim_outside": masked_ssim(a, b, keep),
        "edited_fraction": edited.float().mean().item(),
    }
    return metrics, keep


class EmbeddingSimilarity:
    """Cosine similarity of a vision model's image embeddings outside the edited region.

    Any transformers vision model folder with ``config.json`` + safetensors: CLIP / SigLIP (their
    ``get_image_features``), or a backbone such as DINOv2 (the ``pooler_output``, else the first
    token). Preprocessing (resize to the model's image size, mean/std from its
    ``preprocessor_config.json``) is done here, so no image-processor class is needed.
    """

    def __init__(self, model, image_size: int, mean, std, device="cpu", name: str = ""):
        self.model, self.image_size, self.device, self.name = model, image_size, torch.device(device), name
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    @staticmethod
    def check_path(path: str | os.PathLike) -> Path:
        """Check a similarity model folder before any weight is read: config.json, and its weights
        in safetensors (a folder with only ``.bin`` pickles is refused, named)."""
        p = Path(path)
        if not (p / "config.json").is_file():
            raise ValueError(f"similarity model '{p}' must be a folder with config.json and safetensors weights (e.g. a DINOv2 or CLIP model)")
        try:
            require_safetensors(p)
        except CheckpointError as exc:
            raise ValueError(f"could not load the similarity model from {p}: {exc}") from None
        return p

    @classmethod
    def from_path(cls, path: str | os.PathLike, device="cpu") -> EmbeddingSimilarity:
        from transformers import AutoConfig, AutoModel  # start-up: transformers' models (~2 s) only with --similarity-model

        p = cls.check_path(path)
        try:
            config = AutoConfig.from_pretrained(p, local_files_only=True)
            model = AutoModel.from_pretrained(p, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"could not load the similarity model from {p}: {exc}") from None
        vision = getattr(config, "vision_config", None) or config
        size = int(getattr(vision, "image_size", 224) or 224)
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        pre = p / "preprocessor_config.json"
        if pre.is_file():
            d = json.loads(pre.read_text())
            mean, std = d.get("image_mean", mean), d.get("image_std", std)
            crop = d.get("crop_size")
            size = int(crop.get("height", size) if isinstance(crop, dict) else (crop or size))
        return cls(model.to(device).eval().requires_grad_(False), size, mean, std, device, str(p))

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in 0..1 -> [B, D] embeddings."""
        x = F.interpolate(images, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        x = ((x.clamp(0, 1) - self.mean) / self.std).to(self.device, next(self.model.parameters()).dtype)
        if hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=x)
            if not torch.is_tensor(out):  # some versions return an output object
                out = getattr(out, "pooler_output", None) if getattr(out, "pooler_output", None) is not None else out[0]
            return out.float().reshape(out.shape[0], -1)
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        return (pooled if pooled is not None else out.last_hidden_state[:, 0]).float()

    def cosine_outside(self, source: Image.Image, output: Image.Image, keep: torch.Tensor) -> float:
        a, b = to_array(source), to_array(output, source.size)
        grey = torch.full_like(a, 0.5)
        a, b = torch.where(keep, a, grey), torch.where(keep, b, grey)  # the edited region says nothing here
        ea, eb = self.embed(torch.stack([a, b]))
        return F.cosine_similarity(ea[None], eb[None]).item()
