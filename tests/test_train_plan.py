"""``gie-train plan``: the expected peak memory, from the real module shapes on the meta device.

On the tiny models the plan (made for the CPU) is compared with what a real CPU training step
allocates, measured by torch's profiler (``profile_memory=True``): the CPU allocator's running
total during the step (its "Total Allocated" field), plus the bytes that were already allocated
before it: the model's parameters and buffers and the optimizer state. At real width (meta and
fake tensors only) the released configs get plausible figures, and the 24 GB recipes fit.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from gie_core.train.data import collate
from gie_core.train.plan import GIB, parse_budget, plan_memory
from gie_core.train.trainer import Trainer

from test_train import make_config, write_dataset

SIDE = 512  # at 512 px the step's tensors dominate the CPU kernels' fixed scratch buffers


@pytest.fixture(scope="module")
def cached_pair(tmp_path_factory, kontext_dir, gie_dir):
    from gie_core.train.cache import build_cache

    root = tmp_path_factory.mktemp("plan")
    data = write_dataset(root / "data", [(SIDE, SIDE)])
    options = {"data.resolution": SIDE, "data.bucketing": "square", "data.cache_dir": str(root / "cache"),
               "data.cache_dtype": "fp32"}
    build_cache(make_config(root / "c", kontext_dir, gie_dir, data, **options), progress=False)
    return data, {**options, "data.use_cache": True}


def measured_peak(trainer: Trainer, tmp_path) -> int:
    """Peak bytes allocated on the CPU during a second training step (the first creates the
    optimizer state), by the profiler, plus the model and optimizer state held before it."""
    from torch.profiler import ProfilerActivity, profile

    shard = trainer.batcher.shards(0)[0]
    batch = collate([trainer.dataset[i] for i in shard.indices])
    trainer.training_step(batch, trainer.sample_generators(0, 0, shard))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.training_step(batch, trainer.sample_generators(0, 1, shard))
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = sorted((e for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"),
                    key=lambda e: e["ts"])
    start = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"]
    during = max(e["args"]["Total Allocated"] for e in events) - start
    held = {}
    tensors = [*trainer.model.parameters(), *trainer.model.buffers(),
               *torch.utils._pytree.tree_leaves(trainer.optimizer.optimizer.state_dict()["state"])]
    for t in tensors:
        if torch.is_tensor(t):
            held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(held.values()) + during


@pytest.mark.parametrize("variant, options", [
    ("stage 1, fp32", {"train.mixed_precision": "no"}),
    ("stage 1, bf16, block swap", {"train.mixed_precision": "bf16", "memory.resident_blocks": 1}),
    ("stage 2 LoRA on fp8, bf16, checkpointing", {"train.stage": 2, "train.trainable": "lora", "lora.rank": 8,
                                                  "memory.transformer_dtype": "fp8", "train.mixed_precision": "bf16"}),
    ("stage 2 image attention, Prodigy", {"train.stage": 2, "train.mixed_precision": "bf16", "optim.optimizer": "prodigy"}),
])
def test_plan_agrees_with_the_measured_peak_of_a_cpu_run(tmp_path, kontext_dir, gie_dir, cached_pair, variant, options):
    data, cache = cached_pair
    cfg = make_config(tmp_path / "run", kontext_dir, gie_dir, data, **{**cache, **options})
    plan = plan_memory(cfg, device="cpu")
    measured = measured_peak(Trainer(cfg).setup(), tmp_path)
    assert 0.8 <= plan.peak / measured <= 1.2, (variant, plan.peak, measured)


def _gib(text: str, label: str) -> float:
    """The GiB figure of the first plan line that contains ``label``."""
    line = next(ln for ln in text.splitlines() if label in ln)
    return float(re.findall(r"\s(\d+\.\d+)", line.split(label, 1)[1])[0])


def test_plan_at_real_width_for_the_released_configs(capsys):
    """Nothing is loaded (the configs' model folders do not exist here: the shipped real-size
    architectures are used); the figures follow from FLUX.1 Kontext's 11.9 B weights."""
    from gie_core.cli.train import EXIT_DOES_NOT_FIT, main

    assert main(["plan", "training/stage1.yaml"]) == 0
    s1 = capsys.readouterr().out
    assert "19 double + 38 single blocks" in s1 and "11.9 B" in s1 and "512x512 bucket" in s1
    assert "shipped FLUX.1 Kontext [dev] configs are used" in s1
    assert 21.5 < _gib(s1, "transformer  bf16  frozen") < 22.5  # 11.9 B x 2 bytes
    assert 0.3 < _gib(s1, "connector    fp32  trained") < 0.4  # 94 M x 4 bytes
    assert 15 < _gib(s1, "Qwen2.5-VL   bf16  frozen") < 16  # encodes on the fly: on the GPU
    ckpt_off, ckpt_on = (float(x) for x in re.findall(r"activations .*off\s+(\d+\.\d+)\s+\(checkpointing on: (\d+\.\d+)\)", s1)[0])
    assert ckpt_on < ckpt_off / 5
    peak1 = float(re.search(r"peak: (\d+\.\d+) GiB", s1).group(1))
    assert 40 < peak1 < 65

    code = main(["plan", "training/stage2.yaml", "--budget", "24GB"])
    s2 = capsys.readouterr().out
    assert code == EXIT_DOES_NOT_FIT
    trained = _gib(s2, "transformer  fp32  trained")
    assert 14 < trained < 16  # the image-branch attention set: about 4 B weights as fp32 masters
    assert abs(_gib(s2, "optimizer state  adamw") - 2 * trained - 0.7) < 0.5  # AdamW: two fp32 states
    peak2 = float(re.search(r"peak: (\d+\.\d+) GiB", s2).group(1))
    assert 90 < peak2 < 130
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:  # suggested only where it can be installed and run
        assert "--optim.optimizer adamw8bit" in s2
    assert "--memory.transformer_dtype fp8" in s2
    assert "--train.trainable lora" in s2 and "fits with all of them" in s2

    for stage in (1, 2):  # the shipped 24 GB recipes fit
        assert main(["plan", f"training/stage{stage}.yaml", f"training/24gb_stage{stage}.yaml", "--budget", "24GB"]) == 0
        out = capsys.readouterr().out
        assert "fits a 24 GiB budget" in out and "fp8   frozen" in out

    # eight GPUs with ZeRO-2, as the released stage 2 ran: gradients and optimizer state split 8 ways
    assert main(["plan", "training/stage2.yaml", "--processes", "8", "--sharding", "zero2"]) == 0
    s8 = capsys.readouterr().out
    assert "8 processes (zero2)" in s8 and _gib(s8, "optimizer state") < 4.5


def test_an_overlay_given_alone_says_what_it_layers_over_with_the_exact_command(capsys, monkeypatch):
    from gie_core.cli.train import main

    with pytest.raises(SystemExit) as exc:
        main(["plan", "training/24gb_stage2.yaml", "--budget", "24GB"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "training/24gb_stage2.yaml is layered over training/stage2.yaml; give that first:" in err
    assert "gie-train plan training/stage2.yaml training/24gb_stage2.yaml --budget 24GB" in err
    main(["plan", "training/24gb_stage1.yaml"])
    out = capsys.readouterr().out
    assert "gie-train plan training/stage1.yaml training/24gb_stage1.yaml" in out
    main(["plan", "training/stage1.yaml", "training/24gb_stage1.yaml"])
    assert "layered over" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--config", "training/24gb_stage1.yaml", "--train.max_steps", "1"])
    assert "gie-train --config training/stage1.yaml --config training/24gb_stage1.yaml --train.max_steps 1" in \
        capsys.readouterr().err


def test_plan_suggests_the_8bit_optimizer_only_where_bitsandbytes_imports(capsys, monkeypatch):
    import importlib.util

    from gie_core.cli.train import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    main(["plan", "training/stage1.yaml", "--budget", "8GB"])
    out = capsys.readouterr().out
    assert "to fit, change" in out and "--optim.optimizer" not in out
    main(["plan", "training/stage1.yaml", "training/24gb_stage1.yaml"])
    assert "note: optimizer adamw8bit cannot run here: bitsandbytes is not installed" in capsys.readouterr().out


def test_budget_sizes_and_errors(capsys):
    from gie_core.cli.train import main

    assert parse_budget("24GB") == parse_budget("24 GiB") == parse_budget("24") == 24 * GIB
    assert parse_budget("16000MB") == 16000 * 2**20 and parse_budget("0.5T") == 512 * GIB
    with pytest.raises(ValueError, match="--budget 'lots' is not a size"):
        parse_budget("lots")
    with pytest.raises(SystemExit):
        main(["plan", "training/stage1.yaml", "--budget", "lots"])
    assert "--budget 'lots' is not a size such as 24GB" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "training/stage1.yaml", "--memory.transformer_dtype", "fp4"])
    assert "memory.transformer_dtype is 'fp4'" in capsys.readouterr().err
