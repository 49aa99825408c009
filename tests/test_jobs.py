"""Many edits, one load (``gie-edit --jobs``): job lists, one encoding per job for all its seeds,
atomic outputs, and a rerun that resumes after a kill without ever leaving a partial output."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gie_core.cli.edit import main
from gie_core.engine.jobs import parse_seeds, plan_outputs, read_jobs, run_jobs

COMMON = ["--steps", "2", "--size", "64x48", "--reference-size", "keep", "--dtype", "fp32", "--device", "cpu", "--quiet"]


def _photo(path: Path, seed: int) -> Path:
    Image.fromarray((np.random.RandomState(seed).rand(48, 64, 3) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "jobs"
    d.mkdir()
    for i, text in enumerate(("add a red hat", "make it winter")):
        _photo(d / f"img{i}.png", i)
        (d / f"img{i}.txt").write_text(text + "\n")
    return d


def test_job_lists_in_every_form(tmp_path, folder):
    jobs = read_jobs(folder, default_seeds=(5,))
    assert [(j.image.name, j.instruction, j.seeds, j.name) for j in jobs] == [
        ("img0.png", "add a red hat", (5,), "img0"), ("img1.png", "make it winter", (5,), "img1")]
    lines = [{"image": "jobs/img0.png", "instruction": "add a hat", "seeds": [1, 2]},
             {"image": "jobs/img0.png", "instruction": "add a scarf", "seed": 3},
             {"image": "jobs/img1.png", "instruction": "snow", "name": "winter", "negative": "blurry"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    (tmp_path / "a.json").write_text(json.dumps(lines))
    (tmp_path / "a.tsv").write_text("# image\tinstruction\tseeds\njobs/img0.png\tadd a hat\t1,2\n"
                                    "jobs/img0.png\tadd a scarf\t3\njobs/img1.png\tsnow\n")
    for name in ("a.jsonl", "a.json", "a.tsv"):
        jobs = read_jobs(tmp_path / name, default_seeds=(42,))
        assert [j.seeds for j in jobs] == [(1, 2), (3,), (42,)]
        assert [j.name for j in jobs][:2] == ["img0", "img0-2"]  # the same image twice: unique names
        assert jobs[0].image == folder / "img0.png"  # relative to the list's folder
    assert read_jobs(tmp_path / "a.jsonl")[2].negative == "blurry"
    assert [p.paths[0].name for p in plan_outputs(read_jobs(tmp_path / "a.jsonl"), tmp_path / "out")] == [
        "img0_s1.png", "img0_s2.png", "img0-2_s3.png", "winter_s42.png"]
    assert parse_seeds("0-3,7") == (0, 1, 2, 3, 7)


@pytest.mark.parametrize("content, message", [
    ('{"image": "x.png"}\n', "a.jsonl:1: 'instruction' must be a non-empty text"),
    ('{"image": "x.png", "instruction": "hat", "seeds": "1,1"}\n', "a.jsonl:1: seeds repeat a seed"),
    ('{"image": "x.png", "instruction": "hat", "steps": 3}\n', "a.jsonl:1: unknown field(s) steps"),
    ('\n{"image": "x.png", "instruction": "hat", "seed": -1}\n', "a.jsonl:2: seeds is -1 but must be in"),
    ("not json\n", "a.jsonl:1 is not valid JSON"),
])
def test_malformed_jobs_are_named_by_file_and_line(tmp_path, content, message):
    (tmp_path / "a.jsonl").write_text(content)
    with pytest.raises(ValueError) as err:
        read_jobs(tmp_path / "a.jsonl")
    assert message in str(err.value)


def test_each_job_is_encoded_once_for_all_its_seeds_and_matches_a_single_edit(tmp_path, folder, kontext_dir):
    from gie_core.imaging.images import load_image
    from gie_core.engine.pipeline import EditPipeline
    from gie_core.engine.request import resolve_edit

    pipe = EditPipeline.from_paths(kontext_dir=kontext_dir, mode="t5", dtype="fp32", device="cpu")
    encodes = []
    original = pipe.conditioning
    pipe.conditioning = lambda *a, **k: (encodes.append(a[1]), original(*a, **k))[1]
    jobs = read_jobs(folder, default_seeds=(1, 2, 3))
    requests = {j: resolve_edit(image_width=64, image_height=48, mode="t5", steps=2, width=64, height=48,
                                reference_resize="keep") for j in jobs}
    plan = plan_outputs(jobs, tmp_path / "out")
    steps = []
    saved = []
    assert run_jobs(pipe, plan, requests, load_image=lambda j: load_image(j.image), save=lambda im, p: (
        p.parent.mkdir(exist_ok=True), im.save(p), saved.append(p)), progress=lambda d, t: steps.append((d, t))) == 6
    assert sorted(encodes) == ["add a red hat", "make it winter"]  # once per job, not per seed
    assert steps[-1] == (12, 12) and all(b[0] >= a[0] for a, b in zip(steps, steps[1:]))  # one bar across jobs
    single = pipe.edit(load_image(folder / "img1.png"), "make it winter", request=dataclasses.replace(requests[jobs[1]], seed=2))
    assert np.array_equal(np.asarray(single.images[0]), np.asarray(Image.open(tmp_path / "out" / "img1_s2.png")))
    # everything exists: nothing runs
    assert run_jobs(pipe, plan, requests, load_image=lambda j: pytest.fail("loaded"), save=lambda *a: None) == 0


def test_cli_jobs_skip_finished_outputs_without_loading(tmp_path, folder, kontext_dir, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ["--jobs", str(folder), "-o", str(out), "--kontext", str(kontext_dir), "--mode", "t5", "--seeds", "1,2", *COMMON]
    assert main(args) == 0
    made = sorted(p.name for p in out.iterdir())
    assert made == ["img0_s1.png", "img0_s2.png", "img1_s1.png", "img1_s2.png"]
    assert capsys.readouterr().out.split() == [str(out / n) for n in ("img0_s1.png", "img0_s2.png", "img1_s1.png", "img1_s2.png")]
    from gie_core.engine.pipeline import EditPipeline

    monkeypatch.setattr(EditPipeline, "from_paths", lambda *a, **k: pytest.fail("weights were loaded"))
    assert main(args) == 0
    assert "4 of 4 outputs exist already" in capsys.readouterr().err


def test_cli_bad_job_exits_2_before_loading(tmp_path, folder, kontext_dir, monkeypatch, capsys):
    from gie_core.engine.pipeline import EditPipeline

    monkeypatch.setattr(EditPipeline, "from_paths", lambda *a, **k: pytest.fail("weights were loaded"))
    (tmp_path / "bad.tsv").write_text("jobs/img0.png\tadd a hat\njobs/missing.png\tadd a hat\n")
    rc = main(["--jobs", str(tmp_path / "bad.tsv"), "-o", str(tmp_path / "out"), "--kontext", str(kontext_dir), *COMMON])
    err = capsys.readouterr().err
    assert rc == 2 and "bad.tsv:2" in err and "missing.png" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    rc = main(["--jobs", str(folder), "-o", str(tmp_path / "o.png"), "--kontext", str(kontext_dir), *COMMON])
    assert rc == 2 and "-o is the output folder" in capsys.readouterr().err


def test_a_save_interrupted_mid_write_leaves_no_partial_output_and_a_rerun_completes(tmp_path, folder, kontext_dir,
                                                                                      monkeypatch):
    import gie_core.cli.edit as edit_cli

    out = tmp_path / "out"
    args = ["--jobs", str(folder), "-o", str(out), "--kontext", str(kontext_dir), "--mode", "t5", "--seeds", "1,2", *COMMON]
    real_save = edit_cli.save_image
    calls = []

    def save_then_die(image, path):
        calls.append(path)
        if len(calls) == 3:  # the third output: killed while writing
            from gie_core.files import atomic_write

            def half(tmp):
                tmp.write_bytes(b"\x89PNG half")
                raise KeyboardInterrupt

            atomic_write(path, half)
        real_save(image, path)

    monkeypatch.setattr(edit_cli, "save_image", save_then_die)
    assert main(args) == 130
    assert sorted(os.listdir(out)) == ["img0_s1.png", "img0_s2.png"]  # complete files only, no temporaries
    first = (out / "img0_s1.png").read_bytes()
    monkeypatch.setattr(edit_cli, "save_image", real_save)
    assert main(args) == 0
    assert sorted(os.listdir(out)) == ["img0_s1.png", "img0_s2.png", "img1_s1.png", "img1_s2.png"]
    assert (out / "img0_s1.png").read_bytes() == first  # kept, not made again


def test_cli_jobs_resume_after_kill_9(tmp_path, folder, kontext_dir):
    """A real kill (SIGKILL, no cleanup possible) while editing: every output present is a complete
    image, and the rerun makes exactly the missing ones and sweeps leftover temporaries."""
    out = tmp_path / "out"
    seeds = "1-6"
    cmd = [sys.executable, "-m", "gie_core.cli.edit", "--jobs", str(folder), "-o", str(out), "--kontext",
           str(kontext_dir), "--mode", "t5", "--seeds", seeds, *COMMON, "--steps", "8"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if out.is_dir() and len([p for p in out.iterdir() if p.suffix == ".png"]) >= 2:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    kept = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}
    assert 2 <= len(kept) < 12
    for name in kept:
        with Image.open(out / name) as im:
            im.load()  # complete, decodable images only
    (out / ".img1_s6.png.deadbeef.png.partial").write_bytes(b"left by a kill")  # as a kill mid-write leaves
    assert main(cmd[3:]) == 0
    final = sorted(os.listdir(out))
    assert final == sorted(f"img{i}_s{s}.png" for i in range(2) for s in range(1, 7))  # no temporaries left
    assert all((out / n).read_bytes() == b for n, b in kept.items())


# --- what a new user hits -----------------------------------------------------------------------


def test_a_job_list_that_is_not_utf8_is_named_with_where(tmp_path, folder, kontext_dir, capsys):
    (tmp_path / "jobs.tsv").write_bytes("jobs/img0.png\tcaf\xe9 hat\n".encode("latin-1"))
    rc = main(["--jobs", str(tmp_path / "jobs.tsv"), "-o", str(tmp_path / "out"), "--kontext", str(kontext_dir), *COMMON])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"job list {tmp_path / 'jobs.tsv'} is not UTF-8 text: byte 0xe9 at line 1, column 18" in err
    (folder / "img1.txt").write_bytes("make it caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"instruction file .*img1.txt is not UTF-8 text: byte 0xe9 at line 1"):
        read_jobs(folder)


@pytest.mark.parametrize("seeds, message", [
    ("1-100000", "'1-100000' is 100000 seeds but at most 10000 are allowed (seeds are whole numbers from 0 to "),
    ("5-1", "'5-1' goes down; a range must go from low to high, e.g. 1-5"),
    ("1,3-2", "'3-2' goes down; a range must go from low to high, e.g. 2-3"),
])
def test_a_seed_range_says_the_limit_and_the_order(seeds, message):
    with pytest.raises(ValueError) as err:
        parse_seeds(seeds, "--seeds")
    assert f"--seeds '{seeds}': {message}" in str(err.value)
    from gie_core.constants import MAX_SEEDS

    assert len(parse_seeds(f"0-{MAX_SEEDS - 1}")) == MAX_SEEDS


def test_a_job_folder_reports_every_problem_at_once_before_loading(tmp_path, folder, kontext_dir, monkeypatch, capsys):
    from gie_core.engine.pipeline import EditPipeline

    monkeypatch.setattr(EditPipeline, "from_paths", lambda *a, **k: pytest.fail("weights were loaded"))
    _photo(folder / "img2.png", 2)  # no instruction file
    _photo(folder / "img3.png", 3)
    (folder / "img3.txt").write_text("  \n")  # an empty instruction
    (folder / "img4.png").write_bytes(b"not an image")
    (folder / "img4.txt").write_text("add a hat\n")
    rc = main(["--jobs", str(folder), "-o", str(tmp_path / "out"), "--kontext", str(kontext_dir), *COMMON])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"job list {folder} has 3 problems (nothing was run)" in err
    assert "img2.png has no instruction file img2.txt" in err and "img3.txt: the instruction is empty" in err
    assert f"{folder / 'img4.png'}: " in err
    (tmp_path / "bad.jsonl").write_text('{"image": "jobs/img0.png"}\nnot json\n'
                                        '{"image": "jobs/img1.png", "instruction": "x", "seeds": "5-1"}\n')
    with pytest.raises(ValueError) as info:
        read_jobs(tmp_path / "bad.jsonl")
    text = str(info.value)
    assert "has 3 problems" in text and "bad.jsonl:1: 'instruction'" in text and "bad.jsonl:2 is not valid JSON" in text
    assert "bad.jsonl:3: seeds '5-1'" in text


def test_a_given_name_is_never_renamed_and_automatic_names_avoid_it(tmp_path, folder):
    lines = [{"image": "jobs/img0.png", "instruction": "a"},
             {"image": "jobs/img0.png", "instruction": "b"},
             {"image": "jobs/img1.png", "instruction": "c", "name": "img0-2"},
             {"image": "jobs/img1.png", "instruction": "d", "name": "IMG0"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in lines[:3]) + "\n")
    assert [j.name for j in read_jobs(tmp_path / "a.jsonl")] == ["img0", "img0-3", "img0-2"]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert [j.name for j in read_jobs(tmp_path / "a.jsonl")][:3] == ["img0-3", "img0-4", "img0-2"]
    lines.append({"image": "jobs/img1.png", "instruction": "e", "name": "img0-2"})
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    with pytest.raises(ValueError, match=r"a.jsonl:5: output name 'img0-2' is given to .*a.jsonl:3 already"):
        read_jobs(tmp_path / "a.jsonl")


def test_ctrl_c_during_jobs_counts_what_was_written_and_where(tmp_path, folder, kontext_dir, monkeypatch, capsys):
    import gie_core.cli.edit as edit_cli

    out = tmp_path / "out"
    real_save = edit_cli.save_image
    calls = []

    def save_then_ctrl_c(image, path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real_save(image, path)

    monkeypatch.setattr(edit_cli, "save_image", save_then_ctrl_c)
    args = ["--jobs", str(folder), "-o", str(out), "--kontext", str(kontext_dir), "--mode", "t5", "--seeds", "1-3", *COMMON]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert f"interrupted after writing 2 of 6 images to {out}; run the same command again to resume" in err
    assert "no output written" not in err and len(os.listdir(out)) == 2


def test_a_full_disk_during_jobs_names_the_file_and_the_free_space(tmp_path, folder, kontext_dir, monkeypatch, capsys):
    import errno

    import gie_core.cli.edit as edit_cli
    from gie_core.files import atomic_write

    def full(tmp):
        tmp.write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(edit_cli, "save_image", lambda image, path: atomic_write(path, full))
    out = tmp_path / "out"
    assert main(["--jobs", str(folder), "-o", str(out), "--kontext", str(kontext_dir), "--mode", "t5", *COMMON]) == 1
    err = capsys.readouterr().err
    assert f"the disk is full (No space left on device): could not write '{out / 'img0_s42.png'}'" in err
    assert "free there" in err and "Traceback" not in err and os.listdir(out) == []
