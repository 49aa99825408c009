"""Training speed: ``gie-train`` steps per second vs a plain diffusers flow-matching step, same tiny model.

    python bench/bench_train.py [--steps 30] [--resolution 128] [--trainable full] [--device cpu|cuda] [--pairs 3]

Both sides train the same Kontext transformer parameters (plus our connector) on the same
pairs at the same size, batch 1, fp32 (bf16 autocast with --bf16):

- ``plain diffusers``: the loop of diffusers' Kontext training examples, written out: latents,
  context and pooled vectors precomputed, ``compute_density_for_timestep_sampling`` (logit-normal),
  ``FluxKontextPipeline._pack_latents`` / ``_prepare_latent_image_ids``, forward, MSE, AdamW;
- ``gie-train (cache)``: our Trainer reading the feature cache (no encoder in the loop), so the
  two do the same work per step; the difference is our data loading, accelerate, EMA-free
  bookkeeping and the connector forward;
- ``gie-train (encoders)``: our Trainer encoding Qwen-VL / VAE on the fly, for reference.

Each side runs ``--pairs`` times, interleaved with the others in alternating order (after 3
untimed warm-up steps each); prints each side's median steps/s with its spread, the ratio to the
plain step (of medians, and the median of the per-round ratios), and a note when a spread
exceeds 10%. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _measure import interleaved, machine_line, median_spread, spread_note  # noqa: E402
from diffusers import FluxKontextPipeline  # noqa: E402
from diffusers.training_utils import compute_density_for_timestep_sampling  # noqa: E402
from PIL import Image  # noqa: E402

from gie_core.testing.tiny import build_tiny_model_set, default_tiny_root  # noqa: E402
from gie_core.train.cache import build_cache  # noqa: E402
from gie_core.train.config import load_config  # noqa: E402
from gie_core.train.trainable import image_branch_parameter_names  # noqa: E402
from gie_core.train.trainer import Trainer  # noqa: E402
from gie_core.weights.loading import load_kontext_dir  # noqa: E402


def write_dataset(root: Path, n: int, size: int) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    recs = []
    for i in range(n):
        src = (rng.rand(size, size, 3) * 255).astype(np.uint8)
        tgt = src.copy()
        tgt[: size // 2, : size // 2] = 255 - tgt[: size // 2, : size // 2]
        Image.fromarray(src).save(root / f"img/s{i}.png")
        Image.fromarray(tgt).save(root / f"img/t{i}.png")
        recs.append({"image": [f"img/s{i}.png", f"img/t{i}.png"],
                     "conversations": [{"from": "human", "value": f"<image>\ninvert corner {i}"}, {"from": "gpt", "value": "<gen_image>"}]})
    (root / "ann.json").write_text(json.dumps(recs))
    (root / "data.txt").write_text(f"{root},{root / 'ann.json'},false\n")
    return root / "data.txt"


def plain_diffusers_step(kontext_dir: Path, trainable: str, size: int, device, bf16: bool):
    """A diffusers-example style Kontext step on precomputed tensors, as ``step()``."""
    comps = load_kontext_dir(kontext_dir, dtype="fp32", parts=("transformer", "vae", "scheduler"))
    transformer, vae = comps.transformer.to(device), comps.vae.to(device)
    transformer.requires_grad_(False)
    names = set(image_branch_parameter_names(transformer)) if trainable == "image_attention" else {n for n, _ in transformer.named_parameters()}
    params = [p for n, p in transformer.named_parameters() if n in names]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    with torch.no_grad():
        latents = (vae.encode(image.to(device)).latent_dist.sample() - vae.config.shift_factor) * vae.config.scaling_factor
        cond = (vae.encode(image.to(device)).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
    b, c, h, w = latents.shape
    joint = transformer.config.joint_attention_dim
    context = torch.randn(1, 270, joint, generator=g).to(device)  # ~ the Qwen token count of one pair
    pooled = torch.randn(1, transformer.config.pooled_projection_dim, generator=g).to(device)
    ids = FluxKontextPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, torch.float32)
    cond_ids = ids.clone()
    cond_ids[:, 0] = 1
    img_ids = torch.cat([ids, cond_ids])
    txt_ids = torch.zeros(context.shape[1], 3, device=device)
    cond_tokens = FluxKontextPipeline._pack_latents(cond, b, c, h, w)
    guidance = torch.ones(b, device=device)

    def step():
        noise = torch.randn_like(latents)
        u = compute_density_for_timestep_sampling("logit_normal", b, logit_mean=0.0, logit_std=1.0)
        sigma = u.to(device).view(b, 1, 1, 1)
        noisy = (1 - sigma) * latents + sigma * noise
        packed = FluxKontextPipeline._pack_latents(noisy, b, c, h, w)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            pred = transformer(hidden_states=torch.cat([packed, cond_tokens], 1), timestep=sigma.flatten(), guidance=guidance,
                               pooled_projections=pooled, encoder_hidden_states=context, txt_ids=txt_ids, img_ids=img_ids,
                               return_dict=False)[0][:, : packed.shape[1]]
        pred = FluxKontextPipeline._unpack_latents(pred, h * 8, w * 8, 8)
        loss = ((pred.float() - (noise - latents)) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # untimed, as ours warms up
        step()
    return step


def steps_per_second(step, steps: int, device) -> float:
    """Steps per second of ``step()`` over ``steps`` timed calls."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def ours_trainer(tiny, data_txt: Path, out: Path, trainable: str, size: int, cache: bool, bf16: bool) -> Trainer:
    """Our Trainer on the same model and pairs, set up and warmed up by 3 steps."""
    opts = {
        "output_dir": str(out), "model.kontext": str(tiny.kontext_dir), "model.gie": str(tiny.gie_dir),
        "model.init_transformer": "kontext", "model.init_connector": "fresh", "data.data_txt": str(data_txt),
        "data.resolution": size, "data.num_workers": 0, "train.stage": 2, "train.trainable": trainable,
        "train.gradient_checkpointing": False, "train.mixed_precision": "bf16" if bf16 else "no",
        "train.max_steps": 3, "optim.lr": 1e-5, "log.progress": False, "log.every": 0,
        "checkpoint.every": 0, "export.at_end": False, "data.cache_dir": str(out.parent / "cache"),
        "data.cache_dtype": "fp32", "data.use_cache": cache,
    }
    cfg = load_config(overrides=opts)
    if cache:
        build_cache(load_config(overrides={**opts, "data.use_cache": False}), progress=False)
    trainer = Trainer(cfg).setup()
    trainer.train()
    return trainer


def ours_steps_per_second(trainer: Trainer, steps: int) -> float:
    """``steps`` more steps of the trainer's loop (data loading included, checkpointing not)."""
    trainer.cfg.train.max_steps += steps
    return trainer.train().steps_per_second


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--trainable", choices=("image_attention", "full"), default="image_attention")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on both sides")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pairs", type=int, default=3, help="rounds of every side, the order alternating (default 3)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and torch.cuda.is_available():
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    tiny = build_tiny_model_set(default_tiny_root())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_txt = write_dataset(tmp / "data", 4, args.resolution)
        plain = plain_diffusers_step(tiny.kontext_dir, args.trainable, args.resolution, device, args.bf16)
        cached = ours_trainer(tiny, data_txt, tmp / "run-cache", args.trainable, args.resolution, True, args.bf16)
        live = ours_trainer(tiny, data_txt, tmp / "run-live", args.trainable, args.resolution, False, args.bf16)
        runs = interleaved({
            "plain": lambda: steps_per_second(plain, args.steps, device),
            "cache": lambda: ours_steps_per_second(cached, args.steps),
            "encoders": lambda: ours_steps_per_second(live, args.steps),
        }, args.pairs)
    print(machine_line())
    print(f"device {device}, {args.resolution}x{args.resolution}, batch 1, trainable {args.trainable}, "
          f"{'bf16' if args.bf16 else 'fp32'}, {args.steps} timed steps a run, {args.pairs} rounds, order alternating")
    plain_med, plain_spread = median_spread(runs["plain"])
    print(f"plain diffusers step      {plain_med:8.2f} steps/s   (spread {plain_spread:.0%}){spread_note(plain_spread)}")
    for name, label in (("cache", "gie-train (cache)"), ("encoders", "gie-train (encoders)")):
        med, spread = median_spread(runs[name])
        paired, pspread = median_spread(a / b for a, b in zip(runs[name], runs["plain"]))
        print(f"{label:<25} {med:8.2f} steps/s   ({med / plain_med:.2f}x plain; paired {paired:.2f}x, spread {pspread:.0%})"
              f"{spread_note(max(spread, pspread))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
