"""LoRA adapters on a Kontext transformer, applied per run without changing the base model.

A LoRA file is loaded once into the transformer as a named peft adapter (the name comes from
the file's path, size and modification time, so the same file is never loaded twice) and left
*disabled*. A run activates exactly the adapters it was asked for, with their strengths, and
disables them all again afterwards, also when the run fails. So one transformer in memory
serves the base model and any number of LoRA combinations, and the base model's outputs stay
bit-identical to a transformer that never saw a LoRA (no weight is fused or cloned).

Files: diffusers/peft LoRA safetensors (``transformer.*`` keys, as written by
``FluxKontextPipeline.save_lora_weights`` and our trainer), and the other FLUX LoRA layouts
diffusers converts (kohya ``lora_unet_*``, BFL ``diffusion_model.*``, XLabs).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from gie_core.weights.quantize import adapters_in_compute_dtype


class LoraError(ValueError):
    """A LoRA file that cannot be applied to the transformer."""


def adapter_name(path: str | os.PathLike) -> str:
    """A stable adapter name for a LoRA file: same file (path, size, mtime) -> same name."""
    p = Path(path).resolve()
    st = p.stat()
    digest = hashlib.sha1(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"lora_{digest}"


def loaded_adapters(transformer: torch.nn.Module) -> tuple[str, ...]:
    """Names of the adapters loaded into ``transformer``."""
    return tuple(getattr(transformer, "peft_config", None) or ())


def load_lora(transformer: torch.nn.Module, path: str | os.PathLike) -> str:
    """Load a LoRA file into ``transformer`` as a disabled adapter; returns its name.

    Loading the same file again returns the existing adapter.
    """
    p = Path(path)
    if not p.is_file():
        raise LoraError(f"LoRA file {p} does not exist")
    if p.suffix != ".safetensors":
        raise LoraError(f"LoRA file {p} is not a .safetensors file")
    name = adapter_name(p)
    if name in loaded_adapters(transformer):
        return name

    # The FLUX LoRA mixin (what FluxKontextPipeline.lora_state_dict is), imported on its own:
    # importing the pipelines makes transformers probe torchvision for image processors no LoRA
    # needs, printing warnings on every run.
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin  # start-up: diffusers (~3 s)

    try:
        # converts kohya / BFL / XLabs layouts; folder + weight_name, as older diffusers need offline
        state = FluxLoraLoaderMixin.lora_state_dict(str(p.parent), weight_name=p.name, local_files_only=True)
    except Exception as exc:  # diffusers raises many kinds on foreign files
        raise LoraError(f"{p} is not a FLUX LoRA file diffusers can read: {exc}") from None
    if isinstance(state, tuple):
        state = state[0]
    keys = [k for k in state if k.startswith("transformer.")]
    if not keys:
        found = ", ".join(sorted(state)[:3]) or "no tensors"
        raise LoraError(f"{p} holds no LoRA weights for the FLUX transformer (found {found})")
    try:
        transformer.load_lora_adapter(state, prefix="transformer", adapter_name=name)
    except Exception as exc:
        raise LoraError(f"{p} does not fit this Kontext transformer: {exc}") from None
    if name not in loaded_adapters(transformer):
        raise LoraError(f"{p}: none of its LoRA weights match a layer of this Kontext transformer")

    adapters_in_compute_dtype(transformer)  # an fp8-stored transformer: adapters stay in bf16
    transformer.requires_grad_(False)
    transformer.disable_adapters()  # the base model stays the base model; runs activate per use
    return name


@contextlib.contextmanager
def activated(transformer: torch.nn.Module, loras: Sequence[tuple[str, float]]) -> Iterator[None]:
    """Run a block with exactly ``loras`` (``(adapter name, strength)``) active on ``transformer``.

    Strength 0 leaves an adapter out; the same adapter twice adds its strengths. Every adapter
    is disabled again on exit.
    """
    weights: dict[str, float] = {}
    for name, strength in loras:
        weights[name] = weights.get(name, 0.0) + float(strength)
    weights = {n: w for n, w in weights.items() if w != 0.0}
    loaded = loaded_adapters(transformer)
    missing = [n for n in weights if n not in loaded]
    if missing:
        raise LoraError(f"LoRA adapters {missing} are not loaded in this transformer (loaded: {list(loaded)})")
    if not loaded:
        yield
        return
    try:
        if weights:
            transformer.enable_adapters()
            transformer.set_adapters(list(weights), list(weights.values()))
        else:
            transformer.disable_adapters()
        yield
    finally:
        transformer.disable_adapters()


__all__ = ["LoraError", "activated", "adapter_name", "load_lora", "loaded_adapters"]
