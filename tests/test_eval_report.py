"""``gie-eval report``: one self-contained HTML page, opened in headless Chromium (Debian's
``/usr/bin/chromium`` through Playwright, never ``playwright install``): it renders without a
console error, every image decodes, the charts are there and the worst sample comes first."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from gie_core.cli.eval import main
from gie_core.eval import synthetic
from gie_core.eval.benchmarks import BENCHMARKS, load_samples
from gie_core.eval.judge import RUBRICS
from gie_core.eval.runs import RunFolder
from gie_core.eval.score import SIMILARITY_METRICS, aggregate, run_score, write_report



class ScriptedJudge:
    """Fixed VIEScore answers per sample key (semantics, then quality), as a judge would give them."""

    def __init__(self, by_instruction):
        self.by_instruction, self.current = by_instruction, None

    def answer(self, images, prompt):
        if len(images) == 2:  # semantics names the instruction; quality (the output alone) follows it
            self.current = next(i for i in self.by_instruction if i in prompt)
            sem = self.by_instruction[self.current][0]
            return f'{{"reasoning": "the edit <b>&amp</b> {self.current[:12]}", "editing_success": {sem}, "over_editing": {sem}}}'
        qual = self.by_instruction[self.current][1]
        return f'{{"reasoning": "looks fine", "naturalness": {qual}, "artifacts": {qual}}}'


def _scored_run(tmp_path: Path, name: str, scores: dict) -> Path:
    """A run folder of a jsonl set whose outputs are its sources, judged by a scripted judge (no
    model) and reported as gie-eval score does: scores = {key: (semantics, quality)}."""
    data = tmp_path / "own" / "set.jsonl"
    if not data.is_file():
        synthetic.write_jsonl(tmp_path / "own", n=4)
    samples = load_samples("jsonl", data)
    folder = RunFolder(tmp_path / name)
    folder.root.mkdir()
    for key in scores:
        shutil.copy(tmp_path / "own" / "images" / f"{key[1]}.png", folder.root / f"{key}.png")
    folder.write_run({"version": 1, "benchmark": "jsonl", "data": str(data), "select": {}, "settings": {}})
    judge = ScriptedJudge({s.instruction: scores[s.key] for s in samples if s.key in scores})
    rub = RUBRICS["viescore"]
    run_score(samples, BENCHMARKS["jsonl"], folder, judge=judge, rub=rub, similarity=True, progress=False)
    metrics = [*rub.metrics, *SIMILARITY_METRICS]
    write_report(folder, aggregate(samples, folder.read_records("judgements"), metrics, {"judge": "scripted"}))
    return folder.root


def test_report_page_renders_in_chromium_with_charts_and_the_worst_sample_first(tmp_path, browser):
    pytest.importorskip("matplotlib")
    # s0..s3 (local, global, local, global); "b" lacks s3's output; s2 scores worst in "b"
    a = _scored_run(tmp_path, "a", {"s0": (8, 9), "s1": (7, 7), "s2": (6, 8), "s3": (9, 9)})
    b = _scored_run(tmp_path, "b", {"s0": (9, 9), "s1": (5, 6), "s2": (1, 2)})
    out = tmp_path / "report" / "report.html"
    assert main(["report", str(a), str(b), "-o", str(out), "--names", "plain,rewritten", "--cell", "64"]) == 0
    page_html = out.read_text()
    assert "http://" not in page_html and "https://" not in page_html and "<script" not in page_html  # self-contained
    assert "&lt;b&gt;&amp;amp&lt;/b&gt;" in page_html  # the judge's words are escaped, never markup

    ctx = browser.new_context()
    ctx.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:")) else route.abort())
    page = ctx.new_page()
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
    page.goto(out.as_uri())
    page.wait_for_load_state("load")
    images = page.evaluate("() => Array.from(document.images).map(i => [i.className, i.complete, i.naturalWidth])")
    assert errors == []
    assert images and all(done and width > 0 for _, done, width in images), images  # every image decoded
    charts = [w for cls, _, w in images if cls == "chart"]
    assert len(charts) == 6 and all(w > 200 for w in charts)  # semantics, quality, overall + 3 similarity metrics
    order = page.evaluate("() => Array.from(document.querySelectorAll('tbody tr')).map(r => r.dataset.key)")
    assert order == ["s2", "s1", "s0", "s3"]  # lowest score of any run first (s2: 1 x 2 in 'rewritten')
    first = page.inner_text("tbody tr:first-child")
    assert "Change the sky to a sunset." in first and "overall 1.41" in first and "the edit <b>&amp</b>" in first
    last = page.inner_text("tbody tr:last-child")
    assert "no output" in last and "missing_output" in last  # s3 has no output in 'rewritten'
    ctx.close()


def test_report_without_matplotlib_says_what_to_install_and_writes_nothing(tmp_path, monkeypatch, capsys):
    a = _scored_run(tmp_path, "a", {"s0": (8, 9)})
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "r.html"
    assert main(["report", str(a), "-o", str(out)]) == 2
    assert "draws its charts with matplotlib: pip install 'gpt-image-edit-nodes[eval]'" in capsys.readouterr().err
    assert not out.exists()
    assert main(["report", str(a), "-o", str(tmp_path / "r.txt")]) == 2
    assert "must be an .html file" in capsys.readouterr().err
