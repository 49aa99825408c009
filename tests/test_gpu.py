"""CUDA-only correctness checks (``pytest -m gpu``; ``bench/gpu_check.py`` runs them too).

Without a CUDA GPU every test here is collected and skipped with its reason. On a GPU they check
the paths the CPU suite cannot reach:
- a stage-2 LoRA step at the layout that crashed (real head width, 2 x 4,096 image tokens plus a
  Qwen token count that is not a multiple of 128, fp8 base, bf16 autocast, checkpointing on and
  off) gives a finite loss and finite gradients under the default ``train.attention_kernels``,
  and PyTorch does not pick cuDNN inside the step;
- fp8 compute runs ``torch._scaled_mm`` on compute capability 8.9+ and stays within its bound of
  bf16, and a LoRA on it acts as on bf16.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gie_core.weights.single_file import load_config, model_kwargs

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (pytest -m gpu on a machine with one)")]
FP8_MATMULS = CUDA and torch.cuda.get_device_capability() >= (8, 9)
needs_fp8_matmuls = pytest.mark.skipif(not FP8_MATMULS, reason="needs a CUDA GPU of compute capability 8.9 or newer "
                                                                "(fp8 matmuls)")


def real_width_transformer(device="cuda", dtype=torch.bfloat16):
    """FLUX.1 Kontext's real widths (24 heads x 128, context 4096) with one block of each kind."""
    from diffusers import FluxTransformer2DModel

    kwargs = model_kwargs(load_config("flux1-kontext-dev-transformer.json"))
    kwargs.update(num_layers=1, num_single_layers=1)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**kwargs)
    finally:
        torch.set_default_dtype(old)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_stage2_lora_step_at_the_crash_layout_is_finite(checkpointing):
    from gie_core.engine.connector import Connector
    from gie_core.train.attention import training_attention
    from gie_core.train.config import TrainConfig
    from gie_core.train.memory import resolve_memory
    from gie_core.train.models import EditModel, prepare_for_training

    cfg = TrainConfig()
    cfg.train.stage, cfg.train.trainable, cfg.train.gradient_checkpointing = 2, "lora", checkpointing
    cfg.memory.transformer_dtype = "fp8"
    cfg.check(for_training=False)
    t = real_width_transformer()
    conn = Connector.for_mode("vlm", 3584, t.config.joint_attention_dim).cuda()
    prepare_for_training(t, conn, cfg, resolve_memory(cfg), torch.bfloat16)
    model = EditModel(conn, t, "vlm").cuda().train()
    g = torch.Generator(device="cuda").manual_seed(0)
    lat = lambda: torch.randn(1, 16, 128, 128, generator=g, device="cuda")  # noqa: E731  # 1024 px
    inputs = dict(x0=lat(), noise=lat(), sigmas=torch.tensor([0.7], device="cuda"), reference=lat(),
                  vlm_hidden=torch.randn(1, 301, 3584, generator=g, device="cuda"),  # 8192 + 301: not a multiple of 128
                  pooled_empty=torch.randn(1, 768, generator=g, device="cuda"))
    seen = []

    def kernel_picked(*_):  # what SDPA picks here for diffusers' [B, H, S, D] view of the step's joint sequence
        q = torch.randn(1, 8192 + 301, 24, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        seen.append(torch._fused_sdp_choice(q, q, q))

    hook = t.transformer_blocks[0].attn.register_forward_pre_hook(kernel_picked)
    with torch.autocast("cuda", dtype=torch.bfloat16), training_attention(cfg.train.attention_kernels):
        loss = model(**inputs)["loss"]
        loss.backward()
    torch.cuda.synchronize()
    hook.remove()
    from torch.nn.attention import SDPBackend

    assert math.isfinite(loss.item())
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert seen and SDPBackend.CUDNN_ATTENTION.value not in seen


@needs_fp8_matmuls
def test_fp8_compute_runs_scaled_mm_within_its_bound():
    from gie_core.weights.fp8_compute import Fp8Linear, prepare_fp8_compute

    ref = real_width_transformer()
    fp8 = prepare_fp8_compute(real_width_transformer(), torch.bfloat16)
    layer = fp8.transformer_blocks[0].attn.to_q
    x = torch.randn(8, 3072, device="cuda", dtype=torch.bfloat16)
    assert isinstance(layer, Fp8Linear) and layer._use_scaled_mm(x)
    want = F.linear(x, ref.transformer_blocks[0].attn.to_q.weight, ref.transformer_blocks[0].attn.to_q.bias)
    got = layer(x)
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 0.05
    g = torch.Generator(device="cuda").manual_seed(1)
    kw = dict(hidden_states=torch.randn(1, 2048, 64, generator=g, device="cuda", dtype=torch.bfloat16),
              encoder_hidden_states=torch.randn(1, 301, 4096, generator=g, device="cuda", dtype=torch.bfloat16),
              pooled_projections=torch.randn(1, 768, generator=g, device="cuda", dtype=torch.bfloat16),
              timestep=torch.tensor([0.5], device="cuda"), guidance=torch.tensor([3.5], device="cuda"),
              img_ids=torch.zeros(2048, 3, device="cuda"), txt_ids=torch.zeros(301, 3, device="cuda"), return_dict=False)
    with torch.no_grad():
        a, b = fp8(**kw)[0].float(), ref(**kw)[0].float()
    psnr = 10 * math.log10(b.abs().max().item() ** 2 / ((a - b) ** 2).mean().item())
    assert psnr >= 30


@needs_fp8_matmuls
def test_lora_on_fp8_compute_acts_as_on_bf16(kontext_dir, tmp_path):
    from gie_core.testing.tiny import build_tiny_lora
    from gie_core.weights.lora import activated
    from gie_core.weights.parts import load_part

    lora = build_tiny_lora(kontext_dir, tmp_path)
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)

    kw = dict(hidden_states=rand(1, 16, 64), encoder_hidden_states=rand(1, 8, 32), pooled_projections=rand(1, 64),
              timestep=torch.tensor([0.5], device="cuda"), guidance=torch.tensor([3.5], device="cuda"),
              img_ids=torch.zeros(16, 3, device="cuda"), txt_ids=torch.zeros(8, 3, device="cuda"), return_dict=False)

    def effect(storage):
        t = load_part("transformer", kontext_dir, storage, dtype="bf16").module.cuda()
        name = load_part("lora", lora, transformer=t).adapter
        with torch.no_grad():
            with activated(t, []):
                off = t(**kw)[0].float()
            with activated(t, [(name, 1.0)]):
                on = t(**kw)[0].float()
        return on - off, t

    ref, _ = effect("bf16")
    got, t = effect("fp8_e4m3fn_fast")
    assert t.transformer_blocks[0].attn.to_q.base_layer._use_scaled_mm(torch.zeros(1, 64, device="cuda", dtype=torch.bfloat16))
    assert ((got - ref).norm() / ref.norm()).item() < 0.25
