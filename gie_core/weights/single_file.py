"""Load the single weight files ComfyUI users keep, by path, with the streaming reader.

* ``models/diffusion_models``: FLUX.1 Kontext [dev] transformers in the original BFL key layout
  (``double_blocks.N.img_attn.qkv``...), with or without ComfyUI's ``model.diffusion_model.``
  prefix, as bf16/fp16, plain fp8 or ComfyUI "scaled fp8"; files already in diffusers layout too.
* ``models/vae``: FLUX's ``ae.safetensors`` (LDM layout) or a diffusers-layout AutoencoderKL.
* ``models/text_encoders``: ``t5xxl_fp16`` / ``t5xxl_fp8_e4m3fn(_scaled)`` and ``clip_l``.

The architecture comes from the shipped real configs (``gie_core/configs/*.json``), with every
size that is visible in the weight shapes read from the file, so the same code loads the real
files and the tiny test ones. Weights are read, converted and assigned one tensor at a time:
a fused tensor (``qkv``, ``linear1``) is split and dropped before the next one is read.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import torch

from gie_core.engine.encoders import QwenVLEncoder, load_qwen_image_processor
from gie_core.weights.loading import prepare_streamed_storage, map_qwen_key, qwen_config_from_gie, quiet_transformers
from gie_core.weights.quantize import storage
from gie_core.weights.reader import FLOAT8_DTYPES, CheckpointError, CheckpointReader, assign_weights, empty_weights

# Names of the shipped configs (files in gie_core/configs/, without ".json").
TRANSFORMER_CONFIG = "flux1-kontext-dev-transformer"
VAE_CONFIG = "flux-ae"
T5_CONFIG = "t5-v1_1-xxl-encoder"
CLIP_CONFIG = "clip-vit-large-patch14-text"
SCHEDULER_CONFIG = "flow-match-scheduler"
QWEN_CONFIG = "qwen2.5-vl-7b-instruct"
QWEN_PREPROCESSOR = "qwen2.5-vl-preprocessor"
CONFIG_NAMES = (TRANSFORMER_CONFIG, VAE_CONFIG, T5_CONFIG, CLIP_CONFIG, SCHEDULER_CONFIG, QWEN_CONFIG, QWEN_PREPROCESSOR)

KINDS = ("bfl_transformer", "diffusers_transformer", "vae", "t5", "clip", "qwen2.5-vl", "connector")

_KIND_WORDS = {
    "bfl_transformer": "a FLUX transformer",
    "diffusers_transformer": "a FLUX transformer",
    "vae": "a VAE",
    "t5": "a T5 text encoder",
    "clip": "a CLIP text encoder",
    "qwen2.5-vl": "a Qwen2.5-VL text encoder",
    "connector": "a GPT-Image-Edit connector",
}

# Tensors that identify each kind, relative to a common prefix (the first one is searched for).
_KIND_MARKERS = {
    "bfl_transformer": ("img_in.weight", "txt_in.weight", "final_layer.linear.weight"),
    "diffusers_transformer": ("x_embedder.weight", "context_embedder.weight", "proj_out.weight"),
    "vae": ("decoder.conv_in.weight", "encoder.conv_in.weight"),
    "t5": ("encoder.block.0.layer.0.SelfAttention.q.weight",),
    "clip": ("encoder.layers.0.self_attn.q_proj.weight", "embeddings.token_embedding.weight"),
    "qwen2.5-vl": ("model.layers.0.self_attn.k_proj.bias", "visual.merger.mlp.0.weight"),
    "connector": ("denoise_projector.0.weight", "denoise_projector.2.weight"),
}

# Side tensors of ComfyUI's fp8 formats: the old "scaled fp8" (a ``scaled_fp8`` marker and
# ``<layer>.scale_weight`` / ``<layer>.scale_input``) and the newer mixed-precision one
# (``<layer>.weight_scale`` / ``<layer>.input_scale`` / ``<layer>.comfy_quant``).
_QUANT_SUFFIXES = (".scale_weight", ".scale_input", ".weight_scale", ".weight_scale_2", ".input_scale", ".comfy_quant")
_WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")


# --------------------------------------------------------------------------------------------
# Shipped configs
# --------------------------------------------------------------------------------------------


def load_config(name: str) -> dict:
    """The shipped architecture config ``name`` (e.g. ``"flux-ae"``) as a fresh dict.

    Keys starting with ``_`` (``_class_name``, ``_comment``) are kept; :func:`model_kwargs`
    drops them before a config is handed to a model class.
    """
    stem = name[:-5] if name.endswith(".json") else name
    if stem not in CONFIG_NAMES:
        raise ValueError(f"config '{name}' is not shipped; expected one of {', '.join(CONFIG_NAMES)}")
    text = resources.files("gie_core").joinpath("configs", f"{stem}.json").read_text(encoding="utf-8")
    return json.loads(text)


def model_kwargs(config: dict) -> dict:
    """A config without its ``_``-prefixed bookkeeping keys, ready for ``Model(**kwargs)``."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


# --------------------------------------------------------------------------------------------
# Kind detection
# --------------------------------------------------------------------------------------------


def _find_components(reader: CheckpointReader) -> dict[str, str]:
    """``{kind: key prefix}`` for every model kind found in the file (all-in-one checkpoints
    hold several)."""
    keys = reader.keys()
    found: dict[str, str] = {}
    for kind, markers in _KIND_MARKERS.items():
        candidates = []
        for key in keys:
            if not key.endswith(markers[0]):
                continue
            prefix = key[: -len(markers[0])]
            if prefix and not prefix.endswith("."):
                continue
            if all(prefix + m in reader for m in markers[1:]):
                candidates.append(prefix)
        if candidates:
            found[kind] = min(candidates, key=len)
    return found


def _describe_keys(reader: CheckpointReader) -> str:
    keys = reader.keys()
    if not keys:
        return "it holds no tensors"
    return f"its first tensors are {', '.join(keys[:3])}"


def _detect(reader: CheckpointReader, path) -> tuple[str, str]:
    found = _find_components(reader)
    for kind in KINDS:
        if kind in found:
            return kind, found[kind]
    raise CheckpointError(
        f"{path} is not a FLUX transformer, VAE, T5, CLIP or Qwen2.5-VL text encoder or a connector "
        f"({_describe_keys(reader)})"
    )


def detect_single_file_kind(path: str | os.PathLike) -> str:
    """What a weights file holds: ``"bfl_transformer"``, ``"diffusers_transformer"``, ``"vae"``,
    ``"t5"``, ``"clip"``, ``"qwen2.5-vl"`` or ``"connector"`` (for an all-in-one checkpoint, the
    first of these it holds).

    Raises :class:`CheckpointError` for a missing, corrupt or unrecognised file.
    """
    with CheckpointReader.open(path) as reader:
        return _detect(reader, path)[0]


def file_kinds(path: str | os.PathLike) -> dict[str, str]:
    """``{kind: key prefix}`` of every model kind a safetensors file holds (header only; an
    all-in-one checkpoint holds several). Raises :class:`CheckpointError` for a missing or
    corrupt file."""
    with CheckpointReader.open(path) as reader:
        return _find_components(reader)


def describe_file(path: str | os.PathLike) -> str:
    """What a file that holds none of :data:`KINDS` starts with, for error messages."""
    with CheckpointReader.open(path) as reader:
        return _describe_keys(reader)


def require_kind(reader: CheckpointReader, path, wanted: tuple[str, ...]) -> tuple[str, str]:
    """``(kind, prefix)`` of the wanted component, or a CheckpointError saying what the file is."""
    found = _find_components(reader)
    for kind in wanted:
        if kind in found:
            return kind, found[kind]
    want = _KIND_WORDS[wanted[0]]
    for kind in KINDS:
        if kind in found:
            raise CheckpointError(f"{path} looks like {_KIND_WORDS[kind]}, not {want}")
    raise CheckpointError(f"{path} does not look like {want} ({_describe_keys(reader)})")


# --------------------------------------------------------------------------------------------
# fp8 (plain and ComfyUI-scaled) upcasting
# --------------------------------------------------------------------------------------------


def _is_quant_side_tensor(key: str) -> bool:
    return key == "scaled_fp8" or key.endswith(".scaled_fp8") or key.endswith(_QUANT_SUFFIXES)


def _check_quant_formats(reader: CheckpointReader, path) -> None:
    """Refuse quantisation formats we cannot upcast exactly (nvfp4, int8, ...)."""
    formats: dict[str, str] = {}
    meta = reader.metadata.get("_quantization_metadata")
    if meta:
        try:
            layers = json.loads(meta).get("layers", {})
        except (json.JSONDecodeError, AttributeError):
            raise CheckpointError(f"{path}: its _quantization_metadata is not valid JSON") from None
        for layer, conf in layers.items():
            formats[layer] = conf.get("format") if isinstance(conf, dict) else str(conf)
    for key in reader.keys():
        if key.endswith(".comfy_quant"):
            raw = reader.read(key)
            try:
                conf = json.loads(bytes(raw.to(torch.uint8).flatten().tolist()).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise CheckpointError(f"{path}: tensor '{key}' is not a valid quantisation descriptor") from None
            formats[key[: -len(".comfy_quant")]] = conf.get("format") if isinstance(conf, dict) else None
    bad = {layer: fmt for layer, fmt in formats.items() if fmt not in _FP8_FORMATS}
    if bad:
        layer, fmt = next(iter(bad.items()))
        raise CheckpointError(
            f"{path} stores {len(bad)} layers quantised as '{fmt}' (e.g. {layer}); only bf16/fp16/fp32 "
            f"and fp8 ({', '.join(_FP8_FORMATS)}, plain or scaled) files can be loaded"
        )


def read_upcast(reader: CheckpointReader, key: str) -> torch.Tensor:
    """Read one tensor; an fp8-stored one comes back as float32, multiplied by its ComfyUI
    scale (``<layer>.scale_weight`` of "scaled fp8" files or ``<layer>.weight_scale`` of
    mixed-precision files; a scalar or one value per output row) when the file has one.

    Other tensors come back as stored; the caller's ``assign_weights`` casts them.
    """
    tensor = reader.read(key)
    if tensor.dtype not in FLOAT8_DTYPES:
        return tensor
    tensor = tensor.to(torch.float32)  # exact: every fp8 value is an fp32 value
    if key.endswith(".weight"):
        layer = key[: -len(".weight")]
        for suffix in _WEIGHT_SCALE_SUFFIXES:
            if layer + suffix in reader:
                scale = reader.read(layer + suffix).to(torch.float32)
                if scale.numel() == 1:
                    scale = scale.reshape(())
                elif scale.numel() == tensor.shape[0]:
                    scale = scale.reshape(-1, *([1] * (tensor.ndim - 1)))  # one scale per output row
                else:
                    raise CheckpointError(
                        f"{reader.describe()}: scale '{layer + suffix}' has shape {tuple(scale.shape)}, which "
                        f"does not fit weight '{key}' of shape {tuple(tensor.shape)}"
                    )
                tensor.mul_(scale)
                break
    return tensor


def _iter_component(reader: CheckpointReader, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key without prefix, upcast tensor)`` for the component's tensors, one at a time,
    skipping fp8 scale side tensors."""
    for key in reader.keys():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if _is_quant_side_tensor(name):
            continue
        yield name, read_upcast(reader, key)


# --------------------------------------------------------------------------------------------
# FLUX transformer: BFL layout -> diffusers layout
# --------------------------------------------------------------------------------------------

# BFL module path -> diffusers module path (parameter names weight/bias carry over; the
# RMSNorm ``scale`` becomes ``weight``).
_BFL_TOP_MODULES = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_BFL_DOUBLE_MODULES = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_BFL_DOUBLE_QKV = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_BFL_SINGLE_MODULES = {
    "modulation.lin": "norm.linear",
    "linear2": "proj_out",
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
}
_BFL_SINGLE_LINEAR1 = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
_BLOCK_MODULE = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")


def _split_rows(key: str, tensor: torch.Tensor, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    if tensor.shape[0] != sum(sizes):
        raise CheckpointError(
            f"BFL tensor '{key}' has {tensor.shape[0]} rows but the inferred widths need {sum(sizes)} "
            f"({' + '.join(map(str, sizes))})"
        )
    # Own storage for each part: views of one fused tensor would make later safetensors saves
    # of the model fail ("tensors share memory").
    return [part.clone() for part in torch.split(tensor, list(sizes), dim=0)]


def bfl_flux_key_to_diffusers(
    key: str, tensor: torch.Tensor, *, inner_dim: int, mlp_hidden_dim: int
) -> list[tuple[str, torch.Tensor]]:
    """Map one BFL-layout FLUX tensor (key without any ``model.diffusion_model.`` prefix) to
    its diffusers ``FluxTransformer2DModel`` tensors.

    Fused tensors are split by the model's real widths: double-block ``qkv`` into three
    ``inner_dim`` parts, single-block ``linear1`` into q, k, v (``inner_dim`` each) and the MLP
    input (``mlp_hidden_dim``). ``final_layer.adaLN_modulation.1`` is stored (shift, scale) by
    BFL and read (scale, shift) by diffusers' ``AdaLayerNormContinuous``, so its halves swap.
    Works on meta tensors. Raises :class:`CheckpointError` for a key it does not know.
    """
    module, _, param = key.rpartition(".")
    if param == "scale":  # RMSNorm weight of the q/k norms
        param = "weight"
    if param not in ("weight", "bias"):
        raise CheckpointError(f"'{key}' is not a tensor of a BFL FLUX transformer")

    if module in _BFL_TOP_MODULES:
        return [(f"{_BFL_TOP_MODULES[module]}.{param}", tensor)]
    if module == "final_layer.adaLN_modulation.1":
        shift, scale = tensor.chunk(2, dim=0)
        return [(f"norm_out.linear.{param}", torch.cat([scale, shift], dim=0))]

    match = _BLOCK_MODULE.match(module)
    if match:
        kind, index, sub = match.groups()
        if kind == "double_blocks":
            base = f"transformer_blocks.{index}"
            if sub in _BFL_DOUBLE_MODULES:
                return [(f"{base}.{_BFL_DOUBLE_MODULES[sub]}.{param}", tensor)]
            if sub in _BFL_DOUBLE_QKV:
                parts = _split_rows(key, tensor, (inner_dim,) * 3)
                return [(f"{base}.{name}.{param}", part) for name, part in zip(_BFL_DOUBLE_QKV[sub], parts)]
        else:
            base = f"single_transformer_blocks.{index}"
            if sub in _BFL_SINGLE_MODULES:
                return [(f"{base}.{_BFL_SINGLE_MODULES[sub]}.{param}", tensor)]
            if sub == "linear1":
                parts = _split_rows(key, tensor, (inner_dim, inner_dim, inner_dim, mlp_hidden_dim))
                return [(f"{base}.{name}.{param}", part) for name, part in zip(_BFL_SINGLE_LINEAR1, parts)]
    raise CheckpointError(f"'{key}' is not a tensor of a BFL FLUX transformer")


def _count_blocks(keys, prefix: str) -> int:
    """Number of ``<prefix>N.`` blocks (the highest index + 1)."""
    indices = set()
    for key in keys:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                indices.add(int(head))
    return max(indices) + 1 if indices else 0


def _shape(reader: CheckpointReader, key: str, path) -> tuple[int, ...]:
    if key not in reader:
        raise CheckpointError(f"{path} has no tensor '{key}' (is the file complete?)")
    return reader.shape(key)


def _flux_config_from_shapes(reader: CheckpointReader, prefix: str, path, *, bfl: bool) -> tuple[dict, int]:
    """The diffusers FLUX config for this file (real config, sizes from the shapes) and the
    single-block MLP width."""
    keys = [k[len(prefix):] for k in reader.keys() if k.startswith(prefix)]

    def shape(name: str) -> tuple[int, ...]:
        return _shape(reader, prefix + name, path)

    if bfl:
        names = dict(
            x="img_in.weight", ctx="txt_in.weight", pooled="vector_in.in_layer.weight",
            guidance="guidance_in.in_layer.weight", out="final_layer.linear.weight",
            double="double_blocks.", single="single_blocks.",
            qnorm_double="double_blocks.0.img_attn.norm.query_norm.scale",
            qnorm_single="single_blocks.0.norm.query_norm.scale",
            mlp="double_blocks.0.img_mlp.0.weight", linear1="single_blocks.0.linear1.weight",
        )
    else:
        names = dict(
            x="x_embedder.weight", ctx="context_embedder.weight", pooled="time_text_embed.text_embedder.linear_1.weight",
            guidance="time_text_embed.guidance_embedder.linear_1.weight", out="proj_out.weight",
            double="transformer_blocks.", single="single_transformer_blocks.",
            qnorm_double="transformer_blocks.0.attn.norm_q.weight",
            qnorm_single="single_transformer_blocks.0.attn.norm_q.weight",
            mlp="transformer_blocks.0.ff.net.0.proj.weight", linear1="single_transformer_blocks.0.proj_mlp.weight",
        )
    config = load_config(TRANSFORMER_CONFIG)
    inner, in_channels = shape(names["x"])
    num_layers = _count_blocks(keys, names["double"])
    num_single = _count_blocks(keys, names["single"])
    if num_layers:
        head_dim = shape(names["qnorm_double"])[0]
    elif num_single:
        head_dim = shape(names["qnorm_single"])[0]
    else:
        raise CheckpointError(f"{path} has no transformer blocks")
    if inner % head_dim or head_dim % 16:
        raise CheckpointError(
            f"{path}: width {inner} with head width {head_dim} is not a FLUX layout "
            "(the width must be a multiple of the head width, and the head width of 16)"
        )
    if num_single:
        rows = shape(names["linear1"])[0]
        mlp_hidden = rows - 3 * inner if bfl else rows
    else:
        mlp_hidden = shape(names["mlp"])[0]
    if mlp_hidden != 4 * inner:
        # diffusers' FLUX blocks hard-code mlp_ratio 4.
        raise CheckpointError(f"{path}: MLP width {mlp_hidden} is not 4 x the width {inner}, which FLUX requires")
    out_rows = shape(names["out"])[0]
    patch = config["patch_size"]
    config.update(
        in_channels=in_channels,
        out_channels=None if out_rows == in_channels * patch * patch else out_rows // (patch * patch),
        num_layers=num_layers,
        num_single_layers=num_single,
        attention_head_dim=head_dim,
        num_attention_heads=inner // head_dim,
        joint_attention_dim=shape(names["ctx"])[1],
        pooled_projection_dim=shape(names["pooled"])[1],
        guidance_embeds=prefix + names["guidance"] in reader,
        # real (16, 56, 56) for head 128: the rope split of the head is fixed, only its width varies
        axes_dims_rope=[head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16],
    )
    return config, mlp_hidden


def load_bfl_transformer(
    path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
    quantize: str = "none",
):
    """Load a FLUX(.1 Kontext) transformer file as a diffusers ``FluxTransformer2DModel``.

    Accepts the original BFL layout (as kept in ComfyUI's ``models/diffusion_models``), with or
    without the ``model.diffusion_model.`` prefix of ComfyUI checkpoints, and diffusers-layout
    files; bf16/fp16/fp32, plain fp8 and ComfyUI scaled fp8 weights (upcast to ``dtype``).
    The architecture is the real Kontext config with the sizes read from the tensor shapes.
    ``quantize="fp8"``: each tensor goes straight into float8 storage as it is read (the model
    is never held in ``dtype`` first); ``"fp8_e4m3fn_fast"``: each linear weight is quantised
    to fp8 with its per-tensor scale as it is read (a scaled-fp8 file's stored scales kept).
    """
    from diffusers import FluxTransformer2DModel  # start-up: diffusers' models (~4 s)

    q = storage(quantize)

    with CheckpointReader.open(path) as reader:
        kind, prefix = require_kind(reader, path, ("bfl_transformer", "diffusers_transformer"))
        _check_quant_formats(reader, path)
        bfl = kind == "bfl_transformer"
        config, mlp_hidden = _flux_config_from_shapes(reader, prefix, path, bfl=bfl)
        with empty_weights():
            model = FluxTransformer2DModel.from_config(model_kwargs(config))
        # fp8 storage: straight into float8; fp8 compute: each weight quantised as it is read,
        # a scaled-fp8 file keeping its stored per-tensor scales (its fp8 values come back exactly)
        scales = stored_weight_scales(path, model, kind) if q.method == "scaled_mm" else None
        convert = prepare_streamed_storage(model, q, dtype, "transformer", scales)

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for key, tensor in _iter_component(reader, prefix):
                if bfl:
                    yield from bfl_flux_key_to_diffusers(
                        key, tensor, inner_dim=config["num_attention_heads"] * config["attention_head_dim"],
                        mlp_hidden_dim=mlp_hidden,
                    )
                else:
                    yield key, tensor

        assign_weights(model, tensors(), dtype=dtype, device=device, what=f"{path} (FLUX transformer)", convert=convert)
    return model.eval()


# --------------------------------------------------------------------------------------------
# VAE: LDM/BFL layout -> diffusers layout
# --------------------------------------------------------------------------------------------

_LDM_VAE_TOP = {
    "conv_in": "conv_in",
    "conv_out": "conv_out",
    "norm_out": "conv_norm_out",
}
_LDM_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Names of diffusers' old VAE attention layout (before the Attention processor rewrite).
_LEGACY_DIFFUSERS_VAE_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LDM_RESNET = {"nin_shortcut": "conv_shortcut"}


def ldm_vae_key_to_diffusers(key: str, *, num_up_blocks: int) -> str:
    """Map one LDM/BFL-layout VAE key (``encoder.down.0.block.1.conv1.weight``, ...) to the
    diffusers ``AutoencoderKL`` key. The decoder's ``up.N`` blocks are numbered from the
    lowest resolution in diffusers, so ``up.N`` becomes ``up_blocks.<num_up_blocks - 1 - N>``.
    """
    parts = key.split(".")
    side, rest = parts[0], parts[1:]
    if side in ("quant_conv", "post_quant_conv"):
        return key
    if side not in ("encoder", "decoder") or not rest:
        raise CheckpointError(f"'{key}' is not a tensor of an LDM-layout VAE")
    head = rest[0]
    if head in _LDM_VAE_TOP and len(rest) == 2:
        return f"{side}.{_LDM_VAE_TOP[head]}.{rest[1]}"
    if head in ("down", "up") and len(rest) >= 4:
        index = int(rest[1])
        if head == "down":
            base = f"{side}.down_blocks.{index}"
            sampler = "downsample"
            sampler_new = "downsamplers"
        else:
            base = f"{side}.up_blocks.{num_up_blocks - 1 - index}"
            sampler = "upsample"
            sampler_new = "upsamplers"
        if rest[2] == "block":
            module = _LDM_RESNET.get(rest[4], rest[4])
            return f"{base}.resnets.{rest[3]}.{module}." + ".".join(rest[5:])
        if rest[2] == sampler:
            return f"{base}.{sampler_new}.0." + ".".join(rest[3:])
    if head == "mid" and len(rest) >= 3:
        if rest[1] in ("block_1", "block_2"):
            module = _LDM_RESNET.get(rest[2], rest[2])
            return f"{side}.mid_block.resnets.{int(rest[1][-1]) - 1}.{module}." + ".".join(rest[3:])
        if rest[1] == "attn_1" and rest[2] in _LDM_VAE_ATTN:
            return f"{side}.mid_block.attentions.0.{_LDM_VAE_ATTN[rest[2]]}." + ".".join(rest[3:])
    raise CheckpointError(f"'{key}' is not a tensor of an LDM-layout VAE")


def _vae_attention_to_linear(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """LDM stores the mid-block attention projections as 1x1 convs ([C, C, 1, 1]); diffusers'
    Attention wants Linear weights ([C, C])."""
    if ".mid_block.attentions." in key and key.endswith(".weight") and tensor.ndim > 2:
        return tensor.reshape(tensor.shape[0], tensor.shape[1])
    return tensor


def _vae_config_from_shapes(reader: CheckpointReader, prefix: str, path, *, ldm: bool) -> dict:
    keys = [k[len(prefix):] for k in reader.keys() if k.startswith(prefix)]

    def shape(name: str) -> tuple[int, ...]:
        return _shape(reader, prefix + name, path)

    down, block = ("encoder.down.", "block") if ldm else ("encoder.down_blocks.", "resnets")
    num_blocks = _count_blocks(keys, down)
    if not num_blocks:
        raise CheckpointError(f"{path} has no VAE encoder blocks")
    channels = [shape(f"{down}{i}.{block}.0.conv1.weight")[0] for i in range(num_blocks)]
    layers = _count_blocks(keys, f"{down}0.{block}.")
    mid_attn = "encoder.mid.attn_1.q.weight" if ldm else "encoder.mid_block.attentions.0.to_q.weight"
    legacy_attn = "encoder.mid_block.attentions.0.query.weight"
    config = load_config(VAE_CONFIG)
    config.update(
        in_channels=shape("encoder.conv_in.weight")[1],
        out_channels=shape("decoder.conv_out.weight")[0],
        block_out_channels=channels,
        down_block_types=["DownEncoderBlock2D"] * num_blocks,
        up_block_types=["UpDecoderBlock2D"] * num_blocks,
        layers_per_block=layers,
        latent_channels=shape("decoder.conv_in.weight")[1],
        use_quant_conv=prefix + "quant_conv.weight" in reader,
        use_post_quant_conv=prefix + "post_quant_conv.weight" in reader,
        mid_block_add_attention=prefix + mid_attn in reader or prefix + legacy_attn in reader,
    )
    return config


def load_bfl_vae(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """Load FLUX's ``ae.safetensors`` (BFL/LDM layout) or a diffusers-layout VAE file as a
    diffusers ``AutoencoderKL`` (real FLUX config, sizes from the tensor shapes)."""
    from diffusers import AutoencoderKL  # start-up: diffusers' models (~4 s)

    with CheckpointReader.open(path) as reader:
        _, prefix = require_kind(reader, path, ("vae",))
        _check_quant_formats(reader, path)
        ldm = prefix + "encoder.down.0.block.0.conv1.weight" in reader
        config = _vae_config_from_shapes(reader, prefix, path, ldm=ldm)
        with empty_weights():
            model = AutoencoderKL.from_config(model_kwargs(config))
        num_up = len(config["up_block_types"])

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for key, tensor in _iter_component(reader, prefix):
                if ldm:
                    key = ldm_vae_key_to_diffusers(key, num_up_blocks=num_up)
                else:
                    module, _, param = key.rpartition(".")
                    head, _, last = module.rpartition(".")
                    if ".mid_block.attentions." in key and last in _LEGACY_DIFFUSERS_VAE_ATTN:
                        key = f"{head}.{_LEGACY_DIFFUSERS_VAE_ATTN[last]}.{param}"
                yield key, _vae_attention_to_linear(key, tensor)

        assign_weights(model, tensors(), dtype=dtype, device=device, what=f"{path} (VAE)")
    return model.eval()


# --------------------------------------------------------------------------------------------
# T5 encoder
# --------------------------------------------------------------------------------------------


def load_t5_encoder(path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"):
    """Load a T5 encoder file (``t5xxl_fp16.safetensors``, ``t5xxl_fp8_e4m3fn(_scaled)``, or a
    full T5 whose decoder is dropped) as a transformers ``T5EncoderModel``.

    The config is T5 v1.1 XXL's with every size read from the shapes; fp8 weights are upcast,
    and the model's fp32-kept modules (``wo``) stay fp32 when ``dtype`` is fp16.
    """
    from transformers import T5Config, T5EncoderModel  # start-up: transformers' models (~4 s)

    with CheckpointReader.open(path) as reader:
        _, prefix = require_kind(reader, path, ("t5",))
        _check_quant_formats(reader, path)
        keys = [k[len(prefix):] for k in reader.keys() if k.startswith(prefix)]

        def shape(name: str) -> tuple[int, ...]:
            return _shape(reader, prefix + name, path)

        embed = "shared.weight" if "shared.weight" in keys else "encoder.embed_tokens.weight"
        vocab, d_model = shape(embed)
        buckets, heads = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        q_rows = shape("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
        if q_rows % heads:
            raise CheckpointError(f"{path}: {q_rows} attention rows do not split into {heads} heads")
        config = load_config(T5_CONFIG)
        gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in keys
        ff = "encoder.block.0.layer.1.DenseReluDense." + ("wi_0.weight" if gated else "wi.weight")
        config.update(
            vocab_size=vocab,
            d_model=d_model,
            d_kv=q_rows // heads,
            d_ff=shape(ff)[0],
            num_layers=_count_blocks(keys, "encoder.block."),
            num_heads=heads,
            relative_attention_num_buckets=buckets,
        )
        if not gated:  # the original T5 (v1.0) feed-forward
            config.update(feed_forward_proj="relu", dense_act_fn="relu", is_gated_act=False)
        config["num_decoder_layers"] = config["num_layers"]
        with empty_weights():
            model = T5EncoderModel(T5Config(**model_kwargs(config)))
        # The encoder's embedding is the shared one: one module, so filling shared.weight
        # fills both (assign_weights replaces parameters, which would untie them).
        model.encoder.embed_tokens = model.shared

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for key, tensor in _iter_component(reader, prefix):
                if key.startswith(("decoder.", "lm_head.")):
                    continue
                if key == "encoder.embed_tokens.weight":
                    if embed == "shared.weight":
                        continue  # a duplicate of shared.weight
                    key = "shared.weight"
                yield key, tensor

        assign_weights(model, tensors(), dtype=dtype, device=device, what=f"{path} (T5 encoder)")
    return model.eval()


# --------------------------------------------------------------------------------------------
# CLIP text encoder
# --------------------------------------------------------------------------------------------

_CLIP_TEXT_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")


def load_clip_text(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    eos_token_id: int | None = None,
):
    """Load a CLIP text encoder file (``clip_l.safetensors``; keys ``text_model.*``, possibly
    under ``transformer.`` / ``cond_stage_model.transformer.``) as a transformers
    ``CLIPTextModel``. ``text_projection`` and ``logit_scale`` are ignored.

    Sizes come from the shapes (heads = hidden / 64, as in every OpenAI CLIP); pass the
    tokenizer's ``eos_token_id`` so pooling picks the right token (default: the real 49407).
    """
    from transformers import CLIPTextConfig, CLIPTextModel  # start-up: transformers' models (~4 s)

    with CheckpointReader.open(path) as reader:
        _, base = require_kind(reader, path, ("clip",))
        _check_quant_formats(reader, path)
        keys = [k[len(base):] for k in reader.keys() if k.startswith(base)]

        def shape(name: str) -> tuple[int, ...]:
            return _shape(reader, base + name, path)

        vocab, hidden = shape("embeddings.token_embedding.weight")
        if hidden % 64:
            raise CheckpointError(f"{path}: hidden size {hidden} is not a whole number of 64-wide CLIP heads")
        config = load_config(CLIP_CONFIG)
        config.update(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=shape("encoder.layers.0.mlp.fc1.weight")[0],
            num_hidden_layers=_count_blocks(keys, "encoder.layers."),
            num_attention_heads=hidden // 64,
            max_position_embeddings=shape("embeddings.position_embedding.weight")[0],
        )
        parent = base[: -len("text_model.")] if base.endswith("text_model.") else None
        projection = (parent + "text_projection.weight") if parent is not None else None
        if projection is not None and projection in reader:
            config["projection_dim"] = reader.shape(projection)[0]
        if eos_token_id is not None:
            config["eos_token_id"] = int(eos_token_id)
        with empty_weights():
            model = CLIPTextModel(CLIPTextConfig(**model_kwargs(config)))
        # transformers 4 nests the text tower under "text_model."; transformers 5 does not.
        wrapped = any(name.startswith("text_model.") for name, _ in model.named_parameters())

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for key, tensor in _iter_component(reader, base):
                if not key.startswith(_CLIP_TEXT_PARTS) or key == "embeddings.position_ids":
                    continue
                yield ("text_model." + key if wrapped else key), tensor

        assign_weights(model, tensors(), dtype=dtype, device=device, what=f"{path} (CLIP text encoder)")
    return model.eval()


__all__ = [
    "CONFIG_NAMES",
    "KINDS",
    "bfl_flux_key_to_diffusers",
    "detect_single_file_kind",
    "file_kinds",
    "ldm_vae_key_to_diffusers",
    "load_bfl_transformer",
    "load_bfl_vae",
    "load_clip_text",
    "load_config",
    "load_t5_encoder",
    "model_kwargs",
    "read_upcast",
    "require_kind",
]


# --------------------------------------------------------------------------------------------
# Qwen2.5-VL text encoder (ComfyUI's layout, or gie-convert's) and the connector
# --------------------------------------------------------------------------------------------


def qwen_file_config(reader: CheckpointReader, path, config_dir=None) -> dict:
    """The flat (pre-4.52) Qwen2.5-VL config of a single file: the one ``gie-convert`` stored in
    its metadata, else ``config_dir/config.json``, else the shipped 7B-Instruct config when the
    shapes are the 7B's (ComfyUI's ``qwen_2.5_vl_7b*.safetensors``)."""
    meta = reader.metadata.get("gie_qwen_config")
    if meta:
        try:
            return json.loads(meta)
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: its gie_qwen_config metadata is not valid JSON") from None
    if config_dir is not None:
        cfg_path = Path(config_dir) / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{config_dir} has no config.json for the Qwen2.5-VL in {path}")
        cfg = json.loads(cfg_path.read_text())
        return {k: v for k, v in cfg.items() if k != "denoise_tower"}
    cfg = load_config(QWEN_CONFIG)
    width = _shape(reader, "model.layers.0.self_attn.k_proj.bias", path)[0]
    layers = _count_blocks(reader.keys(), "model.layers.")
    want = cfg["num_key_value_heads"] * cfg["hidden_size"] // cfg["num_attention_heads"]
    if width != want or layers != cfg["num_hidden_layers"]:
        raise CheckpointError(
            f"{path} is a Qwen2.5-VL of another size ({layers} layers, k_proj {width} wide; the 7B has "
            f"{cfg['num_hidden_layers']} and {want}) and carries no config; give the folder with its config.json"
        )
    return model_kwargs(cfg)


def qwen_processing(tokenizer_dir, preprocessor_dir=None):
    """(tokenizer, image processor, None) for a Qwen2.5-VL: the tokenizer from ``tokenizer_dir``
    (a Qwen2.5-VL folder, or ComfyUI's bundled ``comfy/text_encoders/qwen25_tokenizer``), the image
    processor from ``preprocessor_dir``'s (or the tokenizer folder's) preprocessor_config.json,
    else Qwen2.5-VL-Instruct's shipped one."""
    import transformers  # start-up: transformers (~1 s)

    tok_dir = Path(tokenizer_dir)
    if not (tok_dir / "tokenizer.json").exists() and not (tok_dir / "vocab.json").exists():
        raise CheckpointError(f"{tok_dir} has no Qwen tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    with quiet_transformers():
        tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    # its chat template (if any) is never used: prompts are rendered by gie_core.engine.conversation
    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    for d in (preprocessor_dir, tok_dir):
        if d is not None and (Path(d) / "preprocessor_config.json").is_file():
            return tokenizer, load_qwen_image_processor(d), None
    conf = model_kwargs(load_config(QWEN_PREPROCESSOR))
    conf.pop("image_processor_type", None)
    conf.pop("processor_class", None)
    return tokenizer, cls(**conf), None


def load_qwen_file(
    path: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike,
    preprocessor_dir: str | os.PathLike | None = None,
    config_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    lm_head: bool | None = None,
):
    """A :class:`gie_core.engine.encoders.QwenVLEncoder` from one Qwen2.5-VL file in ComfyUI's layout
    (``model.*``, ``visual.*``, optional ``lm_head.*``): bf16/fp16/fp32, plain fp8 or ComfyUI's
    scaled fp8 (upcast to ``dtype``).

    ``lm_head``: None = load it when the file has it; False = leave it out (encoding needs no
    LM head: the model is then the bare ``Qwen2_5_VLModel`` and cannot rewrite); True = required.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel  # start-up: transformers' models (~4 s)

    tokenizer, image_processor, processor = qwen_processing(tokenizer_dir, preprocessor_dir)
    with CheckpointReader.open(path) as reader:
        require_kind(reader, path, ("qwen2.5-vl",))
        _check_quant_formats(reader, path)
        has_head = "lm_head.weight" in reader
        if lm_head and not has_head:
            raise CheckpointError(
                f"{path} has no lm_head (instruction rewriting needs it): convert with gie-convert --lm-head"
            )
        want_head = has_head if lm_head is None else bool(lm_head)
        config = qwen_config_from_gie(qwen_file_config(reader, path, config_dir))
        with empty_weights():
            model = Qwen2_5_VLForConditionalGeneration(config) if want_head else Qwen2_5_VLModel(config)
        model_keys = set(model.state_dict())

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for key in reader.keys():
                if _is_quant_side_tensor(key) or (key.startswith("lm_head.") and not want_head):
                    continue
                name = map_qwen_key(key, model_keys)
                if name is None and not want_head:  # a bare model has no "model." level
                    name = map_qwen_key(key, {"model." + k for k in model_keys})
                    name = name[len("model."):] if name else None
                if name is None:
                    raise CheckpointError(f"{path}: tensor '{key}' does not belong to a Qwen2.5-VL model")
                yield name, read_upcast(reader, key)

        assign_weights(model, tensors(), dtype=dtype, device=device, what=f"{path} (Qwen2.5-VL)")
    return QwenVLEncoder(model.eval().requires_grad_(False), tokenizer, image_processor, processor)

def default_scheduler():
    """FLUX's FlowMatch Euler scheduler from the shipped config (the checkpoints carry none)."""
    from diffusers import FlowMatchEulerDiscreteScheduler  # start-up: diffusers (~2 s)

    return FlowMatchEulerDiscreteScheduler.from_config(model_kwargs(load_config(SCHEDULER_CONFIG)))


# --------------------------------------------------------------------------------------------
# Scaled-fp8 files: their stored per-tensor weight scales (for fp8 compute)
# --------------------------------------------------------------------------------------------

# A tensor every transformer file of a layout has: what comes before it is the file's key prefix
# (ComfyUI's "model.diffusion_model.", or none).
_LAYOUT_MARKER = {"bfl_transformer": "img_in.weight", "diffusers_transformer": "x_embedder.weight"}


def stored_weight_scales(path: str | Path, model: torch.nn.Module, layout: str) -> dict[str, torch.Tensor]:
    """``{diffusers layer name: scale}`` of the per-tensor weight scales a scaled-fp8 transformer
    file of ``layout`` ("bfl_transformer" or "diffusers_transformer", as
    :func:`gie_core.weights.parts.resolve_source` found it) stores (``<layer>.scale_weight`` /
    ``<layer>.weight_scale``; a fused BFL ``qkv`` / ``linear1`` scale applies to each of its
    parts). Per-row scales are left out: those layers get a per-tensor scale of their own."""
    if layout not in _LAYOUT_MARKER:
        return {}
    bfl = layout == "bfl_transformer"
    cfg = model.config
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    scales: dict[str, torch.Tensor] = {}
    with CheckpointReader.open(path) as reader:
        marker = next((k for k in reader.keys() if k.endswith(_LAYOUT_MARKER[layout])), _LAYOUT_MARKER[layout])
        prefix = marker[: -len(_LAYOUT_MARKER[layout])]
        for key in reader.keys():
            if not key.startswith(prefix) or not key.endswith((".scale_weight", ".weight_scale")):
                continue
            scale = reader.read(key)
            if scale.numel() != 1:
                continue
            layer = key[len(prefix):].rsplit(".", 1)[0]
            weight_key = f"{prefix}{layer}.weight"
            if weight_key not in reader:
                continue
            if bfl:
                meta = torch.empty(reader.shape(weight_key), device="meta")
                names = [n for n, _ in bfl_flux_key_to_diffusers(f"{layer}.weight", meta, inner_dim=inner,
                                                                  mlp_hidden_dim=4 * inner)]
            else:
                names = [f"{layer}.weight"]
            for name in names:
                scales[name[: -len(".weight")]] = scale.float().reshape(())
    return scales
