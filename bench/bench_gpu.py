"""Full-size random-weight FLUX.1 Kontext at 1024x1024, 28 steps, bf16, on a CUDA GPU.

Builds the real-size transformer (19 + 38 blocks, 12B parameters) and VAE with random
weights (no download), a 1 MP reference image and random conditioning of the released
model's shape (256 VLM + 256 T5 tokens), then measures seconds per image and peak VRAM:
- ``none``: everything on the GPU;
- ``model``: parts visit the GPU one at a time (the transformer is still whole on it);
- ``sequential``: the transformer's blocks stream in one at a time (the 24 GB mode; goal:
  peak <= 24 GB).
Also times diffusers' FluxKontextPipeline on the same weights (``--with-diffusers``) for the ratio.

    python bench/bench_gpu.py [--modes none,sequential] [--steps 28] [--size 1024]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel  # noqa: E402
from PIL import Image  # noqa: E402

from gie_core.engine.conditioning import Conditioning  # noqa: E402
from gie_core.engine.pipeline import EditPipeline  # noqa: E402
from gie_core.engine.request import resolve_edit  # noqa: E402
from gie_core.engine.sampler import KontextModels, sample  # noqa: E402
from gie_core.imaging.images import prepare_reference  # noqa: E402
from gie_core.weights.single_file import load_config, model_kwargs  # noqa: E402


def build_models():
    # Built on the meta device and filled in bf16 directly: a default fp32 init of 12B
    # parameters would need ~48 GB of RAM and minutes of kaiming init.
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**model_kwargs(load_config("flux1-kontext-dev-transformer.json")))
        vae = AutoencoderKL(**model_kwargs(load_config("flux-ae.json")))
    gen = torch.Generator("cpu").manual_seed(0)
    for module in (transformer, vae):
        module.to(torch.bfloat16).to_empty(device="cpu")
        for name, p in module.named_parameters():
            with torch.no_grad():
                if name.endswith(("norm.weight", "norm_q.weight", "norm_k.weight")) or p.ndim == 1 and "norm" in name:
                    p.fill_(1.0)
                elif p.ndim == 1:
                    p.zero_()
                else:
                    p.normal_(0.0, 0.02, generator=gen)
    transformer = transformer.eval().requires_grad_(False)
    vae = vae.eval().requires_grad_(False)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(load_config("flow-match-scheduler.json"))
    return transformer, vae, scheduler


def time_offload_mode(mode: str, models: tuple, cond: Conditioning, image: Image.Image, args) -> float:
    """Seconds for one image with ``offload=mode``; prints them with the peak VRAM."""
    transformer, vae, scheduler = models
    device = torch.device("cuda")
    pipe = EditPipeline(transformer=transformer, vae=vae, scheduler=scheduler, device=device, offload=mode)
    ref = prepare_reference(image, "preferred")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    with pipe.on_device(pipe.transformer, pipe.vae):
        request = resolve_edit(image_width=args.size, image_height=args.size, width=args.size, height=args.size,
                               steps=args.steps, cfg_batch=mode != "sequential")
        out = sample(KontextModels(transformer, vae, scheduler), cond, ref, request, device=device)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"  offload={mode:10s} {dt:7.2f} s/image   peak VRAM {peak:6.2f} GiB   finite={bool(torch.isfinite(out).all())}")
    if mode != "none":
        pipe.transformer.to("cpu")
    del pipe
    gc.collect()
    torch.cuda.empty_cache()
    return dt


def time_diffusers(models: tuple, cond: Conditioning, image: Image.Image, args) -> float:
    """Seconds for the same image with diffusers' FluxKontextPipeline (everything on the GPU)."""
    from diffusers import FluxKontextPipeline  # start-up: it imports transformers' processors; only --with-diffusers

    transformer, vae, scheduler = models
    device = torch.device("cuda")
    dp = FluxKontextPipeline(scheduler=scheduler, vae=vae.to(device), text_encoder=None, tokenizer=None,
                             text_encoder_2=None, tokenizer_2=None, transformer=transformer.to(device))
    dp.set_progress_bar_config(disable=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    dp(image=image, prompt_embeds=cond.context.to(device), pooled_prompt_embeds=cond.pooled.to(device),
       height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=3.5,
       generator=torch.Generator("cpu").manual_seed(42), output_type="pt")
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="none,model,sequential")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--with-diffusers", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; this benchmark needs a GPU")
        return 1
    models = build_models()
    g = torch.Generator("cpu").manual_seed(0)
    cond = Conditioning(torch.randn(1, 512, 4096, generator=g).to(torch.bfloat16) * 0.1,
                        torch.randn(1, 768, generator=g).to(torch.bfloat16) * 0.1)
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(args.size, args.size, 3) * 255).astype(np.uint8))
    print(f"GPU {torch.cuda.get_device_name()}, {args.size}x{args.size}, {args.steps} steps, bf16, "
          f"transformer {sum(p.numel() for p in models[0].parameters()) / 1e9:.1f}B params")
    results = {mode: time_offload_mode(mode, models, cond, image, args) for mode in args.modes.split(",")}
    if args.with_diffusers and "none" in results:
        dt = time_diffusers(models, cond, image, args)
        print(f"  diffusers FluxKontextPipeline {dt:7.2f} s/image   time ratio ours/diffusers = {results['none'] / dt:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
