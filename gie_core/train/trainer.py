"""The training loop: data, encoders or cache, the loss, optimizer, EMA, checkpoints, validation, export.

Runs as one process on a CPU or GPU, or under ``accelerate launch`` on several GPUs and nodes
(DDP, DeepSpeed ZeRO-2 / ZeRO-3, FSDP). Resume is exact: the global batches depend only on
(seed, epoch, global batch size), every pair draws its VAE sample, timestep and noise from a
generator seeded by (seed, epoch, batch, its place in the global batch), and the checkpoint
holds the trained weights, optimizer, schedule, EMA and the position in the epoch. So a run on
N processes with ``data.batch_size`` B trains what one process with N x B does, and a
checkpoint resumes on another number of processes with the same global batch where the engine
can load its optimizer state there (see :data:`.engine.RESHARDABLE`).

Memory (:mod:`.memory`): frozen weights in fp8 with per-layer upcast, block swap of frozen
transformer blocks, the optimizers of :data:`.config.OPTIMIZER_TABLE` (8-bit AdamW, Adafactor,
Prodigy); ``gie-train plan`` (:mod:`.plan`) says before a run what it will need.

Reproducible: every random initialisation (a fresh connector, new connector parameters, LoRA
weights) and every step's module randomness (LoRA dropout) runs under a generator seeded from
``train.seed`` (:func:`.models.seeded`), never from the process's global random state, which
is left as the caller had it. Two runs of one config give bit-identical weights.

Before any weight is read, :meth:`Trainer.setup` checks the whole config, the model paths, the
checkpoint to resume, the validation images and the data list (every image header), so a
mistake fails in seconds, not after loading 30 GB.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from gie_core.constants import MIXED_PRECISION_DTYPES
from gie_core.engine.connector import QwenFeatures, TextFeatures, fuse
from gie_core.files import atomic_write, atomic_write_text
from gie_core.imaging.images import load_image, prepare_reference, to_pil
from gie_core.engine.modes import fusion_mode
from gie_core.engine.request import resolve_edit
from gie_core.engine.sampler import KontextModels, encode_reference, sample
from gie_core.weights.loading import parse_dtype
from gie_core.weights.parts import load_part
from gie_core.weights.reader import CheckpointReader
from gie_core.train import checkpoint as ckpt
from gie_core.train import export as ex
from gie_core.train.attention import training_attention
from gie_core.train.cache import FeatureCache, cache_info_for, cached_contents
from gie_core.train.config import TrainConfig, optimizer_spec
from gie_core.train.data import BucketBatches, EditDataset, ProblemLog, Shard, bucket_for, collate, read_dataset, usable_pairs
from gie_core.train.loss import normalize_latents, sample_sigmas, standard_normal
from gie_core.train.engine import check_engine, check_requested_engine, check_resharding, zero_stage
from gie_core.train.memory import GIB, PeakMemory, describe_peak_memory, frozen_names, peak_memory, place_with_swap, resolve_memory
from gie_core.train.models import (
    EditModel,
    check_model_paths,
    derived_seed,
    encode_qwen_with_grad,
    load_components,
    needed_parts,
    prepare_for_training,
    seeded,
)

logger = logging.getLogger("gie_core.train")

STATE_VERSION = 2
# Fields of the config a resumed run must share with its checkpoint (and the global batch:
# data.batch_size x processes).
RESUME_FIXED = ("train.stage", "model.mode", "train.layers", "data.bucketing", "data.resolution",
                "train.seed", "optim.optimizer")
RESUME_FIXED_LORA = ("lora.rank", "lora.targets")
SLOW_SAVE_ENV = "GIE_TRAIN_SAVE_DELAY"  # testing crash safety: seconds to pause in the middle of a save


@dataclass
class TrainResult:
    step: int
    losses: list[float] = field(default_factory=list)  # per optimizer step, this process
    checkpoint: Path | None = None
    exported: dict[str, Path] = field(default_factory=dict)
    problems: str = ""
    steps_per_second: float = 0.0
    peak_memory: PeakMemory | None = None  # CUDA only: peak allocated and reserved bytes of the run


def make_accelerator(cfg: TrainConfig, output_dir: Path):
    """An Accelerator for this run (one process on CPU works; ``accelerate launch`` sets up the rest)."""
    mp = cfg.train.mixed_precision
    check_requested_engine()
    if not torch.cuda.is_available() and mp == "fp16":
        raise ValueError("train.mixed_precision 'fp16' needs a GPU; use 'bf16' or 'no' on the CPU")
    # Several runs in one single-process program (tests, notebooks) may differ in precision.
    if AcceleratorState._shared_state and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state()
    log_with = None
    if cfg.log.tensorboard:
        try:
            import tensorboard  # noqa: F401  # probe: optional tensorboard (extra 'train')
        except ImportError:
            try:
                import tensorboardX  # noqa: F401  # probe: the other tensorboard writer accelerate accepts
            except ImportError:
                raise ValueError("log.tensorboard is on but the tensorboard package is not installed (pip install tensorboard)") from None
        log_with = "tensorboard"
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # several CPU processes (torchrun / mpirun) then use gloo
        mixed_precision=mp,
        gradient_accumulation_steps=cfg.train.gradient_accumulation,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )


class Trainer:
    """One training run of ``config``: ``Trainer(cfg).train()``."""

    def __init__(self, config: TrainConfig):
        self.cfg = config
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.problems = ProblemLog()
        self.step = 0
        self.epoch = 0
        self.batches_done = 0  # batches of the current epoch already trained on
        self.losses: list[float] = []
        self.last_checkpoint: Path | None = None
        self.ready = False

    # ------------------------------------------------------------------------------------
    # Setup
    # ------------------------------------------------------------------------------------
    def setup(self, data: bool = True) -> Trainer:
        """Load data, models, optimizer; resume if asked. ``data=False`` prepares only what
        exporting a checkpoint needs (no dataset, no encoders)."""
        cfg = self.cfg
        # Everything up to the models is checked before any weight is read.
        resume, on_main = self._setup_run(data)
        validation_images = self._load_validation_images() if on_main else []
        cache_info = self._setup_data(data)
        comps = self._setup_models(data, on_main, cache_info)
        self._setup_optimizer(comps)
        self._setup_fixed_inputs(data, on_main, validation_images)
        if resume is not None:
            self.load_checkpoint(resume)
        elif cfg.checkpoint.resume == "latest" and self.accelerator.is_main_process:
            logger.info("no checkpoint in %s yet: starting a new run", self.checkpoint_dir)
        if cfg.log.tensorboard:
            self.accelerator.init_trackers("gie-train", config=_flat_config(cfg))
        self.ready = True
        return self

    def _setup_run(self, data: bool) -> tuple[Path | None, bool]:
        """The checked config, the accelerator, dtypes and memory settings, the checkpoint to
        resume; returns it and whether this process makes validation edits."""
        cfg = self.cfg
        cfg.check(for_training=data)  # a config built by hand is checked as a file's is
        if data and (problem := optimizer_spec(cfg.optim.optimizer).import_problem()):
            raise ValueError(f"optim.optimizer is '{cfg.optim.optimizer}' but {problem}")
        check_model_paths(cfg)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        acc = self.accelerator = make_accelerator(cfg, self.output_dir)
        self.device = acc.device
        # fp32 trained norm weights meet bf16 activations under autocast: correct, just not fused
        warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
        # frozen weights in the compute dtype of mixed precision (accelerate's fp8 computes in full precision)
        self.weight_dtype = parse_dtype(acc.mixed_precision if acc.mixed_precision in MIXED_PRECISION_DTYPES else "no")
        self.mode = cfg.model.mode
        self.spec = fusion_mode(self.mode)
        self.trainable_set = cfg.trainable_set
        self._deepspeed = acc.distributed_type.name == "DEEPSPEED"
        self.memory = resolve_memory(cfg)  # reads a transformer file's header at most
        check_engine(cfg, acc, self.memory)
        if self.memory.transformer != "compute" and not self.memory.checkpointing:
            logger.warning("an %s transformer without gradient checkpointing: autograd keeps every layer's upcast weights "
                           "until the backward pass, more memory than not casting (gie-train plan shows both)",
                           self.memory.transformer)
        if acc.is_main_process:
            ckpt.recover(self.checkpoint_dir)
        resume = ckpt.resolve_resume(cfg.checkpoint.resume, self.checkpoint_dir)
        validating = data and cfg.validation.every > 0 and bool(cfg.validation.pairs)
        if validating and (self._fsdp or self._zero3):
            logger.warning("validation edits are off under FSDP and ZeRO-3 (the transformer is sharded); export and run gie-edit instead")
            validating = False
        return resume, validating and acc.is_main_process

    def _setup_data(self, data: bool) -> dict:
        """The feature cache (checked against the run) and the dataset; returns the cache's info."""
        cfg = self.cfg
        self.cache = None
        cache_info = {}
        if data and cfg.data.use_cache:
            self.cache = FeatureCache(cfg.data.cache_dir, cfg.data.cache_dtype)
            cache_info = self.cache.check_compatible({**cache_info_for(cfg), "contents": list(cached_contents(self.mode))})
        self.dataset = self.batcher = None
        if data:
            self._setup_dataset()
        return cache_info

    def _setup_models(self, data: bool, on_main: bool, cache_info: dict):
        """Encoders only where features are not cached (and for validation, on the main process),
        the transformer and connector made trainable, the frozen parts on the device."""
        cfg = self.cfg
        with seeded(cfg.train.seed, "models"):  # any random init while loading: seeded, the caller's RNG untouched
            comps = self.components = load_components(
                cfg, weight_dtype=self.weight_dtype, **needed_parts(cfg, data=data, validating=on_main),
                qwen_hidden=cache_info.get("qwen_hidden"), memory=self.memory,
            )
        self.trainable_names = prepare_for_training(comps.transformer, comps.connector, cfg, self.memory, self.weight_dtype)
        for part in (comps.vae, comps.qwen.model if comps.qwen else None,
                     comps.text.clip if comps.text else None, comps.text.t5 if comps.text else None):
            if part is not None:
                part.to(self.device)
        self.scheduler_config = dict(comps.scheduler.config)
        if self.cache is not None:  # shift/scale of the VAE that made the cache
            vae = cache_info["vae"]
            self.vae_normalisation = SimpleNamespace(shift_factor=vae["shift_factor"], scaling_factor=vae["scaling_factor"])
        else:
            self.vae_normalisation = comps.vae.config if comps.vae is not None else None
        return comps

    def _setup_optimizer(self, comps) -> None:
        """The trained module, optimizer, LR schedule, block swap and EMA, prepared by accelerate."""
        cfg, acc = self.cfg, self.accelerator
        transformer = comps.transformer
        model = EditModel(comps.connector, transformer, self.mode, guidance=cfg.train.guidance)
        model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.param_names = [n for n, p in model.named_parameters() if p.requires_grad]
        optimizer = optimizer_spec(cfg.optim.optimizer).build(self.params, cfg, sharded=self._fsdp)
        lr_scheduler = get_scheduler(
            cfg.optim.lr_scheduler, optimizer=optimizer,
            num_warmup_steps=cfg.optim.warmup_steps * acc.num_processes,
            num_training_steps=cfg.train.max_steps * acc.num_processes,
        )
        if self._deepspeed:
            ds = acc.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
        placement = None
        self.swapped_blocks: list[str] = []
        if self.memory.resident_blocks is not None:  # block swap: the swapped blocks stay in CPU memory
            self.swapped_blocks = place_with_swap(model, transformer, self.memory.resident_blocks, self.device)
            placement = [False, None, None]
            logger.info("block swap: %d transformer blocks stream from CPU memory%s", len(self.swapped_blocks),
                        f" ({self.swapped_blocks[0]} ... {self.swapped_blocks[-1]})" if self.swapped_blocks else "")
        if acc.distributed_type.name.startswith("MULTI_"):
            # DDP synchronises trained weights only: the frozen ones are the same everywhere, may be
            # fp8 (not every backend broadcasts it) or swapped out to the CPU
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen_names(model))
        self.model, self.optimizer, self.lr_scheduler = acc.prepare(model, optimizer, lr_scheduler, device_placement=placement)
        self.unwrapped = acc.unwrap_model(self.model)  # the EditModel itself (connector, transformer)

        self.ema = None
        if cfg.optim.ema_decay > 0:
            if self._fsdp or self._zero3:
                raise ValueError("optim.ema_decay with FSDP or ZeRO-3 is not supported (parameters are sharded); "
                                 "use DeepSpeed ZeRO-2 or DDP")
            self.ema = EMAModel(self.params, decay=cfg.optim.ema_decay, foreach=False)
            self.ema.to(self.device)

        acc.register_save_state_pre_hook(self._save_hook)
        acc.register_load_state_pre_hook(self._load_hook)

    def _setup_fixed_inputs(self, data: bool, on_main: bool, validation_images: list) -> None:
        """CLIP("") for the steps, the validation pairs' encodings; encoders only the cache lacks stay."""
        comps = self.components
        self.pooled_empty = None
        if self.cache is not None:
            self.pooled_empty = self.cache.read_empty_pooled().to(self.device)
        elif data:
            self.pooled_empty = comps.text.clip_pooled([""]).float().to(self.device)  # [1, P]: CLIP("")
        self.validation_inputs = self._prepare_validation(validation_images) if on_main else []
        if self.cache is not None:  # the encoders were loaded only to encode the validation pairs
            comps.text = None
            if not self.spec.queries:  # learned queries read Qwen at every step
                comps.qwen = None

    def _load_validation_images(self) -> list:
        """The validation images, loaded (and so checked) before any weight; an error names the pair."""
        return [load_image(Path(pair["image"]).expanduser(), what=f"validation.pairs[{i}].image")
                for i, pair in enumerate(self.cfg.validation.pairs)]

    def _setup_dataset(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        records = read_dataset(cfg.data.data_txt, self.problems, cfg.data.region_weighting)
        with acc.main_process_first():
            self.records, buckets = usable_pairs(records, self.problems, cfg.data.bucketing, cfg.data.resolution,
                                                 cfg.data.ratios, Path(cfg.data.cache_dir or self.output_dir) / "data_index")
        if not self.records:
            raise ValueError(f"no usable pairs in {cfg.data.data_txt} ({self.problems.summary()})")
        self.dataset = EditDataset(self.records, buckets, bucketing=cfg.data.bucketing,
                                   weight_scheme=cfg.train.weight_scheme, cache=self.cache)
        self.batcher = BucketBatches(buckets, cfg.data.batch_size, seed=cfg.train.seed, shuffle=cfg.data.shuffle,
                                     num_replicas=acc.num_processes, rank=acc.process_index)
        if len(self.batcher) == 0:
            raise ValueError(f"{len(self.records)} pairs make no batch for {acc.num_processes} processes")

    # ------------------------------------------------------------------------------------
    # Batches
    # ------------------------------------------------------------------------------------
    def sample_generators(self, epoch: int, batch_index: int, shard: Shard) -> list[torch.Generator]:
        """One generator per pair of this process's part of a global batch, for its randomness
        (VAE sample, timestep, noise): a function of (seed, epoch, batch, place in the global
        batch) only, so a resumed run draws exactly what it would have, on any number of processes."""
        return [torch.Generator("cpu").manual_seed(derived_seed(self.cfg.train.seed, "pair", epoch, batch_index, shard.offset + j))
                for j in range(len(shard.indices))]

    def encode_batch(self, batch: dict, generator: torch.Generator | list[torch.Generator]) -> dict:
        """A collated batch -> the model's inputs (features, latents), on the device.

        From ``generator`` (one, or one per pair) it draws the target's VAE ``sample()`` noise (the
        same draw with and without a cache); :meth:`compute_loss` then draws the timesteps and the
        flow noise.
        """
        comps, dev, spec = self.components, self.device, self.spec
        unwrapped = self.unwrapped
        queries = unwrapped.connector.queries if spec.queries else None
        n = len(batch["instruction"])
        out: dict = {"pooled_empty": self.pooled_empty, "num_queries": 0}
        if "cached" in batch:
            items = batch["cached"]
            moments = torch.stack([it["target_moments"] for it in items]).to(dev)
            latents = DiagonalGaussianDistribution(moments).sample(generator=generator)
            out["reference"] = torch.stack([it["reference"] for it in items]).to(dev)
            hidden = [it["qwen"] for it in items] if "qwen" in items[0] else None
            if spec.needs_t5:
                out["t5"] = torch.stack([it["t5"] for it in items]).to(dev)
            if spec.pooled_from == "instruction":
                out["pooled"] = torch.stack([it["pooled"] for it in items]).to(dev)
            weights = [it.get("region_weight") for it in items]
            if any(w is not None for w in weights):
                h, w = latents.shape[2:]
                weights = [wt if wt is not None else torch.ones(1, h, w) for wt in weights]
                out["region_weight"] = torch.stack(weights).to(dev)
            vae_config = None
        else:
            vae = comps.vae
            with torch.no_grad():
                target = batch["target"].to(dev, vae.dtype)
                latents = vae.encode(target).latent_dist.sample(generator=generator)
                out["reference"] = encode_reference(vae, batch["source"], dev)
            hidden = None
            if spec.needs_qwen and not spec.queries:
                hidden = [comps.qwen.encode([img], text).hidden[0] for img, text in zip(batch["qwen_image"], batch["instruction"])]
            if spec.needs_t5:
                out["t5"] = comps.text.t5_tokens(batch["instruction"]).to(dev)
            if spec.pooled_from == "instruction":
                out["pooled"] = comps.text.clip_pooled(batch["instruction"]).to(dev)
            if batch["region_weight"] is not None:
                out["region_weight"] = batch["region_weight"].to(dev)
            vae_config = vae.config
        if spec.queries:  # learned queries join the Qwen input: encoded here, with gradients to them
            if "cached" in batch:  # the 448x448 Qwen input, cached as uint8 pixels
                images = [Image.fromarray(it["qwen_pixels"].round().clamp(0, 255).to(torch.uint8).numpy()) for it in batch["cached"]]
            else:
                images = batch["qwen_image"]
            hidden = [encode_qwen_with_grad(comps.qwen, [img], text, queries).hidden[0]
                      for img, text in zip(images, batch["instruction"])]
            out["num_queries"] = queries.shape[0]
        out["vlm_hidden"], out["vlm_mask"] = _left_pad([h.to(dev) for h in hidden])
        if vae_config is None:
            vae_config = self.vae_normalisation
        out["x0"] = normalize_latents(latents.float(), vae_config)
        out["batch_size"] = n
        return out

    def compute_loss(self, inputs: dict, noise: torch.Tensor | None = None, sigmas: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> dict:
        """The loss of encoded inputs; noise and sigmas are drawn from ``generator`` unless given."""
        x0 = inputs["x0"]
        b, _, h, w = x0.shape
        if sigmas is None:
            sigmas = sample_sigmas(b, (h // 2) * (w // 2), generator, logit_mean=self.cfg.train.logit_mean,
                                   logit_std=self.cfg.train.logit_std, scheduler_config=self.scheduler_config)
        if noise is None:
            noise = standard_normal(tuple(x0.shape), generator)
        kwargs = {k: v for k, v in inputs.items() if k not in ("x0", "batch_size")}
        return self.model(x0=x0, noise=noise.to(x0.device), sigmas=sigmas.to(x0.device), **kwargs)

    def training_step(self, batch: dict, generators: list[torch.Generator], loss_scale: float = 1.0) -> torch.Tensor:
        """One micro-batch: encode, loss, backward (its loss times ``loss_scale``: see
        :attr:`.data.Shard.loss_scale`), and the optimizer step when gradients sync. Returns the
        micro-batch's mean loss."""
        acc = self.accelerator
        # module randomness (LoRA dropout) from the batch's seeds: reproducible, resumable, and the
        # process's global generators are left as they were
        # the SDPA kernels of train.attention_kernels for the forward and the backward (gradient
        # checkpointing recomputes attention inside backward(); see gie_core.train.attention)
        with seeded(generators[0].initial_seed(), "modules", acc.process_index, device=self.device), \
                acc.accumulate(self.model), training_attention(self.cfg.train.attention_kernels):
            inputs = self.encode_batch(batch, generators)
            out = self.compute_loss(inputs, generator=generators)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss is {loss.item()} at step {self.step + 1} (pairs {batch['key']})")
            acc.backward(loss * loss_scale if loss_scale != 1.0 else loss)
            if acc.sync_gradients and self.cfg.optim.max_grad_norm > 0:
                acc.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def epoch_batches(self, epoch: int) -> list[Shard]:
        """This process's parts of the global batches of ``epoch``."""
        k = self.cfg.train.overfit_batches
        if k:
            return self.batcher.shards(0)[:k]
        return self.batcher.shards(epoch)

    # ------------------------------------------------------------------------------------
    # Loop
    # ------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        if not self.ready:
            self.setup()
        cfg, acc = self.cfg, self.accelerator
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # the peaks logged are this run's (the weights stay counted)
        max_steps = cfg.train.max_steps
        bar = tqdm(total=max_steps, initial=self.step, desc=f"stage {cfg.train.stage}", unit="step",
                   disable=not (cfg.log.progress and acc.is_local_main_process), dynamic_ncols=True)
        start_step, start_time = self.step, time.perf_counter()
        running = None
        micro: list[torch.Tensor] = []  # losses of the micro-batches of this optimizer step
        self.micro_weights: list[int] = []  # their pairs that count (see Shard.real)
        saved_at = self.step if self.last_checkpoint is not None else -1
        while self.step < max_steps:
            batches = self.epoch_batches(self.epoch)
            if self.batches_done >= len(batches):
                self.epoch, self.batches_done = self.epoch + 1, 0
                continue
            # its own generator: a DataLoader otherwise draws its worker seed from the global one
            loader_gen = torch.Generator().manual_seed(derived_seed(cfg.train.seed, "loader", self.epoch, self.batches_done))
            loader = DataLoader(self.dataset, batch_sampler=[b.indices for b in batches[self.batches_done:]],
                                collate_fn=collate, num_workers=cfg.data.num_workers,
                                pin_memory=self.device.type == "cuda", generator=loader_gen)
            for batch in loader:
                gen_epoch = 0 if cfg.train.overfit_batches else self.epoch
                shard = batches[self.batches_done]
                if shard.real:  # a stand-in pair (a batch smaller than the processes) is not reported twice
                    self.problems.extend(batch["bad"])
                if self.problems.skip_batch(batch, len(batches), cfg.data.data_txt):
                    self.batches_done += 1  # no pair of its bucket loads: counted, the run goes on
                    continue
                generators = self.sample_generators(gen_epoch, self.batches_done, shard)
                micro.append(self.training_step(batch, generators, shard.loss_scale))
                self.micro_weights.append(shard.real)
                self.batches_done += 1
                if not acc.sync_gradients:
                    continue
                loss = torch.stack(micro).mean() if len(micro) > 1 else micro[0]
                real = sum(self.micro_weights)
                micro, self.micro_weights = [], []
                self.step += 1
                if self.ema is not None:
                    self.ema.step(self.params)
                value = float(loss)
                self.losses.append(value)
                running = value if running is None else 0.9 * running + 0.1 * value
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4f}", refresh=False)
                if cfg.log.every and self.step % cfg.log.every == 0:
                    self._log(loss, real, start_step, start_time)
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save_checkpoint()
                    saved_at = self.step
                if cfg.validation.every and cfg.validation.pairs and self.step % cfg.validation.every == 0:
                    self.validate()
                if self.step >= max_steps:
                    break
            else:
                self.epoch, self.batches_done = self.epoch + 1, 0
        bar.close()
        elapsed = time.perf_counter() - start_time
        if saved_at != self.step:
            self.save_checkpoint()
        exported = {}
        if cfg.export.at_end:
            exported = self.export()
        if self.problems.total and acc.is_main_process:
            logger.warning(self.problems.summary())
        acc.end_training()
        rate = (self.step - start_step) / elapsed if elapsed > 0 else 0.0
        if acc.is_local_main_process:
            logger.info("finished training: %s", describe_peak_memory(self.device))
        return TrainResult(self.step, list(self.losses), self.last_checkpoint, exported, self.problems.summary(), rate,
                           peak_memory(self.device))

    def _log(self, loss: torch.Tensor, real: int, start_step: int, start_time: float) -> None:
        acc = self.accelerator
        # the global batch's mean: each process's mean weighted by the pairs it really trained on
        parts = acc.gather(torch.stack([loss.float() * real, torch.tensor(float(real), device=loss.device)]).reshape(1, 2).to(self.device))
        mean = (parts[:, 0].sum() / parts[:, 1].sum().clamp(min=1)).item()
        elapsed = time.perf_counter() - start_time
        values = {"loss": mean, "lr": self.lr_scheduler.get_last_lr()[0],
                  "steps_per_second": (self.step - start_step) / elapsed if elapsed > 0 else 0.0,
                  "bad_samples": self.problems.total}
        peak = peak_memory(self.device)
        if peak is not None:
            values.update(peak_allocated_gib=peak.allocated / GIB, peak_reserved_gib=peak.reserved / GIB)
        if acc.trackers:
            acc.log(values, step=self.step)
        logger.info("step %d: %s; %s", self.step, ", ".join(f"{k} {v:.4g}" for k, v in values.items()),
                    describe_peak_memory(self.device))

    # ------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------
    @property
    def _fsdp(self) -> bool:
        return self.accelerator.distributed_type.name == "FSDP"

    @property
    def _zero3(self) -> bool:
        return self._deepspeed and zero_stage(self.accelerator) == 3

    def full_parameters(self, trained_only: bool = False):
        """A context in which the unwrapped modules hold full parameters (FSDP gathers its shards
        to the CPU of the main process, DeepSpeed ZeRO-3 gathers its partitions, of the trained
        parameters only with ``trained_only``; every process must enter it). A no-op otherwise."""
        if self._zero3:
            import deepspeed  # optional: deepspeed (extra 'deepspeed'); only ZeRO-3 runs reach here

            params = self.params if trained_only else list(self.unwrapped.parameters())
            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        if not self._fsdp:
            return contextlib.nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP  # platform: torch builds without distributed support cannot import it; only FSDP runs reach here

        return FSDP.summon_full_params(self.model, writeback=False, offload_to_cpu=True, rank0_only=True)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """``{connector.* / transformer.* name: tensor}`` of every trained parameter (call inside
        :meth:`full_parameters` under FSDP)."""
        named = {_clean_name(n): p for n, p in self.unwrapped.named_parameters()}
        return {n: named[n].detach() for n in self.param_names}

    def _save_hook(self, models, weights, output_dir):
        with self.full_parameters(trained_only=True):
            if self.accelerator.is_main_process:
                ckpt.save_safetensors(self.trainable_state(), Path(output_dir) / ckpt.TRAINABLE_FILE)
        while weights:  # the frozen weights are not saved: the trained ones are in trainable.safetensors
            weights.pop()

    def _load_hook(self, models, input_dir):
        while models:
            models.pop()
        if not (self._fsdp or self._zero3):  # FSDP and ZeRO-3 restore their own (sharded) model state
            self._load_trainable(Path(input_dir) / ckpt.TRAINABLE_FILE)

    def _load_trainable(self, path: Path) -> None:
        named = {_clean_name(n): p for n, p in self.unwrapped.named_parameters()}
        with CheckpointReader.open(path) as reader:
            keys = set(reader.keys())
            want = set(self.param_names)
            if keys != want:
                extra, missing = sorted(keys - want), sorted(want - keys)
                raise ValueError(
                    f"{path} does not match this run's trainable parameters "
                    f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})"
                )
            with torch.no_grad():
                for k in self.param_names:
                    named[k].copy_(reader.read(k).to(named[k].dtype))

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/checkpoint-<step>`` atomically, then prune to ``keep_last``."""
        acc = self.accelerator
        tmp = self.checkpoint_dir / f"{ckpt.checkpoint_name(self.step)}.tmp"
        if acc.is_main_process:
            tmp = ckpt.begin(self.checkpoint_dir, self.step)
        acc.wait_for_everyone()
        kwargs = {"exclude_frozen_parameters": True} if self._deepspeed else {}
        acc.save_state(str(tmp), **kwargs)
        final = tmp.with_name(ckpt.checkpoint_name(self.step))
        if acc.is_main_process:
            if self.ema is not None:
                shadow = {n: t for n, t in zip(self.param_names, self.ema.shadow_params)}
                ckpt.save_safetensors(shadow, tmp / ckpt.EMA_FILE,
                                      metadata={"format": "pt", "optimization_step": str(self.ema.optimization_step)})
            delay = _save_delay(self.step)
            if delay:
                (tmp / "SAVING").write_text("in progress")
                time.sleep(delay)
            ckpt.write_state(tmp, self._state_dict())
            final = ckpt.commit(tmp)
            ckpt.prune(self.checkpoint_dir, self.cfg.checkpoint.keep_last)
        acc.wait_for_everyone()
        self.last_checkpoint = final
        return final

    def _state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "num_processes": self.accelerator.num_processes,
            "distributed_type": self.accelerator.distributed_type.name,
            "global_batch": self.cfg.data.batch_size * self.accelerator.num_processes,
            "trainable_set": self.trainable_set,
            "trainable": self.trainable_names,
            "problems": self.problems.to_dict(),
            "config": self.cfg.to_dict(),
        }

    def load_checkpoint(self, path: Path) -> None:
        """Restore the state saved by :meth:`save_checkpoint`; the run must match it (mode, sets, data)."""
        state = ckpt.read_state(path)
        saved = state.get("config", {})
        if state.get("trainable_set", self.trainable_set) != self.trainable_set:
            raise ValueError(
                f"cannot resume from {path}: it trained the '{state['trainable_set']}' set but this run trains "
                f"'{self.trainable_set}' (to start a new run from its weights, export them and use model.init_connector / init_transformer)"
            )
        for key in RESUME_FIXED + (RESUME_FIXED_LORA if self.trainable_set == "lora" else ()):
            section, name = key.split(".")
            have = saved.get(section, {}).get(name)
            want = self.cfg.get(key)
            if have != want:
                raise ValueError(
                    f"cannot resume from {path}: it was trained with {key} = {have!r} but this run has {want!r} "
                    "(to start a new run from its weights, export them and use model.init_connector / init_transformer)"
                )
        check_resharding(state, path, self.cfg, self.accelerator.num_processes, self.accelerator.distributed_type.name)
        kwargs = {"load_module_strict": False} if self._deepspeed else {}
        self.accelerator.load_state(str(path), **kwargs)
        if self.ema is not None:
            ema_file = path / ckpt.EMA_FILE
            if ema_file.is_file():
                with CheckpointReader.open(ema_file) as reader:
                    self.ema.shadow_params = [reader.read(n).to(self.device) for n in self.param_names]
                    self.ema.optimization_step = int(reader.metadata.get("optimization_step", state["step"]))
            else:
                logger.warning("%s has no EMA weights: the EMA restarts from the current weights", path)
        self.step, self.epoch, self.batches_done = state["step"], state["epoch"], state["batches_done"]
        self.problems.load_dict(state.get("problems", {}))
        self.last_checkpoint = path
        logger.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------------------------
    # Validation
    # ------------------------------------------------------------------------------------
    def _prepare_validation(self, images: list) -> list[dict]:
        """Encode the validation pairs once (the encoders are frozen); ``images`` are the loaded
        pair images (:meth:`_load_validation_images`)."""
        cfg, comps, spec = self.cfg, self.components, self.spec
        items = []
        for pair, image in zip(cfg.validation.pairs, images):
            width, height = bucket_for(image.size[0], image.size[1], cfg.data.bucketing, cfg.data.resolution, cfg.data.ratios)
            vlm = None
            if spec.needs_qwen and not spec.queries:  # learned queries: encoded at each validation
                vlm = comps.qwen.encode([image], pair["instruction"])
                vlm = QwenFeatures(vlm.hidden.cpu())
            text = comps.text.encode(pair["instruction"], with_t5=spec.needs_t5)
            text = TextFeatures(t5=text.t5.cpu() if text.t5 is not None else None, pooled=text.pooled.cpu(),
                                pooled_empty=text.pooled_empty.cpu())
            items.append({"image": image, "instruction": pair["instruction"], "vlm": vlm, "text": text,
                          "reference": prepare_reference(image, (width, height)), "size": (width, height)})
        return items

    def validate(self) -> list[Path]:
        """Edit the validation pairs with the current weights; images go to validation/step-<N>/."""
        acc = self.accelerator
        written = []
        if acc.is_main_process and self.validation_inputs:
            cfg = self.cfg
            unwrapped = self.unwrapped
            connector, transformer = unwrapped.connector, unwrapped.transformer
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
            folder = self.output_dir / "validation" / f"step-{self.step}"
            folder.mkdir(parents=True, exist_ok=True)
            was_training = unwrapped.training
            unwrapped.eval()
            try:
                with torch.no_grad(), acc.autocast():
                    images = []
                    for i, item in enumerate(self.validation_inputs):
                        vlm = item["vlm"]
                        if vlm is None:
                            vlm = self.components.qwen.encode([item["image"]], item["instruction"], queries=connector.queries)
                        cond = fuse(self.mode, connector, vlm, item["text"])
                        w, h = item["size"]
                        request = resolve_edit(image_width=w, image_height=h, width=w, height=h, mode=self.mode,
                                               steps=cfg.validation.steps, guidance=cfg.validation.guidance,
                                               seed=cfg.validation.seed)
                        out = sample(KontextModels(transformer, self.components.vae, scheduler), cond, item["reference"],
                                     request, device=self.device)
                        pil = to_pil(out.float().cpu())[0]
                        path = folder / f"{i}.png"
                        atomic_write(path, lambda tmp, image=pil: image.save(tmp, format="PNG"))
                        written.append(path)
                        images.append(pil)
                for tracker in acc.trackers:
                    if hasattr(tracker, "log_images"):
                        try:  # a logging problem never stops a run
                            stacked = np.stack([np.asarray(p) for p in images]) if len({p.size for p in images}) == 1 else None
                            for j, p in enumerate(images if stacked is None else []):
                                tracker.log_images({f"validation/{j}": np.asarray(p)[None]}, self.step, dataformats="NHWC")
                            if stacked is not None:
                                tracker.log_images({"validation": stacked}, self.step, dataformats="NHWC")
                        except Exception as exc:  # noqa: BLE001
                            logger.warning("could not log validation images to %s: %s", type(tracker).__name__, exc)
            finally:
                unwrapped.train(was_training)
        acc.wait_for_everyone()
        return written

    # ------------------------------------------------------------------------------------
    # Export
    # ------------------------------------------------------------------------------------
    def export(self, out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
        """Write the trained weights for the engine and the nodes (every process calls it; the main
        one writes; see :mod:`.export`)."""
        cfg, acc = self.cfg, self.accelerator
        out = Path(out_dir or cfg.export.dir or self.output_dir / "export")
        files: dict[str, Path] = {}
        acc.wait_for_everyone()
        with self.full_parameters():
            if acc.is_main_process:
                files = self._export_main(out)
        acc.wait_for_everyone()
        return files

    def _export_main(self, out: Path) -> dict[str, Path]:
        cfg = self.cfg
        files: dict[str, Path] = {}
        out.mkdir(parents=True, exist_ok=True)
        unwrapped = self.unwrapped
        connector, transformer = unwrapped.connector, unwrapped.transformer
        use_ema = self.ema is not None and cfg.export.use_ema
        if use_ema:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
        try:
            dtype = cfg.export.dtype
            files["connector"] = ex.export_connector(connector, out / ex.CONNECTOR_FILE, dtype=dtype, mode=self.mode, step=self.step)
            if self.trainable_set == "lora":
                files["lora"] = ex.export_lora(transformer, out / ex.LORA_FILE, dtype=dtype)
                if cfg.export.merge_lora:
                    files["transformer"] = ex.export_transformer(transformer, out / ex.TRANSFORMER_FILE, dtype=dtype, step=self.step)
            elif self.trainable_set in ("image_attention", "full") and cfg.export.transformer:
                files["transformer"] = ex.export_transformer(transformer, out / ex.TRANSFORMER_FILE, dtype=dtype, step=self.step)
            if cfg.export.released_dir:
                # the Qwen weights as released, not an fp8-stored copy: reloaded when the run stored it small
                loaded = self.components.qwen and not cfg.model.gie and self.memory.encoders == "compute"
                qwen_model = self.components.qwen.model if loaded else None
                if not cfg.model.gie and qwen_model is None:
                    qwen_model = load_part("qwen", cfg.model.qwen, dtype=self.weight_dtype).module.model
                files["released_dir"] = ex.export_released_dir(
                    out / ex.RELEASED_DIR, connector=connector, transformer=transformer,
                    gie_dir=cfg.model.gie, qwen_model=qwen_model,
                    processor_dir=cfg.model.gie or cfg.model.qwen, dtype=dtype,
                )
        finally:
            if use_ema:
                self.ema.restore(self.params)
        info = {"step": self.step, "stage": cfg.train.stage, "mode": self.mode, "trainable": self.trainable_set,
                "ema": use_ema, "files": {k: str(v.name) for k, v in files.items()}, "sources": self.components.sources}
        atomic_write_text(out / ex.INFO_FILE, json.dumps(info, indent=2))
        return files


def _clean_name(name: str) -> str:
    """A parameter name without the wrapper levels FSDP / activation checkpointing insert."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def _save_delay(step: int) -> float:
    """``GIE_TRAIN_SAVE_DELAY=SECONDS`` pauses every save mid-way, ``SECONDS@STEP`` only the save of STEP."""
    value = os.environ.get(SLOW_SAVE_ENV, "").strip()
    if not value:
        return 0.0
    seconds, _, at = value.partition("@")
    if at and int(at) != step:
        return 0.0
    return float(seconds)


def _left_pad(hidden: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-pair Qwen features [L_i, H] -> [B, L_max, H] padded on the left (as the reference's
    left-padded Qwen input), and the mask [B, L_max] (None when nothing is padded)."""
    lengths = [h.shape[0] for h in hidden]
    longest = max(lengths)
    if all(n == longest for n in lengths):
        return torch.stack(hidden), None
    out = hidden[0].new_zeros(len(hidden), longest, hidden[0].shape[-1])
    mask = torch.zeros(len(hidden), longest, dtype=torch.bool, device=hidden[0].device)
    for i, h in enumerate(hidden):
        out[i, longest - h.shape[0]:] = h
        mask[i, longest - h.shape[0]:] = True
    return out, mask


def _flat_config(cfg: TrainConfig) -> dict:
    flat = {}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            for k, v in values.items():
                flat[f"{section}.{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
        else:
            flat[section] = values
    return flat


def train(config: TrainConfig) -> TrainResult:
    """Run one training of ``config`` and return what it did."""
    return Trainer(config).train()
