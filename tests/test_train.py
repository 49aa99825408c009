"""The two-stage trainer end to end on tiny random models and a tiny synthetic dataset.

Every run is a real ``Trainer`` (accelerate on one CPU process) over the engine's encoders,
connector and Kontext transformer; the dataset is written here.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from gie_core.train import checkpoint as ckpt
from gie_core.train.config import load_config
from gie_core.train.data import collate
from gie_core.train.trainer import Trainer
from gie_core.weights.reader import CheckpointReader

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTIONS = ["invert the top left corner", "make it red", "swap the colours of the upper left part of the picture", "flip"]


def noise_image(w, h, seed) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))


def write_dataset(root: Path, sizes, region=True, instructions=INSTRUCTIONS) -> Path:
    """Pairs whose target inverts the source's top-left quarter; returns data.txt."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    recs = []
    for i, (w, h) in enumerate(sizes):
        src = noise_image(w, h, i)
        tgt = np.asarray(src).copy()
        tgt[: h // 2, : w // 2] = 255 - tgt[: h // 2, : w // 2]
        src.save(root / f"img/s{i}.png")
        Image.fromarray(tgt).save(root / f"img/t{i}.png")
        recs.append({"image": [f"img/s{i}.png", f"img/t{i}.png"],
                     "conversations": [{"from": "human", "value": f"<image>\n{instructions[i % len(instructions)]}"},
                                       {"from": "gpt", "value": "<gen_image>"}]})
    (root / "ann.json").write_text(json.dumps(recs))
    (root / "data.txt").write_text(f"{root},{root / 'ann.json'},{'true' if region else 'false'}\n")
    return root / "data.txt"


@pytest.fixture(scope="module")
def data_txt(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), [(64, 64), (96, 64), (64, 96), (64, 64)])


@pytest.fixture(scope="module")
def one_pair(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("pair"), [(64, 64)])


def make_config(out: Path, kontext_dir, gie_dir, data_txt, **options):
    base = {
        "output_dir": str(out),
        "model.kontext": str(kontext_dir),
        "model.gie": str(gie_dir),
        "model.init_connector": "fresh",
        "data.data_txt": str(data_txt),
        "data.resolution": 64,
        "data.num_workers": 0,
        "train.mixed_precision": "no",
        "train.max_steps": 2,
        "log.progress": False,
        "log.every": 0,
        "checkpoint.every": 0,
        "checkpoint.keep_last": 0,
        "export.at_end": False,
        "export.dtype": "fp32",
        "validation.steps": 2,
    }
    base.update(options)
    return load_config(overrides=base)


def state_of(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def read_tensors(path) -> dict[str, torch.Tensor]:
    with CheckpointReader.open(path) as r:
        return {k: r.read(k) for k in r.keys()}


# --- the loss -------------------------------------------------------------------------------


def test_loss_on_a_fixed_batch_equals_the_reference_formula(tmp_path, kontext_dir, gie_dir, data_txt):
    from diffusers import FluxKontextPipeline

    from gie_core.train.loss import sample_sigmas

    trainer = Trainer(make_config(tmp_path / "run", kontext_dir, gie_dir, data_txt)).setup()
    batch = collate([trainer.dataset[1]])  # the 96x64 pair, region-weighted
    inputs = trainer.encode_batch(batch, torch.Generator().manual_seed(5))
    x0 = inputs["x0"]
    b, c, h, w = x0.shape
    assert (b, c, h, w) == (1, 16, 8, 12)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))
    sigma = torch.tensor([0.37])
    ours = trainer.compute_loss(inputs, noise=noise, sigmas=sigma)["loss"]

    # by hand: VAE sample / mode latents, the interpolation, Kontext packing and ids as diffusers
    # makes them, reference tokens after the target, prediction sliced, region-weighted MSE
    comps = trainer.components
    vae = comps.vae
    sf, sc = vae.config.shift_factor, vae.config.scaling_factor
    target_px, source_px = batch["target"], batch["source"]
    with torch.no_grad():
        x0_hand = (vae.encode(target_px).latent_dist.sample(generator=torch.Generator().manual_seed(5)) - sf) * sc
        ref = (vae.encode(source_px).latent_dist.mode() - sf) * sc
        assert torch.equal(x0_hand, x0)
        hidden = comps.qwen.encode(batch["qwen_image"], batch["instruction"][0]).hidden
        context = comps.connector(hidden)  # VLM tokens only, as training saw
        pooled = comps.text.clip_pooled([""])  # CLIP("")
        x_t = (1 - 0.37) * x0 + 0.37 * noise
        packed = FluxKontextPipeline._pack_latents(x_t, b, c, h, w)
        ref_packed = FluxKontextPipeline._pack_latents(ref, b, c, h, w)
        ids = FluxKontextPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
        ref_ids = ids.clone()
        ref_ids[:, 0] = 1
        out = comps.transformer(
            hidden_states=torch.cat([packed, ref_packed], 1), timestep=sigma, guidance=torch.tensor([1.0]),
            pooled_projections=pooled, encoder_hidden_states=context, txt_ids=torch.zeros(context.shape[1], 3),
            img_ids=torch.cat([ids, ref_ids]), return_dict=False,
        )[0][:, : packed.shape[1]]
        pred = FluxKontextPipeline._unpack_latents(out, h * 8, w * 8, 8)
        weight = batch["region_weight"]
        assert weight.shape == (1, 1, 8, 12) and weight.max() > 1
        hand = (weight * (pred - (noise - x0)) ** 2).mean()
    assert abs(ours.item() - hand.item()) <= 1e-6

    # logit-normal sigma with the resolution shift of the target token count
    u = torch.randn(3, generator=torch.Generator().manual_seed(2))
    n_tokens = 24 * 32
    mu = n_tokens * (1.15 - 0.5) / (4096 - 256) + 0.5 - (1.15 - 0.5) / (4096 - 256) * 256
    s = math.exp(mu)
    expected = s * torch.sigmoid(u) / (1 + (s - 1) * torch.sigmoid(u))
    assert torch.allclose(sample_sigmas(3, n_tokens, torch.Generator().manual_seed(2)), expected, atol=1e-7)


# --- stage 1 --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def context_sensitive_transformer(tmp_path_factory, kontext_dir):
    """The tiny Kontext transformer made to depend strongly on its context (random tiny models
    barely attend to it): weaker x_embedder, stronger modulation gates and key norms."""
    from gie_core.weights.loading import load_kontext_dir
    from gie_core.weights.reader import save_safetensors_atomic

    tr = load_kontext_dir(kontext_dir, dtype="fp32", parts=("transformer",)).transformer
    state = {}
    for k, v in tr.state_dict().items():
        if k.startswith("x_embedder"):
            v = v * 0.03
        elif "norm1.linear" in k or "norm.linear" in k:
            v = v * 3
        elif "norm_k" in k or "norm_added_k" in k:
            v = v * 3
        state[k] = v
    return save_safetensors_atomic(state, tmp_path_factory.mktemp("tr") / "transformer.safetensors")


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory, kontext_dir, gie_dir, one_pair, context_sensitive_transformer):
    out = tmp_path_factory.mktemp("stage1")
    image = out / "val.png"
    noise_image(64, 64, 0).save(image)
    cfg = make_config(out, kontext_dir, gie_dir, one_pair, **{
        "model.init_transformer": str(context_sensitive_transformer), "train.max_steps": 40,
        "train.overfit_batches": 1, "optim.lr": 1e-2, "export.at_end": True,
        "validation.every": 20, "validation.pairs": [{"image": str(image), "instruction": "invert the corner"}],
    })
    trainer = Trainer(cfg).setup()
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    before = {"connector": state_of(unwrapped.connector), "transformer": state_of(unwrapped.transformer),
              "vae": state_of(trainer.components.vae), "qwen": state_of(trainer.components.qwen.model),
              "clip": state_of(trainer.components.text.clip)}
    result = trainer.train()
    return trainer, before, result


def test_stage1_overfits_one_pair_and_changes_only_the_connector(stage1_run):
    trainer, before, result = stage1_run
    losses = result.losses
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], losses
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    assert changed(before["connector"], state_of(unwrapped.connector)) == set(before["connector"])
    assert not changed(before["transformer"], state_of(unwrapped.transformer))
    assert not changed(before["vae"], state_of(trainer.components.vae))
    assert not changed(before["qwen"], state_of(trainer.components.qwen.model))
    assert not changed(before["clip"], state_of(trainer.components.text.clip))
    # validation edits every 20 steps, as images
    out = Path(trainer.cfg.output_dir)
    for step in (20, 40):
        with Image.open(out / f"validation/step-{step}/0.png") as im:
            assert im.size == (64, 64)
    # the export is what the engine's loader reads, equal to the trained connector
    from gie_core.weights.loading import load_connector

    conn = load_connector(result.exported["connector"], dtype="fp32")
    for k, v in unwrapped.connector.state_dict().items():
        assert torch.equal(conn.state_dict()[k], v)
    assert ckpt.latest_checkpoint(out / "checkpoints").name == "checkpoint-40"


@pytest.mark.parametrize("mode, extra, optimizer", [("vlm+t5+type", "type_embedding", "prodigy"), ("metaquery", "queries", "adamw")])
def test_new_connector_modes_train_their_own_parameters(tmp_path, kontext_dir, gie_dir, data_txt, mode, extra, optimizer):
    cfg = make_config(tmp_path / "run", kontext_dir, gie_dir, data_txt, **{
        "model.mode": mode, "model.num_queries": 4, "data.batch_size": 2, "optim.optimizer": optimizer,
        "optim.lr": 1.0 if optimizer == "prodigy" else 1e-2})
    trainer = Trainer(cfg).setup()
    conn = trainer.accelerator.unwrap_model(trainer.model).connector
    before = state_of(conn)
    result = trainer.train()
    assert all(math.isfinite(v) for v in result.losses)
    assert extra in changed(before, state_of(conn))


# --- stage 2 --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage2_runs(tmp_path_factory, kontext_dir, gie_dir, data_txt):
    runs = {}

    def run(trainable):
        if trainable not in runs:
            out = tmp_path_factory.mktemp(f"stage2-{trainable}")
            cfg = make_config(out, kontext_dir, gie_dir, data_txt, **{
                "train.stage": 2, "train.trainable": trainable, "train.max_steps": 2, "export.at_end": True,
                "optim.lr": 1e-2 if trainable == "lora" else 1e-3, "lora.rank": 4, "lora.alpha": 4,
                "train.mixed_precision": "bf16" if trainable == "image_attention" else "no",
            })
            trainer = Trainer(cfg).setup()
            unwrapped = trainer.accelerator.unwrap_model(trainer.model)
            before = {"connector": state_of(unwrapped.connector), "transformer": state_of(unwrapped.transformer)}
            result = trainer.train()
            runs[trainable] = (trainer, before, result)
        return runs[trainable]

    return run


@pytest.mark.parametrize("trainable", ["image_attention", "full", "lora"])
def test_stage2_changes_exactly_the_named_parameters(stage2_runs, trainable):
    from gie_core.train.trainable import image_branch_parameter_names

    trainer, before, result = stage2_runs(trainable)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    transformer = unwrapped.transformer
    after = state_of(transformer)
    assert changed(before["connector"], state_of(unwrapped.connector)) == set(before["connector"])
    if trainable == "image_attention":
        expected = set(image_branch_parameter_names(transformer))
        assert any(k.startswith("single_transformer_blocks.0.norm.linear") for k in expected)
        assert any(k.startswith("transformer_blocks.0.attn.to_out.0") for k in expected)
        assert not any("add_q_proj" in k or "ff." in k or "proj_mlp" in k for k in expected)
        # bf16: frozen weights stored in bf16, trained ones kept in fp32
        params = dict(transformer.named_parameters())
        assert all(params[k].dtype == torch.float32 for k in expected)
        assert params["x_embedder.weight"].dtype == torch.bfloat16
    elif trainable == "full":
        expected = set(before["transformer"])
    else:
        expected = {k for k in before["transformer"] if "lora_" in k}
        assert expected and all(".base_layer." in k or "lora_" in k or k in after for k in after)
    assert changed(before["transformer"], after) == expected
    assert set(trainer.trainable_names["transformer"]) == {k for k in expected}


def test_stage2_exports_load_with_the_engine_loaders(stage2_runs):
    from gie_core.train.export import load_transformer_file

    trainer, _, result = stage2_runs("image_attention")
    transformer = trainer.accelerator.unwrap_model(trainer.model).transformer
    loaded = load_transformer_file(result.exported["transformer"], dtype="fp32")
    trained = {k: v.float() for k, v in transformer.state_dict().items()}
    assert set(loaded.state_dict()) == set(trained)
    assert all(torch.equal(loaded.state_dict()[k], trained[k]) for k in trained)
    trainer, _, result = stage2_runs("lora")
    assert set(result.exported) == {"connector", "lora"}
    keys = read_tensors(result.exported["lora"])
    assert keys and all(k.startswith("transformer.") and "lora_" in k for k in keys)


def test_trained_connector_and_lora_change_the_sampler_output(stage1_run, stage2_runs, kontext_dir, gie_dir):
    from gie_core.weights.loading import load_connector
    from gie_core.weights.lora import activated, load_lora
    from gie_core.engine.pipeline import EditPipeline

    image = noise_image(64, 64, 3)
    pipe = EditPipeline.from_paths(gie_dir=gie_dir, kontext_dir=kontext_dir, mode="vlm", dtype="fp32", device="cpu")

    def edit():
        return pipe.edit(image, "invert the corner", mode="vlm", steps=2, size=(64, 64), seed=1).tensor

    base = edit()
    pipe.connector = load_connector(stage1_run[2].exported["connector"], dtype="fp32")
    with_connector = edit()
    assert (with_connector - base).abs().max() > 1e-4
    name = load_lora(pipe.transformer, stage2_runs("lora")[2].exported["lora"])
    with activated(pipe.transformer, [(name, 1.0)]):
        with_lora = edit()
    assert (with_lora - with_connector).abs().max() > 1e-6


def test_export_command_writes_a_released_layout_directory(stage2_runs, tmp_path):
    from gie_core.cli.train import main
    from gie_core.weights.loading import load_gie_checkpoint

    trainer, _, _ = stage2_runs("full")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(trainer.cfg.to_dict()))
    out = tmp_path / "exported"
    assert main(["export", "--config", str(config), "--out", str(out), "--set", "export.released_dir=true"]) == 0
    ck = load_gie_checkpoint(out / "gpt-image-edit", dtype="fp32")
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    for k, v in unwrapped.transformer.state_dict().items():
        assert torch.equal(ck.transformer.state_dict()[k], v), k
    for k, v in unwrapped.connector.state_dict().items():
        assert torch.equal(ck.connector.state_dict()[k], v), k
    assert ck.encoder is not None and (out / "gpt-image-edit" / "tokenizer.json").is_file()


# --- resume, crashes ------------------------------------------------------------------------


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, kontext_dir, gie_dir, data_txt):
    opts = {"data.batch_size": 2, "optim.ema_decay": 0.9, "checkpoint.every": 2, "train.max_steps": 4,
            "train.gradient_accumulation": 2}
    whole = Trainer(make_config(tmp_path / "whole", kontext_dir, gie_dir, data_txt, **opts)).train()
    first = Trainer(make_config(tmp_path / "parts", kontext_dir, gie_dir, data_txt, **{**opts, "train.max_steps": 2})).train()
    resumed_trainer = Trainer(make_config(tmp_path / "parts", kontext_dir, gie_dir, data_txt, **{**opts, "checkpoint.resume": "latest"}))
    resumed = resumed_trainer.train()
    assert (first.step, resumed.step, whole.step) == (2, 4, 4)
    assert resumed.losses == whole.losses[2:]  # the same batches, noise and timesteps
    for name in (ckpt.TRAINABLE_FILE, ckpt.EMA_FILE):
        a = read_tensors(whole.checkpoint / name)
        b = read_tensors(resumed.checkpoint / name)
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    state = ckpt.read_state(resumed.checkpoint)
    assert (state["step"], state["epoch"], state["batches_done"]) == (4, 2, 2)  # 8 batches of 3 per epoch
    # a different run cannot be resumed by mistake
    with pytest.raises(ValueError, match="model.mode"):
        Trainer(make_config(tmp_path / "parts", kontext_dir, gie_dir, data_txt, **{
            **opts, "checkpoint.resume": "latest", "model.mode": "vlm+t5+type"})).setup()


def test_a_process_killed_while_saving_leaves_the_previous_checkpoint(tmp_path, kontext_dir, gie_dir, data_txt):
    out = tmp_path / "run"
    cfg = make_config(out, kontext_dir, gie_dir, data_txt, **{"checkpoint.every": 2, "train.max_steps": 6})
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "GIE_TRAIN_SAVE_DELAY": "120@4", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gie_core.cli.train", "--config", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = out / "checkpoints" / "checkpoint-4.tmp" / "SAVING"
    deadline = time.time() + 120
    try:
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the save of step 4 never started"
            time.sleep(0.05)
        assert (out / "checkpoints/checkpoint-4.tmp" / ckpt.TRAINABLE_FILE).is_file()  # mid-save
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert ckpt.latest_checkpoint(out / "checkpoints") == out / "checkpoints/checkpoint-2"
    assert not (out / "checkpoints/checkpoint-4").exists()
    resumed = Trainer(make_config(out, kontext_dir, gie_dir, data_txt, **{
        "checkpoint.every": 2, "train.max_steps": 4, "checkpoint.resume": "latest"}))
    result = resumed.train()
    assert result.step == 4 and len(result.losses) == 2
    assert ckpt.is_complete(out / "checkpoints/checkpoint-4")
    assert not (out / "checkpoints/checkpoint-4.tmp").exists()


# --- data problems, cache -------------------------------------------------------------------


def test_bad_samples_are_skipped_and_counted_in_a_run(tmp_path, kontext_dir, gie_dir):
    data = write_dataset(tmp_path / "data", [(64, 64)] * 4, region=False)
    (tmp_path / "data/img/t1.png").unlink()
    (tmp_path / "data/img/s2.png").write_bytes(b"\x89PNG broken")
    recs = json.loads((tmp_path / "data/ann.json").read_text())
    (tmp_path / "data/ann.json").write_text("\n".join(json.dumps(r) for r in recs) + "\n{not json\n")
    cfg = make_config(tmp_path / "run", kontext_dir, gie_dir, data, **{"data.bucketing": "square", "train.max_steps": 4})
    result = Trainer(cfg).train()
    assert result.step == 4
    assert "skipped 3 bad samples" in result.problems
    assert "1 malformed record" in result.problems and "1 missing image" in result.problems
    assert "1 unreadable image" in result.problems


def _truncate(path: Path) -> None:
    """Keep the header (the size scan passes) but cut the pixels (loading fails)."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_bad_pair_alone_in_its_bucket_is_skipped_and_the_run_goes_on(tmp_path, kontext_dir, gie_dir):
    from gie_core.train.data import DataError

    data = write_dataset(tmp_path / "data", [(64, 64), (64, 64), (96, 64)], region=False)
    _truncate(tmp_path / "data/img/t2.png")  # the only pair of the 3:2 bucket
    cfg = make_config(tmp_path / "run", kontext_dir, gie_dir, data, **{"train.max_steps": 4})
    result = Trainer(cfg).train()
    assert result.step == 4
    assert "1 unreadable image" in result.problems and "skipped 1 batch whose bucket had no pair that loads" in result.problems
    for name in ("s0", "t0", "s1", "t1"):
        _truncate(tmp_path / f"data/img/{name}.png")  # now no pair loads at all
    cfg = make_config(tmp_path / "run2", kontext_dir, gie_dir, data, **{"train.max_steps": 2})
    with pytest.raises(DataError, match=rf"no pair of {data} could be loaded: 3 batches in a row were skipped, a whole epoch"):
        Trainer(cfg).train()


def test_training_from_the_cache_equals_encoding_on_the_fly(tmp_path, kontext_dir, gie_dir, data_txt):
    from gie_core.train.cache import build_cache

    opts = {"data.cache_dir": str(tmp_path / "cache"), "data.cache_dtype": "fp32", "train.max_steps": 3,
            "data.batch_size": 2}
    counts = build_cache(make_config(tmp_path / "c", kontext_dir, gie_dir, data_txt, **opts), progress=False)
    assert counts == {"pairs": 4, "written": 4, "bad": 0}
    live = Trainer(make_config(tmp_path / "live", kontext_dir, gie_dir, data_txt, **opts))
    live_result = live.train()
    cached = Trainer(make_config(tmp_path / "cached", kontext_dir, gie_dir, data_txt, **{**opts, "data.use_cache": True}))
    cached_result = cached.train()
    comps = cached.components
    assert comps.qwen is None and comps.text is None and comps.vae is None  # no encoder loaded
    assert np.allclose(cached_result.losses, live_result.losses, atol=1e-6, rtol=0)
    a, b = cached.trainable_state(), live.trainable_state()
    assert all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)


def test_metaquery_trains_from_the_cache_with_validation(tmp_path, kontext_dir, gie_dir, data_txt):
    from gie_core.train.cache import build_cache

    image = tmp_path / "val.png"
    noise_image(96, 64, 7).save(image)
    opts = {"data.cache_dir": str(tmp_path / "cache"), "model.mode": "metaquery", "model.num_queries": 4,
            "optim.lr": 1e-2, "validation.every": 2, "validation.pairs": [{"image": str(image), "instruction": "flip"}]}
    build_cache(make_config(tmp_path / "c", kontext_dir, gie_dir, data_txt, **opts), progress=False)
    trainer = Trainer(make_config(tmp_path / "run", kontext_dir, gie_dir, data_txt, **{**opts, "data.use_cache": True})).setup()
    assert trainer.components.text is None and trainer.components.qwen is not None  # queries need Qwen
    queries = trainer.accelerator.unwrap_model(trainer.model).connector.queries.detach().clone()
    trainer.train()
    assert not torch.equal(queries, trainer.accelerator.unwrap_model(trainer.model).connector.queries)
    with Image.open(tmp_path / "run/validation/step-2/0.png") as im:
        assert im.size == (96, 64)


def test_tensorboard_logs_loss_and_validation_images(tmp_path, kontext_dir, gie_dir, one_pair):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    image = tmp_path / "val.png"
    noise_image(64, 64, 1).save(image)
    cfg = make_config(tmp_path / "run", kontext_dir, gie_dir, one_pair, **{
        "log.tensorboard": True, "log.every": 1, "validation.every": 2,
        "validation.pairs": [{"image": str(image), "instruction": "flip"}]})
    Trainer(cfg).train()
    tags = {"scalars": set(), "images": set()}
    for f in (tmp_path / "run/logs").rglob("events.out.tfevents*"):
        ea = EventAccumulator(str(f))
        ea.Reload()
        tags["scalars"] |= set(ea.Tags()["scalars"])
        tags["images"] |= set(ea.Tags()["images"])
    assert {"loss", "lr", "steps_per_second"} <= tags["scalars"] and "validation" in tags["images"]


def test_stage1_from_a_stock_qwen_directory_exports_a_released_layout(tmp_path, kontext_dir, gie_dir, data_txt):
    """The from-scratch path: Qwen2.5-VL + FLUX.1-Kontext-dev, no GPT-Image-Edit checkpoint."""
    import shutil

    from gie_core.weights.loading import load_gie_checkpoint

    qwen_dir = tmp_path / "qwen"
    encoder = load_gie_checkpoint(gie_dir, dtype="fp32", parts=("encoder",)).encoder
    encoder.model.save_pretrained(qwen_dir)
    for f in Path(gie_dir).iterdir():
        if f.name.startswith(("tokenizer", "preprocessor", "chat_template")):
            shutil.copy2(f, qwen_dir / f.name)
    cfg = make_config(tmp_path / "run", kontext_dir, None, data_txt, **{
        "model.gie": None, "model.qwen": str(qwen_dir), "model.init_transformer": "kontext",
        "export.at_end": True, "export.released_dir": True})
    trainer = Trainer(cfg)
    result = trainer.train()
    assert trainer.components.sources["encoder"] == str(qwen_dir)
    ck = load_gie_checkpoint(result.exported["released_dir"], dtype="fp32")
    image = noise_image(64, 64, 5)
    assert torch.equal(ck.encoder.encode([image], "flip").hidden, encoder.encode([image], "flip").hidden)
    trained = trainer.unwrapped.connector.state_dict()
    assert all(torch.equal(ck.connector.state_dict()[k], v) for k, v in trained.items())
    stock = trainer.unwrapped.transformer.state_dict()
    assert all(torch.equal(ck.transformer.state_dict()[k], v) for k, v in stock.items())
