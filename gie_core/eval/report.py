"""``gie-eval report``: one self-contained HTML page of one or more scored runs.

The page holds, with nothing fetched from anywhere (images are embedded as data URIs):

- per metric, a bar chart of the score per category (and overall), one bar per run, drawn with
  matplotlib (an optional dependency: ``pip install "gpt-image-edit-nodes[eval]"``);
- a per-sample grid: the source, each run's output, the instruction, and per run the judge's
  scores and reasons (the ``reasoning`` of its answers, else the answer itself), the worst
  samples first (the lowest headline score of any run; samples no run has a score for last).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from gie_core.eval.benchmarks import Sample, SelectOptions, benchmark, load_sample_image, load_samples
from gie_core.eval.compare import comparison, load_scores, run_names
from gie_core.eval.judge import answer_reasoning
from gie_core.eval.runs import RunFolder
from gie_core.files import atomic_write_text

MATPLOTLIB_HINT = (
    "gie-eval report draws its charts with matplotlib: pip install 'gpt-image-edit-nodes[eval]' (or pip install matplotlib)"
)
DEFAULT_REPORT_SAMPLES = 100  # grid rows (the worst ones); 0 = every sample
_REASON_CHARS = 400


@dataclass
class RunView:
    """What the page shows of one run: its name, scores report, samples and judgements."""

    name: str
    folder: RunFolder
    report: dict
    bench: object
    samples: list[Sample]
    records: dict  # key -> the newest judgement record


def _require_matplotlib():
    try:
        import matplotlib  # optional: matplotlib (extra 'eval'), only the report draws with it
    except ImportError:
        raise ValueError(MATPLOTLIB_HINT) from None
    matplotlib.use("Agg", force=True)  # files only, never a window
    import matplotlib.pyplot as plt  # optional: matplotlib (as above)

    return plt


def _run_view(path, name: str) -> RunView:
    folder = RunFolder(path)
    report = load_scores(path)
    info = folder.read_run() or {}
    config_file = folder.scores / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    bench_name = info.get("benchmark") or config.get("benchmark") or report.get("benchmark")
    data = info.get("data") or config.get("data")
    if not bench_name or not data:
        raise ValueError(f"'{folder.root}' names no benchmark and instruction set (no _gie_eval/run.json nor scores config)")
    bench = benchmark(bench_name)
    samples = load_samples(bench.name, data, SelectOptions.from_dict(info.get("select", {})))
    records = {}
    for r in folder.read_records("judgements"):
        records[r["key"]] = r
    return RunView(name, folder, report, bench, samples, records)


def _png_uri(fig_or_image, plt=None) -> str:
    buf = io.BytesIO()
    if plt is not None:
        fig_or_image.savefig(buf, format="png", dpi=96, bbox_inches="tight")
        plt.close(fig_or_image)
    else:
        fig_or_image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def category_charts(views: list[RunView], plt) -> list[tuple[str, str]]:
    """(metric, PNG data URI) per metric: bars per category and overall, one colour per run."""
    names = [v.name for v in views]
    charts = []
    for metric, table in comparison([v.report for v in views], names).items():
        rows = table["rows"]
        fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(rows) * max(1, len(names)) ** 0.5 + 2), 3.4))
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            values = [table["values"][r].get(n) for r in rows]
            xs = [k + (i - (len(names) - 1) / 2) * width for k in range(len(rows))]
            ax.bar(xs, [0.0 if v is None else v for v in values], width, label=n)
        ax.set_xticks(range(len(rows)), rows, rotation=30, ha="right", fontsize=8)
        ax.set_title(metric)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        charts.append((metric, _png_uri(fig, plt)))
    return charts


def _headline(view: RunView) -> str | None:
    metrics = view.report.get("metrics") or []
    return "overall" if "overall" in metrics else (metrics[-1] if metrics else None)


def _score(view: RunView, key: str):
    rec = view.records.get(key)
    metric = _headline(view)
    if rec is None or metric is None:
        return None
    merged = {**(rec.get("metrics") or {}), **(rec.get("similarity") or {})}
    return merged.get(metric)


def worst_first(views: list[RunView]) -> list[Sample]:
    """The first run's samples, lowest headline score of any run first; unscored samples last."""
    def rank(s: Sample):
        scores = [v for v in (_score(view, s.key) for view in views) if v is not None]
        return (0, min(scores), s.index) if scores else (1, 0.0, s.index)

    return sorted(views[0].samples, key=rank)


def _reasons(rec: dict) -> list[str]:
    """The judge's reasons: each answer's ``reasoning`` field, else the answer (shortened)."""
    out = []
    for question, answer in (rec.get("answers") or {}).items():
        raws = answer.get("raw")
        raw = raws[0] if isinstance(raws, list) and raws else raws
        if not isinstance(raw, str):
            continue
        reason = answer_reasoning(raw) or raw
        reason = reason if len(reason) <= _REASON_CHARS else reason[: _REASON_CHARS - 1] + "…"
        out.append(f"{question} ({answer.get('status')}): {reason}")
    return out


def _thumb(image: Image.Image, cell: int) -> str:
    im = image.convert("RGB")
    im.thumbnail((cell, cell), Image.LANCZOS)
    return _png_uri(im)


def _cell_for_run(view: RunView, sample: Sample, cell: int) -> str:
    path = view.folder.output(view.bench, sample)
    if path.is_file():
        with Image.open(path) as im:
            pic = f'<img src="{_thumb(im, cell)}" alt="{html.escape(view.name)} output">'
    else:
        pic = '<div class="missing">no output</div>'
    rec = view.records.get(sample.key)
    if rec is None:
        text = "<p class='status'>not scored</p>"
    else:
        metrics = {**(rec.get("metrics") or {}), **(rec.get("similarity") or {})}
        shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, (int, float)))
        reasons = "".join(f"<li>{html.escape(r)}</li>" for r in _reasons(rec))
        text = (f"<p class='status'>{html.escape(str(rec.get('status')))}</p><p class='scores'>{html.escape(shown or '—')}</p>"
                f"<ul class='reasons'>{reasons}</ul>")
    return f"<td>{pic}{text}</td>"


def sample_rows(views: list[RunView], cell: int, limit: int) -> list[str]:
    """The grid's rows (HTML), worst first; at most ``limit`` (0 = all)."""
    ordered = worst_first(views)
    if limit:
        ordered = ordered[:limit]
    rows = []
    for s in ordered:
        try:
            source = f'<img src="{_thumb(load_sample_image(s.judge_source, f"sample {s.key}"), cell)}" alt="source">'
        except ValueError as exc:
            source = f'<div class="missing">{html.escape(str(exc))}</div>'
        head = (f"<td class='sample'><b>{html.escape(s.key)}</b><br><span class='cat'>{html.escape(s.category)}</span>"
                f"<p>{html.escape(s.instruction)}</p></td><td>{source}</td>")
        rows.append(f"<tr data-key='{html.escape(s.key)}'>{head}{''.join(_cell_for_run(v, s, cell) for v in views)}</tr>")
    return rows


_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table.grid { border-collapse: collapse; }
table.grid td, table.grid th { border: 1px solid #ccc; padding: 6px; vertical-align: top; max-width: 300px; }
td.sample { max-width: 220px; } .cat { color: #666; font-size: 0.85em; }
.status { font-weight: bold; margin: 4px 0; } .scores { margin: 2px 0; font-size: 0.9em; }
ul.reasons { font-size: 0.8em; padding-left: 1.1em; margin: 4px 0; color: #444; }
.missing { width: 120px; height: 80px; background: #ddd; color: #555; font-size: 0.8em; padding: 4px; }
.charts img { margin: 0 1em 1em 0; border: 1px solid #eee; }
"""


def report_html(views: list[RunView], charts: list[tuple[str, str]], rows: list[str], total: int) -> str:
    """The page: a header naming the runs, the charts, then the grid."""
    runs = "".join(f"<li><b>{html.escape(v.name)}</b>: {html.escape(str(v.folder.root))} ({html.escape(v.bench.title)}; "
                   f"judge {html.escape(str(v.report.get('judge')))})</li>" for v in views)
    chart_html = "".join(f'<img class="chart" src="{uri}" alt="{html.escape(m)} per category">' for m, uri in charts)
    header = "".join(f"<th>{html.escape(v.name)}</th>" for v in views)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>gie-eval report</title>"
        f"<style>{_CSS}</style></head><body><h1>gie-eval report</h1><ul>{runs}</ul>"
        f"<h2>Scores per category</h2><div class='charts'>{chart_html}</div>"
        f"<h2>Samples, worst first ({len(rows)} of {total})</h2>"
        f"<table class='grid'><thead><tr><th>sample</th><th>source</th>{header}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></body></html>\n"
    )


def write_html_report(run_paths: list, out: str | os.PathLike, names: list[str] | None = None, *,
                      samples: int = DEFAULT_REPORT_SAMPLES, cell: int = 192) -> Path:
    """Write the page of ``run_paths`` to ``out`` (atomically); everything is read and drawn first,
    so a refused report writes nothing."""
    plt = _require_matplotlib()
    names = run_names(run_paths, names)
    views = [_run_view(p, n) for p, n in zip(run_paths, names)]
    charts = category_charts(views, plt)
    rows = sample_rows(views, cell, samples)
    page = report_html(views, charts, rows, len(views[0].samples))
    return atomic_write_text(Path(out), page)
