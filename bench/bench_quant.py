"""Lighter transformer weights: fp8 storage, GGUF Q8_0 and Q4_0 against bf16, as process memory and output.

One random FLUX.1 Kontext transformer at the real width (3072, 24 heads, context 4096, pooled
768) with ``--double`` double and ``--single`` single blocks (default 2 + 4, the real model's
1:2) is saved in bf16 (a diffusers-layout
FLUX.1-Kontext folder) and written as GGUF Q8_0 and Q4_0 files (BFL layout, with
``gie_core.weights.gguf.write_gguf``); each is loaded the way users load it,
``load_part("transformer", source, storage)`` (bf16; fp8 = the bf16 folder stored in float8;
fp8_fast = the ``fp8_e4m3fn_fast`` row: fp8 weights with per-tensor scales, each quantised as
it is read; the GGUF files as stored), and measured two ways:

- process memory, each load in a fresh child (``--pairs`` rounds, the order of the kinds
  alternating): steady ``VmRSS`` and peak ``VmHWM`` over the child's baseline after imports, and
  how much of it is anonymous / file-backed, each against bf16's (goals: fp8 <= 0.55x, Q8_0 <=
  0.60x, Q4_0 <= 0.35x, steady and peak), beside the weights' own bytes (measured, and
  extrapolated to the real 19 + 38 blocks from the measured per-block bytes);
- the output against bf16: the same sampling run (seed, conditioning, reference) through each,
  PSNR of the decoded images and relative error of one velocity prediction.

The layers outside the blocks (embedders, timestep MLPs, final layer: 62 M parameters) stay in
bf16 under every kind, so the ratios depend on their share of the model's bytes: 0.5% of the
12B model, 4.9% of the default 2 + 4 blocks, 9.3% of 1 + 2 (where even the weight bytes of
Q4_0 are 0.348x bf16's); the bench prints the share.

No timing column: on a CPU, fp8 and GGUF layers are dequantised to bf16 on every forward
(diffusers' layerwise casting and GGUF quantizer), so sampling there is several times slower
than bf16; that cost belongs to a GPU benchmark, not to this one.

    python bench/bench_quant.py [--double 2] [--single 4] [--pairs 2] [--size 128] [--steps 4] [--dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # bfl_layout: the test-side BFL writer (independent of the loader)
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _measure import disk_free, interleaved, machine_line, median_spread, proc_status, report_child, run_child  # noqa: E402
from bfl_layout import flux_diffusers_to_bfl  # noqa: E402
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel  # noqa: E402

from gie_core.engine.components import module_bytes as resident_bytes  # noqa: E402
from gie_core.engine.conditioning import Conditioning  # noqa: E402
from gie_core.engine.request import resolve_edit  # noqa: E402
from gie_core.engine.sampler import KontextModels, sample  # noqa: E402
from gie_core.testing.tiny_configs import TINY_SCHEDULER, TINY_VAE  # noqa: E402
from gie_core.weights.gguf import write_gguf  # noqa: E402
from gie_core.weights.parts import load_part  # noqa: E402
from gie_core.weights.single_file import load_config, model_kwargs  # noqa: E402

KINDS = ("bf16", "fp8", "fp8_fast", "Q8_0", "Q4_0")
STORAGE = {"bf16": "auto", "fp8": "fp8", "fp8_fast": "fp8_e4m3fn_fast"}  # folder kinds: load_part's storage row
GOALS = {"fp8": 0.55, "Q8_0": 0.60, "Q4_0": 0.35}


def block_bytes(model, prefix: str) -> int:
    return resident_bytes(getattr(model, prefix)[0])


def extrapolate(model, layers=19, single=38) -> int:
    """Resident bytes of the real 19 + 38 block model: this model's non-block bytes plus the
    measured bytes of one block of each kind times the real counts."""
    total = resident_bytes(model)
    d, s = block_bytes(model, "transformer_blocks"), block_bytes(model, "single_transformer_blocks")
    top = total - d * len(model.transformer_blocks) - s * len(model.single_transformer_blocks)
    return top + layers * d + single * s


def fixed_share(n_double: int, n_single: int) -> tuple[float, float, int]:
    """The share of the parameters outside the blocks (kept in bf16 by every kind) in a model of
    ``n_double`` + ``n_single`` blocks and in the real 19 + 38 (built on the meta device), and
    the first model's parameter count."""
    cfg = model_kwargs(load_config("flux1-kontext-dev-transformer"))
    cfg.update(num_layers=1, num_single_layers=1)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**cfg)
    d = sum(p.numel() for p in model.transformer_blocks[0].parameters())
    s = sum(p.numel() for p in model.single_transformer_blocks[0].parameters())
    top = sum(p.numel() for p in model.parameters()) - d - s
    total = top + n_double * d + n_single * s
    return top / total, top / (top + 19 * d + 38 * s), total


def write_models(root: Path, n_double: int, n_single: int) -> dict:
    """A random real-width Kontext transformer in a FLUX.1-Kontext folder (bf16) and as GGUF files."""
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
    (root / "kontext" / "model_index.json").write_text(json.dumps({"_class_name": "FluxKontextPipeline",
                                                                  "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    bfl = flux_diffusers_to_bfl({k: v.float() for k, v in model.state_dict().items()})
    del model
    for q in ("Q8_0", "Q4_0"):
        t = time.perf_counter()
        write_gguf(bfl, root / f"transformer-{q}.gguf", q)
        print(f"wrote {q} GGUF in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    marker.write_text(json.dumps(want))
    return want


def load_weights(root: Path, kind: str, compute: torch.dtype):
    """The transformer stored as ``kind``, loaded as users load it."""
    if kind in STORAGE:
        return load_part("transformer", root / "kontext", STORAGE[kind], dtype=compute).module
    return load_part("transformer", root / f"transformer-{kind}.gguf", dtype=compute).module


def child(root: Path, kind: str) -> None:
    """A fresh process: the modules every kind's load imports, then the baseline, load, touch
    every weight page, report memory and weight bytes (so only loading is measured, as in
    ``bench_loading``)."""
    import diffusers.hooks  # noqa: F401  (fp8: layerwise casting)
    import diffusers.loaders.single_file_model  # noqa: F401  (GGUF: from_single_file)
    import diffusers.quantizers.gguf.gguf_quantizer  # noqa: F401
    import diffusers.quantizers.gguf.utils  # noqa: F401

    base = proc_status()
    model = load_weights(root, kind, torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():  # GGUF blocks are a tensor subclass: read their bytes as plain ones
            flat = p.detach().as_subclass(torch.Tensor).reshape(-1).view(torch.uint8)
            flat[::4096].sum()
    gc.collect()
    report_child({"bytes": resident_bytes(model), "full": extrapolate(model)}, base)


def memory(root: Path, pairs: int) -> dict[str, list[dict]]:
    """Every kind's child ``pairs`` times, the order alternating."""
    sides = {k: (lambda k=k: run_child([__file__, "--child", k, "--dir", str(root)])) for k in KINDS}
    return interleaved(sides, pairs)


def print_memory(runs: dict[str, list[dict]]) -> None:
    def over(r, field):
        return r[field] - r["base_rss"] if field in ("rss", "hwm") else r[field]

    med = {k: {f: statistics.median(over(r, f) for r in rs) for f in ("rss", "hwm", "anon", "file")} for k, rs in runs.items()}
    base = med["bf16"]
    print("  process memory over the baseline after imports (medians of fresh children):")
    print(f"  {'weights':<8} {'steady':>9} {'/ bf16':>7} {'peak':>9} {'/ bf16':>7} {'anon':>8} {'file':>8} "
          f"{'weights':>9} {'/ bf16':>7} {'12B model':>10} {'/ bf16':>7}  goal")
    b = runs["bf16"][0]
    for kind, m in med.items():
        r = runs[kind][0]
        goal = GOALS.get(kind)
        ok = "" if goal is None else (f"<= {goal:.2f}x " + ("met" if max(m["rss"] / base["rss"], m["hwm"] / base["hwm"]) <= goal else "NOT MET"))
        spread = max(median_spread(over(x, "hwm") for x in runs[kind])[1], median_spread(over(x, "rss") for x in runs[kind])[1])
        print(f"  {kind:<8} {m['rss'] / 1e9:>7.3f}GB {m['rss'] / base['rss']:>6.3f}x {m['hwm'] / 1e9:>7.3f}GB "
              f"{m['hwm'] / base['hwm']:>6.3f}x {m['anon'] / 1e9:>6.3f}GB {m['file'] / 1e9:>6.3f}GB "
              f"{r['bytes'] / 1e9:>7.3f}GB {r['bytes'] / b['bytes']:>6.3f}x {r['full'] / 1e9:>8.2f}GB "
              f"{r['full'] / b['full']:>6.3f}x  {ok}{'  (spread %.0f%%)' % (spread * 100) if spread > 0.10 else ''}")


def fidelity(root: Path, args) -> dict:
    """Each kind's velocity for one probe and its sampled image (in this process, one at a time)."""
    device, compute = torch.device(args.device), torch.bfloat16
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE).to(device).eval()  # the VAE is not what is measured
    scheduler = FlowMatchEulerDiscreteScheduler(**TINY_SCHEDULER)
    g = torch.Generator("cpu").manual_seed(1)
    cond = Conditioning(torch.randn(1, 64, 4096, generator=g), torch.randn(1, 768, generator=g))
    ref = torch.rand(1, 3, args.size, args.size, generator=g) * 2 - 1
    probe = dict(hidden_states=torch.randn(1, 128, 64, generator=g), encoder_hidden_states=cond.context,
                 pooled_projections=cond.pooled, timestep=torch.tensor([0.7]), guidance=torch.tensor([3.5]),
                 img_ids=torch.zeros(128, 3), txt_ids=torch.zeros(64, 3), return_dict=False)
    request = resolve_edit(image_width=args.size, image_height=args.size, width=args.size, height=args.size,
                           steps=args.steps, seed=42)
    out = {}
    for kind in KINDS:
        model = load_weights(root, kind, compute).to(device).eval()
        with torch.no_grad():
            inputs = {k: v.to(device, compute) if torch.is_tensor(v) and v.is_floating_point() and k not in ("timestep", "guidance")
                      else v.to(device) if torch.is_tensor(v) else v for k, v in probe.items()}
            velocity = model(**inputs)[0].float().cpu()
        out[kind] = dict(velocity=velocity, image=sample(KontextModels(model, vae, scheduler), cond, ref, request, device=device).cpu())
        del model
        gc.collect()
    return out


def print_fidelity(out: dict) -> None:
    base = out["bf16"]
    print(f"  {'weights':<8} {'PSNR vs bf16':>13} {'velocity rel. err':>18}")
    for kind, r in out.items():
        mse = ((r["image"] - base["image"]) ** 2).mean().item()
        p = float("inf") if mse == 0 else 10 * math.log10(1 / mse)
        rel = ((r["velocity"] - base["velocity"]).norm() / base["velocity"].norm()).item()
        print(f"  {kind:<8} {p:>10.1f} dB {rel:>18.4f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=2, help="rounds of fresh-process loads per kind, order alternating (default 2)")
    ap.add_argument("--size", type=int, default=128, help="output side in pixels (default 128)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default=None, help="keep the model files here (reused); default: a temporary folder")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-fidelity", action="store_true", help="memory only")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="gie-bench-quant-"))
    if args.child:
        child(root, args.child)
        return
    root.mkdir(parents=True, exist_ok=True)
    share, real, params = fixed_share(args.double, args.single)
    need = 2 * params * 1.9  # bf16, Q8_0 (~0.55x) and Q4_0 (~0.3x)
    if disk_free(root) < need + 2e9:
        sys.exit(f"{root}: {disk_free(root) / 1e9:.1f} GB free; the model files need about {need / 1e9:.1f} GB "
                 "plus 2 GB of margin")
    print(machine_line())
    try:
        write_models(root, args.double, args.single)
        print(f"model: FLUX.1 Kontext transformer at the real width, {args.double} double + {args.single} single blocks "
              f"(random weights), compute bf16; {args.pairs} fresh-process loads per kind; the layers every kind "
              f"keeps in bf16 (outside the blocks) are {share:.1%} of its parameters ({real:.1%} of the 12B model's)")
        print_memory(memory(root, args.pairs))
        if not args.no_fidelity:
            print(f"  output against bf16: {args.size}x{args.size}, {args.steps} steps, device {args.device}")
            print_fidelity(fidelity(root, args))
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    print("  goals: fp8 <= 0.55x, Q8_0 <= 0.60x, Q4_0 <= 0.35x of bf16's process memory, steady and peak; "
          f"load average at the end {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
