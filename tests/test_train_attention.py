"""``train.attention_kernels``: the SDPA kernels the training step may use, forward and backward.

Real ``Trainer`` runs on the tiny models (one CPU process). A forward pre-hook on every attention
module records which kernels PyTorch was allowed at that call; with gradient checkpointing the
attention runs again inside ``backward()``, and those calls must see the same limit.
"""

from __future__ import annotations

import math
import sys

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


# --- optional GPU packages: absent or built for another torch -------------------------------


def test_an_attention_backend_whose_wheel_does_not_import_falls_back_with_a_clear_note(tmp_path, monkeypatch):
    """sageattention installed but unusable (a wheel for another torch): diffusers' dispatcher
    cannot use it, the note says so and names what to do, and the run uses sdpa."""
    from gie_core.engine.acceleration import Acceleration, attention_unavailable

    assert "sageattention" in attention_unavailable("sage", "cuda")  # absent: diffusers' own message
    (tmp_path / "sageattention").mkdir()
    (tmp_path / "sageattention" / "__init__.py").write_text("raise ImportError('undefined symbol: _ZN3c10')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    why = attention_unavailable("sage", "cuda")
    assert why.startswith(f"sageattention is installed but does not import with torch {torch.__version__}")
    acc = Acceleration(attention="sage").effective("cuda", log=False)
    assert acc.attention == "sdpa" and "using sdpa" in acc.notes[-1]


def test_an_optimizer_whose_package_does_not_import_is_refused_before_any_weight(tmp_path, monkeypatch, kontext_dir,
                                                                                   gie_dir, one_pair):
    from gie_core.train.config import OPTIMIZER_TABLE

    (tmp_path / "pkg" / "bitsandbytes").mkdir(parents=True)
    (tmp_path / "pkg" / "bitsandbytes" / "__init__.py").write_text("raise OSError('libbitsandbytes_cuda130.so: cannot open')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    assert OPTIMIZER_TABLE["adamw8bit"].import_problem().startswith(
        f"bitsandbytes is installed but does not import with torch {torch.__version__} (OSError: libbitsandbytes_cuda130.so")
    cfg = make_config(tmp_path / "run", kontext_dir, gie_dir, one_pair, **{"optim.optimizer": "adamw8bit"})
    with pytest.raises(ValueError, match="optim.optimizer is 'adamw8bit' but bitsandbytes is installed but does not import"):
        Trainer(cfg).setup()
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_a_bitsandbytes_that_does_not_import_is_refused_for_qwen_before_any_weight(tmp_path, monkeypatch, gie_dir):
    """int8/nf4 Qwen with a bitsandbytes wheel built for another CUDA: refused by check_load, with
    the import error, before a weight is read (not minutes later inside transformers)."""
    from gie_core.weights.parts import check_load

    (tmp_path / "pkg" / "bitsandbytes").mkdir(parents=True)
    (tmp_path / "pkg" / "bitsandbytes" / "__init__.py").write_text("raise OSError('libbitsandbytes_cuda130.so: cannot open')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    with pytest.raises(ValueError, match=r"qwen quantization 'nf4' cannot run here: bitsandbytes is installed but does "
                                         r"not import with torch .*libbitsandbytes_cuda130\.so"):
        check_load("qwen", gie_dir, "nf4", run_device="cuda")
