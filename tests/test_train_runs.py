"""Trainer runs on the tiny models: reproducibility, file permissions, checks before any weight
is read, no torchvision noise, and fusion modes read from the mode table.

Every run is a real ``Trainer`` (accelerate on one CPU process), a few steps long.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from gie_core.train.checkpoint import TRAINABLE_FILE
from gie_core.train.trainer import Trainer
from gie_core.weights.reader import CheckpointReader

from test_train import make_config, noise_image, write_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_txt(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), [(64, 64), (96, 64), (64, 64)])


def trained(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.trainable_state().items()}


# --- reproducibility ----------------------------------------------------------------------------


@pytest.mark.parametrize("trainable, mode, connector", [
    ("lora", "metaquery", "gie"),  # LoRA A init + queries added to the released connector + dropout
    ("image_attention", "vlm", "fresh"),  # a fresh connector + the image-branch set
])
def test_same_seed_gives_bit_identical_weights_and_leaves_the_global_rng(tmp_path, kontext_dir, gie_dir, data_txt,
                                                                         trainable, mode, connector):
    opts = {"train.stage": 2, "train.trainable": trainable, "model.mode": mode, "model.num_queries": 4,
            "model.init_connector": connector, "lora.rank": 4, "lora.alpha": 4, "lora.dropout": 0.2,
            "optim.lr": 1e-2, "train.max_steps": 4}

    untouched = []

    def run(name, seed):
        torch.manual_seed(1000 + len(name))  # whatever the caller's global state, the run is the same
        state = torch.get_rng_state()
        trainer = Trainer(make_config(tmp_path / name, kontext_dir, gie_dir, data_txt, **{**opts, "train.seed": seed}))
        trainer.train()
        untouched.append(torch.equal(torch.get_rng_state(), state))
        return trained(trainer)

    a, b, c = run("a", 5), run("bb", 5), run("c", 6)
    assert set(a) == set(b) and a
    different = {k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not different, list(different.items())[:5]
    assert all(untouched), "a run changed the caller's global RNG state"
    if trainable == "lora":
        assert any("lora_A" in k for k in a) and "connector.queries" in a
        assert all(not torch.equal(a[k], c[k]) for k in a if "lora_A" in k or k == "connector.queries")
    else:
        assert not torch.equal(a["connector.denoise_projector.0.weight"], c["connector.denoise_projector.0.weight"])


# --- permissions --------------------------------------------------------------------------------


def test_outputs_checkpoints_and_cache_get_normal_permissions(tmp_path, kontext_dir, gie_dir, data_txt):
    from gie_core.train.cache import build_cache

    image = tmp_path / "val.png"
    noise_image(64, 64, 2).save(image)
    old = os.umask(0o022)
    try:
        cache = tmp_path / "cache"
        build_cache(make_config(tmp_path / "c", kontext_dir, gie_dir, data_txt, **{"data.cache_dir": str(cache)}),
                    progress=False)
        cfg = make_config(tmp_path / "run", kontext_dir, gie_dir, data_txt, **{
            "train.stage": 2, "train.trainable": "lora", "lora.rank": 4, "optim.ema_decay": 0.5,
            "checkpoint.every": 1, "checkpoint.keep_last": 1, "export.at_end": True, "export.merge_lora": True,
            "export.released_dir": True, "validation.every": 2,
            "validation.pairs": [{"image": str(image), "instruction": "flip"}]})
        result = Trainer(cfg).train()
    finally:
        os.umask(old)
    assert {"connector", "lora", "transformer", "released_dir"} <= set(result.exported)
    run = tmp_path / "run"
    expected = [run / "export" / name for name in ("connector.safetensors", "transformer_lora.safetensors",
                                                   "transformer.safetensors", "export_info.json")]
    expected += [run / "checkpoints/checkpoint-2" / name for name in (TRAINABLE_FILE, "ema.safetensors", "trainer_state.json")]
    expected += [run / "validation/step-2/0.png", cache / "cache_info.json", cache / "empty_pooled.safetensors"]
    files = [p for root in (run, cache) for p in root.rglob("*") if p.is_file()]
    assert set(expected) <= set(files)
    assert any(p.parent.parent == cache and p.suffix == ".safetensors" for p in files)  # per-pair cache files
    assert any(p.parent.name == "gpt-image-edit" and p.name.startswith("model-") for p in files)
    assert any(p.parent.name == "data_index" for p in files)
    bad = [f"{p.relative_to(tmp_path)} {stat.filemode(p.stat().st_mode)}" for p in files if p.stat().st_mode & 0o777 != 0o644]
    assert not bad, bad
    dirs = [p for root in (run, cache) for p in [root, *root.rglob("*")] if p.is_dir()]
    bad = [f"{p.relative_to(tmp_path)} {stat.filemode(p.stat().st_mode)}" for p in dirs if p.stat().st_mode & 0o777 != 0o755]
    assert not bad, bad
    leftovers = [p for p in files + dirs if ".partial" in p.name or p.name.endswith((".tmp", ".dir"))]
    assert not leftovers, leftovers


# --- everything is checked before any weight is read ---------------------------------------------


@pytest.fixture
def no_weights(monkeypatch):
    """Make reading any weight fail loudly: a check that comes after it is a check too late."""
    import gie_core.train.trainer as trainer_module

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the config and data were checked")

    monkeypatch.setattr(trainer_module, "load_components", refuse)


def test_config_and_data_are_checked_before_any_weight_is_read(tmp_path, kontext_dir, gie_dir, data_txt, no_weights):
    from gie_core.train.config import ConfigError, TrainConfig
    from gie_core.train.data import DataError

    # a missing validation image names the option it came from
    cfg = make_config(tmp_path / "run", kontext_dir, gie_dir, data_txt, **{
        "validation.every": 1, "validation.pairs": [{"image": str(tmp_path / "nope.png"), "instruction": "flip"}]})
    with pytest.raises(ValueError, match=r"validation\.pairs\[0\]\.image '.*nope\.png' does not exist"):
        Trainer(cfg).setup()
    # a data.txt line without its region_weighting field
    two = tmp_path / "two.txt"
    two.write_text(Path(data_txt).read_text().rsplit(",", 1)[0] + "\n")
    with pytest.raises(DataError, match=r"two\.txt:1: expected 3 comma-separated fields"):
        Trainer(make_config(tmp_path / "run", kontext_dir, gie_dir, two)).setup()
    # a model path that does not exist, and a checkpoint to resume that does not exist
    for key, value, message in (("model.init_connector", str(tmp_path / "c.safetensors"), "model.init_connector '.*' does not exist"),
                                ("model.kontext", str(tmp_path / "kontext"), "model.kontext '.*' is not a directory"),
                                ("checkpoint.resume", str(tmp_path / "ck"), "checkpoint.resume .* does not exist")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            Trainer(make_config(tmp_path / "run", kontext_dir, gie_dir, data_txt, **{key: value})).setup()
    # a config assembled by hand is checked as a file's is
    cfg = make_config(tmp_path / "run", kontext_dir, gie_dir, data_txt)
    cfg.set("lora.dropout", 1.5)
    with pytest.raises(ConfigError, match=r"lora\.dropout is 1\.5"):
        Trainer(cfg).setup()
    with pytest.raises(ConfigError, match="model.mode is 't5' but that mode has no connector to train"):
        TrainConfig.from_dict({"model": {"mode": "t5"}}).check(for_training=False)


# --- torchvision ----------------------------------------------------------------------------------


def test_stage2_lora_and_load_lora_print_no_torchvision_warning(tmp_path, kontext_dir, gie_dir, data_txt):
    """torchvision is never needed; importing diffusers' pipelines made transformers warn about it
    on every LoRA run. A fresh interpreter, so nothing was imported (and warned once) before."""
    cfg = make_config(tmp_path / "run", kontext_dir, gie_dir, data_txt, **{
        "train.stage": 2, "train.trainable": "lora", "lora.rank": 4, "train.max_steps": 1, "export.at_end": True})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    script = textwrap.dedent(f"""
        import logging, warnings
        warnings.simplefilter("always")
        logging.basicConfig(level=logging.DEBUG)
        from gie_core.cli.train import main
        assert main(["--config", {str(config)!r}]) == 0
        from gie_core.weights.loading import load_kontext_dir
        from gie_core.weights.lora import load_lora
        transformer = load_kontext_dir({str(kontext_dir)!r}, dtype="fp32", parts=("transformer",)).transformer
        print("adapter", load_lora(transformer, {str(tmp_path / "run/export/transformer_lora.safetensors")!r}))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "adapter lora_" in out.stdout
    assert "torchvision" not in text.lower(), [ln for ln in text.splitlines() if "torchvision" in ln.lower()]


# --- fusion modes come from the table --------------------------------------------------------------


def test_a_new_mode_row_trains_live_and_from_the_cache(tmp_path, kontext_dir, gie_dir, data_txt, monkeypatch):
    """Adding a fusion mode is a table row (plus connector code if it needs new parts): the
    trainer's encoders, cache contents and conditioning follow the row."""
    import numpy as np

    from gie_core.engine.modes import FUSION_MODE_TABLE, FusionMode
    from gie_core.train.cache import build_cache, cached_contents
    from gie_core.train.data import collate

    row = FusionMode("vlm+clip", True, False, "instruction", False, False, True, "Qwen tokens, pooled CLIP(instruction)")
    monkeypatch.setitem(FUSION_MODE_TABLE, row.name, row)
    assert cached_contents("vlm+clip") == ("target_moments", "reference", "qwen", "pooled")
    opts = {"model.mode": "vlm+clip", "data.cache_dir": str(tmp_path / "cache"), "data.cache_dtype": "fp32",
            "train.max_steps": 2}
    build_cache(make_config(tmp_path / "c", kontext_dir, gie_dir, data_txt, **opts), progress=False)
    live = Trainer(make_config(tmp_path / "live", kontext_dir, gie_dir, data_txt, **opts)).setup()
    assert live.components.text.t5 is None  # the row needs no T5
    inputs = live.encode_batch(collate([live.dataset[0]]), torch.Generator().manual_seed(0))
    assert "pooled" in inputs and "t5" not in inputs
    assert torch.equal(inputs["pooled"].cpu(), live.components.text.clip_pooled([live.dataset.records[0].instruction]))
    cached = Trainer(make_config(tmp_path / "cached", kontext_dir, gie_dir, data_txt, **{**opts, "data.use_cache": True}))
    assert np.allclose(cached.train().losses, live.train().losses, atol=1e-6, rtol=0)


def test_checkpoint_trainable_file_holds_the_trained_names(tmp_path, kontext_dir, gie_dir, data_txt):
    """The checkpoint writer (now through gie_core.files) still writes what resume reads."""
    trainer = Trainer(make_config(tmp_path / "run", kontext_dir, gie_dir, data_txt, **{"train.max_steps": 1}))
    result = trainer.train()
    with CheckpointReader.open(result.checkpoint / TRAINABLE_FILE) as reader:
        assert set(reader.keys()) == set(trainer.param_names)
