"""One GPU check: every CUDA path of the project, on full-size random models, in one command.

    python bench/gpu_check.py --out DIR            # on a CUDA GPU (H100/H200: a few minutes)
    python bench/gpu_check.py --out DIR --tiny     # the same code paths on the CPU, tiny models, seconds

It builds the models from the architecture configs in ``gie_core/configs`` (FLUX.1 Kontext 12B,
Qwen2.5-VL-7B, T5-XXL, CLIP-L, the VAE) straight on the device in bf16 with random weights (no
download, no copy in CPU memory), and runs each path through the project's own
code: the sampler, the pipeline with offload, the storage rows of
``gie_core.weights.quantize.STORAGE_TABLE``, the trainer's ``prepare_for_training`` + ``EditModel``
with ``train.attention_kernels``, block swap, the optimizers, the attention backends. Each path's
result, or its failure with the traceback's last line, is recorded, and a failure does not stop
the paths after it. It writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` (a table for the
README), and runs ``pytest -m gpu`` and records its summary. ``--tiny`` builds the tiny configs of
``gie_core.testing`` on the CPU instead: the default test suite runs it, so no path rots.

Tokenizers and image processors come from a tiny model set (``gie_core.testing``; built in
``DIR/tiny-set`` unless ``--tiny-set`` names one). Their ids are the models' special tokens, so a
full-size random Qwen encodes real chat-template prompts.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gie_core.train.allocator import configure_allocator  # noqa: E402  (torch-free: before torch sets up CUDA)

ALLOCATOR_NOTE = configure_allocator()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import datetime, timezone  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from gie_core.weights.single_file import load_config, model_kwargs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
# dense bf16 tensor-core peak (TFLOP/s) of the GPUs this check is run on, by name fragment
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0, "B200": 2250.0}


@dataclass(frozen=True)
class Sizes:
    """The shapes of one check: full size (1 MP, the released text length) or tiny."""

    image: int  # target and reference side, px
    text_tokens: int  # T5 / context tokens of the forward benchmark
    vlm_tokens: int  # Qwen tokens of a training pair (deliberately not a multiple of 128)
    steps: int  # sampling steps
    repeats: int  # timed forwards per figure
    warmup: int  # untimed calls before them (compiles, cuDNN plans, allocator growth)
    train_image: dict = field(default_factory=dict)  # stage -> training side, px


FULL = Sizes(1024, 512, 301, 28, 5, 1, {1: 512, 2: 1024})
TINY = Sizes(64, 8, 13, 1, 1, 0, {1: 64, 2: 64})


# --------------------------------------------------------------------------------------------
# Models: configs on the meta device, random weights on the device
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def building(device, dtype):
    """Construct modules straight on ``device`` in ``dtype`` (buffers such as position ids and
    RoPE frequencies computed as the model computes them; no fp32 copy in CPU memory)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights in place: norm weights 1, biases 0, other weights N(0, 0.02)."""
    device = next(module.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith(("weight", "scale")):
                p.fill_(1.0)
            elif p.ndim == 1:
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return module.eval().requires_grad_(False)


class Models:
    """Builds each model of the check once asked (full-size or tiny configs)."""

    def __init__(self, tiny: bool, device: torch.device, tiny_set):
        self.tiny, self.device, self.set = tiny, device, tiny_set
        self.dtype = torch.float32 if tiny else torch.bfloat16  # bf16 matmuls are slow on a CPU

    def _config(self, shipped: str, tiny_name: str) -> dict:
        from gie_core.testing import tiny_configs

        return dict(getattr(tiny_configs, tiny_name)) if self.tiny else model_kwargs(load_config(shipped))

    def transformer(self, dtype=None):
        from diffusers import FluxTransformer2DModel  # start-up: diffusers' models

        with building(self.device, dtype or self.dtype):
            model = FluxTransformer2DModel(**self._config("flux1-kontext-dev-transformer.json", "TINY_TRANSFORMER"))
        return randomize(model)

    def vae(self):
        from diffusers import AutoencoderKL

        with building(self.device, self.dtype):
            model = AutoencoderKL(**self._config("flux-ae.json", "TINY_VAE"))
        return randomize(model, seed=1)

    def scheduler(self):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(load_config("flow-match-scheduler.json"))

    def qwen_flat(self) -> dict:
        """The Qwen2.5-VL flat config, with the tiny tokenizer's special-token ids."""
        tiny = json.loads((self.set.gie_dir / "config.json").read_text(encoding="utf-8"))
        if self.tiny:
            return {k: v for k, v in tiny.items() if k != "denoise_tower"}
        flat = load_config("qwen2.5-vl-7b-instruct.json")
        flat.update({k: tiny[k] for k in tiny if k.endswith("token_id")})
        return {k: v for k, v in flat.items() if not k.startswith("_")}

    def qwen(self):
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        from gie_core.engine.encoders import QwenVLEncoder, load_qwen_image_processor
        from gie_core.weights.loading import qwen_config_from_gie

        with building(self.device, self.dtype):
            model = Qwen2_5_VLForConditionalGeneration(qwen_config_from_gie(self.qwen_flat()))
        model = randomize(model, seed=2)
        tokenizer = AutoTokenizer.from_pretrained(self.set.gie_dir, local_files_only=True)
        return QwenVLEncoder(model, tokenizer, load_qwen_image_processor(self.set.gie_dir))

    def text(self):
        from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        from gie_core.engine.encoders import TextEncoders

        kd = self.set.kontext_dir
        clip_tok = AutoTokenizer.from_pretrained(kd / "tokenizer", local_files_only=True)
        t5_tok = AutoTokenizer.from_pretrained(kd / "tokenizer_2", local_files_only=True)
        clip_cfg = self._config("clip-vit-large-patch14-text.json", "TINY_CLIP_TEXT")
        clip_cfg.update(eos_token_id=clip_tok.eos_token_id, vocab_size=max(clip_cfg.get("vocab_size", 0), len(clip_tok)))
        t5_cfg = self._config("t5-v1_1-xxl-encoder.json", "TINY_T5")
        t5_cfg["vocab_size"] = max(t5_cfg.get("vocab_size", 0), len(t5_tok))
        with building(self.device, self.dtype):
            clip = CLIPTextModel(CLIPTextConfig(**clip_cfg))
            t5 = T5EncoderModel(T5Config(**t5_cfg))
        return TextEncoders(randomize(clip, 3), clip_tok, randomize(t5, 4), t5_tok)

    def connector(self, qwen_hidden: int, joint: int, mode: str = "vlm"):
        from gie_core.engine.connector import Connector

        with building(self.device, self.dtype):
            conn = Connector.for_mode(mode, qwen_hidden, joint)
        return randomize(conn, seed=5)

    def qwen_hidden(self) -> int:
        flat = self.qwen_flat()
        return int((flat.get("text_config") or {}).get("hidden_size") or flat["hidden_size"])


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device, repeats: int = 1, warmup: int = 0) -> tuple[float, object]:
    """(median seconds of ``repeats`` calls after ``warmup``, the last result)."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2], out


def reset_peaks(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peaks(device) -> dict:
    if torch.device(device).type != "cuda":
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 2)}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of ``a`` against ``b`` in dB, the peak being ``b``'s largest magnitude."""
    a, b = a.float(), b.float()
    mse = ((a - b) ** 2).mean().item()
    return math.inf if mse == 0 else round(10 * math.log10(b.abs().max().item() ** 2 / mse), 1)


def forward_inputs(transformer, sizes: Sizes, device, dtype=None, text_tokens: int | None = None) -> dict:
    """Transformer inputs of one edit step: target + reference tokens and the context."""
    from gie_core.engine.sampler import latent_ids

    cfg = transformer.config
    side = sizes.image // 16  # 8x VAE, 2x2 packing
    n = side * side
    text = text_tokens or sizes.text_tokens
    dtype = dtype or transformer.x_embedder.weight.dtype
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.cat([latent_ids(side, side), latent_ids(side, side, index=1.0)]).to(device)
    return dict(hidden_states=torch.randn(1, 2 * n, cfg.in_channels, generator=g, device=device, dtype=dtype),
                encoder_hidden_states=torch.randn(1, text, cfg.joint_attention_dim, generator=g, device=device, dtype=dtype),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g, device=device, dtype=dtype),
                timestep=torch.tensor([0.5], device=device), guidance=torch.tensor([3.5], device=device),
                img_ids=ids, txt_ids=torch.zeros(text, 3, device=device), return_dict=False)


def free(*_objects) -> None:
    """Drop what a path built (the caller deletes its references) and return the memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# The paths
# --------------------------------------------------------------------------------------------


class Skip(Exception):
    """A path that cannot run on this machine: recorded as skipped with the reason."""


@dataclass
class Check:
    models: Models
    sizes: Sizes
    device: torch.device
    tiny: bool
    tmp: Path

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def path_forward_mfu(c: Check) -> dict:
    """Transformer forward at 1 MP target + 1 MP reference + 512 text tokens: TFLOP/s and MFU."""
    from torch.utils.flop_counter import FlopCounterMode

    t = c.models.transformer()
    kw = forward_inputs(t, c.sizes, c.device)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            t(**kw)
        seconds, _ = timed(lambda: t(**kw), c.device, c.sizes.repeats, c.sizes.warmup)
    flops = counter.get_total_flops()
    tokens = kw["hidden_states"].shape[1] + kw["encoder_hidden_states"].shape[1]
    out = {"tokens": tokens, "gflop": round(flops / 1e9, 2), "seconds": round(seconds, 4),
           "tflops_per_s": round(flops / max(seconds, 1e-9) / 1e12, 3)}
    name = torch.cuda.get_device_name(c.device) if c.cuda else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    if peak:
        out["mfu"] = round(out["tflops_per_s"] / peak, 3)
    n = 8192 if c.cuda else 256
    a = torch.randn(n, n, device=c.device, dtype=torch.bfloat16)
    mm, _ = timed(lambda: a @ a, c.device, 3, warmup=1)
    out["matmul_tflops_per_s"] = round(2 * n**3 / max(mm, 1e-9) / 1e12, 3)
    out["of_matmul"] = round(out["tflops_per_s"] / max(out["matmul_tflops_per_s"], 1e-9), 3)
    return out


def _sample_seconds(c: Check, models, cond, ref, **speed) -> tuple[float, torch.Tensor, tuple]:
    from gie_core.engine.request import resolve_edit
    from gie_core.engine.sampler import sample

    request = resolve_edit(image_width=c.sizes.image, image_height=c.sizes.image, width=c.sizes.image,
                           height=c.sizes.image, steps=c.sizes.steps, seed=1, **speed)
    notes = request.acceleration.effective(c.device, models.transformer, log=False).notes if speed else ()
    seconds, out = timed(lambda: sample(models, cond, ref, request, device=c.device), c.device, 1,
                         warmup=1 if speed.get("compile") else c.sizes.warmup)
    return seconds, out, notes


def path_sampling(c: Check) -> dict:
    """A 28-step 1 MP edit: ours against diffusers' FluxKontextPipeline, then with compile and each cache."""
    from gie_core.engine.acceleration import CACHE_METHODS
    from gie_core.engine.conditioning import Conditioning
    from gie_core.engine.sampler import KontextModels

    t, vae = c.models.transformer(), c.models.vae()
    models = KontextModels(t, vae, c.models.scheduler())
    g = torch.Generator().manual_seed(0)
    dtype = c.models.dtype
    cond = Conditioning((torch.randn(1, c.sizes.text_tokens, t.config.joint_attention_dim, generator=g) * 0.1).to(dtype),
                        (torch.randn(1, t.config.pooled_projection_dim, generator=g) * 0.1).to(dtype))
    ref = torch.rand(1, 3, c.sizes.image, c.sizes.image, generator=g) * 2 - 1
    ours, base, _ = _sample_seconds(c, models, cond, ref)
    out = {"ours_s": round(ours, 2), "diffusers_s": round(_diffusers_seconds(c, t, vae, cond, ref), 2)}
    out["ours_over_diffusers"] = round(out["ours_s"] / out["diffusers_s"], 3)
    variants = [{"compile": True}] + [{"compile": True, "cache": m} for m in CACHE_METHODS]
    if c.tiny:  # compiling takes minutes on a CPU: the tiny check runs each cache uncompiled
        variants = [{"cache": m} for m in CACHE_METHODS]
    for speed in variants:
        label = "+".join(["compile"] * bool(speed.get("compile")) + [speed.get("cache", "")]).strip("+")
        seconds, image, notes = _sample_seconds(c, models, cond, ref, **speed)
        out[f"{label}_s"] = round(seconds, 2)
        out[f"{label}_speedup"] = round(ours / seconds, 2)
        out[f"{label}_psnr_db"] = psnr(image, base)
        if notes:
            out[f"{label}_note"] = "; ".join(notes)
    return out


def _diffusers_seconds(c: Check, transformer, vae, cond, ref) -> float:
    from diffusers import FluxKontextPipeline

    from gie_core.imaging.images import to_pil

    pipe = FluxKontextPipeline(scheduler=c.models.scheduler(), vae=vae, text_encoder=None, tokenizer=None,
                               text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    image = to_pil((ref[0].permute(1, 2, 0)[None] + 1) / 2)[0]
    side = c.sizes.image
    kwargs = dict(image=image, prompt_embeds=cond.context.to(c.device), pooled_prompt_embeds=cond.pooled.to(c.device),
                  height=side, width=side, num_inference_steps=c.sizes.steps, guidance_scale=3.5, output_type="pt",
                  max_area=side**2, _auto_resize=False)
    seconds, _ = timed(lambda: pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(1)), c.device, 1,
                       warmup=c.sizes.warmup)
    return seconds


def _bfl_entries(transformer) -> list:
    """The transformer's tensors in BFL's layout, made one at a time (for write_gguf)."""
    from gie_core.weights.convert import Entry, bfl_transformer_plan

    state = transformer.state_dict()
    entries = []
    for item in bfl_transformer_plan(list(state)):
        def make(item=item):
            parts = [state[s].detach().float().cpu() for s in item.sources]
            if item.op == "cat":
                return torch.cat(parts, 0)
            if item.op == "swap":
                scale, shift = parts[0].chunk(2, 0)
                return torch.cat([shift, scale], 0)
            return parts[0]
        shapes = [tuple(state[s].shape) for s in item.sources]
        shape = (sum(s[0] for s in shapes), *shapes[0][1:]) if item.op == "cat" else shapes[0]
        entries.append(Entry(item.key, torch.float32, shape, make))
    return entries


def _storage_variant(c: Check, name: str, bf16):
    """The bf16 transformer stored as row ``name`` of STORAGE_TABLE (through the project's code)."""
    from gie_core.weights.fp8_compute import prepare_fp8_compute
    from gie_core.weights.gguf import write_gguf
    from gie_core.weights.parts import load_part
    from gie_core.weights.quantize import prepare_fp8_storage

    if name == "bf16":
        return bf16
    if name == "gguf_q8_0":
        path = write_gguf(_bfl_entries(bf16), c.tmp / "kontext-q8_0.gguf", "Q8_0")
        return load_part("transformer", path, dtype=c.models.dtype).module.to(c.device)
    model = copy.deepcopy(bf16)
    if name == "fp8":
        return prepare_fp8_storage(model, c.models.dtype, "transformer")
    return prepare_fp8_compute(model, c.models.dtype, "transformer")


def path_storage(c: Check) -> dict:
    """Forward time, bytes and PSNR against bf16 of each way to store the transformer."""
    from gie_core.engine.components import module_bytes
    from gie_core.weights.fp8_compute import fp8_compute_unavailable, set_fp8_matmul

    bf16 = c.models.transformer()
    kw = forward_inputs(bf16, c.sizes, c.device)
    out = {}
    with torch.no_grad():
        base_s, base = timed(lambda: bf16(**kw)[0], c.device, c.sizes.repeats, c.sizes.warmup)
        for name in ("bf16", "fp8", "fp8_e4m3fn_fast", "gguf_q8_0"):
            try:
                model = _storage_variant(c, name, bf16)
                seconds, got = timed(lambda: model(**kw)[0], c.device, c.sizes.repeats, c.sizes.warmup)
            except Exception as exc:  # noqa: BLE001 - one storage failing must not hide the others
                out[f"{name}_error"] = _last_line(exc)
                continue
            out[f"{name}_time_vs_bf16"] = round(seconds / base_s, 3)
            out[f"{name}_bytes_vs_bf16"] = round(module_bytes(model) / module_bytes(bf16), 3)
            out[f"{name}_psnr_db"] = psnr(got, base)
            if name == "fp8_e4m3fn_fast":
                out["fp8_compute_note"] = fp8_compute_unavailable(c.device) or "torch._scaled_mm"
                set_fp8_matmul(model, "cast")
                cast_s, _ = timed(lambda: model(**kw)[0], c.device, c.sizes.repeats, c.sizes.warmup)
                out["fp8_e4m3fn_fast_upcast_time_vs_bf16"] = round(cast_s / base_s, 3)
            if model is not bf16:
                model = None
                free()
    out["bf16_forward_s"] = round(base_s, 4)
    return out


def path_bnb_qwen(c: Check) -> dict:
    """bitsandbytes nf4 and int8 Qwen2.5-VL (loaded through load_part) encoding one pair."""
    from PIL import Image

    from gie_core.weights.parts import load_part
    from gie_core.weights.quantize import package_available

    if not package_available("bitsandbytes"):
        raise Skip("bitsandbytes is not installed (pip install \"gpt-image-edit-nodes[bnb]\")")
    if not c.cuda:
        raise Skip("bitsandbytes int8/nf4 run on CUDA here")
    folder = c.models.set.gie_dir
    if not c.tiny:  # a full-size random Qwen written where transformers' loader reads it
        folder = c.tmp / "qwen-full"
        qwen = c.models.qwen()
        qwen.model.save_pretrained(folder, safe_serialization=True)
        qwen.tokenizer.save_pretrained(folder)
        for f in c.models.set.gie_dir.glob("*.json"):
            if "config" not in f.name or f.name == "preprocessor_config.json":
                shutil.copy(f, folder / f.name)
        del qwen
        free()
    out = {}
    image = Image.new("RGB", (448, 448), (40, 90, 160))
    for name in ("nf4", "int8"):
        reset_peaks(c.device)
        t0 = time.perf_counter()
        enc = load_part("qwen", folder, name, dtype="bf16", run_device=c.device).module
        out[f"{name}_load_s"] = round(time.perf_counter() - t0, 1)
        seconds, feats = timed(lambda: enc.encode([image], "make the sky red").hidden, c.device, 1, warmup=1)
        out.update({f"{name}_encode_s": round(seconds, 3), f"{name}_finite": bool(torch.isfinite(feats).all()),
                    f"{name}_peak_gib": peaks(c.device)["peak_allocated_gib"]})
        enc = None
        free()
    return out


def path_edit_peak(c: Check) -> dict:
    """A whole 1 MP edit of the released mode (Qwen + T5) with model offload and the fp8 transformer:
    the peak of each phase."""
    from PIL import Image

    from gie_core.engine.modes import DEFAULT_FUSION_MODE
    from gie_core.engine.pipeline import EditPipeline
    from gie_core.weights.quantize import prepare_fp8_storage

    qwen, text = c.models.qwen(), c.models.text()
    t = prepare_fp8_storage(c.models.transformer(), c.models.dtype, "transformer")
    conn = c.models.connector(qwen.hidden_size, t.config.joint_attention_dim, DEFAULT_FUSION_MODE)
    pipe = EditPipeline(transformer=t, vae=c.models.vae(), scheduler=c.models.scheduler(), text=text, qwen=qwen,
                        connector=conn, device=c.device, offload="model")
    phases = {"Qwen encode": qwen._base_model(), "T5": text.t5, "CLIP": text.clip, "transformer": t,
              "VAE encode": pipe.vae.encoder, "VAE decode": pipe.vae.decoder}
    seen: dict[str, float] = {}
    hooks = []
    for phase, module in phases.items():
        hooks.append(module.register_forward_pre_hook(lambda *_: reset_peaks(c.device)))
        hooks.append(module.register_forward_hook(lambda *_, phase=phase: seen.__setitem__(
            phase, max(seen.get(phase, 0.0), peaks(c.device)["peak_allocated_gib"] or 0.0))))
    image = Image.new("RGB", (c.sizes.image, c.sizes.image), (120, 80, 40))
    t0 = time.perf_counter()
    side = c.sizes.image
    result = pipe.edit(image, "make it winter", mode=DEFAULT_FUSION_MODE, steps=c.sizes.steps, seed=1, width=side, height=side,
                       reference_resize=(side, side))
    out = {"seconds": round(time.perf_counter() - t0, 1), "finite": bool(torch.isfinite(result.tensor).all())}
    for h in hooks:
        h.remove()
    out["phases"] = ",".join(p for p in phases if p in seen)  # each phase ran (and was measured on CUDA)
    if c.cuda:
        out.update({f"{k} GiB": round(v, 2) for k, v in seen.items()})
        top = max(seen, key=seen.get)
        out.update(peak_gib=round(seen[top], 2), peak_phase=top, within_16gb=seen[top] <= 16.0)
    return out


def _train_config(c: Check, stage: int, **overrides):
    from gie_core.train.config import load_config as load_train_config
    from gie_core.train.config import optimizer_spec

    files = [str(ROOT / f"training/stage{stage}.yaml"), str(ROOT / f"training/24gb_stage{stage}.yaml")]
    opts = {"data.resolution": c.sizes.train_image[stage], **overrides}
    cfg = load_train_config(*files, overrides=opts, for_training=False)
    if optimizer_spec(cfg.optim.optimizer).missing:
        cfg.optim.optimizer = "adamw"  # the recipe's 8-bit AdamW needs bitsandbytes
    return cfg


def _train_step(c: Check, stage: int, steps: int | None = None, **overrides) -> dict:
    """One 24 GB recipe through the trainer's own prepare_for_training + EditModel, the recipe's
    attention kernels, bf16 autocast: the loss, seconds per step, peak memory against the plan."""
    from gie_core.train.attention import allowed_kernels, training_attention
    from gie_core.train.config import optimizer_spec
    from gie_core.train.memory import place_with_swap, resolve_memory
    from gie_core.train.models import EditModel, prepare_for_training
    from gie_core.train.plan import plan_memory

    cfg = _train_config(c, stage, **overrides)
    memory = resolve_memory(cfg)
    t = c.models.transformer()
    conn = c.models.connector(c.models.qwen_hidden(), t.config.joint_attention_dim, cfg.model.mode).float()
    prepare_for_training(t, conn, cfg, memory, c.models.dtype)
    model = EditModel(conn, t, cfg.model.mode).train()
    if memory.resident_blocks is not None:
        place_with_swap(model, t, memory.resident_blocks, c.device)
    else:
        model.to(c.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer_spec(cfg.optim.optimizer).build(params, cfg)
    inputs = _train_inputs(c, cfg, stage, t, conn)
    reset_peaks(c.device)
    losses, seconds = [], []
    for _ in range(steps or (2 if c.cuda else 1)):  # the second step has the optimizer state
        sync(c.device)
        t0 = time.perf_counter()
        with torch.autocast(c.device.type, dtype=torch.bfloat16, enabled=c.models.dtype == torch.bfloat16), \
                training_attention(cfg.train.attention_kernels):
            kernels = allowed_kernels()
            loss = model(**inputs)["loss"]
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(c.device)
        seconds.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    out = {"optimizer": cfg.optim.optimizer, "attention_kernels": ",".join(kernels),
           "loss_finite": all(map(math.isfinite, losses)),
           "s_per_step": round(seconds[-1], 3), **peaks(c.device)}
    if c.cuda:  # the plan of the recipe at real size (gie-train plan's figures)
        plan = plan_memory(cfg, device="cuda")
        out.update(plan_allocated_gib=round(plan.peak / GIB, 2), plan_reserved_gib=round(plan.reserved_peak / GIB, 2))
        out["allocated_vs_plan"] = round(out["peak_allocated_gib"] / out["plan_allocated_gib"], 3)
        out["reserved_under_22gib"] = out["peak_reserved_gib"] < 22.0
    return out


def _train_inputs(c: Check, cfg, stage: int, t, conn) -> dict:
    """One cached pair's tensors at the recipe's size; the Qwen token count is not a multiple of 128."""
    side = c.sizes.train_image[stage] // 8
    g = torch.Generator(device=c.device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=c.device)

    return dict(x0=rand(1, 16, side, side), noise=rand(1, 16, side, side), sigmas=torch.tensor([0.6], device=c.device),
                vlm_hidden=rand(1, c.sizes.vlm_tokens, conn.input_hidden_size), reference=rand(1, 16, side, side),
                pooled_empty=rand(1, t.config.pooled_projection_dim))


def path_train_stage2(c: Check) -> dict:
    return _train_step(c, 2)


def path_train_stage1(c: Check) -> dict:
    return _train_step(c, 1)


def path_block_swap(c: Check) -> dict:
    """Stage 1 with block swap (diffusers group offloading): 8 blocks resident, the rest streamed."""
    if not c.cuda and not c.tiny:
        raise Skip("block swap streams blocks to a GPU")
    return _train_step(c, 1, **{"memory.resident_blocks": 1 if c.tiny else 8})


def path_adamw8bit(c: Check) -> dict:
    from gie_core.weights.quantize import package_available

    if not package_available("bitsandbytes"):
        raise Skip("bitsandbytes is not installed (pip install \"gpt-image-edit-nodes[bnb]\")")
    return _train_step(c, 2, **{"optim.optimizer": "adamw8bit"})


def path_attention(c: Check) -> dict:
    """Each attention backend's forward time (or why it cannot run), the SDPA kernel PyTorch picks
    for sampling and for training, and whether cuDNN's backward still fails at the training layout."""
    from gie_core.engine.acceleration import ATTENTION_TABLE, Acceleration, accelerated
    from gie_core.train.attention import training_attention
    from gie_core.train.config import DEFAULT_ATTENTION_KERNELS

    t = c.models.transformer()
    kw = forward_inputs(t, c.sizes, c.device)
    out = {}
    for row in ATTENTION_TABLE:
        acc = Acceleration(attention=row.name).effective(c.device, t, log=False)
        if acc.attention != row.name:
            out[f"{row.name}"] = "unavailable: " + acc.notes[-1]
            continue
        with torch.no_grad(), accelerated(t, acc, steps=1, device=c.device):
            seconds, _ = timed(lambda: t(**kw), c.device, c.sizes.repeats, c.sizes.warmup)
        out[f"{row.name}_s"] = round(seconds, 4)
    heads, dim = t.config.num_attention_heads, t.config.attention_head_dim
    infer_len = kw["hidden_states"].shape[1] + kw["encoder_hidden_states"].shape[1]
    out["sampling_kernel"] = _sdpa_choice(c, heads, infer_len, dim, contextlib.nullcontext())
    train_len = kw["hidden_states"].shape[1] + c.sizes.vlm_tokens
    out["training_kernel"] = _sdpa_choice(c, heads, train_len, dim, training_attention(DEFAULT_ATTENTION_KERNELS))
    out["cudnn_training_backward"] = _cudnn_probe(c, heads, train_len, dim)
    return out


def _sdpa_choice(c: Check, heads: int, length: int, dim: int, context) -> str:
    """The kernel PyTorch's SDPA picks for diffusers' [B, H, S, D] views of [B, S, H, D] projections."""
    from torch.nn.attention import SDPBackend

    q = torch.randn(1, length, heads, dim, device=c.device, dtype=torch.bfloat16).transpose(1, 2)
    with context:
        choice = torch._fused_sdp_choice(q, q, q)
    return SDPBackend(choice).name


_CUDNN_PROBE = """
import sys, torch, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
h, L, d = (int(x) for x in sys.argv[1:4])
q, k, v = (torch.randn(1, L, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    o.transpose(1, 2).float().square().mean().backward()
torch.cuda.synchronize()
print("finite" if all(torch.isfinite(t.grad).all() for t in (q, k, v)) else "NaN gradients")
"""


def _cudnn_probe(c: Check, heads: int, length: int, dim: int) -> str:
    """cuDNN's SDPA forward + backward at the training layout, in its own process (an illegal
    memory access poisons the CUDA context of the process it happens in)."""
    if not c.cuda:
        return "not run: needs CUDA"
    proc = subprocess.run([sys.executable, "-c", _CUDNN_PROBE, str(heads), str(length), str(dim)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        return proc.stdout.strip().splitlines()[-1]
    return "fails: " + (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]


PATHS: dict[str, Callable[[Check], dict]] = {
    "forward_mfu": path_forward_mfu,
    "sampling": path_sampling,
    "storage": path_storage,
    "bnb_qwen": path_bnb_qwen,
    "edit_peak": path_edit_peak,
    "train_stage2_24gb": path_train_stage2,
    "train_stage1_24gb": path_train_stage1,
    "block_swap": path_block_swap,
    "adamw8bit": path_adamw8bit,
    "attention": path_attention,
}


# --------------------------------------------------------------------------------------------
# Running and reporting
# --------------------------------------------------------------------------------------------


def _last_line(exc: BaseException) -> str:
    lines = [line for line in traceback.format_exception_only(type(exc), exc) if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def run_path(name: str, check: Check, fail: set[str]) -> dict:
    """One path: ``{"status": "ok" | "skipped" | "failed", "seconds", figures... or "error"}``."""
    t0 = time.perf_counter()
    try:
        if name in fail:
            raise RuntimeError(f"forced failure of {name} (--fail)")
        figures = PATHS[name](check)
        result = {"status": "ok", **figures}
    except Skip as why:
        result = {"status": "skipped", "reason": str(why)}
    except Exception as exc:  # noqa: BLE001 - every path's failure is recorded, the others still run
        result = {"status": "failed", "error": _last_line(exc)}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    free()
    return result


def run_pytest(target: str, timeout: int) -> dict:
    """``pytest -m gpu`` on ``target``: its summary line and exit status."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", target]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd[1:]), "exit_status": None, "summary": f"timed out after {timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return {"command": "python " + " ".join(cmd[1:]), "exit_status": proc.returncode,
            "summary": lines[-1].strip("= ") if lines else proc.stderr.strip()[-300:]}


def environment(device: torch.device) -> dict:
    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    env = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": str(device),
           "torch": torch.__version__, "cuda": torch.version.cuda, "allocator": ALLOCATOR_NOTE}
    env.update({pkg: version(pkg) for pkg in ("diffusers", "transformers", "accelerate", "bitsandbytes", "flash-attn",
                                              "sageattention")})
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cudnn"] = torch.backends.cudnn.version()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return env


def markdown(report: dict) -> str:
    env = report["environment"]
    head = f"GPU check {env['date']}: {env.get('gpu', env['device'])}, torch {env['torch']}"
    head += f" (CUDA {env['cuda']})" if env.get("cuda") else ""
    head += f", diffusers {env['diffusers']}, transformers {env['transformers']}{' (tiny models)' if report['tiny'] else ''}"
    lines = [head, "", "| path | status | s | figures |", "|---|---|---|---|"]
    for name, r in report["paths"].items():
        figures = {k: v for k, v in r.items() if k not in ("status", "seconds")}
        text = "; ".join(f"{k} {v}" for k, v in figures.items()).replace("|", "/")
        lines.append(f"| {name} | {r['status']} | {r['seconds']} | {text} |")
    p = report.get("pytest")
    if p:
        lines += ["", f"`{p['command']}`: {p['summary']} (exit status {p['exit_status']})"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU: the same code paths in seconds")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of: {', '.join(PATHS)}")
    ap.add_argument("--fail", default="", help="paths to fail on purpose (tests the recording)")
    ap.add_argument("--tiny-set", type=Path, default=None, help="a built tiny model set (tokenizers); default DIR/tiny-set")
    ap.add_argument("--pytest", default="tests", metavar="TARGET", help="what 'pytest -m gpu' runs ('' = skip it)")
    ap.add_argument("--pytest-timeout", type=int, default=600)
    args = ap.parse_args(argv)
    unknown = [p for p in args.paths.split(",") + [f for f in args.fail.split(",") if f] if p not in PATHS]
    if unknown:
        ap.error(f"unknown path '{unknown[0]}'; expected some of {', '.join(PATHS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from gie_core.testing.tiny import build_tiny_model_set

    if not args.tiny and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run on a GPU, or with --tiny to check the code paths on the CPU", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1))) if args.tiny else None
    device = torch.device("cpu" if args.tiny else "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    tiny_set = build_tiny_model_set(args.tiny_set or args.out / "tiny-set")
    tmp = args.out / "tmp"
    tmp.mkdir(exist_ok=True)
    check = Check(Models(args.tiny, device, tiny_set), TINY if args.tiny else FULL, device, args.tiny, tmp)
    report = {"tiny": args.tiny, "environment": environment(device), "paths": {}}
    for name in args.paths.split(","):
        print(f"gpu_check: {name} ...", flush=True)
        report["paths"][name] = run_path(name, check, set(filter(None, args.fail.split(","))))
        print(f"gpu_check: {name}: {report['paths'][name]}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    if args.pytest:
        report["pytest"] = run_pytest(args.pytest, args.pytest_timeout)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (args.out / "gpu_check.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
