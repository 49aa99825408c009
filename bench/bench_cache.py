"""Step caching on vs off, per method: wall-time ratio and PSNR against the uncached image.

The same model, reference, conditioning and seed on both sides; each cached run is timed
against an uncached run beside it (``--repeats`` pairs), so drift in machine load falls on
both. Also prints the fraction of transformer-block work the cache skipped (counted, so it
does not depend on timing noise). Goal: >= 1.8x at PSNR >= 30 dB. Pairs run in alternating
order (uncached first, then cached first, ...), at least 3; each method reports the ratio of
medians, the median of the pairs' ratios and their spread, with a note when the spread exceeds
10%.

The default model is a random 6-block FLUX (2 double + 4 single blocks, width 256, context
256 tokens) at 384x256 for 28 steps on the CPU: large enough that the transformer dominates
(the VAE and the Python loop are a few percent). ``--full`` builds the real Kontext
architecture (19 + 38 blocks, 12B parameters, random weights, bf16) for a GPU. Random weights
change more from step to step than trained ones, so caches skip less here than on real weights
(First-Block Cache never skips at its default on random weights): run on real weights for the
numbers users see.

    python bench/bench_cache.py [--methods fbcache:0.3,magcache,taylorseer] [--steps 28] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_gpu, for --full

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _measure import interleaved, machine_line, median_spread, spread_note  # noqa: E402
from bench_gpu import build_models  # noqa: E402
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel  # noqa: E402
from PIL import Image  # noqa: E402

from gie_core.engine.conditioning import Conditioning  # noqa: E402
from gie_core.engine.request import resolve_edit  # noqa: E402
from gie_core.engine.sampler import KontextModels, sample  # noqa: E402
from gie_core.imaging.images import prepare_reference  # noqa: E402
from gie_core.testing.tiny_configs import TINY_SCHEDULER, TINY_VAE  # noqa: E402

DEFAULT_METHODS = "fbcache,fbcache:0.3,magcache,magcache:0.1,taylorseer,taylorseer:3,fastercache"


def build(device, full: bool):
    torch.manual_seed(0)
    if full:
        transformer, vae, scheduler = build_models()
        return transformer.to(device), vae.to(device), scheduler, 4096, 768
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
        num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=128, guidance_embeds=True,
        axes_dims_rope=(8, 28, 28),
    ).to(device).eval()
    vae = AutoencoderKL(**TINY_VAE).to(device).eval()
    return transformer, vae, FlowMatchEulerDiscreteScheduler(**TINY_SCHEDULER), 256, 128


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float() - b.float()) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def inputs(args, device, dtype, ctx_dim: int, pooled_dim: int) -> tuple[Conditioning, torch.Tensor]:
    """Random conditioning and a random reference image, the same for every run."""
    g = torch.Generator("cpu").manual_seed(1)
    context = torch.randn(1, 512, ctx_dim, generator=g).to(device, dtype)
    pooled = torch.randn(1, pooled_dim, generator=g).to(device, dtype)
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(args.height, args.width, 3) * 255).astype(np.uint8))
    return Conditioning(context, pooled), prepare_reference(image, "keep")


def make_runner(models: KontextModels, cond: Conditioning, reference, args):
    """``run(spec) -> (seconds, image, attention calls)``: one sampling with cache ``spec`` (None: uncached)."""
    device = torch.device(args.device)
    calls = {"n": 0}
    probe = models.transformer.single_transformer_blocks[-1].attn.to_q  # runs only when the block's attention is computed
    probe.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))

    def run(spec):
        request = resolve_edit(image_width=args.width, image_height=args.height, width=args.width, height=args.height,
                               steps=args.steps, seed=42, cache=spec)
        if device.type == "cuda":
            torch.cuda.synchronize()
        calls["n"] = 0
        t = time.perf_counter()
        out = sample(models, cond, reference, request, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, out, calls["n"]

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated NAME[:VALUE] (default {DEFAULT_METHODS})")
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--repeats", type=int, default=3,
                    help="uncached/cached pairs per method, the order alternating (default 3, at least 3)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--full", action="store_true", help="the real 12B architecture (random weights, bf16; a GPU)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    args = ap.parse_args()
    if args.repeats < 3:
        ap.error(f"--repeats is {args.repeats}; at least 3 pairs are needed for a median and a spread")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    transformer, vae, scheduler, ctx_dim, pooled_dim = build(device, args.full)
    dtype = next(transformer.parameters()).dtype
    run = make_runner(KontextModels(transformer, vae, scheduler), *inputs(args, device, dtype, ctx_dim, pooled_dim), args)
    run(None)  # warm-up
    _, base, base_calls = run(None)
    n_params = sum(p.numel() for p in transformer.parameters())
    print(machine_line())
    print(f"model: FLUX transformer {len(transformer.transformer_blocks)} double + "
          f"{len(transformer.single_transformer_blocks)} single blocks, {n_params / 1e6:.1f} M parameters ({dtype}), "
          f"{args.width}x{args.height}, {args.steps} steps, device {device}; {args.repeats} uncached/cached pairs per method, order alternating")
    print(f"  {'method':<16} {'time ratio':>10} {'paired':>8} {'spread':>7} {'PSNR (dB)':>10} {'attention computed':>19}")
    for spec in [m.strip() for m in args.methods.split(",") if m.strip()]:
        runs = interleaved({"uncached": lambda: run(None), "cached": lambda spec=spec: run(spec)}, args.repeats)
        plain, cached = [r[0] for r in runs["uncached"]], [r[0] for r in runs["cached"]]
        _, out, n = runs["cached"][-1]
        ratio = statistics.median(plain) / statistics.median(cached)
        pair, spread = median_spread(a / b for a, b in zip(plain, cached))
        print(f"  {spec:<16} {ratio:>9.2f}x {pair:>7.2f}x {spread:>7.0%} {psnr(out, base):>10.1f} {n:>10d}/{base_calls:<8d}"
              f"{spread_note(spread)}")
    print("  goal: >= 1.8x at PSNR >= 30 dB (time ratio = uncached / cached wall time, medians; paired = median of the"
          " pairs' ratios, spread = (max - min) / median of those)")
    print(f"  load average at the end {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
