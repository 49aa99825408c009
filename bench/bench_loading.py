"""Loading a synthetic multi-GB checkpoint in the released GPT-Image-Edit layout.

Writes (once, into --dir) a random bf16 checkpoint with the released key names and shards,
then, each in a fresh process, measures:
- ours: ``load_gie_checkpoint`` (Qwen2.5-VL + connector + Kontext transformer), streamed;
- plain: ``Qwen2_5_VLForConditionalGeneration.from_pretrained`` of the same directory
  (transformers' own loader; it reads the Qwen part and its lm_head).
After loading, every page of every weight is touched (as moving to a GPU would), so loaders
that only map files are charged for reading them. Both sides run ``--repeats`` times,
alternating, with a warm page cache (the files just read) and with a cold one (the shards'
pages evicted with ``posix_fadvise(DONTNEED)`` before each run); each reports the median time.
Prints, measured in this one run: load time per byte loaded, ours / from_pretrained (goal
<= 1.0, warm and cold), and peak RSS over the process's import-time baseline / bytes loaded
(goal <= 1.15).

    python bench/bench_loading.py [--gb 2] [--dir /tmp/gie-bench-ckpt] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Every library is imported here, in each child too, before its RSS baseline: only loading is measured.
import torch  # noqa: E402
from diffusers import FluxTransformer2DModel  # noqa: E402
from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402, F401

from gie_core.engine.encoders import load_qwen_image_processor  # noqa: E402, F401  (what loading imports lazily)
from gie_core.testing.tiny import build_tokenizers  # noqa: E402
from gie_core.weights.loading import gie_config, load_gie_checkpoint, qwen_config_from_gie  # noqa: E402
from gie_core.weights.reader import save_safetensors_atomic  # noqa: E402


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


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


def child(kind: str, path: str) -> None:
    """Runs in a fresh process (the module's imports done): note the baseline, load, report."""
    base = _current_rss_mb()
    t = time.perf_counter()
    if kind == "ours":
        ck = load_gie_checkpoint(path, dtype="bf16", device="cpu")
        n = sum(p.numel() for m in (ck.encoder.model, ck.connector, ck.transformer) for p in m.parameters())
    else:
        m = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, config=qwen_config_from_gie(gie_config(path)),
                                                               dtype="bfloat16", local_files_only=True)
        n = sum(p.numel() for p in m.parameters())
    # Touch every page of every weight (as moving to a GPU would): mmap-backed loaders only
    # read lazily, so without this their time and memory would not count the reading.
    models = (ck.encoder.model, ck.connector, ck.transformer) if kind == "ours" else (m,)
    with torch.no_grad():
        for mod in models:
            for p in mod.parameters():
                p.detach().reshape(-1)[::2048].float().sum()
    dt = time.perf_counter() - t
    print(json.dumps({"seconds": dt, "peak_mb": _rss_peak_mb(), "base_mb": base, "params": n}))


def evict(path: Path) -> None:
    """Drop the checkpoint's pages from the page cache (a cold read next time), as far as the
    kernel allows without privileges: clean, unmapped pages of these files."""
    for f in sorted(path.glob("*.safetensors")):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_child(kind: str, path: Path, cold: bool) -> dict:
    if cold:
        evict(path)
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--dir", str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--dir", default="/tmp/gie-bench-ckpt")
    ap.add_argument("--repeats", type=int, default=3, help="runs per side and cache state, alternating (default 3)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    path = Path(args.dir)
    if args.child:
        child(args.child, str(path))
        return
    total = write_checkpoint(path, args.gb)
    run_child("ours", path, cold=False)  # warm the page cache once for the warm runs
    results = {(kind, cold): [] for kind in ("ours", "plain") for cold in (False, True)}
    for _ in range(args.repeats):  # alternate, so drift in machine load falls on both sides alike
        for cold in (False, True):
            for kind in ("ours", "plain"):
                results[(kind, cold)].append(run_child(kind, path, cold))
    print(f"checkpoint: {total / 1e9:.2f} GB in {path}; {args.repeats} runs per side and page-cache state, alternating")
    ratios = {}
    for cold in (False, True):
        state = "cold" if cold else "warm"
        per_byte = {}
        for kind, name in (("ours", "ours (Qwen w/o lm_head + connector + transformer)"), ("plain", "from_pretrained (Qwen + lm_head)")):
            runs = results[(kind, cold)]
            nbytes = runs[0]["params"] * 2
            sec = statistics.median(r["seconds"] for r in runs)
            rss = max((r["peak_mb"] - r["base_mb"]) * 2**20 for r in runs) / nbytes
            per_byte[kind] = sec / nbytes
            print(f"  {state}  {name:50s} {nbytes / 1e9:5.2f} GB  median {sec:6.2f} s  "
                  f"({nbytes / sec / 1e9:5.2f} GB/s)  peak RSS over baseline / bytes = {rss:.3f}")
        ratios[state] = per_byte["ours"] / per_byte["plain"]
    for state, r in ratios.items():
        print(f"  load time per byte, ours / from_pretrained, {state} page cache = {r:.3f}  (goal <= 1.0)")
    ours_rss = max((r["peak_mb"] - r["base_mb"]) * 2**20 for c in (False, True) for r in results[("ours", c)])
    print(f"  ours peak RSS over baseline / bytes loaded = {ours_rss / (results[('ours', False)][0]['params'] * 2):.3f}  (goal <= 1.15)")


if __name__ == "__main__":
    main()
