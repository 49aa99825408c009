"""Our Kontext sampler vs diffusers' FluxKontextPipeline on the same small random model.

Both sides are measured the same way (the shared method of ``bench/_measure.py``): ``--warmup``
untimed runs each, then ``--repeats`` timed rounds in interleaved pairs whose order alternates
(ours-diffusers, diffusers-ours, ...), so drift in machine load falls on both; each side reports
its median and spread, with a note when the spread exceeds 10%. Prints the machine line, the
wall-time ratio of the medians (ours / diffusers; goal <= 1.0), the median of the paired ratios,
and the max output difference, all measured in this one run. CPU by default; ``--device cuda``
on a GPU machine.

    python bench/bench_sampler.py [--size 256] [--steps 8] [--repeats 5] [--warmup 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel  # noqa: E402
from _measure import interleaved, machine_line, median_spread, spread_note  # noqa: E402
from PIL import Image  # noqa: E402

from gie_core.engine.conditioning import Conditioning  # noqa: E402
from gie_core.engine.request import resolve_edit  # noqa: E402
from gie_core.engine.sampler import KontextModels, sample  # noqa: E402
from gie_core.imaging.images import prepare_reference  # noqa: E402
from gie_core.testing.tiny_configs import TINY_SCHEDULER, TINY_VAE  # noqa: E402


def build(device):
    torch.manual_seed(0)
    # Bigger than the test models so the transformer, not Python overhead, dominates.
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
        num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=128, guidance_embeds=True,
        axes_dims_rope=(8, 28, 28),
    ).to(device).eval()
    vae = AutoencoderKL(**TINY_VAE).to(device).eval()
    return transformer, vae, FlowMatchEulerDiscreteScheduler(**TINY_SCHEDULER)


def make_sides(args, device) -> tuple[dict, int, int]:
    """{"ours": fn, "diffusers": fn}, each one edit of the same random inputs, and the (w, h) they make."""
    transformer, vae, scheduler = build(device)
    pipe = FluxKontextPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                               text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator("cpu").manual_seed(1)
    context = torch.randn(1, 512, 256, generator=g).to(device)
    pooled = torch.randn(1, 128, generator=g).to(device)
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(args.size, args.size * 3 // 2, 3) * 255).astype(np.uint8))
    h = args.size // 16 * 16
    w = (args.size * 3 // 2) // 16 * 16

    def ours():
        ref = prepare_reference(image, "keep")
        request = resolve_edit(image_width=w, image_height=h, width=w, height=h, steps=args.steps, seed=42)
        return sample(KontextModels(transformer, vae, scheduler), Conditioning(context, pooled), ref, request, device=device)

    def theirs():
        out = pipe(image=image, prompt_embeds=context, pooled_prompt_embeds=pooled, height=h, width=w,
                   num_inference_steps=args.steps, guidance_scale=3.5, generator=torch.Generator("cpu").manual_seed(42),
                   max_area=h * w, _auto_resize=False, output_type="pt").images
        return out.permute(0, 2, 3, 1)

    return {"ours": ours, "diffusers": theirs}, w, h


def measure(sides: dict, device, warmup: int, repeats: int) -> tuple[dict, dict]:
    """({side: [seconds]}, {side: last output}): warm-up, then timed rounds in interleaved pairs
    whose order alternates."""
    outs = {}

    def timed(name, fn):
        def run():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            outs[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t
        return run

    for _ in range(warmup):  # the same untimed warm-up on both sides
        for fn in sides.values():
            fn()
    times = interleaved({name: timed(name, fn) for name, fn in sides.items()}, repeats)
    return times, outs


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per side, order alternating (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per side first (default 1)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    args = ap.parse_args()
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sides, w, h = make_sides(args, device)
    times, outs = measure(sides, device, args.warmup, args.repeats)

    print(machine_line())
    print(f"device {device}, {w}x{h}, {args.steps} steps, {args.warmup} warm-up + {args.repeats} timed rounds "
          "per side, order alternating")
    med = {}
    for name in sides:
        med[name], spread = median_spread(times[name])
        runs = ", ".join(f"{t * 1000:.1f}" for t in times[name])
        print(f"  {name:<9} median {med[name] * 1000:8.1f} ms  spread {spread:4.0%}  (runs: {runs}){spread_note(spread)}")
    paired, pspread = median_spread(a / b for a, b in zip(times["ours"], times["diffusers"]))
    diff = (outs["ours"].float().cpu() - outs["diffusers"].float().cpu()).abs().max().item()
    print(f"  time ratio ours/diffusers = {med['ours'] / med['diffusers']:.3f} (medians; paired {paired:.3f}, "
          f"spread {pspread:.0%})  (goal <= 1.0)")
    print(f"  max |ours - diffusers| = {diff:.2e}")


if __name__ == "__main__":
    main()
