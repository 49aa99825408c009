"""Reserved GPU memory: gie-train's allocator setting (set, or the user's kept), the margin
``gie-train plan`` assumes between allocated and reserved memory, and the trainer's log of both
peaks ("none" on the CPU)."""

from __future__ import annotations

import logging
import os
import re

import pytest

from gie_core.cli.train import main as train_main
from gie_core.train.allocator import ALLOCATOR_SETTING, RESERVED_MARGIN, configure_allocator
from gie_core.train.memory import GIB, PeakMemory
from gie_core.train.trainer import Trainer

from test_train import make_config, write_dataset


def test_the_allocator_setting_is_set_when_the_user_has_none():
    env = {"PATH": "/bin"}
    said = configure_allocator(env)
    assert env["PYTORCH_ALLOC_CONF"] == ALLOCATOR_SETTING == "expandable_segments:True"  # torch >= 2.9's name
    assert "PYTORCH_CUDA_ALLOC_CONF" not in env
    assert said.startswith("CUDA allocator: set PYTORCH_ALLOC_CONF=expandable_segments:True")


@pytest.mark.parametrize("name", ["PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"])
def test_the_users_own_allocator_setting_is_kept_and_named(name):
    env = {name: "max_split_size_mb:512"}
    said = configure_allocator(env)
    assert env == {name: "max_split_size_mb:512"}
    assert said.startswith(f"CUDA allocator: kept your {name}=max_split_size_mb:512")


def test_gie_train_sets_it_before_a_run_and_logs_it(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "")  # restored (removed) after the test
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    with caplog.at_level(logging.INFO, logger="gie_core.train"), pytest.raises(SystemExit) as exc:
        train_main(["export", "--output_dir", str(tmp_path)])  # refused (no model.kontext) after the setting
    assert exc.value.code == 2
    assert os.environ["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    assert "CUDA allocator: set PYTORCH_ALLOC_CONF=expandable_segments:True" in caplog.text


def test_plan_states_the_margin_between_allocated_and_reserved(capsys):
    assert train_main(["plan", "training/stage1.yaml", "training/24gb_stage1.yaml", "--budget", "24GB"]) == 0
    out = capsys.readouterr().out
    peak = float(re.search(r"peak: (\d+\.\d+) GiB", out).group(1))
    reserved = float(re.search(r"reserved: about (\d+\.\d+) GiB, the margin assumed between allocated and reserved "
                               r"memory being 10% of the peak \(gie-train sets expandable_segments:True", out).group(1))
    assert RESERVED_MARGIN == 0.10
    assert reserved == pytest.approx(peak * 1.10, abs=0.011)
    assert "fits a 24 GiB budget" in out
    assert train_main(["plan", "training/stage1.yaml", "--device", "cpu"]) == 0
    assert "reserved: about" not in capsys.readouterr().out  # nothing is reserved on the CPU


def test_the_peak_line_names_both_peaks():
    assert str(PeakMemory(int(17.29 * GIB), int(25.35 * GIB))) == \
        "peak GPU memory 17.29 GiB allocated, 25.35 GiB reserved (reserved/allocated 1.47)"


def test_a_cpu_run_logs_that_no_gpu_memory_was_used(tmp_path, kontext_dir, gie_dir, caplog):
    data_txt = write_dataset(tmp_path / "data", [(64, 64)])
    cfg = make_config(tmp_path / "run", kontext_dir, gie_dir, data_txt, **{"log.every": 1, "train.max_steps": 1})
    with caplog.at_level(logging.INFO, logger="gie_core.train"):
        result = Trainer(cfg).train()
    assert result.peak_memory is None
    assert re.search(r"step 1: loss [0-9.e-]+, .*; peak GPU memory: none \(this run trains on cpu\)", caplog.text)
    assert "finished training: peak GPU memory: none (this run trains on cpu)" in caplog.text
