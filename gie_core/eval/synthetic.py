"""Tiny synthetic benchmark folders in each published on-disk form, made locally.

For trying ``gie-eval`` end to end offline (with the tiny random models of
:mod:`gie_core.testing.tiny`) and for the tests: a few small pictures (coloured shapes on a
gradient) and instructions, laid out as each benchmark ships them. The images are
deterministic; nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from gie_core.eval.benchmarks import IMGEDIT_JSON, IMGEDIT_JUDGE_PROMPTS, IMGEDIT_SINGLETURN

SIZE = (48, 32)  # width, height: small and not square, so aspect handling is exercised
_INSTRUCTIONS = (
    "Add a red hat to the man.",
    "Remove the person from the image.",
    "Change the sky to a sunset.",
    "Turn the photo into a watercolor painting.",
    "Replace the dog with a cat.",
    "Make the room brighter.",
)
IMGEDIT_TYPES = ("add", "remove", "background", "style", "replace", "adjust")
IMGEDIT_ALL_TYPES = ("replace", "add", "adjust", "remove", "style", "action", "extract", "background", "compose")
GEDIT_TASKS = ("subject-add", "subject-remove", "background_change", "style_change", "subject-replace", "tone_transfer")


def picture(i: int, size: tuple[int, int] = SIZE) -> Image.Image:
    """A deterministic small picture: a gradient with a coloured ellipse and a box."""
    rng = np.random.RandomState(1000 + i)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / w, y / h, np.full_like(x, (i % 5) / 5.0, dtype=float)], -1)
    im = Image.fromarray((base * 200 + 30).astype(np.uint8))
    d = ImageDraw.Draw(im)
    c = tuple(int(v) for v in rng.randint(0, 255, 3))
    x0, y0 = rng.randint(0, w // 2), rng.randint(0, h // 2)
    d.ellipse([x0, y0, x0 + w // 3, y0 + h // 3], fill=c)
    d.rectangle([w - w // 4, h - h // 3, w - 2, h - 2], fill=tuple(255 - v for v in c))
    return im


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa  # optional: pyarrow (extra 'eval'); only the parquet test sets need it
    import pyarrow.parquet as pq  # optional: pyarrow (as above)

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def write_imgedit(root: str | os.PathLike, n: int = 4) -> tuple[Path, Path]:
    """ImgEdit single-turn as the unpacked Benchmark.tar lays it out: ``Benchmark/singleturn/``
    holding ``singleturn.json``, ``judge_prompt.json`` (one judging prompt per edit type, the
    instruction at ``<edit_prompt>``) and ``<category>/<file>.jpg``. Returns (json path, image root)."""
    images = Path(root).joinpath(*IMGEDIT_SINGLETURN)
    data = {}
    for i in range(n):
        rel = f"{'animal' if i % 2 else 'human'}/{i:09d}.jpg"
        (images / rel).parent.mkdir(parents=True, exist_ok=True)
        picture(i).save(images / rel, quality=95)
        data[str(100 + i)] = {"id": rel, "prompt": _INSTRUCTIONS[i % len(_INSTRUCTIONS)], "edit_type": IMGEDIT_TYPES[i % len(IMGEDIT_TYPES)]}
    path = images / IMGEDIT_JSON
    path.write_text(json.dumps(data, indent=4))
    (images / IMGEDIT_JUDGE_PROMPTS).write_text(json.dumps(_judge_prompts(IMGEDIT_ALL_TYPES), indent=2))
    return path, images


def _judge_prompts(types) -> dict:
    return {t: f"You are a data rater grading '{t}' edits. Instruction: <edit_prompt>\nScore 1-5." for t in types}


def write_gpt_image_edit_eval(root: str | os.PathLike, imgedit_json: str | os.PathLike, gedit_n: int = 2) -> Path:
    """GPT-Image-Edit's own evaluation files, as its repository keeps them: ImgEdit's
    ``univa/eval/imgedit/eval_prompts/basic_edit.json`` and ``prompts.json`` (the benchmark's entries
    with ``adjust`` named ``alter`` and one instruction worded otherwise, as its copy differs from
    today's benchmark), and GEdit's ``univa/eval/gedit/gedit_edit.json`` (``{key: {prompt, id,
    edit_type}}``) over a ``gedit-asset`` folder (``fullset/<type>/<lang>/<key>.png`` beside
    ``<key>_SRCIMG.png``). Returns the checkout's root; the asset folder is ``root/gedit-asset``."""
    root = Path(root)
    folder = root / "univa" / "eval" / "imgedit" / "eval_prompts"
    folder.mkdir(parents=True, exist_ok=True)
    data = json.loads(Path(imgedit_json).read_text())
    for i, item in enumerate(data.values()):
        item["edit_type"] = "alter" if item["edit_type"] == "adjust" else item["edit_type"]
        if i == 0:
            item["prompt"] = item["prompt"].rstrip(".") + " (older wording)."
    (folder / "basic_edit.json").write_text(json.dumps(data, indent=4))
    types = ["alter" if t == "adjust" else t for t in IMGEDIT_ALL_TYPES]
    (folder / "prompts.json").write_text(json.dumps(_judge_prompts(types), indent=2))
    edits = {}
    for row in gedit_rows(gedit_n, embed=False, root=root / "gedit-src"):
        rel = f"fullset/{row['task_type']}/{row['instruction_language']}/{row['key']}.png"
        src = root / "gedit-src" / row["input_image"]
        (root / "gedit-asset" / rel).parent.mkdir(parents=True, exist_ok=True)
        with Image.open(src) as im:
            im.save(root / "gedit-asset" / rel.replace(".png", "_SRCIMG.png"))
            im.resize((32, 32)).save(root / "gedit-asset" / rel)  # step0 resized the input it edits
        edits[row["key"]] = {"prompt": row["instruction"], "id": rel, "edit_type": row["task_type"]}
    (root / "univa" / "eval" / "gedit").mkdir(parents=True, exist_ok=True)
    (root / "univa" / "eval" / "gedit" / "gedit_edit.json").write_text(json.dumps(edits, indent=4))
    return root


def gedit_rows(n: int = 4, *, embed: bool = True, root: Path | None = None) -> list[dict]:
    """GEdit-Bench rows (``key, task_type, instruction, instruction_language, input_image,
    input_image_raw, Intersection_exist``); images embedded as ``{"bytes", "path"}`` structs, or
    written under ``root`` and named by path."""
    rows = []
    for i in range(n):
        lang = "cn" if i % 4 == 3 else "en"
        img = picture(i)
        if embed:
            ref = {"bytes": _png(img), "path": f"{i}.png"}
        else:
            (root / "images").mkdir(parents=True, exist_ok=True)
            img.save(root / "images" / f"{i}.png")
            ref = f"images/{i}.png"
        rows.append({
            "task_type": GEDIT_TASKS[i % len(GEDIT_TASKS)], "key": f"g{i:04d}", "instruction": _INSTRUCTIONS[i % len(_INSTRUCTIONS)],
            "instruction_language": lang, "input_image": ref, "input_image_raw": ref, "Intersection_exist": bool(i % 2),
        })
    return rows


def write_gedit(root: str | os.PathLike, n: int = 4, fmt: str = "jsonl") -> Path:
    """GEdit-Bench rows as ``data/train-00000-of-00001.parquet`` (fmt parquet, images embedded) or
    ``gedit.jsonl`` with image files (fmt jsonl)."""
    root = Path(root)
    if fmt == "parquet":
        path = root / "data" / "train-00000-of-00001.parquet"
        _write_parquet(path, gedit_rows(n))
        return root
    path = root / "gedit.jsonl"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in gedit_rows(n, embed=False, root=root)))
    return path


def write_complex_edit(root: str | os.PathLike, n: int = 3, image_type: str = "real") -> Path:
    """Complex-Edit as a Hugging Face image folder: ``test/<type>/images/NNNN.png`` and
    ``test/<type>/metadata.jsonl`` rows ``{"file_name", "edit": {"compound": [8 levels]}}``.
    Returns the dataset root."""
    root = Path(root)
    split = root / "test" / image_type
    (split / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        picture(i).save(split / "images" / f"{i:04d}.png")
        steps = [_INSTRUCTIONS[(i + k) % len(_INSTRUCTIONS)].rstrip(".") for k in range(8)]
        steps = steps[:1] + [t[0].lower() + t[1:] for t in steps[1:]]
        compound = [{"compound_instruction": ", then ".join(steps[: k + 1]) + "."} for k in range(8)]
        lines.append(json.dumps({"file_name": f"images/{i:04d}.png", "edit": {"compound": compound}}))
    (split / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def write_omnicontext(root: str | os.PathLike, n: int = 4) -> Path:
    """OmniContext rows (``key, task_type, instruction, instruction_language, input_images``) as
    ``omnicontext.jsonl`` with image files: SINGLE tasks plus one MULTIPLE row (filtered out)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        picture(i).save(root / "images" / f"{i}.png")
        rows.append({"key": f"o{i}", "task_type": ("single_character", "single_object")[i % 2],
                     "instruction": "The subject stands on a beach at sunset.", "instruction_language": "en",
                     "input_images": [f"images/{i}.png"]})
    rows.append({"key": "multi0", "task_type": "multiple_character", "instruction": "The two stand together.",
                 "instruction_language": "en", "input_images": ["images/0.png", "images/1.png"]})
    path = root / "omnicontext.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_jsonl(root: str | os.PathLike, n: int = 4) -> Path:
    """Your own set: ``set.jsonl`` rows ``{"key", "image", "instruction", "category"}`` + images."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        picture(i).save(root / "images" / f"{i}.png")
        rows.append({"key": f"s{i}", "image": f"images/{i}.png", "instruction": _INSTRUCTIONS[i % len(_INSTRUCTIONS)],
                     "category": ("local", "global")[i % 2]})
    path = root / "set.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
