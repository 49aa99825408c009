"""``gie-train plan``: the GPU memory a run will need, before any weight is read.

The figures come from the real modules, built from their configs on the meta device (nothing is
allocated) and prepared exactly as the trainer prepares them (:func:`.models.prepare_for_training`:
trained set, LoRA, fp8 storage, checkpointing; :func:`.memory.swappable_blocks`):

- **weights**: every parameter and buffer of the parts the run keeps on the GPU, per dtype as
  stored (fp8 layers, fp32 trained masters, swapped blocks in CPU memory with one of them on the
  GPU at a time);
- **optimizer state**, **EMA**: from the trained tensors' shapes (:data:`.config.OPTIMIZER_TABLE`);
- **activations and gradients**: one training step (the trainer's own loss,
  :class:`.models.EditModel`) run on fake tensors (``torch._subclasses.FakeTensorMode``: shapes and
  dtypes propagate, no memory is touched) at the configured bucket and batch, under autocast,
  with every tensor storage that is alive counted (:class:`LiveBytes`); the transformer is run
  with 1-2 blocks of each kind and the per-block cost extrapolated (every block of a kind has
  the same shapes);
- **transients**: the optimizer step (torch's multi-tensor AdamW makes one fp32 copy of the
  trained weights) and VAE encoding of the batch when latents are not cached (simulated too).

Autocast follows PyTorch's CPU rules (CUDA's also keeps layer norms in fp32: about 2% more
activations, measured at 512 px); the CPU's flash attention saves what CUDA's flash /
memory-efficient attention save (query, key, value, output, log-sum-exp). Not counted: the CUDA context and cuBLAS workspaces
(about 1 GiB, kept as :data:`CUDA_RESERVE` when checking a budget) and Qwen's activations for
learned queries (metaquery). A budget is about *reserved* memory, which allocator fragmentation
grows past the allocated peak: on CUDA the budget check adds
:data:`gie_core.train.allocator.RESERVED_MARGIN` of the peak (what gie-train's expandable
segments are assumed to keep it within), and the plan says so.
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    AutoConfig,
    CLIPTextConfig,
    CLIPTextModel,
    Qwen2_5_VLForConditionalGeneration,
    T5Config,
    T5EncoderModel,
)

from gie_core.constants import QWEN_IMAGE_SIZE, T5_MAX_LENGTH
from gie_core.engine.connector import Connector
from gie_core.engine.modes import fusion_mode
from gie_core.train.allocator import ALLOCATOR_SETTING, RESERVED_MARGIN
from gie_core.train.config import OPTIMIZER_TABLE, TrainConfig
from gie_core.train.data import bucket_sizes
from gie_core.train.models import EditModel, needed_parts, prepare_for_training
from gie_core.weights.loading import qwen_config_from_gie
from gie_core.weights.reader import empty_weights
from gie_core.weights.single_file import load_config
from gie_core.train.memory import MemorySettings, resolve_memory, store_fp8, swappable_blocks, transformer_blocks
from gie_core.weights.loading import parse_dtype

GIB = 2**30
CUDA_RESERVE = 1 * GIB  # CUDA context, cuBLAS workspace, allocator slack: outside the tensors counted
QWEN_IMAGE_TOKENS = (QWEN_IMAGE_SIZE // 28) ** 2  # 448 px, 14 px patches merged 2x2: 256 tokens
QWEN_TEMPLATE_TOKENS = 11  # <|im_start|>user\n<|vision_start|> ... <|vision_end|> ... <|im_end|>\n<|im_start|>assistant\n
PLAN_INSTRUCTION_TOKENS = 64  # an instruction's tokens, assumed (the dataset's are mostly 10-60)
SHARDINGS = ("none", "zero2", "zero3")


# --------------------------------------------------------------------------------------------
# Counting live tensor bytes
# --------------------------------------------------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside it that are still alive, and their peak.

    Works on real and on fake tensors (a storage is counted once however many views it has, and
    leaves the count when it is freed). Storages of ``existing`` tensors (weights, inputs) are
    never counted, also when an op returns a view of them. Storages marked with
    :meth:`mark_gradient` are also summed apart, so a peak can be split into gradients and the rest."""

    def __init__(self, existing=()):
        super().__init__()

        self._ref = StorageWeakRef
        self.live: dict[int, tuple[object, int]] = {}
        self.gradients: set[int] = set()
        self.now = self.peak = self.gradients_at_peak = 0
        self._existing = [t for t in existing if isinstance(t, torch.Tensor)]  # kept alive: their ids stay theirs
        self._skip = {self._ref(t.untyped_storage()).cdata for t in self._existing}

    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.now -= self.live.pop(k)[1]
            self.gradients.discard(k)

    def _add(self, t: torch.Tensor) -> int:
        storage = t.untyped_storage()
        ref = self._ref(storage)
        if ref.cdata not in self.live and ref.cdata not in self._skip:
            self.live[ref.cdata] = (ref, storage.nbytes())
            self.now += storage.nbytes()
        return ref.cdata

    def mark_gradient(self, t: torch.Tensor) -> None:
        key = self._ref(t.untyped_storage()).cdata
        if key in self.live:
            self.gradients.add(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        if self.now > self.peak:
            self.peak = self.now
            self.gradients_at_peak = sum(self.live[k][1] for k in self.gradients if k in self.live)
        return out


# --------------------------------------------------------------------------------------------
# Architectures, from config files only
# --------------------------------------------------------------------------------------------


@dataclass
class Architecture:
    """The configs of a run's models (read from the model folders, or the shipped real ones)."""

    transformer: dict
    qwen: object | None  # transformers Qwen2_5_VLConfig
    qwen_lm_head: bool  # loaded with the encoder (a stock Qwen folder) or only for generation (released layout)
    t5: dict | None
    clip: dict | None
    vae: dict | None
    notes: list[str] = field(default_factory=list)


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _shipped(name: str) -> dict:
    return load_config(name)


def read_architecture(cfg: TrainConfig) -> Architecture:
    """The configs of ``cfg``'s models; a folder that does not exist is replaced by the shipped
    real-size config (so a plan can be made before anything is downloaded), with a note."""

    notes = []
    kontext = Path(cfg.model.kontext).expanduser() if cfg.model.kontext else None
    if kontext is not None and not kontext.is_dir():
        notes.append(f"model.kontext {cfg.model.kontext} not found: the shipped FLUX.1 Kontext [dev] configs are used")
        kontext = None
    gie = Path(cfg.model.gie).expanduser() if cfg.model.gie else None
    if gie is not None and not (gie / "config.json").is_file():
        notes.append(f"model.gie {cfg.model.gie} not found: the shipped Qwen2.5-VL-7B and Kontext configs are used")
        gie = None
    qwen_dir = Path(cfg.model.qwen).expanduser() if cfg.model.qwen else None
    if qwen_dir is not None and not (qwen_dir / "config.json").is_file():
        notes.append(f"model.qwen {cfg.model.qwen} not found: the shipped Qwen2.5-VL-7B config is used")
        qwen_dir = None

    def kontext_config(sub: str, shipped: str) -> dict:
        if kontext is not None and (kontext / sub / "config.json").is_file():
            return _json(kontext / sub / "config.json")
        return _shipped(shipped)

    src = cfg.model.init_transformer
    if (src == "gie" or (src == "auto" and cfg.model.gie)) and gie is not None:
        transformer = dict(_json(gie / "config.json")["denoise_tower"]["denoiser_config"])
    else:
        transformer = kontext_config("transformer", "flux1-kontext-dev-transformer")
        if src not in ("auto", "kontext", "gie"):
            notes.append(f"model.init_transformer {src}: sized as the Kontext transformer config")
    lm_head = False
    if gie is not None:
        qwen = qwen_config_from_gie(_json(gie / "config.json"))
    elif qwen_dir is not None:
        qwen, lm_head = AutoConfig.from_pretrained(qwen_dir, local_files_only=True), True
    else:
        flat = {k: v for k, v in _shipped("qwen2.5-vl-7b-instruct").items() if not k.startswith("_")}
        qwen, lm_head = qwen_config_from_gie(flat), bool(cfg.model.qwen)
    return Architecture(
        transformer={k: v for k, v in transformer.items() if not k.startswith("_")},
        qwen=qwen, qwen_lm_head=lm_head,
        t5=kontext_config("text_encoder_2", "t5-v1_1-xxl-encoder"),
        clip=kontext_config("text_encoder", "clip-vit-large-patch14-text"),
        vae={k: v for k, v in kontext_config("vae", "flux-ae").items() if not k.startswith("_")},
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# Modules on the meta device
# --------------------------------------------------------------------------------------------


def _meta_transformer(arch: Architecture, **overrides) -> nn.Module:
    with empty_weights():
        return FluxTransformer2DModel.from_config({**arch.transformer, **overrides})


def _meta_connector(cfg: TrainConfig, arch: Architecture) -> nn.Module:
    hidden = arch.qwen.text_config.hidden_size if hasattr(arch.qwen, "text_config") else arch.qwen.hidden_size
    with empty_weights():
        return Connector.for_mode(cfg.model.mode, hidden, arch.transformer["joint_attention_dim"], cfg.model.num_queries)


def _meta_encoders(cfg: TrainConfig, arch: Architecture, memory: MemorySettings, dtype: torch.dtype,
                   need: dict[str, bool]) -> dict[str, nn.Module]:
    """The frozen encoders the run keeps on the GPU, stored as the trainer stores them."""
    parts = {}
    with empty_weights():
        if need["need_qwen"]:
            qwen = Qwen2_5_VLForConditionalGeneration(arch.qwen)
            if not arch.qwen_lm_head:  # the released layout reads the output head only to generate text
                qwen.lm_head = nn.Identity()
            parts["Qwen2.5-VL"] = qwen.to(dtype)
        if need["need_t5"]:
            parts["T5"] = T5EncoderModel(T5Config(**{k: v for k, v in arch.t5.items() if not k.startswith("_")})).to(dtype)
        if need["need_clip"]:
            parts["CLIP"] = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in arch.clip.items() if not k.startswith("_")})).to(dtype)
        if need["need_vae"]:
            parts["VAE"] = AutoencoderKL(**arch.vae)
    for part in parts.values():
        part.requires_grad_(False)
    if memory.encoders == "fp8":
        for name, part in (("Qwen2.5-VL", "qwen"), ("T5", "t5"), ("CLIP", "clip")):
            if name in parts:
                store_fp8(parts[name], part, dtype)
    if "VAE" in parts and memory.vae == "fp8":
        store_fp8(parts["VAE"], "vae", torch.float32)
    return parts


def _prepared(cfg: TrainConfig, memory: MemorySettings, dtype: torch.dtype, transformer: nn.Module, connector: nn.Module):
    nn.Module.to(transformer, dtype)  # (diffusers' own .to() logs about fp32 modules this model has none of)
    if memory.transformer == "gguf":
        # a GGUF file: about 8.5 bits a weight (Q8_0) in its blocks; sized as fp8 here
        memory = replace(memory, transformer="fp8")
    prepare_for_training(transformer, connector, cfg, memory, dtype)
    return transformer, connector


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclass
class WeightLine:
    part: str
    dtype: str
    kind: str  # "frozen", "trained", "swapped (CPU)", "swapped, in flight"
    bytes: int
    params: int


@dataclass
class MemoryPlan:
    """Expected peak GPU memory of a run, and its parts (bytes)."""

    summary: str
    architecture: str
    notes: list[str]
    weights: list[WeightLine]
    trained_params: int
    gradients: int  # all of them, fp32 (at the peak of backward: ``gradients_at_peak``)
    gradients_at_peak: int
    optimizer: int
    optimizer_name: str
    ema: int
    inputs: int
    activations: int  # at the peak of the training step, with the configured checkpointing
    activations_other: int  # with checkpointing the other way
    checkpointing: bool
    step_transient: int
    encode_transient: int
    cpu_bytes: int  # swapped blocks held in CPU memory
    peak: int
    phase: str
    device: str
    processes: int
    sharding: str

    @property
    def gpu_weights(self) -> int:
        return sum(w.bytes for w in self.weights if "CPU" not in w.kind)

    @property
    def reserved_peak(self) -> int:
        """The reserved memory the budget check assumes: on CUDA the allocated peak plus
        :data:`RESERVED_MARGIN` of it (allocator fragmentation); elsewhere the peak."""
        return int(self.peak * (1 + RESERVED_MARGIN)) if self.device == "cuda" else self.peak

    def fits(self, budget: int) -> bool:
        return self.reserved_peak + (CUDA_RESERVE if self.device == "cuda" else 0) <= budget


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float8_e4m3fn: "fp8",
            torch.float8_e5m2: "fp8_e5m2", torch.uint8: "uint8 (GGUF)"}.get(dtype, str(dtype).replace("torch.", ""))


def _weight_lines(part: str, module: nn.Module, swapped: set[str] | None = None) -> list[WeightLine]:
    """Per (dtype, frozen / trained / swapped) bytes of ``module``'s parameters and buffers."""
    sums: dict[tuple[str, str], list[int]] = {}
    swapped = swapped or set()
    seen = set()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        block = next((b for b in swapped if name.startswith(b + ".")), None)
        kind = "trained" if getattr(t, "requires_grad", False) else ("swapped (CPU)" if block else "frozen")
        key = (_dtype_name(t.dtype), kind)
        acc = sums.setdefault(key, [0, 0])
        acc[0] += t.numel() * t.element_size()
        acc[1] += t.numel()
    return [WeightLine(part, d, k, b, n) for (d, k), (b, n) in sorted(sums.items(), key=lambda kv: (kv[0][1], kv[0][0]))]


def _bucket(cfg: TrainConfig) -> tuple[int, int]:
    """The largest training bucket (most tokens) of the run."""

    if cfg.data.bucketing == "square":
        return cfg.data.resolution, cfg.data.resolution
    return max(bucket_sizes(cfg.data.resolution, cfg.data.ratios), key=lambda wh: wh[0] * wh[1])


def context_tokens(cfg: TrainConfig) -> tuple[int, int]:
    """(Qwen tokens, context tokens) of one pair as the plan assumes them."""
    spec = fusion_mode(cfg.model.mode)
    qwen = QWEN_IMAGE_TOKENS + QWEN_TEMPLATE_TOKENS + PLAN_INSTRUCTION_TOKENS
    context = cfg.model.num_queries if spec.queries else qwen
    return qwen, context + (T5_MAX_LENGTH if spec.needs_t5 else 0)


_SIM_CACHE: dict[tuple, tuple[int, int, int]] = {}


def _feature_dtype(cfg: TrainConfig, dtype: torch.dtype) -> torch.dtype:
    """The dtype Qwen / T5 features reach the connector in: the cache's, or the encoders' compute dtype."""
    if cfg.data.use_cache:
        return parse_dtype(cfg.data.cache_dtype)
    return dtype


def _simulate_step(cfg: TrainConfig, arch: Architecture, memory: MemorySettings, dtype: torch.dtype, device: str,
                   layers: tuple[int, int]) -> tuple[int, int, int]:
    """(peak live bytes, gradient bytes at that peak, input bytes) of one training step of the
    transformer with ``layers`` = (double, single) blocks, on fake tensors."""
    spec = fusion_mode(cfg.model.mode)
    width, height = _bucket(cfg)
    b = cfg.data.batch_size
    h, w = height // 8, width // 8
    n_qwen, _ = context_tokens(cfg)
    transformer = _meta_transformer(arch, num_layers=layers[0], num_single_layers=layers[1])
    connector = _meta_connector(cfg, arch)
    # fake tensors cannot be re-cast in place (torch swaps their storage, which fake tensors refuse),
    # so per-layer casting runs without its hooks here; plan_memory adds the upcast copies it keeps
    _prepared(cfg, replace(memory, transformer="compute"), dtype, transformer, connector)
    model = EditModel(connector, transformer, cfg.model.mode, guidance=cfg.train.guidance).train()
    hidden = connector.input_hidden_size
    feature_dtype = _feature_dtype(cfg, dtype)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        model.to_empty(device="cpu")
        inputs = {
            "x0": torch.empty(b, 16, h, w), "noise": torch.empty(b, 16, h, w), "sigmas": torch.empty(b),
            "reference": torch.empty(b, 16, h, w),
            "vlm_hidden": torch.empty(b, n_qwen, hidden, dtype=feature_dtype),
            "pooled_empty": torch.empty(1, arch.transformer["pooled_projection_dim"]),
        }
        if spec.needs_t5:
            inputs["t5"] = torch.empty(b, T5_MAX_LENGTH, arch.transformer["joint_attention_dim"], dtype=feature_dtype)
        if spec.pooled_from == "instruction":
            inputs["pooled"] = torch.empty(b, arch.transformer["pooled_projection_dim"])
        if spec.queries:
            inputs["num_queries"] = cfg.model.num_queries
            inputs["vlm_hidden"] = torch.empty(b, n_qwen + cfg.model.num_queries, hidden, dtype=feature_dtype)
        input_bytes = sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))
        live = LiveBytes(existing=[*model.parameters(), *model.buffers(), *inputs.values()])
        handles = [p.register_post_accumulate_grad_hook(lambda p: live.mark_gradient(p.grad))
                   for p in model.parameters() if p.requires_grad]
        autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        with live, autocast, warnings.catch_warnings():
            # fp32 trained norm weights meet bf16 activations: correct, just not fused (as in the trainer)
            warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
            loss = model(**inputs)["loss"]
            loss.backward()
        for handle in handles:
            handle.remove()
    return live.peak, live.gradients_at_peak, input_bytes


def _simulate_vae_encode(arch: Architecture, memory: MemorySettings, cfg: TrainConfig) -> int:
    """Peak live bytes of VAE-encoding a batch of targets (and references) at the bucket size."""
    key = ("vae", json.dumps(arch.vae, sort_keys=True), memory.vae, _bucket(cfg), cfg.data.batch_size)
    if key not in _SIM_CACHE:
        _SIM_CACHE[key] = _run_vae_encode(arch, memory, cfg)
    return _SIM_CACHE[key]


def _run_vae_encode(arch: Architecture, memory: MemorySettings, cfg: TrainConfig) -> int:
    width, height = _bucket(cfg)
    with empty_weights():
        vae = AutoencoderKL(**arch.vae)
    if memory.vae == "fp8":
        store_fp8(vae, "vae", torch.float32)
    with FakeTensorMode(allow_non_fake_inputs=True):
        vae.to_empty(device="cpu")
        image = torch.empty(cfg.data.batch_size, 3, height, width)
        live = LiveBytes(existing=[*vae.parameters(), *vae.buffers(), image])
        with live, torch.no_grad():
            vae.encode(image).latent_dist.mode()
    return live.peak


def _step_activations(cfg: TrainConfig, arch: Architecture, memory: MemorySettings, dtype: torch.dtype,
                      device: str) -> tuple[int, int, int]:
    """(activations + gradients at the peak, gradients at the peak, inputs) of the full transformer,
    extrapolated from 1-2 blocks of each kind (exact when the transformer has at most that many)."""
    key = (cfg.model.mode, cfg.trainable_set, cfg.trains_connector, str(cfg.train.layers), cfg.lora.rank,
           tuple(cfg.lora.targets), _bucket(cfg), cfg.data.batch_size, str(_feature_dtype(cfg, dtype)),
           memory.checkpointing, str(dtype), device, json.dumps(arch.transformer, sort_keys=True),
           cfg.model.num_queries)
    if key in _SIM_CACHE:
        return _SIM_CACHE[key]
    n_double, n_single = arch.transformer["num_layers"], arch.transformer["num_single_layers"]
    layers = cfg.train.layers
    if n_double <= 2 and n_single <= 2 or layers is not None:
        # small models, and runs training chosen blocks (their cost differs per block): simulate all
        result = _simulate_step(cfg, arch, memory, dtype, device, (n_double, n_single))
    else:
        base = _simulate_step(cfg, arch, memory, dtype, device, (1, 1))
        more_d = _simulate_step(cfg, arch, memory, dtype, device, (2, 1))
        more_s = _simulate_step(cfg, arch, memory, dtype, device, (1, 2))
        result = tuple(
            max(0, base[i] + (n_double - 1) * (more_d[i] - base[i]) + (n_single - 1) * (more_s[i] - base[i]))
            for i in range(2)
        ) + (base[2],)
    _SIM_CACHE[key] = result
    return result


def _upcast_bytes_per_block(transformer: nn.Module, dtype: torch.dtype) -> list[int]:
    """Compute-dtype bytes of the per-layer-cast weights of each transformer block (and of the
    cast layers outside the blocks, as one more entry)."""
    def cast_bytes(module: nn.Module) -> int:
        total = 0
        for sub in module.modules():
            registry = getattr(sub, "_diffusers_hook", None)
            if registry is not None and registry.get_hook("layerwise_casting") is not None:
                total += sum(p.numel() for p in sub.parameters(recurse=False)) * dtype.itemsize
        return total

    blocks = transformer_blocks(transformer)
    inside = {id(m) for _, b in blocks for m in b.modules()}
    outside = sum(cast_bytes(m) for m in transformer.modules() if id(m) not in inside and not list(m.children()))
    return [cast_bytes(b) for _, b in blocks] + [outside]


def plan_memory(cfg: TrainConfig, *, device: str = "cuda", processes: int = 1, sharding: str = "none",
                arch: Architecture | None = None) -> MemoryPlan:
    """The expected peak GPU memory of ``cfg`` (see the module docstring for what is counted).

    ``processes`` / ``sharding`` (none, zero2 = DeepSpeed ZeRO-2 / FSDP SHARD_GRAD_OP: gradients
    and optimizer state split across processes; zero3 = ZeRO-3 / FSDP FULL_SHARD: the model's
    weights too) give the per-GPU figure of a sharded run."""
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding is '{sharding}'; expected one of {', '.join(SHARDINGS)}")
    if processes < 1:
        raise ValueError(f"processes is {processes} but must be at least 1")
    arch = arch or read_architecture(cfg)
    memory = resolve_memory(cfg)
    dtype = parse_dtype(cfg.train.mixed_precision)
    modules, weights = _planned_weights(cfg, arch, memory, dtype, device)
    transformer, connector = modules["transformer"], modules["connector"]
    trained = [p for m in (transformer, connector) for p in m.parameters() if p.requires_grad]
    state = _training_state(cfg, trained, device)
    act = _activation_bytes(cfg, arch, memory, dtype, device, transformer)
    encode_transient = _simulate_vae_encode(arch, memory, cfg) if "VAE" in modules else 0
    if processes > 1 and sharding != "none":
        _shard(state, act, weights, transformer, processes, sharding)

    gpu_weights = sum(w.bytes for w in weights if "CPU" not in w.kind)
    static = gpu_weights + state["optimizer"] + state["ema"]
    phases = {
        "forward/backward": static + act["inputs"] + act["activations"] + act["grads_at_peak"],
        "optimizer step": static + state["gradients"] + state["step_transient"],
    }
    if encode_transient:
        phases["VAE encoding"] = static + encode_transient
    phase = max(phases, key=phases.get)
    n_trained = sum(p.numel() for p in trained)
    return MemoryPlan(
        summary=_summary(cfg, dtype, n_trained, device, processes, sharding), architecture=_architecture(modules),
        notes=_notes(cfg, arch, memory), weights=weights, trained_params=n_trained, gradients=state["gradients"],
        gradients_at_peak=act["grads_at_peak"], optimizer=state["optimizer"], optimizer_name=cfg.optim.optimizer,
        ema=state["ema"], inputs=act["inputs"], activations=act["activations"],
        activations_other=act["activations_other"], checkpointing=memory.checkpointing,
        step_transient=state["step_transient"], encode_transient=encode_transient,
        cpu_bytes=sum(w.bytes for w in weights if "CPU" in w.kind), peak=phases[phase], phase=phase, device=device,
        processes=processes, sharding=sharding,
    )


def _planned_weights(cfg: TrainConfig, arch: Architecture, memory: MemorySettings, dtype: torch.dtype,
                     device: str) -> tuple[dict[str, nn.Module], list[WeightLine]]:
    """The run's modules on the meta device, prepared as training prepares them (name -> module:
    transformer, connector, then the encoders on the GPU), and their weight lines."""

    validating = cfg.validation.every > 0 and bool(cfg.validation.pairs)
    transformer = _meta_transformer(arch)
    connector = _meta_connector(cfg, arch)
    _prepared(cfg, memory, dtype, transformer, connector)
    swapped: list[str] = []
    in_flight = 0
    if memory.resident_blocks is not None and device == "cuda":  # on the CPU a swapped block stays where it is
        blocks = swappable_blocks(transformer, memory.resident_blocks)
        swapped = [n for n, _ in blocks]
        in_flight = max((sum(t.numel() * t.element_size() for t in blk.parameters()) for _, blk in blocks), default=0)
    weights = _weight_lines("transformer", transformer, set(swapped)) + _weight_lines("connector", connector)
    if in_flight:
        weights.append(WeightLine("transformer", "", "swapped, in flight", in_flight, 0))
    encoders = _meta_encoders(cfg, arch, memory, dtype, needed_parts(cfg, data=True, validating=validating))
    for name, module in encoders.items():
        weights += _weight_lines(name, module)
    return {"transformer": transformer, "connector": connector, **encoders}, weights


def _training_state(cfg: TrainConfig, trained: list[nn.Parameter], device: str) -> dict[str, int]:
    """Bytes of the optimizer state, gradients, EMA and the optimizer step's temporaries."""
    opt = OPTIMIZER_TABLE[cfg.optim.optimizer]
    gradients = sum(p.numel() * 4 for p in trained)
    if device == "cuda":
        step_transient = opt.step_bytes_per_param * sum(p.numel() for p in trained)
    else:  # the CPU runs the optimizers tensor by tensor: one trained tensor's temporaries at a time
        step_transient = opt.step_bytes_per_param * max((p.numel() for p in trained), default=0) * 2
    return {
        "optimizer": sum(opt.state_bytes(tuple(p.shape)) for p in trained),
        "gradients": gradients,
        "ema": gradients if cfg.optim.ema_decay > 0 else 0,
        "step_transient": step_transient,
    }


def _activation_bytes(cfg: TrainConfig, arch: Architecture, memory: MemorySettings, dtype: torch.dtype, device: str,
                      transformer: nn.Module) -> dict[str, int]:
    """Activations at the step's peak with the configured checkpointing and the other way,
    gradients alive at that peak, and the step's inputs."""
    act_grads, grads_at_peak, inputs = _step_activations(cfg, arch, memory, dtype, device)
    other = replace(memory, checkpointing=not memory.checkpointing)
    other_grads, other_grads_at_peak, _ = _step_activations(cfg, arch, other, dtype, device)
    # layers stored in fp8 (or GGUF) run on an upcast copy of their weight, which autograd keeps
    # until the backward pass reaches the layer: every cast layer's copy without checkpointing,
    # the copies of the block being recomputed with it
    per_block = _upcast_bytes_per_block(transformer, dtype) if memory.transformer != "compute" else [0]
    return {
        "activations": act_grads - grads_at_peak + (max(per_block) if memory.checkpointing else sum(per_block)),
        "activations_other": other_grads - other_grads_at_peak + (sum(per_block) if memory.checkpointing else max(per_block)),
        "grads_at_peak": grads_at_peak,
        "inputs": inputs,
    }


def _shard(state: dict[str, int], act: dict[str, int], weights: list[WeightLine], transformer: nn.Module,
           processes: int, sharding: str) -> None:
    """Split what ``sharding`` splits across ``processes`` (in place): gradients and optimizer
    state (zero2), and the trained modules' weights with one block gathered at a time (zero3)."""
    for key in ("optimizer", "gradients", "step_transient"):
        state[key] //= processes
    act["grads_at_peak"] //= processes
    if sharding == "zero3":
        gathered = max((sum(t.numel() * t.element_size() for t in blk.parameters())
                        for _, blk in transformer_blocks(transformer)), default=0)
        for line in weights:
            if line.part in ("transformer", "connector") and "CPU" not in line.kind:
                line.bytes //= processes
        weights.append(WeightLine("transformer", "", "one block gathered", gathered, 0))


def _architecture(modules: dict[str, nn.Module]) -> str:
    """'transformer (19 double + 38 single blocks) 11.9 B, connector 94.4 M, ...'."""
    text = ", ".join(f"{name} {_count(sum(p.numel() for p in m.parameters()))}" for name, m in modules.items())
    t = modules["transformer"]
    n_d, n_s = len(t.transformer_blocks), len(t.single_transformer_blocks)
    return text.replace("transformer ", f"transformer ({n_d} double + {n_s} single blocks) ", 1)


def _summary(cfg: TrainConfig, dtype: torch.dtype, n_trained: int, device: str, processes: int, sharding: str) -> str:
    width, height = _bucket(cfg)
    trained_what = cfg.trainable_set + (" + connector" if cfg.trainable_set != "connector" and cfg.trains_connector else "")
    return (f"stage {cfg.train.stage}, trains {trained_what} ({_count(n_trained)} parameters), "
            f"{width}x{height} bucket, batch {cfg.data.batch_size} per process, "
            f"{'fp32' if dtype == torch.float32 else _dtype_name(dtype) + ' autocast'}, "
            f"optimizer {cfg.optim.optimizer}, {device.upper() if device == 'cuda' else device}, "
            f"{processes} process{'es' if processes > 1 else ''}" + (f" ({sharding})" if sharding != "none" else ""))


def _notes(cfg: TrainConfig, arch: Architecture, memory: MemorySettings) -> list[str]:
    notes = list(arch.notes)
    if spec_queries(cfg):
        notes.append("learned queries run Qwen2.5-VL with gradients: its activations are not counted")
    if memory.transformer == "gguf":
        notes.append("a GGUF transformer is sized as fp8 (Q8_0 is about 8.5 bits a weight; Q4 files are smaller)")
    missing = OPTIMIZER_TABLE[cfg.optim.optimizer].missing
    if missing:
        notes.append(f"optimizer {cfg.optim.optimizer} cannot run here: {missing}")
    return notes


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return str(n)


def spec_queries(cfg: TrainConfig) -> bool:
    return fusion_mode(cfg.model.mode).queries


# --------------------------------------------------------------------------------------------
# Fitting a budget
# --------------------------------------------------------------------------------------------


@dataclass
class Change:
    """One step towards a budget: options to set, why, and the plan with it (and those before)."""

    options: dict[str, object]
    why: str
    plan: MemoryPlan


def _with(cfg: TrainConfig, options: dict) -> TrainConfig:
    new = TrainConfig.from_dict(cfg.to_dict(), source="plan")
    for key, value in options.items():
        new.set(key, value, "plan")
    return new.check(for_training=False)


def fit_budget(cfg: TrainConfig, budget: int, *, device: str = "cuda", processes: int = 1, sharding: str = "none",
               plan: MemoryPlan | None = None) -> list[Change]:
    """Changes that bring ``cfg`` under ``budget`` bytes, cheapest in quality and speed first,
    each applied on top of the ones before, until the plan fits (an empty list when it already
    does; the last change's plan says whether the whole list was enough)."""
    arch = read_architecture(cfg)
    current = plan or plan_memory(cfg, device=device, processes=processes, sharding=sharding, arch=arch)
    if current.fits(budget):
        return []
    candidates = []
    need = _encoders_on_gpu(cfg)
    if need and not cfg.data.use_cache:
        candidates.append(({"data.use_cache": True, "data.cache_dir": cfg.data.cache_dir or "cache/features"},
                           "precompute features and latents (gie-train cache): no encoder on the GPU"))
    if not resolve_memory(cfg).checkpointing:
        candidates.append(({"train.gradient_checkpointing": True}, "recompute activations in backward (slower steps)"))
    if cfg.optim.optimizer in ("adamw", "prodigy") and OPTIMIZER_TABLE["adamw8bit"].installed:  # only what can run here
        candidates.append(({"optim.optimizer": "adamw8bit"}, "8-bit optimizer state (bitsandbytes)"))
    if cfg.memory.transformer_dtype == "auto" and resolve_memory(cfg).transformer == "compute" and cfg.trainable_set != "full":
        candidates.append(({"memory.transformer_dtype": "fp8"}, "frozen transformer weights in fp8, upcast per layer"))
    if need and cfg.memory.encoder_dtype == "auto":
        candidates.append(({"memory.encoder_dtype": "fp8"}, "frozen encoders in fp8 (when they are not cached)"))
    if cfg.trainable_set in ("image_attention", "full"):
        candidates.append(({"train.trainable": "lora", "optim.lr": 1e-4},
                           "train a LoRA instead of transformer weights (changes what is trained)"))
    out: list[Change] = []
    applied: dict[str, object] = {}
    for options, why in candidates:
        applied.update(options)
        try:
            step_cfg = _with(cfg, applied)
        except Exception:  # noqa: BLE001 - a change this config cannot take is skipped
            for k in options:
                applied.pop(k)
            continue
        step = plan_memory(step_cfg, device=device, processes=processes, sharding=sharding, arch=arch)
        if step.peak < current.peak:
            out.append(Change(options, why, step))
            current = step
            if step.fits(budget):
                return out
        else:
            for k in options:
                applied.pop(k)
    swap = _fit_block_swap(cfg, applied, budget, device, processes, sharding, arch)
    if swap is not None:
        out.append(swap)
        current = swap.plan
        if current.fits(budget):
            return out
        applied.update(swap.options)
    for resolution in (768, 512, 384, 256):
        if resolution >= cfg.data.resolution:
            continue
        step = plan_memory(_with(cfg, {**applied, "data.resolution": resolution}), device=device, processes=processes,
                           sharding=sharding, arch=arch)
        if step.fits(budget) or resolution == 256:
            out.append(Change({"data.resolution": resolution}, "train smaller images (changes what is learned)", step))
            break
    return out


def _encoders_on_gpu(cfg: TrainConfig) -> bool:
    return any(needed_parts(cfg, data=True, validating=False).values())


def _fit_block_swap(cfg, applied, budget, device, processes, sharding, arch) -> Change | None:
    """The most blocks kept resident that still fits (block swap), when blocks can be swapped."""
    try:
        probe = _with(cfg, {**applied, "memory.resident_blocks": 0})
    except Exception:  # noqa: BLE001 - blocks with trained weights cannot be swapped
        return None
    n = arch.transformer["num_layers"] + arch.transformer["num_single_layers"]
    low = plan_memory(probe, device=device, processes=processes, sharding=sharding, arch=arch)
    if not low.fits(budget):
        return Change({"memory.resident_blocks": 0}, "stream every frozen transformer block from CPU memory (block swap)", low)
    lo, hi, best = 0, n, (0, low)
    while lo <= hi:  # the most resident blocks that fit
        mid = (lo + hi) // 2
        p = plan_memory(_with(cfg, {**applied, "memory.resident_blocks": mid}), device=device, processes=processes,
                        sharding=sharding, arch=arch)
        if p.fits(budget):
            best, lo = (mid, p), mid + 1
        else:
            hi = mid - 1
    k, p = best
    return Change({"memory.resident_blocks": k}, f"keep {k} of {n} transformer blocks on the GPU, stream the rest (block swap)", p)


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def parse_budget(text: str) -> int:
    """'24GB', '24 GiB', '80G', '16000MB' -> bytes. GB and GiB both mean 2**30 bytes: a "24 GB"
    card holds 24 GiB (24576 MiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([GgMmTt])?(?:i?[Bb])?\s*", str(text))
    if not m:
        raise ValueError(f"--budget '{text}' is not a size such as 24GB, 80GiB or 16000MB")
    unit = (m.group(2) or "G").upper()  # no unit: GiB
    value = float(m.group(1)) * {"M": 2**20, "G": 2**30, "T": 2**40}[unit]
    if value <= 0:
        raise ValueError(f"--budget '{text}' must be more than 0")
    return int(value)


def _unit(plan: MemoryPlan) -> tuple[str, int]:
    return ("GiB", GIB) if plan.peak >= GIB else ("MiB", 2**20)


def _size(n: int, unit: int) -> str:
    return f"{n / unit:8.2f}"


def format_plan(plan: MemoryPlan, budget: int | None = None, changes: list[Change] | None = None,
                config_name: str = "") -> str:
    """The plan as the text ``gie-train plan`` prints."""
    name, unit = _unit(plan)
    lines = [f"gie-train plan{(' ' + config_name) if config_name else ''}", f"  {plan.summary}",
             f"  models: {plan.architecture}"]
    lines += [f"  note: {n}" for n in plan.notes]
    lines += ["", f"  expected peak {'GPU' if plan.device == 'cuda' else plan.device} memory (allocated tensors){'':12s}{name}"]
    first = True
    for w in plan.weights:
        if "CPU" in w.kind or w.dtype in ("int64", "int32"):  # swapped blocks; position-id buffers (counted, too small to list)
            continue
        label = "weights" if first else ""
        first = False
        lines.append(f"    {label:<17s}{w.part:<13s}{w.dtype:<6s}{w.kind:<20s}{_size(w.bytes, unit)}")
    lines.append(f"    {'gradients':<17s}{'fp32, at the peak':<39s}{_size(plan.gradients_at_peak, unit)}"
                 + (f"   (all: {plan.gradients / unit:.2f} at the step)" if plan.gradients != plan.gradients_at_peak else ""))
    lines.append(f"    {'optimizer state':<17s}{plan.optimizer_name:<39s}{_size(plan.optimizer, unit)}")
    if plan.ema:
        lines.append(f"    {'EMA':<17s}{'fp32':<39s}{_size(plan.ema, unit)}")
    lines.append(f"    {'inputs':<17s}{'latents, features':<39s}{_size(plan.inputs, unit)}")
    ck = "on" if plan.checkpointing else "off"
    lines.append(f"    {'activations':<17s}{'gradient checkpointing ' + ck:<39s}{_size(plan.activations, unit)}"
                 f"   (checkpointing {'off' if plan.checkpointing else 'on'}: {plan.activations_other / unit:.2f})")
    lines.append(f"    {'transient':<17s}{'optimizer step':<39s}{_size(plan.step_transient, unit)}")
    if plan.encode_transient:
        lines.append(f"    {'':<17s}{'VAE encoding (latents not cached)':<39s}{_size(plan.encode_transient, unit)}")
    lines.append(f"  peak: {plan.peak / unit:.2f} {name}, during the {plan.phase}"
                 + (f" (+ about {CUDA_RESERVE / GIB:.0f} GiB for the CUDA context)" if plan.device == "cuda" else ""))
    if plan.device == "cuda":
        lines.append(f"  reserved: about {plan.reserved_peak / unit:.2f} {name}, the margin assumed between allocated and "
                     f"reserved memory being {RESERVED_MARGIN:.0%} of the peak (gie-train sets {ALLOCATOR_SETTING}; "
                     "the trainer logs both peaks)")
    if plan.cpu_bytes:
        lines.append(f"  CPU memory for swapped blocks: {plan.cpu_bytes / GIB:.2f} GiB")
    if budget is not None:
        lines.append("")
        if plan.fits(budget):
            lines.append(f"  fits a {budget / GIB:g} GiB budget")
        elif not changes:
            lines.append(f"  does not fit {budget / GIB:g} GiB, and no option of gie-train brings it there")
        else:
            lines.append(f"  does not fit {budget / GIB:g} GiB; to fit, change (in this order, each on top of the ones before):")
            for c in changes:
                flags = " ".join(f"--{k} {_flag_value(v)}" for k, v in c.options.items())
                lines.append(f"    {flags:<52s} -> {c.plan.peak / GIB:6.2f} GiB   {c.why}")
            last = changes[-1].plan
            lines.append(f"  {'fits' if last.fits(budget) else 'still does not fit'} with all of them "
                         f"({last.peak / GIB:.2f} GiB peak)")
    return "\n".join(lines)


def _flag_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


__all__ = ["CUDA_RESERVE", "Change", "LiveBytes", "MemoryPlan", "fit_budget", "format_plan", "parse_budget",
           "plan_memory", "read_architecture"]
