"""The parts a training run needs, loaded through :func:`gie_core.weights.parts.load_part`, and the
trained module.

Sources (local paths only; what each file or folder is, parts decides):
- a FLUX.1-Kontext-dev diffusers directory: VAE, CLIP-L, T5-XXL, scheduler, stock transformer;
- a GPT-Image-Edit checkpoint directory (released layout): Qwen2.5-VL, connector, fine-tuned transformer;
- a stock Qwen2.5-VL directory, when there is no GPT-Image-Edit directory;
- a transformer single file and/or a connector file to start from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gie_core.engine.connector import Connector, QwenFeatures, TextFeatures, fuse
from gie_core.engine.encoders import QwenVLEncoder, TextEncoders
from gie_core.engine.modes import fusion_mode
from gie_core.weights.parts import load_part, load_text_encoders, scheduler_from
from gie_core.train.config import ConfigError, TrainConfig
from gie_core.train.loss import flow_matching_loss
from gie_core.train.memory import MemorySettings, is_layerwise_cast, resolve_memory, store_fp8
from gie_core.train.trainable import add_lora, select_trainable, upcast_trainable

logger = logging.getLogger("gie_core.train")


def derived_seed(*parts) -> int:
    """A 63-bit seed from ``parts`` (the run's seed and what it is for): the same in every process
    and every run, independent of Python's hash randomisation."""
    text = ":".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded(*parts, device: torch.device | str | None = None) -> Iterator[None]:
    """Run a block with the CPU random generator (and ``device``'s, when a CUDA device is given)
    seeded from ``derived_seed(*parts)``; the caller's generator states are restored afterwards.

    Every random initialisation of a run (a fresh connector, new connector parameters, LoRA
    weights) and every step's module randomness (LoRA dropout) runs under one, so the same
    seed gives the same weights, whatever ran before in the process.
    """
    seed = derived_seed(*parts)
    dev = torch.device(device) if device is not None else None
    cuda = dev is not None and dev.type == "cuda"
    with torch.random.fork_rng(devices=[dev] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(dev):
                torch.cuda.manual_seed(seed)
        yield


def qwen_hidden_size(cfg: TrainConfig) -> int | None:
    """The Qwen text hidden width from the configured directory's config.json, without loading weights."""
    for path in (cfg.model.gie, cfg.model.qwen):
        if path and (Path(path) / "config.json").is_file():
            data = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
            text = data.get("text_config") or {}
            return int(text.get("hidden_size") or data["hidden_size"])
    return None


def encode_qwen_with_grad(encoder: QwenVLEncoder, images, instruction: str, queries: torch.Tensor) -> QwenFeatures:
    """``QwenVLEncoder.encode`` with gradients flowing to the MetaQuery ``queries`` (the encoder
    itself stays frozen)."""
    return encoder.encode(images, instruction, queries=queries, grad=True)


@dataclass
class TrainingComponents:
    """Everything a run loaded. Encoders are None when the feature cache replaces them."""

    transformer: nn.Module
    connector: Connector
    scheduler: object
    vae: nn.Module | None = None
    qwen: QwenVLEncoder | None = None
    text: TextEncoders | None = None
    sources: dict = field(default_factory=dict)


def check_model_paths(cfg: TrainConfig) -> None:
    """Fail, naming the option, when a configured model path does not exist (before any weight is read)."""
    def need_dir(key: str, what: str) -> None:
        value = cfg.get(key)
        if value and not Path(value).expanduser().is_dir():
            raise ConfigError(f"{key} '{value}' is not a directory ({what})")

    need_dir("model.kontext", "a FLUX.1-Kontext-dev diffusers folder")
    need_dir("model.gie", "a GPT-Image-Edit checkpoint folder")
    need_dir("model.qwen", "a Qwen2.5-VL transformers folder")
    t_src = cfg.model.init_transformer
    if t_src not in ("auto", "kontext", "gie") and not Path(t_src).expanduser().is_file():
        raise ConfigError(f"model.init_transformer '{t_src}' is not a file; expected auto, kontext, gie, a .safetensors "
                          "or a .gguf file")
    c_src = cfg.model.init_connector
    if c_src not in ("auto", "fresh", "gie") and not Path(c_src).expanduser().exists():
        raise ConfigError(
            f"model.init_connector '{c_src}' does not exist; expected auto, fresh, gie, a connector .safetensors "
            "or a GPT-Image-Edit folder"
        )
    if c_src == "gie" and not cfg.model.gie:
        raise ConfigError("model.init_connector is 'gie' but model.gie is not set")


def _transformer_source(cfg: TrainConfig) -> str:
    src = cfg.model.init_transformer
    if src == "auto":
        return "gie" if cfg.model.gie else "kontext"
    return src


def _connector_source(cfg: TrainConfig) -> str:
    src = cfg.model.init_connector
    if src == "auto":
        return "gie" if cfg.model.gie else "fresh"
    return src


def _fit_connector_to_mode(conn: Connector, cfg: TrainConfig, where: str) -> Connector:
    """Add the parameters ``mode`` needs (type embedding, queries) to a loaded connector, keeping its projector."""
    mode = cfg.model.mode
    if mode in conn.modes:
        return conn
    with seeded(cfg.train.seed, "connector-extra", mode):  # the new parameters: the same in every run
        fresh = Connector.for_mode(mode, conn.input_hidden_size, conn.output_hidden_size, cfg.model.num_queries)
    missing = fresh.load_state_dict(conn.state_dict(), strict=False).missing_keys
    logger.info("connector from %s has no %s; starting them fresh for mode '%s'", where, ", ".join(missing), mode)
    return fresh


def needed_parts(cfg: TrainConfig, *, data: bool = True, validating: bool = False) -> dict[str, bool]:
    """Which frozen encoders a run loads (``need_qwen``, ``need_clip``, ``need_t5``, ``need_vae``):
    those that encode pairs on the fly (not cached), Qwen for learned queries, and all of them for
    validation edits (on the main process). The trainer and ``gie-train plan`` share this rule."""
    spec = fusion_mode(cfg.model.mode)
    encode = data and not cfg.data.use_cache
    return {
        "need_qwen": spec.needs_qwen and (encode or (data and spec.queries) or validating),
        "need_clip": encode or validating,
        "need_t5": spec.needs_t5 and (encode or validating),
        "need_vae": encode or validating,
    }


def load_components(
    cfg: TrainConfig,
    *,
    weight_dtype: torch.dtype,
    need_qwen: bool,
    need_clip: bool,
    need_t5: bool,
    need_vae: bool,
    qwen_hidden: int | None = None,
    memory: MemorySettings | None = None,
) -> TrainingComponents:
    """Load what the run needs onto the CPU (the trainer moves it). Frozen parts are stored in
    ``weight_dtype``, or as ``memory`` says (fp8 with per-layer upcast, a GGUF file's quantisation);
    the VAE stays fp32 (as the reference's ``vae_fp32``) unless stored in fp8; the connector is fp32.

    An fp8 transformer streams straight into float8 when no layer of it will train (stage 1, LoRA);
    otherwise the trainer casts it once the trained set is known (:func:`.memory.store_fp8`)."""
    memory = memory or resolve_memory(cfg)
    sources: dict[str, str] = {}
    transformer = _load_transformer(cfg, weight_dtype, memory, sources)
    qwen = _load_qwen(cfg, weight_dtype, memory, sources) if need_qwen else None
    text = _load_text(cfg, weight_dtype, memory, need_clip, need_t5)
    vae = None
    if need_vae:
        vae = load_part("vae", cfg.model.kontext, "fp32").module
        if memory.vae == "fp8":
            store_fp8(vae, "vae", torch.float32)
    hidden = qwen.hidden_size if qwen is not None else (qwen_hidden or qwen_hidden_size(cfg))
    connector = _load_connector(cfg, transformer.config.joint_attention_dim, hidden, sources)
    return TrainingComponents(
        transformer=transformer, connector=connector, scheduler=scheduler_from(cfg.model.kontext), vae=vae, qwen=qwen,
        text=text, sources=sources,
    )


def _load_transformer(cfg: TrainConfig, weight_dtype: torch.dtype, memory: MemorySettings, sources: dict) -> nn.Module:
    """The transformer to start from (``model.init_transformer``), frozen; fp8 streamed in when
    no layer of it trains, a GGUF file as stored."""
    t_src = _transformer_source(cfg)
    where = {"gie": cfg.model.gie, "kontext": cfg.model.kontext}.get(t_src, t_src)
    if not where:  # pragma: no cover - config.check rejects this first
        raise ValueError(f"model.init_transformer '{t_src}' needs model.{t_src}")
    stream_fp8 = memory.transformer == "fp8" and cfg.trainable_set in ("connector", "lora")
    transformer = load_part("transformer", where, "fp8" if stream_fp8 else "auto", dtype=weight_dtype).module
    sources["transformer"] = str(where)
    return transformer.requires_grad_(False)


def _load_qwen(cfg: TrainConfig, weight_dtype: torch.dtype, memory: MemorySettings, sources: dict) -> QwenVLEncoder:
    """Qwen2.5-VL from the GPT-Image-Edit checkpoint, else the stock Qwen folder (``model.qwen``)."""
    where = cfg.model.gie or cfg.model.qwen
    if not where:
        raise ValueError("the Qwen2.5-VL encoder is needed: set model.gie or model.qwen")
    sources["encoder"] = str(where)
    return load_part("qwen", where, "fp8" if memory.encoders == "fp8" else "auto", dtype=weight_dtype).module


def _load_text(cfg: TrainConfig, weight_dtype: torch.dtype, memory: MemorySettings, need_clip: bool,
               need_t5: bool) -> TextEncoders | None:
    """CLIP-L / T5-XXL of the Kontext folder, when the run encodes text (fp8-stored as ``memory`` says)."""
    if not (need_clip or need_t5):
        return None
    parts = {p: load_part(p, cfg.model.kontext, dtype=weight_dtype) for p, need in (("clip", need_clip), ("t5", need_t5))
             if need}
    if memory.encoders == "fp8":
        for part, loaded in parts.items():
            store_fp8(loaded.module, part, weight_dtype)
    return load_text_encoders(parts.get("clip"), parts.get("t5"))


def _load_connector(cfg: TrainConfig, joint_dim: int, hidden: int | None, sources: dict) -> Connector:
    """The connector to start from (``model.init_connector``: fresh and seeded, or a file / the
    checkpoint's), fitted to the mode, fp32, checked against the transformer and the encoder."""
    c_src = _connector_source(cfg)
    if c_src == "fresh":
        if hidden is None:
            raise ValueError("cannot size a fresh connector: no Qwen encoder, cache info or model.gie/model.qwen config")
        with seeded(cfg.train.seed, "connector"):  # the same on every process and every run of the seed
            connector = Connector.for_mode(cfg.model.mode, hidden, joint_dim, cfg.model.num_queries)
        sources["connector"] = "fresh"
    else:
        where = cfg.model.gie if c_src == "gie" else c_src
        if not where:
            raise ValueError("model.init_connector is 'gie' but model.gie is not set")
        connector = load_part("connector", where, "fp32").module  # trained weights stay fp32
        sources["connector"] = str(where)
    connector = _fit_connector_to_mode(connector, cfg, sources["connector"]).float()
    if connector.output_hidden_size != joint_dim:
        raise ValueError(
            f"the connector outputs {connector.output_hidden_size}-wide tokens but the transformer's "
            f"joint_attention_dim is {joint_dim}"
        )
    if hidden is not None and connector.input_hidden_size != hidden:
        raise ValueError(f"the connector takes {connector.input_hidden_size}-wide Qwen features but the encoder gives {hidden}")
    return connector


def prepare_for_training(transformer: nn.Module, connector: Connector, cfg: TrainConfig, memory: MemorySettings,
                         weight_dtype: torch.dtype) -> dict[str, list[str]]:
    """Make loaded parts trainable as ``cfg`` says: a seeded LoRA when it trains one, the trained
    set unfrozen and kept fp32, the frozen transformer layers in fp8 when ``memory`` says so (the
    trained ones never), gradient checkpointing. The trainer and ``gie-train plan`` (on meta
    tensors) both call this. Returns the trained names (:func:`.trainable.select_trainable`)."""
    if cfg.trainable_set == "lora":
        with seeded(cfg.train.seed, "lora"):  # LoRA A weights: the same in every run of the seed
            add_lora(transformer, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.dropout)
    names = select_trainable(connector, transformer, cfg.trainable_set, train_connector=cfg.trains_connector,
                             layers=cfg.train.layers)
    upcast_trainable(connector)
    upcast_trainable(transformer)
    if memory.transformer == "fp8" and not is_layerwise_cast(transformer):
        store_fp8(transformer, "transformer", weight_dtype)  # after the trained set is known: it stays fp32
    if memory.checkpointing:
        transformer.enable_gradient_checkpointing()
    return names


class EditModel(nn.Module):
    """Connector + Kontext transformer: the one module handed to accelerate (DDP / DeepSpeed / FSDP)."""

    def __init__(self, connector: Connector, transformer: nn.Module, mode: str, guidance: float = 1.0):
        super().__init__()
        self.connector = connector
        self.transformer = transformer
        self.mode = mode
        self.spec = fusion_mode(mode)
        self.guidance = guidance

    def conditioning(self, vlm_hidden, num_queries, t5, pooled, pooled_empty):
        """Fuse like the engine (``gie_core.engine.connector.fuse``)."""
        vlm = QwenFeatures(vlm_hidden, num_queries=num_queries)
        text = TextFeatures(t5=t5, pooled=pooled if pooled is not None else pooled_empty, pooled_empty=pooled_empty)
        return fuse(self.mode, self.connector, vlm, text)

    def forward(self, *, x0, noise, sigmas, vlm_hidden, vlm_mask=None, num_queries=0, t5=None, pooled=None,
                pooled_empty=None, reference=None, region_weight=None) -> dict:
        cond = self.conditioning(vlm_hidden, num_queries, t5, pooled, pooled_empty)
        context_mask = None
        # learned queries keep only their own outputs (never padded); otherwise the VLM tokens lead
        if vlm_mask is not None and not bool(vlm_mask.all()) and not self.spec.queries:
            extra = cond.context.shape[1] - vlm_mask.shape[1]  # T5 tokens are never padded
            context_mask = torch.cat([vlm_mask, vlm_mask.new_ones(vlm_mask.shape[0], extra)], 1) if extra else vlm_mask
        out = flow_matching_loss(
            self.transformer, x0, noise, sigmas, cond.context, cond.pooled, reference,
            guidance=self.guidance, region_weight=region_weight, context_mask=context_mask,
        )
        return {"loss": out.loss, "prediction": out.prediction, "target": out.target}
