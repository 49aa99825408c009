"""Lighter transformer weights: fp8 storage, GGUF Q8_0 and Q4_0 against bf16.

One random FLUX.1 Kontext transformer at the real width (3072, 24 heads, context 4096, pooled
768) with ``--double`` double and ``--single`` single blocks is saved in bf16 (diffusers
layout) and written as GGUF Q8_0 and Q4_0 files (BFL layout, with ``gie_core.weights.gguf.write_gguf``);
each variant is then loaded the way users load it (bf16: ``load_kontext_dir``; fp8:
``transformer_quantize="fp8"``; GGUF: ``load_gguf_transformer``) and measured the same way:

- resident weight bytes / bf16's, measured on this model and extrapolated to the real
  19 + 38 blocks from the measured per-block bytes (goals: fp8 <= 0.55x, Q4 <= 0.35x);
- the output difference against bf16: the same sampling run (seed, conditioning, reference)
  through each, PSNR of the decoded images and relative error of one velocity prediction.

    python bench/bench_quant.py [--double 1] [--single 2] [--size 128] [--steps 4] [--dir /tmp/gie-bench-quant]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # bfl_layout: the test-side BFL writer (independent of the loader)

import torch  # noqa: E402
from bfl_layout import flux_diffusers_to_bfl  # noqa: E402
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel  # noqa: E402

from gie_core.engine.components import module_bytes as resident_bytes  # noqa: E402
from gie_core.engine.conditioning import Conditioning  # noqa: E402
from gie_core.engine.request import resolve_edit  # noqa: E402
from gie_core.engine.sampler import KontextModels, sample  # noqa: E402
from gie_core.testing.tiny_configs import TINY_SCHEDULER, TINY_VAE  # noqa: E402
from gie_core.weights.gguf import load_gguf_transformer, write_gguf  # noqa: E402
from gie_core.weights.quantize import prepare_fp8_storage  # noqa: E402
from gie_core.weights.single_file import load_config, model_kwargs  # noqa: E402

KINDS = ("bf16", "fp8", "Q8_0", "Q4_0")


def block_bytes(model, prefix: str) -> int:
    return resident_bytes(getattr(model, prefix)[0])


def extrapolate(model, layers=19, single=38) -> int:
    """Resident bytes of the real 19 + 38 block model: this model's non-block bytes plus the
    measured bytes of one block of each kind times the real counts."""
    total = resident_bytes(model)
    d, s = block_bytes(model, "transformer_blocks"), block_bytes(model, "single_transformer_blocks")
    top = total - d * len(model.transformer_blocks) - s * len(model.single_transformer_blocks)
    return top + layers * d + single * s


def write_models(root: Path, n_double: int, n_single: int) -> dict:
    """A random real-width Kontext transformer in a diffusers folder (bf16) and as GGUF files."""
    marker = root / "bench.json"
    want = {"double": n_double, "single": n_single}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return want
    root.mkdir(parents=True, exist_ok=True)
    cfg = model_kwargs(load_config("flux1-kontext-dev-transformer"))
    cfg.update(num_layers=n_double, num_single_layers=n_single)
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
            else:
                p.normal_(0, 0.02)
    model = model.to(torch.bfloat16)
    model.save_pretrained(root / "kontext" / "transformer")
    bfl = flux_diffusers_to_bfl({k: v.float() for k, v in model.state_dict().items()})
    for q in ("Q8_0", "Q4_0"):
        t = time.perf_counter()
        write_gguf(bfl, root / f"transformer-{q}.gguf", q)
        print(f"wrote {q} GGUF in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    marker.write_text(json.dumps(want))
    return want


def load_weights(root: Path, kind: str, compute: torch.dtype):
    """The transformer stored as ``kind``: bf16, fp8 (bf16 weights stored in fp8) or a GGUF quant."""
    if kind == "bf16":
        return FluxTransformer2DModel.from_pretrained(root / "kontext" / "transformer", torch_dtype=compute)
    if kind == "fp8":
        m = FluxTransformer2DModel.from_pretrained(root / "kontext" / "transformer", torch_dtype=compute)
        return prepare_fp8_storage(m, compute, "transformer")
    return load_gguf_transformer(root / f"transformer-{kind}.gguf", dtype=compute)


def measure(model, parts: tuple, args, device, compute) -> dict:
    """One storage kind: resident bytes (here and extrapolated to 12B), one velocity, one sampled image."""
    vae, scheduler, cond, ref, probe = parts
    with torch.no_grad():
        velocity = model(**{k: v.to(device, compute) if torch.is_tensor(v) and v.is_floating_point() and k not in ("timestep", "guidance") else v.to(device) if torch.is_tensor(v) else v
                            for k, v in probe.items()})[0].float().cpu()
    t = time.perf_counter()
    request = resolve_edit(image_width=args.size, image_height=args.size, width=args.size, height=args.size,
                           steps=args.steps, seed=42)
    image = sample(KontextModels(model, vae, scheduler), cond, ref, request, device=device).cpu()
    return dict(bytes=resident_bytes(model), full=extrapolate(model), image=image, velocity=velocity,
                seconds=time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--size", type=int, default=128, help="output side in pixels (default 128)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default="/tmp/gie-bench-quant")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.dir)
    write_models(root, args.double, args.single)
    device = torch.device(args.device)
    compute = torch.bfloat16
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE).to(device).eval()  # the VAE is not what is measured
    scheduler = FlowMatchEulerDiscreteScheduler(**TINY_SCHEDULER)
    g = torch.Generator("cpu").manual_seed(1)
    cond = Conditioning(torch.randn(1, 64, 4096, generator=g), torch.randn(1, 768, generator=g))
    ref = torch.rand(1, 3, args.size, args.size, generator=g) * 2 - 1
    probe = dict(hidden_states=torch.randn(1, 128, 64, generator=g), encoder_hidden_states=cond.context,
                 pooled_projections=cond.pooled, timestep=torch.tensor([0.7]), guidance=torch.tensor([3.5]),
                 img_ids=torch.zeros(128, 3), txt_ids=torch.zeros(64, 3), return_dict=False)
    results = {}
    for kind in KINDS:
        model = load_weights(root, kind, compute).to(device).eval()
        results[kind] = measure(model, (vae, scheduler, cond, ref, probe), args, device, compute)
        del model

    base = results["bf16"]
    print(f"model: FLUX.1 Kontext transformer at the real width, {args.double} double + {args.single} single blocks "
          f"(random weights), {args.size}x{args.size}, {args.steps} steps, compute bf16, device {device}")
    print(f"  {'weights':<8} {'resident':>10} {'/ bf16':>8} {'12B model':>10} {'/ bf16':>8} {'PSNR vs bf16':>13} "
          f"{'velocity rel. err':>18} {'sample s':>9}")
    for kind, r in results.items():
        mse = ((r["image"] - base["image"]) ** 2).mean().item()
        p = float("inf") if mse == 0 else 10 * math.log10(1 / mse)
        rel = ((r["velocity"] - base["velocity"]).norm() / base["velocity"].norm()).item()
        print(f"  {kind:<8} {r['bytes'] / 1e9:>8.3f}GB {r['bytes'] / base['bytes']:>7.3f}x {r['full'] / 1e9:>8.2f}GB "
              f"{r['full'] / base['full']:>7.3f}x {p:>10.1f} dB {rel:>18.4f} {r['seconds']:>9.1f}")
    print("  goals (12B model): fp8 <= 0.55x, Q4_0 <= 0.35x of bf16's resident bytes")


if __name__ == "__main__":
    main()
