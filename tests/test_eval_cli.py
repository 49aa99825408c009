"""gie-eval as a user runs it, on tiny synthetic benchmark folders and the tiny random models:
generate in each format, resume, a corrupt sample, seeds per sample, two processes under
accelerate, score with the tiny Qwen-VL judge, compare with tables and a picture grid."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gie_core.cli.eval import main
from gie_core.eval import synthetic

FAST = ["--steps", "1", "--size", "32x32", "--reference-size", "keep", "--dtype", "fp32", "--device", "cpu", "--quiet"]


def _records(out: Path) -> list[dict]:
    recs = []
    for f in sorted((out / "_gie_eval" / "logs").glob("generate.rank*.jsonl")):
        recs += [json.loads(line) for line in f.read_text().splitlines()]
    return recs


def _sets(root: Path) -> dict:
    img_json, img_root = synthetic.write_imgedit(root / "imgedit", n=2)
    return {
        "imgedit": ([str(img_json), "--images", str(img_root)], ["100.png", "101.png"]),
        "gedit": ([str(synthetic.write_gedit(root / "gedit", n=2))],
                  ["fullset/subject-add/en/g0000.png", "fullset/subject-remove/en/g0001.png"]),
        "complex-edit": ([str(synthetic.write_complex_edit(root / "cx", n=2))], ["00000.png", "00001.png"]),
        "omnicontext": ([str(synthetic.write_omnicontext(root / "omni", n=2))],
                        ["fullset/single_character/o0.png", "fullset/single_object/o1.png"]),
        "jsonl": ([str(synthetic.write_jsonl(root / "own", n=2))], ["s0.png", "s1.png"]),
    }


@pytest.mark.parametrize("name", ["imgedit", "gedit", "complex-edit", "omnicontext", "jsonl"])
def test_generate_each_benchmark_into_its_scorers_layout(tmp_path, name, gie_dir, kontext_dir, capsys):
    data, expected = _sets(tmp_path)[name]
    out = tmp_path / "run"
    extra = ["--rewrite", "--rewrite-max-tokens", "4"] if name == "imgedit" else []  # the "rewritten" configuration
    assert main(["generate", name, *data, "-o", str(out), "--model", str(gie_dir), "--kontext", str(kontext_dir),
                 *FAST, *extra]) == 0
    for rel in expected:
        with Image.open(out / rel) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
    recs = _records(out)
    assert sorted(r["output"] for r in recs) == sorted(expected) and {r["status"] for r in recs} == {"ok"}
    run = json.loads((out / "_gie_eval" / "run.json").read_text())
    assert run["benchmark"] == name and run["settings"]["mode"] == "vlm+t5" and run["settings"]["steps"] == 1
    if name == "imgedit":
        assert all("rewritten" in r for r in recs)  # the tiny model's rewrite falls back, and says so
    assert "2 made, 0 already done, 0 failed, of 2 samples" in capsys.readouterr().err


def test_resume_skips_done_samples_and_loads_nothing_when_all_are_done(tmp_path, kontext_dir, monkeypatch, capsys):
    data = synthetic.write_jsonl(tmp_path / "own", n=3)
    out = tmp_path / "run"
    args = ["generate", "jsonl", str(data), "-o", str(out), "--kontext", str(kontext_dir), *FAST]
    assert main([*args, "--limit", "2"]) == 0
    assert main(args) == 2  # the selection is part of the run: another one goes to another folder
    assert "holds a run with other settings (select:" in capsys.readouterr().err
    shutil.rmtree(out)
    assert main(args) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    (out / "s1.png").unlink()  # lost output: its record alone does not make it done
    capsys.readouterr()
    assert main(args) == 0
    assert "1 made, 2 already done" in capsys.readouterr().err
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert after["s0.png"] == before["s0.png"] and after["s2.png"] == before["s2.png"]

    from gie_core.engine.pipeline import EditPipeline

    def no_loading(*a, **k):
        raise AssertionError("weights were loaded although every sample was done")

    monkeypatch.setattr(EditPipeline, "from_paths", no_loading)
    assert main(args) == 0
    assert "0 made, 3 already done" in capsys.readouterr().err
    assert main([*args[:-len(FAST)], *FAST[:1], "2", *FAST[2:]]) == 2  # other steps: refused, not mixed in
    assert "steps: 1 -> 2" in capsys.readouterr().err


def test_a_corrupt_sample_is_recorded_and_the_rest_finish(tmp_path, kontext_dir, capsys):
    data = synthetic.write_jsonl(tmp_path / "own", n=4)
    (tmp_path / "own" / "images" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # truncated
    Image.new("RGB", (8, 8)).save(tmp_path / "own" / "images" / "2.png")  # below the 16 px minimum
    out = tmp_path / "run"
    args = ["generate", "jsonl", str(data), "-o", str(out), "--kontext", str(kontext_dir), *FAST]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "2 made, 0 already done, 2 failed" in err and "sample 's1' failed" in err
    recs = {r["key"]: r for r in _records(out)}
    assert recs["s0"]["status"] == recs["s3"]["status"] == "ok"
    assert recs["s1"]["status"] == "failed" and "damaged" in recs["s1"]["reason"] or "not an image" in recs["s1"]["reason"]
    assert recs["s2"]["status"] == "failed" and "16" in recs["s2"]["reason"]
    assert sorted(p.name for p in out.glob("*.png")) == ["s0.png", "s3.png"]
    synthetic.picture(1).save(tmp_path / "own" / "images" / "1.png")  # fixed: the next run retries it
    assert main(args) == 0
    assert "1 made, 2 already done, 1 failed" in capsys.readouterr().err


def test_a_sample_needing_more_references_than_a_turn_takes_is_recorded_not_squeezed(tmp_path, kontext_dir):
    """OmniContext's multi-image tasks run with Image 1 and Image 2 (issue 17); a sample with three
    input images is recorded as failed, naming the limit, and nothing is squeezed."""
    data = synthetic.write_omnicontext(tmp_path / "omni", n=2)  # multi0 reads images 0 and 1
    with open(data, "a") as f:
        f.write(json.dumps({"key": "multi3", "task_type": "multiple_object", "instruction": "All three together.",
                            "instruction_language": "en",
                            "input_images": ["images/0.png", "images/0.png", "images/0.png"]}) + "\n")
    out = tmp_path / "run"
    assert main(["generate", "omnicontext", str(data), "--task-types", "all", "-o", str(out), "--kontext", str(kontext_dir), *FAST]) == 0
    recs = {r["key"]: r for r in _records(out)}
    assert recs["o0"]["status"] == "ok" and (out / "fullset/single_character/o0.png").is_file()
    assert recs["multi0"]["status"] == "ok" and (out / "fullset/multiple_character/multi0.png").is_file()
    assert recs["multi3"]["status"] == "failed" and "3 input images" in recs["multi3"]["reason"]
    assert "at most 2" in recs["multi3"]["reason"] and not (out / "fullset/multiple_object/multi3.png").exists()


def test_seeds_belong_to_the_sample_not_the_run(tmp_path, kontext_dir):
    data = synthetic.write_jsonl(tmp_path / "own", n=4)
    whole, part = tmp_path / "whole", tmp_path / "part"
    base = ["generate", "jsonl", str(data), "--kontext", str(kontext_dir), *FAST]
    assert main([*base, "-o", str(whole)]) == 0
    assert main([*base, "-o", str(part), "--task-types", "global", "--geometry", "paper"]) == 0
    settings = json.loads((part / "_gie_eval" / "run.json").read_text())["settings"]
    assert (settings["geometry"], settings["reference_resample"]) == ("paper", "nearest")
    assert sorted(p.name for p in part.glob("*.png")) == ["s1.png", "s3.png"]
    assert main([*base, "-o", str(part), "--task-types", "global"]) == 2  # resuming needs the same geometry
    part2 = tmp_path / "part2"
    assert main([*base, "-o", str(part2), "--task-types", "global"]) == 0  # s1, s3 only, in other positions
    for name in ("s1.png", "s3.png"):
        assert np.array_equal(np.asarray(Image.open(whole / name)), np.asarray(Image.open(part2 / name)))
    assert not np.array_equal(np.asarray(Image.open(whole / "s1.png")), np.asarray(Image.open(whole / "s3.png")))


def test_bad_inputs_exit_2_before_loading(tmp_path, kontext_dir, capsys):
    data = synthetic.write_jsonl(tmp_path / "own", n=1)
    cases = [
        (["generate", "jsonl", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o"), "--kontext", str(kontext_dir)], "does not exist"),
        (["generate", "jsonl", str(data), "-o", str(tmp_path / "o")], "give the weights"),
        (["generate", "jsonl", str(data), "-o", str(tmp_path / "o"), "--kontext", str(kontext_dir), "--steps", "0"], "steps"),
        (["generate", "jsonl", str(data), "-o", str(tmp_path / "o"), "--kontext", str(kontext_dir), "--rewrite"], "--rewrite needs"),
        (["score", str(tmp_path / "o2")], "does not exist"),
        (["compare", str(tmp_path), "-o", str(tmp_path / "c")], "two or more"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_two_processes_under_accelerate_split_the_set_without_overlap(tmp_path, kontext_dir):
    data = synthetic.write_jsonl(tmp_path / "own", n=5)
    out = tmp_path / "run"
    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.exists():
        pytest.skip("the accelerate launcher is not installed next to this Python")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    # accelerate's process launcher (torch.distributed.run); without a GPU the processes meet over gloo
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "gie_core.cli.eval", "generate", "jsonl", str(data), "-o", str(out),
           "--kontext", str(kontext_dir), "--steps", "1", "--size", "32x32", "--reference-size", "keep", "--dtype", "fp32"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_rank = {}
    for f in (out / "_gie_eval" / "logs").glob("generate.rank*.jsonl"):
        by_rank[f.name] = [json.loads(line)["key"] for line in f.read_text().splitlines()]
    assert sorted(by_rank) == ["generate.rank0.jsonl", "generate.rank1.jsonl"]
    keys = by_rank["generate.rank0.jsonl"] + by_rank["generate.rank1.jsonl"]
    assert sorted(keys) == ["s0", "s1", "s2", "s3", "s4"] and len(set(keys)) == 5  # none missed, none twice
    assert by_rank["generate.rank0.jsonl"] == ["s0", "s2", "s4"]
    assert sorted(p.name for p in out.glob("*.png")) == [f"s{i}.png" for i in range(5)]
    assert "(process 1 of 2)" in proc.stderr and "(process 2 of 2)" in proc.stderr


def test_score_with_the_tiny_judge_then_compare_two_runs(tmp_path, gie_dir, kontext_dir, capsys):
    data = synthetic.write_jsonl(tmp_path / "own", n=3)
    runs = [tmp_path / "t5", tmp_path / "released"]
    base = ["generate", "jsonl", str(data), "--kontext", str(kontext_dir), *FAST]
    assert main([*base, "-o", str(runs[0]), "--mode", "t5"]) == 0
    assert main([*base, "-o", str(runs[1]), "--model", str(gie_dir)]) == 0
    (runs[1] / "s2.png").unlink()  # a run that lacks an output still compares
    judge = ["--judge", str(gie_dir), "--judge-max-new-tokens", "8", "--judge-max-pixels", "3136", "--dtype", "fp32",
             "--device", "cpu", "--similarity", "--quiet"]
    capsys.readouterr()
    for run in runs:
        assert main(["score", str(run), *judge]) == 0
    scores = runs[0] / "_gie_eval" / "scores"
    report = json.loads((scores / "scores.json").read_text())
    assert report["judge"] == str(Path(gie_dir).resolve()) and report["rubric"] == "viescore"
    assert report["metrics"] == ["semantics", "quality", "overall", "psnr_outside", "ssim_outside", "edited_fraction"]
    assert set(report["categories"]) == {"local", "global"} and report["counts"]["judged"] == 3
    assert report["counts"]["ok"] + report["counts"]["partial"] + report["counts"]["unparseable"] == 3
    recs = [json.loads(line) for line in (scores / "judgements.rank0.jsonl").read_text().splitlines()]
    assert all(set(r["answers"]) == {"semantics", "quality"} and isinstance(r["answers"]["semantics"]["raw"], str) for r in recs)
    assert (scores / "scores.csv").read_text().startswith("category,n,semantics,quality,overall")
    assert "| **overall** (mean of categories) |" in (scores / "scores.md").read_text()
    assert main(["score", str(runs[0]), *judge[:-2], "--rubric", "imgedit", "--quiet"]) == 2  # other judging: refused
    assert "rubric: 'viescore' -> 'imgedit'" in capsys.readouterr().err

    cmp = tmp_path / "cmp"
    assert main(["compare", *map(str, runs), "-o", str(cmp), "--names", "stock,released", "--grid", "3", "--cell", "64"]) == 0
    md = (cmp / "compare.md").read_text()
    assert "## overall" in md and "| category | stock | released |" in md and "| **overall** |" in md
    assert (cmp / "compare.csv").read_text().splitlines()[0] == "metric,category,stock,released"
    with Image.open(cmp / "grid.png") as grid:
        assert grid.width == 8 + 3 * (64 + 8)  # source + two runs
        rows = np.asarray(grid.convert("L"))
    assert rows.shape[0] > 2 * 64  # a header and two complete rows (s2 is missing in one run: not chosen)
    assert main(["compare", *map(str, runs), "-o", str(tmp_path / "cmp2"), "--grid-keys", "s2", "--cell", "48"]) == 0
    assert (tmp_path / "cmp2" / "grid.png").is_file()  # the missing output shows as a placeholder
    refused = tmp_path / "cmp3"
    assert main(["compare", *map(str, runs), "-o", str(refused), "--grid-keys", "nope"]) == 2
    assert "grid sample(s) nope are not in the instruction set" in capsys.readouterr().err
    assert not refused.exists()  # a refused comparison writes no tables either


# --------------------------------------------------------------------------------------------
# Nothing written outside the run folder; refused commands leave nothing behind
# --------------------------------------------------------------------------------------------


def _gedit_with(tmp_path: Path, **fields) -> Path:
    data = synthetic.write_gedit(tmp_path / "gedit", n=2)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[1].update(fields)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


@pytest.mark.parametrize("fields, message", [
    ({"task_type": "../../../victim"}, "GEdit row 1: task_type '../../../victim' cannot name an output folder"),
    ({"instruction_language": ".."}, "GEdit row 1: instruction_language '..' cannot name an output folder"),
    ({"key": "../../victim"}, "GEdit row 1: key '../../victim' cannot name an output file"),
])
def test_a_traversal_row_is_refused_and_nothing_is_written_outside_the_run(tmp_path, kontext_dir, capsys, fields, message):
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    for name in ("victim", "en", "fullset"):
        assert not (tmp_path / name).is_dir()
    data = _gedit_with(tmp_path, **fields)
    out = tmp_path / "deep" / "er" / "run"
    before = sorted(p for p in tmp_path.rglob("*"))
    assert main(["generate", "gedit", str(data), "--language", "all", "-o", str(out), "--kontext", str(kontext_dir), *FAST]) == 2
    assert message in capsys.readouterr().err
    assert victim.read_bytes() == b"precious"
    assert sorted(p for p in tmp_path.rglob("*")) == before  # not a file, not a folder, not the run folder


def test_a_symlinked_subfolder_pointing_outside_is_refused_before_anything_is_written(tmp_path, kontext_dir, capsys):
    data = synthetic.write_gedit(tmp_path / "gedit", n=2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "run"
    out.mkdir()
    try:
        (out / "fullset").symlink_to(elsewhere, target_is_directory=True)
    except OSError:
        pytest.skip("this filesystem cannot make symlinks")
    args = ["generate", "gedit", str(data), "-o", str(out), "--kontext", str(kontext_dir), *FAST]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "gedit sample 'g0000' (row 0): 'fullset/subject-add/en/g0000.png' resolves to" in err and "outside the folder" in err
    assert list(elsewhere.iterdir()) == [] and not (out / "_gie_eval").exists()
    (out / "fullset").unlink()
    assert main(args) == 0  # the refusal left nothing that would refuse the next run
    assert (out / "fullset/subject-add/en/g0000.png").is_file() and list(elsewhere.iterdir()) == []


def test_a_refused_generate_leaves_no_run_record(tmp_path, kontext_dir, capsys, monkeypatch):
    """Weights that cannot load (a wrong folder) refuse the run before run.json is written, so the
    corrected command runs instead of being refused for 'other settings'. (A run folder given
    relative to the working folder, as people type it.)"""
    data = synthetic.write_jsonl(tmp_path / "own", n=1)
    wrong = tmp_path / "not-kontext"
    wrong.mkdir()
    monkeypatch.chdir(tmp_path)
    out = Path("run")
    assert main(["generate", "jsonl", str(data), "-o", str(out), "--kontext", str(wrong), *FAST]) == 2
    assert "not-kontext" in capsys.readouterr().err
    assert not (out / "_gie_eval" / "run.json").exists()
    assert main(["generate", "jsonl", str(data), "-o", str(out), "--kontext", str(kontext_dir), *FAST]) == 0
    assert json.loads((out / "_gie_eval" / "run.json").read_text())["settings"]["weights"]["kontext"] == str(kontext_dir.resolve())
    assert (out / "s0.png").is_file() and (out / "_gie_eval" / "logs" / "generate.rank0.jsonl").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-kontext", "own", "run"]


def _bin_only(folder: Path, config: dict) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "pytorch_model.bin").write_bytes(b"a pickle that must never be loaded")
    return folder


def test_bin_only_judge_and_similarity_model_are_refused_through_the_cli(tmp_path, gie_dir, capsys):
    data = synthetic.write_jsonl(tmp_path / "own", n=1)
    run = tmp_path / "run"
    run.mkdir()
    stock = _bin_only(tmp_path / "qwen-bin", {"model_type": "qwen2_5_vl"})
    ckpt = tmp_path / "gie-bin"  # a GPT-Image-Edit checkpoint whose weights were saved as pickles
    shutil.copytree(gie_dir, ckpt)
    for f in list(ckpt.glob("*.safetensors*")):
        f.unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"a pickle")
    dino = _bin_only(tmp_path / "dino-bin", {"model_type": "dinov2"})
    base = ["score", str(run), "--benchmark", "jsonl", "--data", str(data), "--dtype", "fp32", "--device", "cpu", "--quiet"]
    for option, folder in (("--judge", stock), ("--judge", ckpt), ("--similarity-model", dino)):
        assert main([*base, option, str(folder)]) == 2
        err = capsys.readouterr().err
        assert f"{folder.name} holds its weights as .bin/.pt pickles only; only safetensors are read" in err, err
        assert not (run / "_gie_eval").exists()


def test_a_refused_score_leaves_no_state_and_the_next_score_runs(tmp_path, gie_dir, capsys):
    """A judge folder without config.json, or a bad judge option, is refused before anything is
    written: no scores/config.json stays behind to refuse the next, valid score."""
    path = synthetic.write_jsonl(tmp_path / "own", n=2)
    run = tmp_path / "run"
    run.mkdir()
    for s in ("s0", "s1"):
        shutil.copy(tmp_path / "own" / "images" / f"{s[1]}.png", run / f"{s}.png")
    empty = tmp_path / "no-config"
    empty.mkdir()
    base = ["score", str(run), "--benchmark", "jsonl", "--data", str(path), "--device", "cpu", "--quiet"]
    cases = [([*base, "--judge", str(empty)], "has no config.json"),
             ([*base, "--judge", str(empty), "--similarity"], "has no config.json"),
             ([*base, "--similarity-model", str(empty)], "must be a folder with config.json"),
             ([*base, "--judge", str(gie_dir), "--judge-max-pixels", "10"], "judge max pixels is 10 but must be at least 784")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
        assert not (run / "_gie_eval").exists()
    assert main([*base, "--similarity"]) == 0
    scores = run / "_gie_eval" / "scores"
    assert json.loads((scores / "config.json").read_text())["judge"] is None
    assert json.loads((scores / "scores.json").read_text())["counts"]["judged"] == 2


def _gedit_set_with_distinct_sources(root: Path) -> tuple[Path, list[dict]]:
    """A GEdit JSONL set whose ``input_image`` (what the scorers compare with) differs from
    ``input_image_raw`` (what is edited), with en and cn rows."""
    rows = synthetic.gedit_rows(5, embed=False, root=root)
    for i, row in enumerate(rows):
        synthetic.picture(20 + i).save(root / "images" / f"src{i}.png")
        row["input_image"] = f"images/src{i}.png"
    path = root / "gedit.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def _upstream_gedit_reads(rows: list[dict], save_path: Path, source_path: Path, languages: tuple) -> set[Path]:
    """The files GEdit's own scorers open for these rows: Step1X-Edit's test_gedit_score.py (every
    row; source_path = save_path = SAVE/MODEL) and GPT-Image-Edit's step2_gedit_bench.py (English
    rows; --source_path and --save_path), both formatted as their lines do."""
    files = set()
    for item in rows:
        if item["instruction_language"] not in languages:
            continue
        group, lang, key = item["task_type"], item["instruction_language"], item["key"]
        files.add(Path(f"{source_path}/fullset/{group}/{lang}/{key}_SRCIMG.png"))
        files.add(Path(f"{save_path}/fullset/{group}/{lang}/{key}.png"))
    return files


def test_gedit_run_holds_exactly_the_files_its_own_scorers_open(tmp_path, kontext_dir, monkeypatch, capsys):
    data, rows = _gedit_set_with_distinct_sources(tmp_path / "set")
    out = tmp_path / "eval" / "gedit"
    args = ["generate", "gedit", str(data), "-o", str(out), "--kontext", str(kontext_dir), "--language", "all", *FAST]
    assert main(args) == 0
    written = {p for p in out.rglob("*") if p.is_file() and "_gie_eval" not in p.relative_to(out).parts}
    # Step1X-Edit: --save_path eval --model_name gedit reads eval/gedit/fullset/... for every row
    step1x = _upstream_gedit_reads(rows, tmp_path / "eval" / "gedit", tmp_path / "eval" / "gedit", ("en", "cn"))
    assert written == step1x  # file for file: nothing missing, nothing extra (no temporary files left)
    # GPT-Image-Edit: --save_path eval/gedit --source_path eval/gedit, English rows
    assert _upstream_gedit_reads(rows, out, out, ("en",)) <= written
    for i, row in enumerate(rows):
        src = out / "fullset" / row["task_type"] / row["instruction_language"] / f"{row['key']}_SRCIMG.png"
        with Image.open(src) as im, Image.open(tmp_path / "set" / "images" / f"src{i}.png") as want:
            assert im.format == "PNG" and np.array_equal(np.asarray(im.convert("RGB")), np.asarray(want.convert("RGB")))

    # resumable like the outputs: a lost source copy comes back without loading any model
    lost = next(p for p in written if p.name.endswith("_SRCIMG.png"))
    before = {p: p.stat().st_mtime_ns for p in written if p != lost}
    lost.unlink()
    from gie_core.engine.pipeline import EditPipeline

    def no_loading(*a, **k):
        raise AssertionError("weights were loaded although every output was done")

    monkeypatch.setattr(EditPipeline, "from_paths", no_loading)
    capsys.readouterr()
    assert main(args) == 0
    assert "0 made, 5 already done" in capsys.readouterr().err
    assert lost.is_file() and {p: p.stat().st_mtime_ns for p in before} == before

    # gie-eval score reports the Intersection subset for GEdit runs (rows 1 and 3 are flagged)
    assert main(["score", str(out), "--similarity", "--device", "cpu", "--quiet"]) == 0
    report = json.loads((out / "_gie_eval" / "scores" / "scores.json").read_text())
    inter = report["subsets"]["intersection"]
    assert inter["samples"] == 2 and inter["judged"] == 2 and set(inter["overall"]) == set(report["metrics"])
