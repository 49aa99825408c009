"""Training in less memory on the tiny models: an fp8-stored frozen base (diffusers layerwise
casting), fp8 and GGUF transformer files, 8-bit AdamW / Adafactor / Prodigy resuming exactly,
block swap (diffusers group offloading) giving the loss of no swap, and the options' checks.

Every run is a real ``Trainer`` (accelerate on one CPU process). torch stores float8 on the CPU
and diffusers upcasts each layer while it runs, so the fp8 paths run here as on a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from gie_core.train import checkpoint as ckpt
from gie_core.train.config import ConfigError, TrainConfig
from gie_core.train.trainer import Trainer

from test_train import changed, context_sensitive_transformer, make_config, read_tensors, state_of, write_dataset  # noqa: F401

FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def data_txt(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), [(64, 64), (96, 64), (64, 64)])


@pytest.fixture(scope="module")
def one_pair(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("pair"), [(64, 64)])


def fp8_layers(transformer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in transformer.named_parameters() if p.dtype == FP8}


# --- an fp8-stored base -------------------------------------------------------------------------


@pytest.mark.parametrize("trainable, lr", [("connector", 1e-2), ("lora", 1e-2)])
def test_fp8_base_trains_and_only_the_trained_weights_change(tmp_path, kontext_dir, gie_dir, one_pair,
                                                             context_sensitive_transformer, trainable, lr):  # noqa: F811
    """Stage 1 (the connector, its gradients flowing through the fp8 transformer) and a stage-2
    LoRA on the fp8 transformer: the loss goes down, the trained weights stay fp32 and change,
    every fp8 weight (and every other frozen one) is bit-for-bit what it was."""
    from gie_core.train.memory import is_layerwise_cast

    opts = {"model.init_transformer": str(context_sensitive_transformer), "train.max_steps": 30,
            "train.overfit_batches": 1, "optim.lr": lr, "memory.transformer_dtype": "fp8",
            "memory.encoder_dtype": "fp8", "memory.vae_dtype": "fp8"}
    if trainable == "lora":
        opts.update({"train.stage": 2, "train.trainable": "lora", "lora.rank": 4, "lora.alpha": 4})
    trainer = Trainer(make_config(tmp_path / "run", kontext_dir, gie_dir, one_pair, **opts)).setup()
    transformer, connector = trainer.unwrapped.transformer, trainer.unwrapped.connector
    assert trainer.memory.transformer == "fp8" and trainer.memory.checkpointing  # checkpointing comes with fp8
    assert is_layerwise_cast(transformer) and is_layerwise_cast(trainer.components.qwen.model)
    assert is_layerwise_cast(trainer.components.vae) and is_layerwise_cast(trainer.components.text.clip)
    assert transformer.x_embedder.weight.dtype == torch.float32  # kept layers: the compute dtype
    before_fp8 = fp8_layers(transformer)
    assert any("transformer_blocks.0.attn.to_q" in n for n in before_fp8)
    before = {"connector": state_of(connector), "transformer": state_of(transformer)}
    frozen_parts = {"qwen": state_of(trainer.components.qwen.model), "vae": state_of(trainer.components.vae)}

    losses = trainer.train().losses
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], losses
    after_fp8 = fp8_layers(transformer)
    assert set(after_fp8) == set(before_fp8) and all(torch.equal(after_fp8[n].view(torch.uint8), before_fp8[n].view(torch.uint8))
                                                     for n in before_fp8)
    trained = {n for n, p in transformer.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in connector.parameters())
    assert all(dict(transformer.named_parameters())[n].dtype == torch.float32 for n in trained)
    assert changed(before["connector"], state_of(connector)) == set(before["connector"])
    moved = changed(before["transformer"], state_of(transformer))
    if trainable == "lora":
        assert moved and all("lora_" in n for n in moved) and {n for n in moved} <= trained
    else:
        assert not moved and not trained
    assert not changed(frozen_parts["qwen"], state_of(trainer.components.qwen.model))
    assert not changed(frozen_parts["vae"], state_of(trainer.components.vae))


def test_image_attention_set_stays_fp32_on_an_fp8_base(tmp_path, kontext_dir, gie_dir, data_txt):
    """The released stage-2 set trains as fp32 masters; the rest of each block is fp8."""
    trainer = Trainer(make_config(tmp_path / "run", kontext_dir, gie_dir, data_txt, **{
        "train.stage": 2, "memory.transformer_dtype": "fp8", "train.mixed_precision": "bf16"})).setup()
    params = dict(trainer.unwrapped.transformer.named_parameters())
    trained = {n for n, p in params.items() if p.requires_grad}
    assert "transformer_blocks.0.attn.to_q.weight" in trained and "single_transformer_blocks.0.attn.to_q.weight" in trained
    assert all(params[n].dtype == torch.float32 for n in trained)
    assert params["transformer_blocks.0.ff.net.2.weight"].dtype == FP8
    assert params["transformer_blocks.0.attn.add_q_proj.weight"].dtype == FP8
    before = {n: p.detach().clone() for n, p in params.items()}
    result = trainer.train()
    assert all(math.isfinite(v) for v in result.losses)
    after = dict(trainer.unwrapped.transformer.named_parameters())
    assert {n for n in before if not torch.equal(before[n].float(), after[n].float())} == trained


def test_fp8_and_gguf_transformer_files_stay_as_stored(tmp_path, kontext_dir, gie_dir, data_txt):
    """An fp8 safetensors transformer trains fp8 without an upcast copy (its fp8 values exactly as
    in the file); a GGUF one keeps its quantised blocks and trains stage 1 and a LoRA; a set that
    would train quantised layers is refused by name."""
    from gie_core.weights.gguf import write_gguf
    from gie_core.weights.loading import load_kontext_dir
    from gie_core.weights.reader import save_safetensors_atomic

    state = load_kontext_dir(kontext_dir, dtype="fp32", parts=("transformer",)).transformer.state_dict()
    fp8_file = save_safetensors_atomic({k: v.to(FP8) if v.ndim == 2 and "blocks." in k else v for k, v in state.items()},
                                       tmp_path / "transformer_fp8.safetensors")
    trainer = Trainer(make_config(tmp_path / "fp8", kontext_dir, gie_dir, data_txt, **{
        "model.init_transformer": str(fp8_file)})).setup()
    assert trainer.memory.transformer == "fp8"
    loaded = dict(trainer.unwrapped.transformer.named_parameters())
    to_q = "transformer_blocks.0.attn.to_q.weight"
    assert loaded[to_q].dtype == FP8 and torch.equal(loaded[to_q].view(torch.uint8), state[to_q].to(FP8).view(torch.uint8))
    assert all(math.isfinite(v) for v in trainer.train().losses)

    gguf_file = write_gguf(state, tmp_path / "transformer-Q8_0.gguf", "Q8_0")
    for name, opts in (("gguf1", {}), ("gguf2", {"train.stage": 2, "train.trainable": "lora", "lora.rank": 4})):
        trainer = Trainer(make_config(tmp_path / name, kontext_dir, gie_dir, data_txt, **{
            "model.init_transformer": str(gguf_file), **opts}))
        result = trainer.train()
        assert trainer.memory.transformer == "gguf" and all(math.isfinite(v) for v in result.losses)
        assert type(trainer.unwrapped.transformer.transformer_blocks[0].ff.net[2]).__name__ == "GGUFLinear"
    with pytest.raises(ValueError, match="GGUF file: its quantised layers cannot train"):
        Trainer(make_config(tmp_path / "gguf3", kontext_dir, gie_dir, data_txt, **{
            "model.init_transformer": str(gguf_file), "train.stage": 2})).setup()


# --- optimizers ---------------------------------------------------------------------------------


def _bnb_reason() -> str | None:
    """Why 8-bit AdamW cannot run here, or None when it can (bitsandbytes' CPU backend)."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        return f"bitsandbytes is not installed ({exc}); pip install 'gpt-image-edit-nodes[bnb]'"
    try:
        p = torch.nn.Parameter(torch.ones(4096))
        opt = bnb.optim.AdamW8bit([p], lr=1e-3)
        p.grad = torch.ones_like(p)
        opt.step()
    except Exception as exc:  # noqa: BLE001 - any failure of its backend on this machine
        return f"bitsandbytes {bnb.__version__} cannot run 8-bit AdamW on this CPU: {type(exc).__name__}: {exc}"
    return None


@pytest.mark.parametrize("optimizer", ["adamw8bit", "prodigy", "adafactor"])
def test_optimizers_resume_exactly(tmp_path, kontext_dir, gie_dir, data_txt, optimizer):
    """Four steps at once, or two then a resume for two: the same weights bit for bit (the
    checkpoint holds the optimizer's whole state: 8-bit blocks and their scales, Prodigy's d)."""
    if optimizer == "adamw8bit" and (reason := _bnb_reason()):
        pytest.skip(reason)
    # the image-branch set: its 64x64 attention weights reach bitsandbytes' 8-bit size (4096 elements)
    opts = {"optim.optimizer": optimizer, "optim.lr": 1.0 if optimizer == "prodigy" else 1e-3, "checkpoint.every": 2,
            "train.max_steps": 4, "train.stage": 2}
    whole = Trainer(make_config(tmp_path / "whole", kontext_dir, gie_dir, data_txt, **opts)).train()
    Trainer(make_config(tmp_path / "parts", kontext_dir, gie_dir, data_txt, **{**opts, "train.max_steps": 2})).train()
    resumed = Trainer(make_config(tmp_path / "parts", kontext_dir, gie_dir, data_txt, **{
        **opts, "checkpoint.resume": "latest"})).train()
    assert resumed.losses == whole.losses[2:]
    a, b = read_tensors(whole.checkpoint / ckpt.TRAINABLE_FILE), read_tensors(resumed.checkpoint / ckpt.TRAINABLE_FILE)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(resumed.checkpoint / "optimizer.bin", weights_only=False)
    first = next(iter(state["state"].values()))
    if optimizer == "adamw8bit":  # the 8-bit state itself was saved, not a 32-bit copy
        tensors = torch.utils._pytree.tree_leaves(state["state"])
        assert any(torch.is_tensor(v) and v.dtype == torch.uint8 for v in tensors)
    elif optimizer == "prodigy":
        assert {"d", "d_numerator", "d_max"} <= set(state["param_groups"][0]) and {"p0", "s"} <= set(first)
    else:
        assert any("exp_avg_sq" in k for k in first)


# --- block swap ---------------------------------------------------------------------------------


def test_block_swap_gives_the_loss_of_no_swap(tmp_path, kontext_dir, gie_dir, data_txt):
    """Blocks streamed by diffusers' group offloading (in forward and in the checkpointed
    backward) give the same losses and weights as resident ones; blocks that train stay."""
    from gie_core.train.memory import swapped_block_names

    runs = {}
    for name, opts in (("resident", {}), ("swap0", {"memory.resident_blocks": 0}), ("swap1", {"memory.resident_blocks": 1})):
        trainer = Trainer(make_config(tmp_path / name, kontext_dir, gie_dir, data_txt, **{
            "train.max_steps": 3, "optim.lr": 1e-2, "train.gradient_checkpointing": True, **opts}))
        runs[name] = (trainer, trainer.train())
    assert swapped_block_names(runs["resident"][0].unwrapped.transformer) == []
    assert swapped_block_names(runs["swap0"][0].unwrapped.transformer) == ["transformer_blocks.0", "single_transformer_blocks.0"]
    assert runs["swap1"][0].swapped_blocks == ["single_transformer_blocks.0"]
    base = runs["resident"]
    for name in ("swap0", "swap1"):
        trainer, result = runs[name]
        assert result.losses == pytest.approx(base[1].losses, abs=1e-6, rel=0)
        a, b = trainer.trainable_state(), base[0].trainable_state()
        assert all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)
    # stage 2 training the double block only: the single block is swapped, the double block stays
    trainer = Trainer(make_config(tmp_path / "layers", kontext_dir, gie_dir, data_txt, **{
        "train.stage": 2, "train.layers": [0], "memory.resident_blocks": 0, "train.max_steps": 1})).setup()
    assert trainer.swapped_blocks == ["single_transformer_blocks.0"]


# --- options --------------------------------------------------------------------------------------


def test_memory_options_are_checked_with_the_config_and_named():
    def check(**options):
        return TrainConfig.from_dict({}).update({k.split(".")[0]: {k.split(".")[1]: v} for k, v in options.items()}).check(
            for_training=False)

    with pytest.raises(ConfigError, match=r"memory\.transformer_dtype is 'fp4'; expected one of auto, fp8"):
        check(**{"memory.transformer_dtype": "fp4"})
    with pytest.raises(ConfigError, match=r"optim\.optimizer is 'lion'; expected one of adamw, adamw8bit, adafactor, prodigy"):
        check(**{"optim.optimizer": "lion"})
    cfg = TrainConfig.from_dict({"train": {"stage": 2, "trainable": "lora"}, "memory": {"resident_blocks": 10}})
    with pytest.raises(ConfigError, match=r"memory\.resident_blocks is 10 but train\.trainable 'lora' trains weights in every"):
        cfg.check(for_training=False)
    cfg = TrainConfig.from_dict({"memory": {"resident_blocks": 4}, "train": {"gradient_checkpointing": False}})
    with pytest.raises(ConfigError, match=r"memory\.resident_blocks needs gradient checkpointing"):
        cfg.check(for_training=False)
    with pytest.raises(ConfigError, match=r"train\.trainable 'full' trains every transformer weight"):
        TrainConfig.from_dict({"train": {"stage": 2, "trainable": "full"}, "memory": {"transformer_dtype": "fp8"}}).check(False)
    ok = TrainConfig.from_dict({"memory": {"transformer_dtype": "fp8"}}).check(for_training=False)
    assert ok.use_gradient_checkpointing and ok.learning_rate == 1e-3
    assert TrainConfig.from_dict({"optim": {"optimizer": "prodigy"}}).learning_rate == 1.0


def test_help_lists_the_memory_options_and_optimizers(capsys):
    from gie_core.cli.train import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--memory.transformer_dtype", "--memory.encoder_dtype", "--memory.vae_dtype", "--memory.resident_blocks"):
        assert flag in text
    assert "adamw8bit" in text and "adafactor" in text and "prodigy" in text
