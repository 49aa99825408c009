"""Test-side writers of the files ComfyUI users keep: diffusers state dicts turned into the
original BFL (FLUX transformer) and LDM (``ae.safetensors``) layouts, fp8 and ComfyUI
"scaled fp8" storage.

Written independently of ``gie_core.weights.single_file``: the transformer writer follows diffusers'
``convert_flux_transformer_checkpoint_to_diffusers`` in reverse (concatenating what it
splits), the VAE writer is a list of renaming rules from diffusers' names to LDM's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    found = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(found) + 1 if found else 0


def flux_diffusers_to_bfl(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``FluxTransformer2DModel`` state dict in BFL's original key layout."""
    src = dict(sd)
    out: dict[str, torch.Tensor] = {}

    def move(bfl: str, diffusers: str, params=("weight", "bias")) -> None:
        for p in params:
            out[f"{bfl}.{p}"] = src.pop(f"{diffusers}.{p}")

    def fuse(bfl: str, parts: list[str]) -> None:
        for p in ("weight", "bias"):
            out[f"{bfl}.{p}"] = torch.cat([src.pop(f"{d}.{p}") for d in parts], dim=0)

    move("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    move("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    move("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    move("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    if "time_text_embed.guidance_embedder.linear_1.weight" in src:
        move("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        move("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    move("txt_in", "context_embedder")
    move("img_in", "x_embedder")

    for i in range(_count(src, "transformer_blocks.")):
        b, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        move(f"{d}.img_mod.lin", f"{b}.norm1.linear")
        move(f"{d}.txt_mod.lin", f"{b}.norm1_context.linear")
        fuse(f"{d}.img_attn.qkv", [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"])
        fuse(f"{d}.txt_attn.qkv", [f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"])
        out[f"{d}.img_attn.norm.query_norm.scale"] = src.pop(f"{b}.attn.norm_q.weight")
        out[f"{d}.img_attn.norm.key_norm.scale"] = src.pop(f"{b}.attn.norm_k.weight")
        out[f"{d}.txt_attn.norm.query_norm.scale"] = src.pop(f"{b}.attn.norm_added_q.weight")
        out[f"{d}.txt_attn.norm.key_norm.scale"] = src.pop(f"{b}.attn.norm_added_k.weight")
        move(f"{d}.img_mlp.0", f"{b}.ff.net.0.proj")
        move(f"{d}.img_mlp.2", f"{b}.ff.net.2")
        move(f"{d}.txt_mlp.0", f"{b}.ff_context.net.0.proj")
        move(f"{d}.txt_mlp.2", f"{b}.ff_context.net.2")
        move(f"{d}.img_attn.proj", f"{b}.attn.to_out.0")
        move(f"{d}.txt_attn.proj", f"{b}.attn.to_add_out")

    for i in range(_count(src, "single_transformer_blocks.")):
        b, d = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        move(f"{d}.modulation.lin", f"{b}.norm.linear")
        fuse(f"{d}.linear1", [f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v", f"{b}.proj_mlp"])
        out[f"{d}.norm.query_norm.scale"] = src.pop(f"{b}.attn.norm_q.weight")
        out[f"{d}.norm.key_norm.scale"] = src.pop(f"{b}.attn.norm_k.weight")
        move(f"{d}.linear2", f"{b}.proj_out")

    move("final_layer.linear", "proj_out")
    for p in ("weight", "bias"):
        # diffusers keeps (scale, shift); BFL (shift, scale)
        scale, shift = src.pop(f"norm_out.linear.{p}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale], dim=0)

    if src:
        raise AssertionError(f"writer left diffusers tensors unconverted: {sorted(src)[:5]}")
    return out


# diffusers AutoencoderKL name -> LDM name, applied in order (decoder block numbers are
# reversed separately).
_VAE_RULES = [
    (r"\.conv_norm_out\.", ".norm_out."),
    (r"\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r".down.\1.block.\2."),
    (r"\.down_blocks\.(\d+)\.downsamplers\.0\.", r".down.\1.downsample."),
    (r"\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r".up.\1.block.\2."),
    (r"\.up_blocks\.(\d+)\.upsamplers\.0\.", r".up.\1.upsample."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
    (r"\.mid_block\.attentions\.0\.to_q\.", ".mid.attn_1.q."),
    (r"\.mid_block\.attentions\.0\.to_k\.", ".mid.attn_1.k."),
    (r"\.mid_block\.attentions\.0\.to_v\.", ".mid.attn_1.v."),
    (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
]


def vae_diffusers_to_ldm(sd: Mapping[str, torch.Tensor], *, conv_attention: bool = True) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict in the LDM layout of FLUX's ``ae.safetensors``
    (mid-block attention projections as 1x1 conv weights when ``conv_attention``)."""
    num_up = _count(sd, "decoder.up_blocks.")
    out = {}
    for key, tensor in sd.items():
        name = re.sub(r"^decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up_blocks.{num_up - 1 - int(m.group(1))}.", key)
        for pattern, repl in _VAE_RULES:
            name = re.sub(pattern, repl, name)
        if conv_attention and ".mid.attn_1." in name and name.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        out[name] = tensor
    return out


def add_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def to_fp8(sd: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float8_e4m3fn) -> dict[str, torch.Tensor]:
    """Every floating tensor stored as plain fp8 (no scales), like ``*_fp8_e4m3fn`` files."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def to_scaled_fp8(
    sd: Mapping[str, torch.Tensor], *, style: str = "scale_weight", dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, torch.Tensor]]:
    """ComfyUI "scaled fp8": each 2-D ``*.weight`` stored as ``fp8(w / s)`` with an fp32 scalar
    scale ``s = absmax / fp8_max``; everything else kept as is.

    ``style="scale_weight"``: the original format (``scaled_fp8`` marker tensor,
    ``<layer>.scale_weight``, ``<layer>.scale_input`` = 1). ``style="weight_scale"``: the
    mixed-precision format (``<layer>.weight_scale``, ``<layer>.comfy_quant`` JSON bytes and the
    ``_quantization_metadata`` file metadata).

    Returns (tensors to save, file metadata, the dequantised values a loader must produce).
    """
    out: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    layers = {}
    for key, w in sd.items():
        if key.endswith(".weight") and w.ndim == 2 and w.is_floating_point():
            layer = key[: -len(".weight")]
            scale = (w.float().abs().max() / FP8_MAX[dtype]).clamp(min=1e-12).reshape(())
            q = (w.float() / scale).to(dtype)
            out[key] = q
            expected[key] = q.float() * scale
            if style == "scale_weight":
                out[f"{layer}.scale_weight"] = scale
                out[f"{layer}.scale_input"] = torch.ones((), dtype=torch.float32)
            elif style == "weight_scale":
                conf = {"format": "float8_e4m3fn" if dtype == torch.float8_e4m3fn else "float8_e5m2"}
                out[f"{layer}.weight_scale"] = scale
                out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
                layers[layer] = conf
            else:
                raise ValueError(style)
        else:
            out[key] = w
            expected[key] = w
    metadata = {"format": "pt"}
    if style == "scale_weight":
        out["scaled_fp8"] = torch.empty(0, dtype=dtype)
    else:
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    return out, metadata, expected


def save(sd: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Save tensors as one safetensors file (each with its own storage, as ComfyUI's are)."""
    path = Path(path)
    save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, str(path), metadata=dict(metadata or {"format": "pt"}))
    return path


def real_width_flux_meta(num_layers: int = 1, num_single_layers: int = 1):
    """A FLUX.1 Kontext [dev]-width ``FluxTransformer2DModel`` on the meta device (real head,
    joint and pooled dims, fewer blocks) for key/shape checks without memory."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
