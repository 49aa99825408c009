"""``gie-eval compare``: several scored runs side by side, and a picture grid.

Tables: one per metric, a row per category (and ``overall``), a column per run, the best value
of a row in bold. Grid: a row per chosen sample: the source, then each run's output, with the
instruction as the caption under the row and the run names on top.
"""

from __future__ import annotations

import csv
import io
import json
import os
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from gie_core.files import atomic_write, atomic_write_text
from gie_core.eval.benchmarks import SelectOptions, benchmark, load_sample_image, load_samples
from gie_core.eval.runs import RunFolder

# metrics with no better direction: never bolded
_NOT_RANKED = {"edited_fraction"}


def load_scores(path: str | os.PathLike) -> dict:
    """scores.json of a run folder (or the file itself)."""
    p = Path(path)
    f = p if p.is_file() else RunFolder(p).scores / "scores.json"
    if not f.is_file():
        raise ValueError(f"'{p}' has no scores: run gie-eval score on it first (looked for {f})")
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{f} is not valid JSON: {exc.msg}") from None


def run_names(paths: list, names: list[str] | None = None) -> list[str]:
    """Column names: given ones, else the folders' names (made unique)."""
    if names:
        if len(names) != len(paths):
            raise ValueError(f"{len(names)} names given for {len(paths)} runs")
        return list(names)
    out: list[str] = []
    for p in paths:
        n = Path(p).resolve().name or str(p)
        base, i = n, 2
        while n in out:
            n, i = f"{base}-{i}", i + 1
        out.append(n)
    return out


def comparison(reports: list[dict], names: list[str]) -> dict:
    """{metric: {"rows": [category..., "overall"], "values": {row: {run: value}}}} over the union."""
    metrics: list[str] = []
    for r in reports:
        metrics += [m for m in r.get("metrics", []) if m not in metrics]
    tables = {}
    for m in metrics:
        rows: list[str] = []
        for r in reports:
            rows += [c for c in r.get("categories", {}) if c not in rows]
        values = {row: {} for row in [*rows, "overall"]}
        for r, n in zip(reports, names):
            for c in rows:
                values[c][n] = r.get("categories", {}).get(c, {}).get(m)
            values["overall"][n] = r.get("overall", {}).get(m)
        tables[m] = {"rows": [*rows, "overall"], "values": values}
    return tables


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3f}"


def comparison_markdown(tables: dict, names: list[str]) -> str:
    out = []
    for m, t in tables.items():
        out += [f"## {m}", "", "| category | " + " | ".join(names) + " |", "| --- | " + " | ".join("---" for _ in names) + " |"]
        for row in t["rows"]:
            vals = t["values"][row]
            present = [vals[n] for n in names if vals.get(n) is not None]
            best = max(present) if present and m not in _NOT_RANKED and len(present) > 1 else None
            cells = [(f"**{_fmt(vals.get(n))}**" if best is not None and vals.get(n) == best else _fmt(vals.get(n))) for n in names]
            label = f"**{row}**" if row == "overall" else row
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def comparison_csv(tables: dict, names: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["metric", "category", *names])
    for m, t in tables.items():
        for row in t["rows"]:
            w.writerow([m, row, *("" if t["values"][row].get(n) is None else f"{t['values'][row][n]:.4f}" for n in names)])
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _fit(image: Image.Image, cell: int) -> Image.Image:
    im = image.convert("RGB")
    scale = min(cell / im.width, cell / im.height)  # up or down: small outputs should be seen too
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
    canvas = Image.new("RGB", (cell, cell), (255, 255, 255))
    canvas.paste(im, ((cell - im.width) // 2, (cell - im.height) // 2))
    return canvas


def _placeholder(cell: int, text: str) -> Image.Image:
    im = Image.new("RGB", (cell, cell), (200, 200, 200))
    ImageDraw.Draw(im).text((8, cell // 2 - 8), text, fill=(90, 90, 90), font=_font(max(10, cell // 16)))
    return im


def picture_grid(rows: list[tuple[Image.Image | None, list[Image.Image | None], str]], names: list[str],
                 cell: int = 256, pad: int = 8) -> Image.Image:
    """Rows of (source, [output per run], caption) -> one image: a header with the column names,
    then each row's pictures with its caption (wrapped) underneath."""
    font = _font(max(11, cell // 18))
    cols = 1 + len(names)
    width = pad + cols * (cell + pad)
    chars = max(20, int((width - 2 * pad) / (font.getlength("x") or 7)))
    line_h = int(font.size * 1.3) if hasattr(font, "size") else 14
    header_h = line_h + 2 * pad
    blocks = []
    for source, outs, caption in rows:
        lines = textwrap.wrap(caption, chars)[:4] or [""]
        blocks.append((source, outs, lines, cell + pad + len(lines) * line_h + pad))
    height = header_h + sum(b[3] for b in blocks) + pad
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, n in enumerate(["source", *names]):
        draw.text((pad + i * (cell + pad), pad), n[: max(8, cell // 8)], fill=(0, 0, 0), font=font)
    y = header_h
    for source, outs, lines, h in blocks:
        pics = [source, *outs]
        for i, pic in enumerate(pics):
            tile = _fit(pic, cell) if pic is not None else _placeholder(cell, "missing")
            grid.paste(tile, (pad + i * (cell + pad), y))
        for j, line in enumerate(lines):
            draw.text((pad, y + cell + pad // 2 + j * line_h), line, fill=(40, 40, 40), font=font)
        y += h
    return grid


def grid_rows(run_paths: list, keys: list[str] | None, count: int) -> list[tuple]:
    """(source, outputs, instruction) for the chosen samples: ``keys``, or the first ``count``
    samples every run has an output for (in the instruction set's order). Sources and
    instructions come from the first run's instruction set."""
    folders = [RunFolder(p) for p in run_paths]
    runs = []
    for f in folders:
        info = f.read_run()
        if info is None:
            raise ValueError(f"'{f.root}' has no {f.run_file.name}: the grid needs folders made by gie-eval generate")
        runs.append(info)
    first = runs[0]
    samples = load_samples(first["benchmark"], first["data"], SelectOptions.from_dict(first.get("select", {})))
    if keys:
        by_key = {s.key: s for s in samples}
        unknown = [k for k in keys if k not in by_key]
        if unknown:
            raise ValueError(f"grid sample(s) {', '.join(unknown)} are not in the instruction set of '{folders[0].root}'")
        chosen = [by_key[k] for k in keys]
    else:
        chosen = [s for s in samples if all(f.output(benchmark(r["benchmark"]), s).is_file()
                                            for f, r in zip(folders, runs))][:count]
        if not chosen:
            raise ValueError("no sample has an output in every run; pick samples with --grid-keys")
    rows = []
    for s in chosen:
        source = load_sample_image(s.image, f"sample '{s.key}' image")
        outs = []
        for f, r in zip(folders, runs):
            p = f.output(benchmark(r["benchmark"]), s)
            if p.is_file():
                with Image.open(p) as im:
                    outs.append(im.convert("RGB"))
            else:
                outs.append(None)
        rows.append((source, outs, f"{s.key}: {s.instruction}"))
    return rows


def write_comparison(run_paths: list, out_dir, names: list[str] | None = None, *, grid_keys: list[str] | None = None,
                     grid_count: int = 4, cell: int = 256) -> dict:
    """Write compare.md, compare.csv, compare.json (and grid.png when ``grid_count`` or
    ``grid_keys``) to ``out_dir``; returns their paths and the markdown. Everything is read and
    checked first: a refused comparison writes nothing."""
    names = run_names(run_paths, names)
    reports = [load_scores(p) for p in run_paths]
    tables = comparison(reports, names)
    out = Path(out_dir)
    md = comparison_markdown(tables, names)
    grid = None
    if grid_keys or grid_count:
        grid = picture_grid(grid_rows(run_paths, grid_keys, grid_count), names, cell=cell)
    written = {
        "markdown": atomic_write_text(out / "compare.md", md),
        "csv": atomic_write_text(out / "compare.csv", comparison_csv(tables, names)),
        "json": atomic_write_text(out / "compare.json", json.dumps({"runs": names, "paths": [str(p) for p in run_paths],
                                                                      "tables": tables}, indent=2) + "\n"),
    }
    if grid is not None:
        written["grid"] = atomic_write(out / "grid.png", lambda tmp: grid.save(tmp, format="PNG"))
    return {"paths": written, "markdown": md}
