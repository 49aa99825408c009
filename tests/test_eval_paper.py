"""``gie-eval paper`` on the tiny models and synthetic sets: both protocols, plain and rewritten,
the scorer-ready folders (ImgEdit's edit/prompt files agree on every edit type), the table in
the paper's layout beside the published figures, marked not comparable for a local judge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gie_core.cli.eval import main
from gie_core.eval import synthetic
from gie_core.eval.paper import PAPER, PROTOCOLS, PaperRun, imgedit_scorer_files, paper_rows

FAST = ["--steps", "1", "--size", "32x32", "--reference-size", "keep", "--dtype", "fp32", "--device", "cpu", "--quiet",
        "--rewrite-max-tokens", "4", "--judge-max-new-tokens", "4", "--judge-max-pixels", "3136"]


def _upstream_step2_reads(edit_json: Path, prompts_json: Path, result_img_folder: Path, origin_img_root: Path) -> list:
    """What GPT-Image-Edit's step2_basic_bench.py (and ImgEdit's basic_bench.py) look up for each
    entry, as their process_single_item / call_gpt lines do: the output, the original, the prompt."""
    prompts = json.loads(prompts_json.read_text())
    opened = []
    for key, item in json.loads(edit_json.read_text()).items():
        prompt = prompts[item["edit_type"]]  # a KeyError here is the failure the mapping prevents
        opened.append((os.path.join(result_img_folder, f"{key}.png"), os.path.join(origin_img_root, item["id"]), prompt))
    return opened


def test_paper_gpt_image_edit_protocol_plain_and_rewritten(tmp_path, gie_dir, kontext_dir, capsys):
    img_json, images = synthetic.write_imgedit(tmp_path / "ImgEdit", n=6)  # the 6th is an 'adjust' edit
    upstream = synthetic.write_gpt_image_edit_eval(tmp_path / "GPT-Image-Edit", img_json, gedit_n=2)
    out = tmp_path / "paper"
    argv = ["paper", "--protocol", "gpt-image-edit", "--upstream", str(upstream), "--imgedit", str(tmp_path / "ImgEdit"),
            "--gedit", str(upstream / "gedit-asset"), "-o", str(out), "--judge", str(gie_dir),
            "--model", str(gie_dir), "--kontext", str(kontext_dir), *FAST]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "protocol gpt-image-edit: GPT-Image-Edit's own prompt files" in captured.err and "geometry paper" in captured.err
    for name in ("imgedit", "imgedit-rewritten", "gedit", "gedit-rewritten"):
        run = json.loads((out / name / "_gie_eval" / "run.json").read_text())
        assert run["settings"]["geometry"] == "paper" and run["settings"]["rewrite"] == name.endswith("rewritten")
        assert (out / name / "_gie_eval" / "scores" / "scores.json").is_file()
    assert json.loads((out / "imgedit" / "_gie_eval" / "run.json").read_text())["data"] == str(
        upstream / "univa/eval/imgedit/eval_prompts/basic_edit.json")
    assert sorted(p.name for p in (out / "imgedit").glob("*.png")) == [f"{100 + i}.png" for i in range(6)]
    # GEdit in its scorers' layout, the source its gedit-asset holds beside each output
    for row in json.loads((upstream / "univa/eval/gedit/gedit_edit.json").read_text()).values():
        assert (out / "gedit" / row["id"]).is_file()
        assert (out / "gedit" / row["id"].replace(".png", "_SRCIMG.png")).read_bytes() == (
            upstream / "gedit-asset" / row["id"].replace(".png", "_SRCIMG.png")).read_bytes()

    # ImgEdit's scorer finds every image and a prompt for every edit type ('alter' here, as its files say)
    files = out / "imgedit" / "_gie_eval" / "upstream"
    reads = _upstream_step2_reads(files / "edit.json", files / "prompts.json", out / "imgedit", images)
    assert len(reads) == 6 and all(Path(o).is_file() and Path(src).is_file() for o, src, _ in reads)
    assert {e["edit_type"] for e in json.loads((files / "edit.json").read_text()).values()} >= {"alter"}

    md = (out / "paper.md").read_text()
    assert md.strip() in captured.out  # the table is printed as written
    assert "Protocol: **gpt-image-edit**" in md
    assert "| | Add | Adjust | Extract | Replace | Remove | Background | Style | Hybrid | Action | Overall |" in md
    assert "| paper: GPT-Image-Edit | 4.07 | 3.79 | 2.04 | 4.13 | 3.89 | 3.90 | 4.84 | 3.04 | 4.52 | 3.80 |" in md
    assert "| paper: GPT-Image-Edit, rewritten | — | — | — | — | — | — | — | — | — | 3.90 |" in md
    assert "| BG Change | Color Alt. |" in md and "| paper: GPT-Image-Edit | 7.80 | 7.54 |" in md and "7.66 |" in md
    assert md.count("| ours: plain |") == 2 and md.count("| ours: rewritten |") == 2
    assert f"not comparable: judged by {Path(gie_dir).resolve()}; the paper's figures by GPT-4.1" in md
    table = json.loads((out / "paper.json").read_text())["tables"]["imgedit"]
    assert table["columns"][-1] == "Overall" and [r[0] for r in table["rows"]] == [
        "paper: GPT-Image-Edit", "ours: plain", "paper: GPT-Image-Edit, rewritten", "ours: rewritten"]

    # run again: everything is done, nothing is made or judged twice
    assert main(argv) == 0
    assert "0 made, 6 already done" in capsys.readouterr().err


def test_paper_benchmark_protocol_uses_the_current_files_and_says_so(tmp_path, gie_dir, kontext_dir, capsys):
    synthetic.write_imgedit(tmp_path / "ImgEdit", n=2)
    out = tmp_path / "paper"
    assert main(["paper", "--protocol", "benchmark", "--imgedit", str(tmp_path / "ImgEdit"), "--variants", "plain",
                 "-o", str(out), "--judge", str(gie_dir), "--kontext", str(kontext_dir), *FAST]) == 0
    assert "protocol benchmark: the benchmarks' current files" in capsys.readouterr().err
    run = json.loads((out / "imgedit" / "_gie_eval" / "run.json").read_text())
    assert run["data"].endswith("Benchmark/singleturn/singleturn.json") and run["settings"]["geometry"] == "ours"
    assert sorted(p.name for p in out.iterdir()) == ["imgedit", "paper.json", "paper.md"]
    md = (out / "paper.md").read_text()
    assert "Protocol: **benchmark**" in md and "the benchmark's current files, not the copy GPT-Image-Edit scored" in md
    assert (out / "imgedit" / "_gie_eval" / "upstream" / "prompts.json").read_text() == (
        tmp_path / "ImgEdit" / "Benchmark" / "singleturn" / "judge_prompt.json").read_text()


def test_paper_refuses_bad_inputs_before_anything_is_written(tmp_path, gie_dir, kontext_dir, capsys):
    synthetic.write_imgedit(tmp_path / "ImgEdit", n=1)
    out = tmp_path / "paper"
    base = ["paper", "-o", str(out), "--judge", str(gie_dir), "--kontext", str(kontext_dir), *FAST]
    cases = [
        (["--protocol", "gpt-image-edit", "--imgedit", str(tmp_path / "ImgEdit")], "give --upstream, its checkout"),
        (["--protocol", "gpt-image-edit", "--upstream", str(tmp_path), "--imgedit", str(tmp_path / "ImgEdit")],
         "has no univa/eval/imgedit/eval_prompts/basic_edit.json"),
        (["--protocol", "benchmark"], "give --imgedit"),
        (["--protocol", "benchmark", "--imgedit", str(tmp_path)], "has no Benchmark/singleturn/singleturn.json"),
        (["--protocol", "benchmark", "--imgedit", str(tmp_path / "ImgEdit"), "--variants", "thinking"], "variant 'thinking'"),
        (["--protocol", "benchmark", "--imgedit", str(tmp_path / "ImgEdit")], "--rewrite needs"),  # rewritten without --model
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
        assert not out.exists()


def test_imgedit_scorer_files_name_edit_types_as_the_prompts_do(tmp_path):
    """GPT-Image-Edit's step2 with its prompts.json ('alter') on today's benchmark ('adjust') stopped
    with KeyError 'adjust': the edit.json written for a run names each type as its prompts file does."""
    img_json, _ = synthetic.write_imgedit(tmp_path / "ImgEdit", n=6)
    upstream = synthetic.write_gpt_image_edit_eval(tmp_path / "GPT-Image-Edit", img_json, gedit_n=0)
    prompts = upstream / "univa/eval/imgedit/eval_prompts/prompts.json"
    run = PaperRun("imgedit", "plain", str(img_json), None, tmp_path / "run")
    files = imgedit_scorer_files(run, ["105", "100"], prompts)
    entries = json.loads(files["edit_json"].read_text())
    assert list(entries) == ["105", "100"] and entries["105"]["edit_type"] == "alter"  # was 'adjust'
    assert entries["100"] == json.loads(img_json.read_text())["100"]
    _upstream_step2_reads(files["edit_json"], files["prompts_json"], tmp_path, tmp_path)  # no KeyError
    assert set(PROTOCOLS) == {"gpt-image-edit", "benchmark"} and set(PAPER) == {"imgedit", "gedit"}


def test_our_scores_fill_the_papers_columns():
    """Categories land in the paper's columns: 'alter' (GPT-Image-Edit's name) and 'adjust' fill
    Adjust, 'compose' fills Hybrid; the last column is the report's overall (mean of categories)."""
    report = {"categories": {"add": {"overall": 4.0}, "alter": {"overall": 3.0}, "compose": {"overall": 2.0},
                             "style": {"overall": None}}, "overall": {"overall": 3.0}}
    rows = dict(paper_rows(PAPER["imgedit"], {"plain": report}))
    assert rows["ours: plain"] == [4.0, 3.0, None, None, None, None, None, 2.0, None, 3.0]
    assert "ours: rewritten" not in rows and rows["paper: GPT-Image-Edit"][-1] == 3.80


def test_paper_shards_under_accelerate_as_generate_and_score_do(tmp_path, gie_dir, kontext_dir):
    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.exists():
        pytest.skip("the accelerate launcher is not installed next to this Python")
    synthetic.write_imgedit(tmp_path / "ImgEdit", n=3)
    out = tmp_path / "paper"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "gie_core.cli.eval", "paper", "--protocol", "benchmark",
           "--imgedit", str(tmp_path / "ImgEdit"), "--variants", "plain", "-o", str(out), "--judge", str(gie_dir),
           "--kontext", str(kontext_dir), *[a for a in FAST if a != "cpu" and a != "--device"]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = out / "imgedit" / "_gie_eval"
    made = {f.name: [json.loads(x)["key"] for x in f.read_text().splitlines()] for f in (logs / "logs").glob("*.jsonl")}
    judged = {f.name: [json.loads(x)["key"] for x in f.read_text().splitlines()] for f in (logs / "scores").glob("*.jsonl")}
    assert made == {"generate.rank0.jsonl": ["100", "102"], "generate.rank1.jsonl": ["101"]}
    assert judged == {"judgements.rank0.jsonl": ["100", "102"], "judgements.rank1.jsonl": ["101"]}
    assert proc.stdout.count("## ImgEdit-Full") == 1  # the table once, from the main process
    assert json.loads((logs / "scores" / "scores.json").read_text())["counts"]["samples"] == 3
