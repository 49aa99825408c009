"""fp8 that computes in fp8 (the ``fp8_e4m3fn_fast`` storage row, :mod:`gie_core.weights.fp8_compute`).

torch's CPU build runs ``torch._scaled_mm``, so the fp8 matmul's numerics are checked here
against bf16, forcing the scaled-matmul path. The automatic choice on the CPU is the fallback
(each layer upcast per call), and that path is checked here too. On CUDA the same paths run
under ``pytest -m gpu`` (tests/test_gpu.py).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from gie_core.engine.components import module_bytes
from gie_core.weights.convert import convert
from gie_core.weights.fp8_compute import (
    FP8,
    Fp8Linear,
    _note_once,
    fp8_compute_unavailable,
    fp8_linear,
    quantize_per_tensor,
    set_fp8_matmul,
)
from gie_core.weights.parts import check_load, load_part, quantize_choices
from gie_core.weights.reader import CheckpointReader
from gie_core.weights.single_file import bfl_flux_key_to_diffusers

ROW = "fp8_e4m3fn_fast"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def psnr(a, b) -> float:
    a, b = a.float(), b.float()
    mse = ((a - b) ** 2).mean().item()
    peak = b.abs().max().item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def _inputs(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 64, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g).to(dtype),
                pooled_projections=torch.randn(1, 64, generator=g).to(dtype), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]), return_dict=False)


def test_fp8_matmul_is_within_its_bound_of_bf16():
    """One scaled fp8 matmul (dynamic input scale, per-tensor weight scale) against the bf16
    matmul of the unquantised weights: e4m3 keeps 3 mantissa bits, so each operand is within
    1/16 relative, and the output's relative error stays near 3%."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 96, 256, generator=g).bfloat16()
    w = (torch.randn(512, 256, generator=g) * 0.02).bfloat16()
    b = torch.randn(512, generator=g).bfloat16() * 0.1
    w8, scale = quantize_per_tensor(w)
    assert w8.dtype == FP8 and scale.dtype == torch.float32 and scale.ndim == 0
    ref = F.linear(x, w, b)
    out = fp8_linear(x, w8, scale, b)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert rel_err(out, ref) < 0.05
    assert psnr(out, ref) > 30
    # the weight's own rounding only: the fp8 matmul against the upcast fp8 weight
    upcast = F.linear(x, (w8.float() * scale).bfloat16(), b)
    assert rel_err(out, upcast) < 0.04


def test_gradients_flow_to_the_input_through_the_fp8_matmul():
    g = torch.Generator().manual_seed(1)
    w8, scale = quantize_per_tensor(torch.randn(64, 32, generator=g) * 0.1)
    x = torch.randn(10, 32, generator=g).bfloat16().requires_grad_()
    fp8_linear(x, w8, scale).float().pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    F.linear(x2, (w8.float() * scale).bfloat16()).float().pow(2).sum().backward()
    assert rel_err(x.grad, x2.grad) < 0.06


def test_the_row_loads_through_load_part_and_the_forward_stays_close_to_bf16(gie_dir):
    assert ROW in quantize_choices("transformer") and ROW not in quantize_choices("qwen")
    loaded = load_part("transformer", gie_dir, ROW, dtype="bf16")
    ref = load_part("transformer", gie_dir, dtype="bf16").module
    t = loaded.module
    assert loaded.storage == ROW and "torch._scaled_mm" in loaded.decided
    for layer in (t.transformer_blocks[0].attn.to_q, t.transformer_blocks[0].ff.net[2],
                  t.single_transformer_blocks[0].proj_out, t.transformer_blocks[0].norm1.linear):
        assert isinstance(layer, Fp8Linear) and layer.weight.dtype == FP8 and layer.weight_scale.dtype == torch.float32
    for kept in (t.x_embedder, t.context_embedder, t.proj_out, t.norm_out.linear):
        assert type(kept) is torch.nn.Linear and kept.weight.dtype == torch.bfloat16
    assert module_bytes(t) < 0.75 * module_bytes(ref)
    with torch.no_grad():
        want = ref(**_inputs())[0]
        auto = t(**_inputs())[0]  # the CPU: each layer upcast per call
        assert set_fp8_matmul(t, "scaled_mm") >= 10
        fast = t(**_inputs())[0]  # torch's CPU _scaled_mm
    assert psnr(auto, want) > 30 and psnr(fast, want) > 28


def test_the_cpu_falls_back_to_upcasting_with_a_note(caplog):
    why = fp8_compute_unavailable("cpu")
    assert "compute capability 8.9" in why and "upcast" in why
    layer = Fp8Linear.from_linear(torch.nn.Linear(32, 16), torch.float32)
    assert layer.matmul == "auto" and not layer._use_scaled_mm(torch.zeros(2, 32))
    _note_once.cache_clear()  # logged once per process: an earlier test may have said it
    with caplog.at_level(logging.WARNING, logger="gie_core.weights.fp8_compute"):
        out = layer(torch.ones(2, 32))
        layer(torch.ones(2, 32))
    assert caplog.text.count("fp8_e4m3fn_fast: fp8 matmuls run on CUDA GPUs of compute capability 8.9") == 1
    assert torch.equal(out, torch.nn.functional.linear(torch.ones(2, 32), layer.weight.float() * layer.weight_scale,
                                                       layer.bias))


def test_a_scaled_fp8_file_runs_on_its_stored_values_and_scales(gie_dir, tmp_path):
    """Our fp8_scaled file (ComfyUI's scaled-fp8 layout: a ``scaled_fp8`` marker and per-tensor
    ``<layer>.scale_weight``), BFL names with fused qkv / linear1: every fp8 layer holds the stored
    fp8 values bit for bit, with the stored scale (split parts share their fused tensor's)."""
    path = convert(gie_dir, tmp_path, parts=("transformer",), transformer_format="fp8_scaled")["transformer"]
    t = load_part("transformer", path, ROW, dtype="bf16").module
    inner = t.config.num_attention_heads * t.config.attention_head_dim
    layers = {n: m for n, m in t.named_modules() if isinstance(m, Fp8Linear)}
    checked = 0
    with CheckpointReader.open(path) as r:
        assert "scaled_fp8" in r
        for key in r.keys():
            if not key.endswith(".scale_weight"):
                continue
            layer = key[: -len(".scale_weight")]
            stored, scale = r.read(f"{layer}.weight"), r.read(key).float()
            for name, part in bfl_flux_key_to_diffusers(f"{layer}.weight", stored, inner_dim=inner, mlp_hidden_dim=4 * inner):
                module = layers.get(name[: -len(".weight")])
                if module is None:
                    continue  # a layer FP8_KEEP keeps in the compute dtype
                assert torch.equal(module.weight.view(torch.uint8), part.view(torch.uint8)), name
                assert module.weight_scale.item() == scale.item(), name
                checked += 1
    assert checked >= 10


def test_lora_on_fp8_compute_acts_as_on_bf16(kontext_dir, tmp_path):
    from gie_core.testing.tiny import build_tiny_lora
    from gie_core.weights.lora import activated

    lora = build_tiny_lora(kontext_dir, tmp_path)

    def effect(storage: str, matmul: str = "auto"):
        t = load_part("transformer", kontext_dir, storage, dtype="bf16").module
        if storage == ROW:
            set_fp8_matmul(t, matmul)
        name = load_part("lora", lora, transformer=t).adapter
        adapted = [m for m in t.modules() if hasattr(m, "lora_A") and name in m.lora_A]
        assert adapted and all(m.lora_A[name].weight.dtype == torch.bfloat16 for m in adapted)
        with torch.no_grad():
            with activated(t, []):
                off = t(**_inputs())[0].float()
            with activated(t, [(name, 1.0)]):
                on = t(**_inputs())[0].float()
        return on - off

    ref = effect("bf16")
    assert ref.abs().max() > 0
    for matmul in ("auto", "scaled_mm"):
        assert rel_err(effect(ROW, matmul), ref) < 0.25


def test_the_row_is_refused_where_it_does_not_apply(gie_dir):
    with pytest.raises(ValueError, match=f"qwen quantization '{ROW}' is not available for the qwen"):
        check_load("qwen", gie_dir, ROW)


@pytest.mark.parametrize("kind", ["gie_dir", "kontext_dir"])
def test_the_folder_loaders_honour_the_row_when_called_directly(kind, request):
    """`load_gie_checkpoint` / `load_kontext_dir(transformer_quantize="fp8_e4m3fn_fast")` give the
    fp8-compute layers too (before, called without load_part, they silently loaded the compute dtype)."""
    from gie_core.weights import loading

    folder = request.getfixturevalue(kind)
    if kind == "gie_dir":
        model = loading.load_gie_checkpoint(folder, dtype="fp32", parts=("transformer",),
                                            transformer_quantize="fp8_e4m3fn_fast").transformer
    else:
        model = loading.load_kontext_dir(folder, dtype="fp32", parts=("transformer",),
                                         transformer_quantize="fp8_e4m3fn_fast").transformer
    fp8 = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert fp8 and all(m.weight.dtype == torch.float8_e4m3fn for m in fp8)
