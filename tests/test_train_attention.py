"""``train.attention_kernels``: the SDPA kernels the training step may use, forward and backward.

Real ``Trainer`` runs on the tiny models (one CPU process). A forward pre-hook on every attention
module records which kernels PyTorch was allowed at that call; with gradient checkpointing the
attention runs again inside ``backward()``, and those calls must see the same limit.
"""

from __future__ import annotations

import math

import pytest
import torch

from gie_core.cli.train import main as train_main
from gie_core.train.attention import allowed_kernels
from gie_core.train.config import ATTENTION_KERNELS, DEFAULT_ATTENTION_KERNELS, ConfigError, TrainConfig
from gie_core.train.trainer import Trainer

from test_train import make_config, write_dataset


@pytest.fixture(scope="module")
def one_pair(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("pair"), [(64, 64)])


def _record_attention_calls(transformer) -> list[list[str]]:
    """The allowed kernels at every attention call of ``transformer``."""
    calls: list[list[str]] = []
    for name, module in transformer.named_modules():
        if name.endswith(".attn"):
            module.register_forward_pre_hook(lambda *_: calls.append(allowed_kernels()))
    return calls


@pytest.mark.parametrize("kernels", [["math"], None])
def test_the_step_runs_under_the_chosen_kernels_in_forward_and_backward(tmp_path, kontext_dir, gie_dir, one_pair, kernels):
    """A stage-2 LoRA step with gradient checkpointing: every attention call of the step, the
    recomputed ones in backward included, is limited to ``train.attention_kernels`` (math alone
    still trains: finite losses, LoRA weights change); the default leaves cuDNN out; outside the
    step PyTorch's own choice is back."""
    opts = {"train.stage": 2, "train.trainable": "lora", "lora.rank": 4, "lora.alpha": 4, "optim.lr": 1e-2,
            "train.gradient_checkpointing": True, "train.max_steps": 2}
    if kernels is not None:
        opts["train.attention_kernels"] = kernels
    trainer = Trainer(make_config(tmp_path / "run", kontext_dir, gie_dir, one_pair, **opts)).setup()
    transformer = trainer.unwrapped.transformer
    lora_before = {n: p.detach().clone() for n, p in transformer.named_parameters() if "lora_" in n}
    calls = _record_attention_calls(transformer)
    result = trainer.train()

    assert all(math.isfinite(v) for v in result.losses) and len(result.losses) == 2
    assert any(not torch.equal(p, lora_before[n]) for n, p in transformer.named_parameters() if "lora_" in n)
    want = kernels or list(DEFAULT_ATTENTION_KERNELS)
    assert "cudnn" not in want
    blocks = sum(1 for n, _ in transformer.named_modules() if n.endswith(".attn"))
    # each step: one forward call per block, and with checkpointing its recomputation in backward
    assert len(calls) >= 2 * 2 * blocks
    assert {tuple(k) for k in calls} == {tuple(want)}
    assert set(allowed_kernels()) >= set(ATTENTION_KERNELS)  # scoped to the step


@pytest.mark.parametrize("value, message", [
    (["flash", "turbo"], "train.attention_kernels has 'turbo'; expected a list of one or more of flash, efficient, math, cudnn"),
    ([], "train.attention_kernels is []"),
    (["math", "math"], "names a kernel twice"),
])
def test_a_kernel_that_does_not_exist_is_refused_by_name(value, message):
    cfg = TrainConfig()
    cfg.train.attention_kernels = value
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        cfg.check(for_training=False)


def test_the_command_line_refuses_an_unknown_kernel_before_loading_anything(capsys):
    with pytest.raises(SystemExit) as exc:
        train_main(["plan", "--train.attention_kernels", "flash,cudnnx"])
    assert exc.value.code == 2
    assert "train.attention_kernels has 'cudnnx'" in capsys.readouterr().err


def test_cudnn_is_allowed_when_asked_for():
    cfg = TrainConfig()
    cfg.train.attention_kernels = ["cudnn", "flash"]
    cfg.check(for_training=False)  # an explicit opt-in is accepted
