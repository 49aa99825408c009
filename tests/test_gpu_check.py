"""``bench/gpu_check.py --tiny``: the GPU check's code paths run on the CPU with tiny models.

One run (a subprocess, as a user runs it) with one path forced to fail: every path is in the
JSON and the markdown table, the failure is recorded with its last traceback line and the paths
after it still ran, and ``pytest -m gpu`` ran and skipped the GPU tests with their reasons.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory, tiny_set):
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(out), "--tiny",
                           "--tiny-set", str(tiny_set.root), "--fail", "storage", "--pytest", "tests/test_gpu.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_every_path_is_recorded_and_a_failure_does_not_stop_the_rest(tiny_check):
    from gpu_check import PATHS

    report, md = tiny_check
    assert list(report["paths"]) == list(PATHS) and report["tiny"] is True
    failed = report["paths"]["storage"]
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: forced failure of storage (--fail)"
    for name, result in report["paths"].items():
        if name == "storage":
            continue
        assert result["status"] in ("ok", "skipped"), (name, result)
        if result["status"] == "skipped":
            assert "bitsandbytes" in result["reason"]  # the only paths the CPU skips: bnb is not installed here
    for name in PATHS:
        assert f"| {name} | {report['paths'][name]['status']} |" in md
    assert "| storage | failed |" in md and "forced failure of storage" in md


def test_the_paths_ran_through_the_projects_code(tiny_check):
    report, _ = tiny_check
    paths = report["paths"]
    assert paths["edit_peak"]["finite"] is True
    assert paths["edit_peak"]["phases"] == "Qwen encode,T5,CLIP,transformer,VAE encode,VAE decode"
    for name in ("train_stage2_24gb", "train_stage1_24gb", "block_swap"):
        assert paths[name]["loss_finite"] is True
        assert paths[name]["attention_kernels"] == "flash,efficient,math"  # the training default: no cuDNN
        assert paths[name]["peak_allocated_gib"] is None  # nothing is reserved on the CPU
    assert paths["attention"]["cudnn_training_backward"] == "not run: needs CUDA"
    assert paths["attention"]["cudnn"].startswith("unavailable: attention backend 'cudnn' is not available")
    sampling = paths["sampling"]
    assert {"ours_s", "diffusers_s", "magcache_psnr_db", "fbcache_s"} <= set(sampling)
    assert report["environment"]["allocator"].startswith("CUDA allocator: ")


def test_pytest_m_gpu_collects_the_gpu_tests_and_skips_them_on_the_cpu(tiny_check):
    report, md = tiny_check
    run = report["pytest"]
    assert run["exit_status"] == 0 and run["summary"].startswith("4 skipped")
    assert "pytest -m gpu" in run["command"] and run["summary"] in md
