"""Which parameters train.

- ``connector`` (stage 1): the connector only; the transformer is frozen.
- ``image_attention`` (stage 2, released): the connector plus, in every chosen block, the
  image-branch attention and its modulation: double blocks ``attn.norm_q, attn.norm_k,
  attn.to_q, attn.to_k, attn.to_v, attn.to_out, norm1.linear``; single blocks ``attn.norm_q,
  attn.norm_k, attn.to_q, attn.to_k, attn.to_v, norm.linear``.
- ``full``: every transformer parameter.
- ``lora``: a peft LoRA on ``lora.targets`` (the base weights stay frozen).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import LoraConfig

IMAGE_BRANCH_DOUBLE = ("attn.norm_q", "attn.norm_k", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out", "norm1.linear")
IMAGE_BRANCH_SINGLE = ("attn.norm_q", "attn.norm_k", "attn.to_q", "attn.to_k", "attn.to_v", "norm.linear")


def image_branch_parameter_names(transformer: torch.nn.Module, layers: Sequence[int] | None = None) -> list[str]:
    """Names of the released stage-2 parameters of ``transformer``.

    ``layers`` numbers the double blocks first, then the single blocks (as the reference's
    ``flux_train_layer_idx``: 0-18 double, 19-56 single on the real model); None = every block.
    """
    n_double = len(transformer.transformer_blocks)
    n_single = len(transformer.single_transformer_blocks)
    layers = list(range(n_double + n_single)) if layers is None else list(layers)
    prefixes = []
    for layer in layers:
        if not 0 <= layer < n_double + n_single:
            raise ValueError(
                f"train.layers holds {layer} but the transformer has {n_double} double + {n_single} single blocks "
                f"(valid 0..{n_double + n_single - 1})"
            )
        if layer < n_double:
            prefixes += [f"transformer_blocks.{layer}.{c}." for c in IMAGE_BRANCH_DOUBLE]
        else:
            prefixes += [f"single_transformer_blocks.{layer - n_double}.{c}." for c in IMAGE_BRANCH_SINGLE]
    return [name for name, _ in transformer.named_parameters() if any(name.startswith(p) for p in prefixes)]


def add_lora(transformer, rank: int, alpha: float, targets: Sequence[str], dropout: float = 0.0, adapter_name: str = "default"):
    """Attach a peft LoRA adapter (B initialised to zero: the model starts unchanged)."""
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), init_lora_weights=True)
    try:
        transformer.add_adapter(config, adapter_name=adapter_name)
    except ValueError as exc:
        raise ValueError(f"lora.targets {list(targets)} do not name modules of the transformer: {exc}") from None
    return transformer


def select_trainable(
    connector: torch.nn.Module,
    transformer: torch.nn.Module,
    trainable: str,
    *,
    train_connector: bool = True,
    layers: Sequence[int] | None = None,
) -> dict[str, list[str]]:
    """Freeze everything, then unfreeze the chosen set. Returns {"connector": names, "transformer": names}.

    For ``lora`` the adapter must already be attached (:func:`add_lora`); its ``lora_`` weights train.
    """
    connector.requires_grad_(False)
    transformer.requires_grad_(False)
    if train_connector or trainable == "connector":
        connector.requires_grad_(True)
    if trainable == "image_attention":
        names = set(image_branch_parameter_names(transformer, layers))
    elif trainable == "full":
        names = {n for n, _ in transformer.named_parameters()}
    elif trainable == "lora":
        names = {n for n, _ in transformer.named_parameters() if "lora_" in n}
        if not names:
            raise ValueError("train.trainable is 'lora' but the transformer has no LoRA adapter attached")
    elif trainable == "connector":
        names = set()
    else:
        raise ValueError(f"trainable set '{trainable}' is unknown; expected connector, image_attention, full or lora")
    for name, p in transformer.named_parameters():
        if name in names:
            p.requires_grad_(True)
    return {
        "connector": [n for n, p in connector.named_parameters() if p.requires_grad],
        "transformer": [n for n, p in transformer.named_parameters() if p.requires_grad],
    }


def upcast_trainable(module: torch.nn.Module, dtype: torch.dtype = torch.float32) -> None:
    """Keep trainable weights in fp32 (mixed precision trains fp32 masters; frozen weights stay low precision)."""
    for p in module.parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)
