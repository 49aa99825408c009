"""Several processes: a run on N processes with data.batch_size B trains what one process with N x B
trains, its checkpoint resumes on another number of processes, and the sharded engines say what
they cannot do.

Two CPU processes talk over gloo (``torchrun``; accelerate then runs plain data parallel,
MULTI_CPU). accelerate 1.15 enables DeepSpeed and FSDP only on accelerators: on CPUs it refuses
FSDP and runs a DeepSpeed config as plain data parallel, so the ZeRO-2 / FSDP comparisons need
two GPUs and are skipped here with that reason; what *is* tested on the CPU is that the trainer
says so instead of silently training something else.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gie_core.train import checkpoint as ckpt
from gie_core.train.engine import check_resharding
from gie_core.train.trainer import Trainer

from test_train import make_config, read_tensors, write_dataset

ROOT = Path(__file__).resolve().parents[1]
ENGINES_NEED_GPUS = ("accelerate 1.15 runs DeepSpeed and FSDP only on accelerators (on CPUs it refuses FSDP and "
                     "trains a DeepSpeed config as plain data parallel): a 2-process ZeRO-2 / FSDP run needs 2 GPUs")


@pytest.fixture(scope="module")
def data_txt(tmp_path_factory):
    # three buckets, one of them a single pair: global batches of 2, 1 and 1 (a stand-in pair on the
    # process a one-pair batch does not reach)
    return write_dataset(tmp_path_factory.mktemp("data"), [(64, 64), (96, 64), (64, 64), (64, 96), (64, 64)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def launch(cfg, tmp_path, *launcher) -> subprocess.CompletedProcess:
    config = tmp_path / f"{Path(cfg.output_dir).name}.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    return subprocess.run([sys.executable, "-m", *launcher, "-m", "gie_core.cli.train", "--config", str(config)],
                          env=_env(), capture_output=True, text=True, timeout=300)


def torchrun(n: int) -> tuple[str, ...]:
    return ("torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1", "--master_port", str(_free_port()))


def test_two_processes_train_what_one_does_and_the_checkpoint_resumes_on_one(tmp_path, kontext_dir, gie_dir, data_txt):
    """Two processes with batch 1 (DDP over gloo, an fp8 frozen transformer that DDP leaves alone)
    reach the weights one process with batch 2 reaches; then one process resumes the two-process
    checkpoint and ends where an uninterrupted one-process run ends."""
    opts = {"optim.lr": 1e-2, "memory.transformer_dtype": "fp8", "checkpoint.every": 2, "train.max_steps": 4}
    one = Trainer(make_config(tmp_path / "one", kontext_dir, gie_dir, data_txt, **{**opts, "data.batch_size": 2})).train()

    two = make_config(tmp_path / "two", kontext_dir, gie_dir, data_txt, **{**opts, "data.batch_size": 1, "train.max_steps": 2})
    out = launch(two, tmp_path, *torchrun(2))
    assert out.returncode == 0, out.stderr[-3000:]
    state = ckpt.read_state(tmp_path / "two/checkpoints/checkpoint-2")
    assert (state["num_processes"], state["distributed_type"], state["global_batch"]) == (2, "MULTI_CPU", 2)
    a = read_tensors(tmp_path / "one/checkpoints/checkpoint-2" / ckpt.TRAINABLE_FILE)
    b = read_tensors(tmp_path / "two/checkpoints/checkpoint-2" / ckpt.TRAINABLE_FILE)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5

    # the two-process checkpoint, resumed by one process with the same global batch
    resumed = Trainer(make_config(tmp_path / "two", kontext_dir, gie_dir, data_txt, **{
        **opts, "data.batch_size": 2, "checkpoint.resume": "latest"})).train()
    assert resumed.step == 4
    assert resumed.losses == pytest.approx(one.losses[2:], abs=1e-5, rel=0)
    a, b = read_tensors(one.checkpoint / ckpt.TRAINABLE_FILE), read_tensors(resumed.checkpoint / ckpt.TRAINABLE_FILE)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    # another global batch cannot continue it, and says which batch size would
    with pytest.raises(ValueError, match=r"global batch of 2 .* set data\.batch_size 2 to resume on 1 processes"):
        Trainer(make_config(tmp_path / "two", kontext_dir, gie_dir, data_txt, **{
            **opts, "data.batch_size": 1, "checkpoint.resume": str(tmp_path / "two/checkpoints/checkpoint-2")})).setup()


@pytest.mark.parametrize("config", ["accelerate_deepspeed_zero2.yaml", "accelerate_deepspeed_zero3.yaml",
                                    "accelerate_fsdp.yaml"])
def test_sharded_configs_on_cpus_say_they_need_gpus(tmp_path, kontext_dir, gie_dir, data_txt, config):
    """The shipped accelerate configs, launched on this CPU machine: the trainer stops before any
    weight is read and says why, instead of training plain data parallel under a ZeRO/FSDP name
    (one process is enough to see it, and quick)."""
    if "deepspeed" in config:
        pytest.importorskip("deepspeed", reason="accelerate launches DeepSpeed configs only with deepspeed installed")
    if torch.cuda.device_count() >= 2:
        pytest.skip("GPUs are present: the sharded runs are compared in test_sharded_runs_match_one_process")
    cfg = make_config(tmp_path / "run", kontext_dir, gie_dir, data_txt, **{"train.max_steps": 1})
    out = launch(cfg, tmp_path, "accelerate.commands.launch", "--config_file", str(ROOT / "training" / config),
                 "--num_processes", "1", "--main_process_port", str(_free_port()))
    assert out.returncode != 0
    name = "DeepSpeed" if "deepspeed" in config else "FSDP"
    assert f"this launch asked accelerate for {name}, but accelerate" in out.stderr + out.stdout
    assert "runs " + name + " only on accelerators" in out.stderr + out.stdout
    assert not (tmp_path / "run/checkpoints").exists()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=ENGINES_NEED_GPUS)
@pytest.mark.parametrize("config", ["accelerate_deepspeed_zero2.yaml", "accelerate_fsdp.yaml"])
def test_sharded_runs_match_one_process(tmp_path, kontext_dir, gie_dir, data_txt, config):  # pragma: no cover - 2 GPUs
    opts = {"optim.lr": 1e-2, "train.max_steps": 2, "train.mixed_precision": "bf16", "train.stage": 2}
    one = Trainer(make_config(tmp_path / "one", kontext_dir, gie_dir, data_txt, **{**opts, "data.batch_size": 2})).train()
    cfg = make_config(tmp_path / "two", kontext_dir, gie_dir, data_txt, **{**opts, "data.batch_size": 1})
    out = launch(cfg, tmp_path, "accelerate.commands.launch", "--config_file", str(ROOT / "training" / config),
                 "--num_processes", "2", "--main_process_port", str(_free_port()))
    assert out.returncode == 0, out.stderr[-3000:]
    a = read_tensors(one.checkpoint / ckpt.TRAINABLE_FILE)
    b = read_tensors(tmp_path / "two/checkpoints/checkpoint-2" / ckpt.TRAINABLE_FILE)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-2  # bf16 on two GPUs


def test_resuming_on_another_number_of_processes_follows_the_engine(tmp_path):
    """Where the engine can load its optimizer state on another number of processes (one process,
    DDP; FSDP's torch.distributed.checkpoint shards) a checkpoint resumes there; DeepSpeed's ZeRO
    files cannot, and the error says what to do."""
    from gie_core.train.config import TrainConfig

    cfg = TrainConfig.from_dict({"data": {"batch_size": 1}})
    path = tmp_path / "checkpoint-8"

    def state(engine, n, batch):
        return {"num_processes": n, "distributed_type": engine, "global_batch": batch * n,
                "config": {"data": {"batch_size": batch}}}

    check_resharding(state("MULTI_GPU", 8, 1), path, TrainConfig.from_dict({"data": {"batch_size": 2}}), 4, "MULTI_GPU")
    check_resharding(state("NO", 1, 4), path, cfg, 4, "MULTI_CPU")
    check_resharding(state("FSDP", 8, 1), path, TrainConfig.from_dict({"data": {"batch_size": 2}}), 4, "FSDP")
    check_resharding(state("DEEPSPEED", 8, 1), path, cfg, 8, "DEEPSPEED")  # same count: fine
    with pytest.raises(ValueError, match=r"written by 8 DEEPSPEED processes.*Resume with 8 processes.*ds_to_universal"):
        check_resharding(state("DEEPSPEED", 8, 1), path, TrainConfig.from_dict({"data": {"batch_size": 2}}), 4, "DEEPSPEED")
    with pytest.raises(ValueError, match=r"written by DEEPSPEED and this run uses MULTI_GPU"):
        check_resharding(state("DEEPSPEED", 8, 1), path, cfg, 8, "MULTI_GPU")
    with pytest.raises(ValueError, match=r"global batch of 8 .* but this run has 4 .* set data\.batch_size 2"):
        check_resharding(state("MULTI_GPU", 8, 1), path, cfg, 4, "MULTI_GPU")
