"""Write a tiny edit dataset for the offline training recipe (README, "Try the trainer offline").

    python training/tiny/make_data.py tiny/data

writes ``tiny/data/images/`` (source and target PNGs), ``tiny/data/edits.json`` (GPT-Image-Edit
records) and ``tiny/data/data.txt`` (one line, paths relative to it). Each target is its source
with one simple edit (a colour inverted, a square painted), so the pairs are real edits, only
small and synthetic. Deterministic: the same files every time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

EDITS = (
    ("invert the colours of the top left corner", "invert"),
    ("paint a red square in the middle", "red"),
    ("make the image black and white", "grey"),
    ("invert the colours of the top left corner", "invert"),
)
SIZES = ((64, 64), (96, 64), (64, 96), (64, 64))  # 1:1, 3:2 and 2:3: the data's aspect buckets


def source_image(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth colour gradient with a few soft blobs (uint8 HxWx3)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    img = np.stack([x, y, 1 - x * y], -1) * rng.uniform(0.4, 1.0, 3)
    for _ in range(3):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.3)
        img += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / r**2)[..., None] * rng.uniform(-0.5, 0.5, 3)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def edited(src: np.ndarray, kind: str) -> np.ndarray:
    out = src.copy()
    h, w = src.shape[:2]
    if kind == "invert":
        out[: h // 2, : w // 2] = 255 - out[: h // 2, : w // 2]
    elif kind == "red":
        out[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = (220, 30, 30)
    elif kind == "grey":
        out[:] = src.mean(-1, keepdims=True).astype(np.uint8)
    return out


def write_tiny_data(folder: str | Path) -> Path:
    """Write the dataset into ``folder``; returns its data.txt."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, ((instruction, kind), (w, h)) in enumerate(zip(EDITS, SIZES)):
        src = source_image(w, h, i)
        Image.fromarray(src).save(folder / f"images/{i:04d}_source.png")
        Image.fromarray(edited(src, kind)).save(folder / f"images/{i:04d}_target.png")
        records.append({
            "image": [f"{i:04d}_source.png", f"{i:04d}_target.png"],
            "conversations": [{"from": "human", "value": f"<image>\n{instruction}"}, {"from": "gpt", "value": "<gen_image>"}],
        })
    (folder / "edits.json").write_text(json.dumps(records, indent=1), encoding="utf-8")
    (folder / "data.txt").write_text("# image_root,annotation_json,region_weighting\nimages,edits.json,true\n", encoding="utf-8")
    return folder / "data.txt"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="where to write the dataset (e.g. tiny/data)")
    print(write_tiny_data(p.parse_args(argv).folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
