"""Exported weights, in the formats the engine's loaders and the ComfyUI nodes read.

- ``connector.safetensors``: keys ``denoise_projector.{0,2}.{weight,bias}`` (+ ``type_embedding``,
  ``queries``), read by :func:`gie_core.weights.loading.load_connector`;
- ``transformer.safetensors``: the whole Kontext transformer, diffusers key names (trained
  weights merged in), read by :func:`gie_core.weights.single_file.load_bfl_transformer` (it takes the
  diffusers layout too) and by ComfyUI's diffusion-model loader;
- ``transformer_lora.safetensors``: a diffusers/peft LoRA (``transformer.``-prefixed keys with
  the adapter config in the metadata, as ``FluxKontextPipeline.save_lora_weights`` writes),
  read by :func:`gie_core.weights.lora.load_lora` (the engine and the GIE LoRA node), diffusers'
  ``load_lora_weights`` and ComfyUI's own LoRA loader;
- optionally ``gpt-image-edit/``: a full checkpoint directory in the released layout
  (``denoise_tower.denoise_projector.*``, ``denoise_tower.denoiser.*``, Qwen in the pre-4.52
  names), read by :func:`gie_core.weights.loading.load_gie_checkpoint` and ``gie-edit --model``.

Every file is written through :func:`gie_core.files.atomic_write` (a temporary file beside the
target, renamed when complete, normal permissions); the released-layout directory is built by
:func:`gie_core.files.atomic_folder` (a hidden sibling folder, flushed and swapped into place, the
old one removed only after the new is there).
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path

import torch

# the LoRA mixin itself, not FluxKontextPipeline: importing the pipelines makes transformers
# probe torchvision for image processors the trainer never uses, printing warnings
from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from gie_core.files import atomic_folder, atomic_write, atomic_write_text, temporary_path
from gie_core.train.checkpoint import save_safetensors
from gie_core.weights.loading import GIE_DENOISER_PREFIX, GIE_PROJECTOR_PREFIX, gie_config, parse_dtype, released_qwen_key
from gie_core.weights.reader import CheckpointReader
from gie_core.weights.parts import load_part

CONNECTOR_FILE = "connector.safetensors"
TRANSFORMER_FILE = "transformer.safetensors"
LORA_FILE = "transformer_lora.safetensors"
RELEASED_DIR = "gpt-image-edit"
INFO_FILE = "export_info.json"

# Processor / tokenizer files copied into a released-layout directory.
_PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "preprocessor_config.json", "chat_template.json", "chat_template.jinja",
    "generation_config.json",
)


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()) for k, v in state.items()}


def export_connector(connector, path: str | os.PathLike, *, dtype="bf16", mode: str | None = None, step: int | None = None) -> Path:
    """Write the connector (``denoise_projector.*`` keys, + ``type_embedding`` / ``queries``)."""
    meta = {"format": "pt", "gie_component": "connector"}
    if mode:
        meta["gie_fusion_mode"] = mode
    if step is not None:
        meta["gie_train_step"] = str(step)
    return save_safetensors(_cast(connector.state_dict(), parse_dtype(dtype)), path, metadata=meta)


def transformer_state_dict(transformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The diffusers-named state dict of ``transformer`` on the CPU, in ``dtype`` (floating tensors;
    None keeps each as stored), with any peft LoRA merged in.

    The merge is computed on copies (base weight upcast to fp32, plus the adapter's delta, then
    cast), so the model is never touched: merging into a bf16 or fp8 base weight in place and
    unmerging after would not restore it exactly."""
    deltas: dict[str, torch.Tensor] = {}
    for name, module in transformer.named_modules():
        if isinstance(module, BaseTunerLayer) and not module.disable_adapters:
            for adapter in module.active_adapters:
                if adapter in getattr(module, "lora_A", {}):
                    delta = module.get_delta_weight(adapter).detach().to("cpu", torch.float32)
                    key = f"{name}.weight"
                    deltas[key] = deltas[key] + delta if key in deltas else delta
    state = {}
    for k, v in transformer.state_dict().items():
        if "lora_" in k:
            continue
        key = k.replace(".base_layer.", ".")
        v = v.detach()
        if key in deltas:
            merged = v.to("cpu", torch.float32) + deltas[key]
            v = merged.to(dtype or v.dtype)
        elif v.is_floating_point():
            v = v.to("cpu", dtype or v.dtype)
        state[key] = v.cpu()
    return state


def export_transformer(transformer, path: str | os.PathLike, *, dtype="bf16", step: int | None = None) -> Path:
    """Write the whole transformer, diffusers key names, any LoRA merged in."""
    meta = {"format": "pt", "gie_component": "kontext_transformer", "config": json.dumps(dict(_transformer_config(transformer)))}
    if step is not None:
        meta["gie_train_step"] = str(step)
    return save_safetensors(transformer_state_dict(transformer, parse_dtype(dtype)), path, metadata=meta)


def _transformer_config(transformer) -> dict:
    return {k: v for k, v in json.loads(transformer.to_json_string()).items() if not k.startswith("_")} | {
        "_class_name": type(transformer).__name__
    }


def export_lora(transformer, path: str | os.PathLike, *, dtype="bf16", adapter_name: str = "default") -> Path:
    """Write the LoRA as diffusers' ``save_lora_weights`` does (``transformer.`` keys, adapter metadata)."""
    path = Path(path)
    layers = _cast(get_peft_model_state_dict(transformer, adapter_name=adapter_name), parse_dtype(dtype))
    kwargs = {}
    if "transformer_lora_adapter_metadata" in inspect.signature(FluxLoraLoaderMixin.save_lora_weights).parameters:
        kwargs["transformer_lora_adapter_metadata"] = transformer.peft_config[adapter_name].to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_path(path, ".dir")  # diffusers writes into a folder; mkdir: normal permissions
    staging.mkdir()
    try:
        FluxLoraLoaderMixin.save_lora_weights(staging, transformer_lora_layers=layers, weight_name=path.name, **kwargs)
        atomic_write(path, lambda tmp: shutil.copyfile(staging / path.name, tmp))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def load_transformer_file(path: str | os.PathLike, *, dtype="bf16", device="cpu"):
    """A transformer written by :func:`export_transformer` (the engine's single-file loader reads it)."""
    return load_part("transformer", path, dtype=parse_dtype(dtype), device=device).module


# ------------------------------------------------------------------------------------------
# Released-layout directory
# ------------------------------------------------------------------------------------------


class _ShardWriter:
    """Greedy shards ``model-0000i-of-0000N.safetensors`` plus the index, written as tensors arrive."""

    def __init__(self, directory: Path, max_shard_bytes: int):
        self.dir, self.max = directory, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.size + nbytes > self.max:
            self._flush()
        self.pending[name] = tensor.detach().cpu().contiguous()
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        i = len(self.shards)
        save_safetensors(self.pending, self.dir / f"shard-{i:05d}.partial", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.size = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.shards)
        weight_map = {}
        for i, keys in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / f"shard-{i:05d}.partial", self.dir / name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        atomic_write_text(self.dir / "model.safetensors.index.json", json.dumps(index, indent=2))


def _released_config(base: dict, connector, transformer, dt: torch.dtype) -> dict:
    """The released ``config.json``: the Qwen2.5-VL config plus ``denoise_tower`` (the connector's
    sizes and the transformer's diffusers config)."""
    return {
        **base,
        "architectures": ["UnivaQwen2p5VLForConditionalGeneration"],
        "model_type": "univa_qwen2p5vl",
        "torch_dtype": {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dt, "float32"),
        "denoise_tower": {
            **(base.get("denoise_tower") or {}),
            "denoiser_type": "flux",
            "denoise_projector_type": "mlp2x_gelu",
            "input_hidden_size": connector.input_hidden_size,
            "output_hidden_size": connector.output_hidden_size,
            "denoiser_config": _transformer_config(transformer),
        },
    }


def export_released_dir(
    out_dir: str | os.PathLike,
    *,
    connector,
    transformer,
    gie_dir: str | os.PathLike | None = None,
    qwen_model=None,
    processor_dir: str | os.PathLike | None = None,
    dtype="bf16",
    max_shard_bytes: int = 5 * 10**9,
) -> Path:
    """A checkpoint directory in the released GPT-Image-Edit layout.

    The Qwen2.5-VL part is streamed from ``gie_dir`` (names kept) or taken from ``qwen_model``
    (renamed to the release's pre-4.52 names); the processor files come from ``processor_dir``
    (default ``gie_dir``). The directory appears complete or not at all (:func:`gie_core.files.atomic_folder`).
    """
    out = Path(out_dir)
    dt = parse_dtype(dtype)
    if gie_dir is None and qwen_model is None:
        raise ValueError("a released-layout export needs the Qwen2.5-VL weights: a GPT-Image-Edit directory or a loaded model")
    with atomic_folder(out) as tmp:
        writer = _ShardWriter(tmp, max_shard_bytes)
        if gie_dir is not None:
            base = gie_config(gie_dir)
            with CheckpointReader.open(gie_dir) as reader:
                for key in reader.keys():
                    if not key.startswith("denoise_tower."):
                        t = reader.read(key)
                        writer.add(key, t.to(dt) if t.is_floating_point() else t)
        else:
            cfg = qwen_model.config.to_dict()
            base = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "_name_or_path")}
            for key, t in qwen_model.state_dict().items():
                writer.add(released_qwen_key(key), t.to(dt) if t.is_floating_point() else t)
        for key, t in connector.state_dict().items():
            name = key[len("denoise_projector."):] if key.startswith("denoise_projector.") else key
            writer.add(GIE_PROJECTOR_PREFIX + name, t.to(dt))
        for key, t in transformer_state_dict(transformer, dt).items():
            writer.add(GIE_DENOISER_PREFIX + key, t)
        writer.close()
        atomic_write_text(tmp / "config.json", json.dumps(_released_config(base, connector, transformer, dt), indent=2))
        src = Path(processor_dir or gie_dir) if (processor_dir or gie_dir) else None
        if src is not None:
            for name in _PROCESSOR_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, tmp / name)
    return out
