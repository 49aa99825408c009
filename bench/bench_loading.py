"""Loading against the library loaders a user would otherwise call, on the same files and dtype path.

Two checkpoints with random weights are written into a temporary folder (free disk is checked
first; the folder is removed at the end unless ``--dir`` names one to keep):

- ``transformer``: a diffusers-layout FLUX.1 Kontext transformer at the real width (3072, 24
  heads) with enough blocks for ``--transformer-gb`` (default 1.7 GB, bf16), in a FLUX.1-Kontext
  folder. Ours: ``load_part("transformer", folder, storage, dtype)``; the library:
  ``FluxTransformer2DModel.from_pretrained(folder/transformer, torch_dtype=...)``, and for fp8
  diffusers' layerwise casting to float8_e4m3fn over the layers we store in fp8
  (``diffusers.hooks.apply_layerwise_casting(..., skip_modules_pattern=FP8_KEEP["transformer"])``:
  the same weights in the same dtypes, so the same conversion work); ``fp8-default`` is the
  model's own ``enable_layerwise_casting(storage_dtype=float8_e4m3fn)``, whose skip patterns
  leave every block's modulation layers (every module named ``norm*``) in bf16: less to
  convert, about 20% more memory kept;
- ``released``: a checkpoint in the released GPT-Image-Edit layout (``--released-gb``, default
  2 GB, sharded, pre-4.52 key names), sized mostly by Qwen2.5-VL layers. Ours:
  ``load_gie_checkpoint(parts=("encoder",), lm_head=True)``; the library:
  ``Qwen2_5_VLForConditionalGeneration.from_pretrained`` of the same folder. Both load the same
  tensors (Qwen with its output head; transformers renames the old key names itself).

Each measurement is a fresh process (libraries imported before its memory baseline), and after
loading every page of every weight is touched (as a forward or a move to a GPU would), so a
loader that only maps files is charged for reading them. Per checkpoint and dtype path (bf16 =
the files' dtype; fp32 = every weight cast, the CLI's CPU default; fp8 and fp8-default for the
transformer),
warm page cache and cold (the files' pages dropped before every run, checked with mincore),
``--pairs`` interleaved pairs in alternating order. Reported: median seconds and spread per side,
the ratio of medians (ours / library; goal <= 1.0), and each side's memory beside the bytes it
keeps: steady VmRSS and peak VmHWM over the process's baseline, and its anonymous / file-backed
parts (goal: peak <= 1.05x the bytes kept).

    python bench/bench_loading.py [--cases transformer,released] [--dtypes bf16,fp32,fp8,fp8-default] [--pairs 3]
"""

from __future__ import annotations

import argparse
import json
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Every library is imported here, in each child too, before its memory baseline: only loading is measured.
import torch  # noqa: E402
from _measure import (disk_free, drop_page_cache, interleaved, machine_line, median_spread, proc_status,  # noqa: E402
                      report_child, run_child, spread_note, warm_page_cache)
from diffusers import FluxTransformer2DModel  # noqa: E402
from diffusers.hooks import apply_layerwise_casting  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402, F401

from gie_core.engine.encoders import load_qwen_image_processor  # noqa: E402, F401  (what loading imports lazily)
from gie_core.testing.tiny import build_tokenizers  # noqa: E402
from gie_core.weights.loading import gie_config, load_gie_checkpoint, qwen_config_from_gie  # noqa: E402
from gie_core.weights.parts import load_part  # noqa: E402
from gie_core.weights.quantize import FP8_KEEP  # noqa: E402
from gie_core.weights.reader import save_safetensors_atomic  # noqa: E402
from gie_core.weights.single_file import load_config, model_kwargs  # noqa: E402

# fp8: stored fp8, computed in bf16 (fp8-default: the library with its default skip patterns; ours is the same load)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp8": torch.bfloat16, "fp8-default": torch.bfloat16}


def released_entries(hidden: int, gb: float) -> tuple[list[tuple[str, tuple]], dict, dict, dict]:
    """(name, shape) of every tensor of a released-layout checkpoint of about ``gb`` GB, sized
    mostly by Qwen layers, and the text, vision and FLUX configs it was built from."""
    layer_bytes = 2 * (4 * hidden * hidden + 3 * hidden * 4 * hidden)  # attn + mlp, bf16
    layers = max(2, int(gb * 0.8 * 1e9 / layer_bytes))
    text = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=8,
                num_key_value_heads=8, vocab_size=32000, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                max_position_embeddings=4096, tie_word_embeddings=False, image_token_id=31990, video_token_id=31991,
                vision_start_token_id=31992, vision_end_token_id=31993)
    vision = dict(depth=2, hidden_size=256, intermediate_size=512, num_heads=4, out_hidden_size=hidden, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1])
    with torch.device("meta"):
        qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**text, vision_config=vision))
    flux_cfg = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
                    num_attention_heads=8, joint_attention_dim=hidden, pooled_projection_dim=768, guidance_embeds=True,
                    axes_dims_rope=[8, 28, 28])
    with torch.device("meta"):
        flux = FluxTransformer2DModel(**flux_cfg)

    def old_name(k):
        if k.startswith("model.language_model."):
            return "model." + k[len("model.language_model."):]
        if k.startswith("model.visual."):
            return k[len("model."):]
        return k

    entries = [(old_name(k), tuple(v.shape)) for k, v in qwen.state_dict().items()]
    entries += [("denoise_tower.denoise_projector.0.weight", (3 * hidden, hidden)), ("denoise_tower.denoise_projector.0.bias", (3 * hidden,)),
                ("denoise_tower.denoise_projector.2.weight", (hidden, 3 * hidden)), ("denoise_tower.denoise_projector.2.bias", (hidden,))]
    entries += [("denoise_tower.denoiser." + k, tuple(v.shape)) for k, v in flux.state_dict().items()]
    return entries, text, vision, flux_cfg


def write_shards(path: Path, entries: list[tuple[str, tuple]], shard_limit: float = 500e6) -> int:
    """Random bf16 tensors for ``entries`` in ~``shard_limit``-byte shards plus their index; the bytes written."""
    shard, shards, weight_map, total, size = {}, [], {}, 0, 0
    for name, shape in entries:
        t = (torch.randn(shape) * 0.02).to(torch.bfloat16)
        if size + t.numel() * 2 > shard_limit and shard:
            shards.append(shard)
            shard, size = {}, 0
        shard[name] = t
        size += t.numel() * 2
        total += t.numel() * 2
    if shard:
        shards.append(shard)
    n = len(shards)
    for i, sd in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_safetensors_atomic(sd, path / fname)
        weight_map.update({k: fname for k in sd})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def write_checkpoint(path: Path, gb: float) -> int:
    """A released-layout checkpoint of about ``gb`` GB (bf16), sized mostly by Qwen layers."""
    marker = path / "bench.json"
    if marker.exists() and json.loads(marker.read_text()).get("gb") == gb:
        return json.loads(marker.read_text())["bytes"]
    path.mkdir(parents=True, exist_ok=True)
    hidden = 1024
    torch.manual_seed(0)
    entries, text, vision, flux_cfg = released_entries(hidden, gb)
    total = write_shards(path, entries)
    cfg = dict(text, model_type="univa_qwen2p5vl", architectures=["UnivaQwen2p5VLForConditionalGeneration"], vision_config=vision,
               torch_dtype="bfloat16", denoise_tower=dict(denoiser_type="flux", denoise_projector_type="mlp2x_gelu",
                                                          input_hidden_size=hidden, output_hidden_size=hidden,
                                                          denoiser_config=dict(flux_cfg, _class_name="FluxTransformer2DModel")))
    (path / "config.json").write_text(json.dumps(cfg))
    # the processor files the released directory carries (a tiny tokenizer stands in)
    with tempfile.TemporaryDirectory() as tmp:
        for f in build_tokenizers(Path(tmp)).qwen.iterdir():
            shutil.copy(f, path / f.name)
    marker.write_text(json.dumps({"gb": gb, "bytes": total}))
    return total


def write_transformer(root: Path, gb: float) -> int:
    """A FLUX.1-Kontext folder (model_index.json + transformer/) whose transformer is real-width,
    random, bf16, with 2 double blocks and enough single blocks for about ``gb`` GB."""
    cfg = model_kwargs(load_config("flux1-kontext-dev-transformer"))
    cfg.update(num_layers=2, num_single_layers=1)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**cfg)
    single = sum(p.numel() for p in model.single_transformer_blocks[0].parameters()) * 2
    base = sum(p.numel() for p in model.parameters()) * 2
    cfg["num_single_layers"] = 1 + max(0, int((gb * 1e9 - base) // single) + 1)
    with torch.device("meta"):
        model = FluxTransformer2DModel(**cfg)
    folder = root / "transformer"
    folder.mkdir(parents=True)
    model.save_config(folder)
    gen = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=gen) * 0.02).to(torch.bfloat16) for k, v in model.state_dict().items()}
    save_file(state, folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxKontextPipeline",
                                                      "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    return sum(t.numel() * 2 for t in state.values())


def _touch(models) -> None:
    """One element of every page of every weight (as a forward or a move to a GPU would read them)."""
    with torch.no_grad():
        for m in models:
            for p in m.parameters():
                flat = p.detach().reshape(-1)
                flat[:: max(1, 4096 // flat.element_size())].float().sum()


def _kept_bytes(models) -> int:
    return sum(t.numel() * t.element_size() for m in models for t in m.state_dict().values())


def child(case: str, side: str, dtype_name: str, path: Path) -> None:
    """Runs in a fresh process (the module's imports done): baseline, load, touch, report."""
    dtype = DTYPES[dtype_name]
    base = proc_status()
    t = time.perf_counter()
    if case == "transformer" and side == "ours":
        models = [load_part("transformer", path, "fp8" if dtype_name.startswith("fp8") else "auto", dtype=dtype).module]
    elif case == "transformer":
        m = FluxTransformer2DModel.from_pretrained(path / "transformer", torch_dtype=dtype, use_safetensors=True,
                                                   local_files_only=True)
        if dtype_name == "fp8":  # the layers we store in fp8: the same result, the same work
            apply_layerwise_casting(m, storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype,
                                    skip_modules_pattern=FP8_KEEP["transformer"], skip_modules_classes=None)
        elif dtype_name == "fp8-default":
            m.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
        models = [m]
    elif side == "ours":
        models = [load_gie_checkpoint(path, dtype=dtype, parts=("encoder",), lm_head=True).encoder.model]
    else:
        models = [Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, config=qwen_config_from_gie(gie_config(path)), dtype=dtype, local_files_only=True, use_safetensors=True)]
    _touch(models)
    report_child({"seconds": time.perf_counter() - t, "kept": _kept_bytes(models)}, base)


def measure(case: str, path: Path, dtype_name: str, cold: bool, pairs: int) -> dict:
    files = sorted(path.rglob("*.safetensors"))
    notes: list[str] = []

    def side(name):
        def run():
            notes.append(drop_page_cache(files) if cold else f"warm: {warm_page_cache(files):.0%} cached")
            return run_child([__file__, "--child", case, name, dtype_name, str(path)])
        return run

    return {"runs": interleaved({"ours": side("ours"), "library": side("library")}, pairs), "notes": notes}


LIBRARY = {"transformer": "FluxTransformer2DModel.from_pretrained", "released": "Qwen2_5_VLForConditionalGeneration.from_pretrained"}


def print_result(case: str, dtype_name: str, state: str, res: dict) -> float:
    runs = res["runs"]
    ours, _ = median_spread(r["seconds"] for r in runs["ours"])
    lib, _ = median_spread(r["seconds"] for r in runs["library"])
    ratio = ours / lib
    paired, pspread = median_spread(a["seconds"] / b["seconds"] for a, b in zip(runs["ours"], runs["library"]))
    print(f"  {case} {dtype_name} {state}: ours / {LIBRARY[case]} = {ratio:.2f} (medians; paired {paired:.2f})"
          f"{'  <= 1.0' if ratio <= 1.0 else '  > 1.0 (goal <= 1.0)'}")
    if state == "cold":
        print(f"    page cache before each run: {sorted(set(n.split(':')[0] for n in res['notes']))}, "
              f"worst {max(res['notes'], key=lambda n: float(n.split(': ')[1].split('%')[0]))}")
    for name in ("ours", "library"):
        rs = runs[name]
        sec, spread = median_spread(r["seconds"] for r in rs)
        kept = rs[0]["kept"]
        peak = max(r["hwm"] - r["base_rss"] for r in rs) / kept
        steady = max(r["rss"] - r["base_rss"] for r in rs) / kept
        anon = statistics.median(r["anon"] for r in rs) / 1e9
        filed = statistics.median(r["file"] for r in rs) / 1e9
        print(f"    {name:8s} {sec:6.2f} s (spread {spread:.0%}), {kept / sec / 1e9:5.2f} GB/s; kept {kept / 1e9:.2f} GB; "
              f"over baseline: steady {steady:.3f}x, peak {peak:.3f}x the bytes kept "
              f"(grown: anon {anon:.2f} GB + file-backed {filed:.2f} GB){spread_note(spread)}")
    return ratio


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="Writes ~4 GB of random checkpoints (temporary unless --dir is given).")
    ap.add_argument("--cases", default="transformer,released", help="transformer, released (default both)")
    ap.add_argument("--dtypes", default="bf16,fp32,fp8,fp8-default",
                    help="bf16, fp32, fp8, fp8-default (the fp8 ones: transformer only; default all)")
    ap.add_argument("--states", default="warm,cold", help="warm, cold page cache (default both)")
    ap.add_argument("--pairs", type=int, default=3, help="interleaved ours/library pairs per measurement (default 3)")
    ap.add_argument("--transformer-gb", type=float, default=1.7)
    ap.add_argument("--released-gb", type=float, default=2.0)
    ap.add_argument("--dir", default=None, help="keep the checkpoints here (reused when present); default: a temp dir")
    ap.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        case, side, dtype_name, path = args.child
        child(case, side, dtype_name, Path(path))
        return
    cases = [c for c in args.cases.split(",") if c]
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="gie-bench-loading-"))
    need = (args.transformer_gb if "transformer" in cases else 0) + (args.released_gb if "released" in cases else 0)
    root.mkdir(parents=True, exist_ok=True)
    if disk_free(root) < (need + 2) * 1e9:
        sys.exit(f"{root}: {disk_free(root) / 1e9:.1f} GB free, the checkpoints need {need:.1f} GB plus 2 GB of margin")
    print(machine_line())
    ratios = {}
    try:
        paths = {}
        if "transformer" in cases:
            paths["transformer"] = root / "kontext"
            if not (paths["transformer"] / "model_index.json").exists():
                write_transformer(paths["transformer"], args.transformer_gb)
            n = (paths["transformer"] / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
            print(f"diffusers-layout transformer: {n / 1e9:.2f} GB (bf16, real width) in {paths['transformer']}")
        if "released" in cases:
            paths["released"] = root / "released"
            n = write_checkpoint(paths["released"], args.released_gb)
            print(f"released-layout checkpoint: {n / 1e9:.2f} GB (bf16) in {paths['released']}")
        for case, path in paths.items():
            for dtype_name in [d for d in args.dtypes.split(",") if d]:
                if dtype_name.startswith("fp8") and case != "transformer":
                    continue
                for state in [s for s in args.states.split(",") if s]:
                    res = measure(case, path, dtype_name, state == "cold", args.pairs)
                    ratios[(case, dtype_name, state)] = print_result(case, dtype_name, state, res)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    worst = max(ratios.values()) if ratios else float("nan")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{len(ratios)} measurements, {args.pairs} alternating pairs each; worst time ratio {worst:.2f} (goal <= 1.0); "
          f"load average at the end {load}")


if __name__ == "__main__":
    main()
