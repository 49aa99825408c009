"""``gie-eval score``: judge a run folder offline and report scores per category and overall.

Each sample's judgement (the raw answers, the parsed scores, their status, the similarity
metrics) is appended to ``_gie_eval/scores/judgements.rank<N>.jsonl``; a rerun skips judged
samples. The report (``scores.json``, ``scores.csv``, ``scores.md``) holds, per category, the
mean of each metric over the samples that have it, and ``overall``: the mean of the category
means (as GEdit-Bench and ImgEdit-Bench report theirs), plus the plain mean over all samples.
Unparseable answers are counted, never scored as 0.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from dataclasses import dataclass, field

from PIL import Image
from tqdm import tqdm

from gie_core.eval.benchmarks import Benchmark, Sample, load_sample_image
from gie_core.eval.judge import judge_sample
from gie_core.eval.metrics import similarity_outside
from gie_core.eval.runs import RunFolder, Shard
from gie_core.files import atomic_write_text

SIMILARITY_METRICS = ("psnr_outside", "ssim_outside", "edited_fraction")
EMBED_METRIC = "embed_cosine_outside"
REPORT_NAMES = ("scores.json", "scores.csv", "scores.md")
# a judged sample is done; a failed one (an error while judging) or a missing output is tried again
DONE_STATUSES = ("ok", "partial", "unparseable", "similarity")


@dataclass
class ScoreSummary:
    total: int
    done_before: int
    judged: int = 0
    failed: list[dict] = field(default_factory=list)
    missing: int = 0


def _open_output(path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def score_sample(sample: Sample, output_path, record: dict, *, judge=None, rub=None, similarity: bool = False,
                 embedder=None, judge_samples: int = 1) -> None:
    """Judge one sample's output and/or measure its similarity outside the edit, into ``record``.

    Raises when it cannot be judged (the caller records the reason and goes on).
    """
    output = _open_output(output_path)
    source = load_sample_image(sample.judge_source, f"sample '{sample.key}' source image")
    record["status"] = "similarity"
    if judge is not None:
        more = [load_sample_image(ref, f"sample '{sample.key}' image {i}") for i, ref in enumerate(sample.more_images, 2)]
        record.update(judge_sample(judge, rub, sample, source, output, samples=judge_samples, more_sources=more))
    if similarity or embedder is not None:
        sim, keep = similarity_outside(source, output, sample.mask)
        if embedder is not None:
            sim[EMBED_METRIC] = embedder.cosine_outside(source, output, keep)
        record["similarity"] = sim


def run_score(
    samples: list[Sample],
    bench: Benchmark,
    folder: RunFolder,
    *,
    judge=None,
    rub=None,
    similarity: bool = False,
    embedder=None,
    shard: Shard = Shard(),
    progress: bool = True,
    judge_samples: int | None = None,
) -> ScoreSummary:
    """Judge this process's shard of ``samples`` (see the module docstring); ``judge`` is anything
    with ``answer(images, prompt) -> str`` and ``rub`` its :class:`gie_core.eval.judge.Rubric`.
    ``judge_samples`` answers per question (default: the rubric's, e.g. Complex-Edit's 20) are
    averaged per criterion."""
    n_answers = judge_samples or (rub.samples if rub is not None else 1)
    folder.check_outputs(bench, samples)
    mine = shard.take(samples)
    done = {r["key"] for r in folder.read_records("judgements") if r.get("status") in DONE_STATUSES}
    todo = [s for s in mine if s.key not in done]
    summary = ScoreSummary(total=len(mine), done_before=len(mine) - len(todo))
    bar = None
    if progress and shard.is_main and todo:
        bar = tqdm(total=len(todo), desc=f"judging {bench.name}", unit="sample", file=sys.stderr)
    try:
        for sample in todo:
            rel = bench.output_path(sample)
            record = {"key": sample.key, "index": sample.index, "category": sample.category, "output": rel,
                      "instruction": sample.instruction, "rank": shard.process_index}
            started = time.monotonic()
            path = folder.output(bench, sample)
            if not path.is_file():
                record.update(status="missing_output", reason=f"no output at {rel}")
                summary.missing += 1
            else:
                try:
                    score_sample(sample, path, record, judge=judge, rub=rub, similarity=similarity, embedder=embedder,
                                 judge_samples=n_answers)
                    summary.judged += 1
                except KeyboardInterrupt:
                    raise
                except Exception as exc:  # a bad sample is recorded, the rest go on
                    record.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
                    summary.failed.append(record)
            record["seconds"] = round(time.monotonic() - started, 3)
            folder.append_record("judgements", shard.process_index, record)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return summary


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _means(samples: list[Sample], latest: dict[str, dict], metric_names: list[str], categories: list[str],
           counts: dict | None = None) -> dict:
    """Per category the mean of each metric over its judged samples, ``overall`` (the mean of the
    category means; a category without a value is left out) and ``sample_mean``. ``counts`` (when
    given) is filled with the samples' statuses."""
    per_cat: dict[str, dict] = {}
    all_values: dict[str, list] = {m: [] for m in metric_names}
    for cat in categories:
        values: dict[str, list] = {m: [] for m in metric_names}
        n = 0
        for s in samples:
            if s.category != cat:
                continue
            r = latest.get(s.key)
            status = None if r is None else r.get("status")
            if counts is not None:
                key = "not_scored" if r is None else status
                if key in counts and key != "judged":
                    counts[key] += 1
            if r is None or status in ("failed", "missing_output"):
                continue
            n += 1
            merged = {**(r.get("metrics") or {}), **(r.get("similarity") or {})}
            for m in metric_names:
                values[m].append(merged.get(m))
                all_values[m].append(merged.get(m))
        row = {"n": n}
        for m in metric_names:
            row[m] = _mean(values[m])
            row[f"{m}_n"] = sum(v is not None for v in values[m])
        per_cat[cat] = row
    return {
        "categories": per_cat,
        "overall": {m: _mean([per_cat[c][m] for c in categories]) for m in metric_names},
        "sample_mean": {m: _mean(all_values[m]) for m in metric_names},
        "judged": sum(row["n"] for row in per_cat.values()),
    }


def aggregate(samples: list[Sample], records: list[dict], metric_names: list[str], info: dict | None = None,
              subsets: tuple = ()) -> dict:
    """Scores per category and overall from the judgement records (the newest record of a key wins).

    ``subsets`` (a benchmark's ``(name, belongs)`` pairs, e.g. GEdit's ``intersection``) add
    ``report["subsets"][name]``: the same table over that subset's samples alone, averaged the way
    the benchmark's own statistics script does (mean per category, then the mean of those; a
    category with no sample of the subset is left out, where upstream's mean would be NaN).
    """
    latest: dict[str, dict] = {}
    for r in records:
        latest[r["key"]] = r
    categories: list[str] = []
    for s in samples:
        if s.category not in categories:
            categories.append(s.category)
    counts = {"samples": len(samples), "judged": 0, "ok": 0, "partial": 0, "unparseable": 0, "failed": 0,
              "missing_output": 0, "not_scored": 0}
    table = _means(samples, latest, metric_names, categories, counts)
    counts["judged"] = table.pop("judged")
    report = {**(info or {}), "metrics": list(metric_names), **table, "counts": counts}
    if subsets:
        report["subsets"] = {}
        for name, belongs in subsets:
            part = [s for s in samples if belongs(s)]
            cats = [c for c in categories if any(s.category == c for s in part)]
            report["subsets"][name] = {"samples": len(part), **_means(part, latest, metric_names, cats)}
    return report


def _fmt(v, digits: int = 3) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def report_csv(report: dict) -> str:
    metrics = report["metrics"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["category", "n", *metrics])
    for cat, row in report["categories"].items():
        w.writerow([cat, row["n"], *(_fmt(row[m], 4) for m in metrics)])
    w.writerow(["overall", report["counts"]["judged"], *(_fmt(report["overall"][m], 4) for m in metrics)])
    for name, sub in report.get("subsets", {}).items():
        for cat, row in sub["categories"].items():
            w.writerow([f"{name}/{cat}", row["n"], *(_fmt(row[m], 4) for m in metrics)])
        w.writerow([f"{name}/overall", sub["judged"], *(_fmt(sub["overall"][m], 4) for m in metrics)])
    return buf.getvalue()


def report_markdown(report: dict) -> str:
    metrics = report["metrics"]
    lines = [f"# {report.get('title', 'scores')}", ""]
    if report.get("judge"):
        lines.append(f"Judge: `{report['judge']}` (rubric `{report.get('rubric')}`)")
    c = report["counts"]
    lines += [
        f"Samples: {c['samples']}; judged {c['judged']} (ok {c['ok']}, partial {c['partial']}, "
        f"unparseable {c['unparseable']}); failed {c['failed']}; missing output {c['missing_output']}; "
        f"not scored yet {c['not_scored']}",
        "",
        "| category | n | " + " | ".join(metrics) + " |",
        "| --- | --- | " + " | ".join("---" for _ in metrics) + " |",
    ]
    for cat, row in report["categories"].items():
        lines.append(f"| {cat} | {row['n']} | " + " | ".join(_fmt(row[m]) for m in metrics) + " |")
    lines.append(f"| **overall** (mean of categories) | {c['judged']} | "
                 + " | ".join(f"**{_fmt(report['overall'][m])}**" if report["overall"][m] is not None else ""
                              for m in metrics) + " |")
    lines.append(f"| all samples | {c['judged']} | " + " | ".join(_fmt(report["sample_mean"][m]) for m in metrics) + " |")
    for name, sub in report.get("subsets", {}).items():
        lines += ["", f"## {name} ({sub['samples']} samples)", "",
                  "| category | n | " + " | ".join(metrics) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in metrics) + " |"]
        for cat, row in sub["categories"].items():
            lines.append(f"| {cat} | {row['n']} | " + " | ".join(_fmt(row[m]) for m in metrics) + " |")
        lines.append(f"| **average {name}** (mean of categories) | {sub['judged']} | "
                     + " | ".join(_fmt(sub["overall"][m]) for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def write_report(folder: RunFolder, report: dict) -> list:
    """scores.json, scores.csv and scores.md in the scores folder (each written atomically)."""
    out = folder.scores
    paths = [folder.checked(out / n, "scores report") for n in REPORT_NAMES]
    atomic_write_text(paths[0], json.dumps(report, indent=2, sort_keys=False) + "\n")
    atomic_write_text(paths[1], report_csv(report))
    atomic_write_text(paths[2], report_markdown(report))
    return paths
