"""Precomputed encoder features and VAE latents, so a run needs no encoder loaded.

One safetensors file per pair and bucket size, ``<cache_dir>/<key[:2]>/<key>-<W>x<H>.safetensors``:

- ``qwen`` [L, H]: Qwen2.5-VL last hidden states of (source, instruction); for a mode with
  learned queries (metaquery), which change during training, ``qwen_pixels`` [448, 448, 3] uint8
  (the Qwen input) instead;
- ``t5`` [256, D]: T5 tokens, when the mode needs T5 (its row in :mod:`gie_core.engine.modes`);
- ``pooled`` [P]: CLIP(instruction), when the mode's pooled vector is the instruction's;
- ``target_moments`` [2C, h, w]: the VAE posterior (mean, logvar) of the target, so each step
  still draws its own ``sample()`` as the reference does;
- ``reference`` [C, h, w]: normalised VAE mode latents of the source;
- ``region_weight`` [1, h, w] when the pair is region-weighted;

plus ``cache_info.json`` (what was cached, from which models, at which sizes) and
``empty_pooled.safetensors`` (CLIP("")). Files are written atomically; an interrupted cache run
resumes where it stopped. Sizes: about 2 MB per pair per feature in bf16 at 1024 px on the
real models (Qwen 3584 x ~290 tokens, T5 4096 x 256, latents 32 x 128 x 128).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from accelerate import PartialState
from tqdm.auto import tqdm

from gie_core.engine.modes import fusion_mode
from gie_core.engine.sampler import encode_reference
from gie_core.files import atomic_write_text
from gie_core.train.checkpoint import save_safetensors
from gie_core.train.data import EditDataset, EditRecord, ProblemLog, collate, read_dataset, usable_pairs
from gie_core.train.models import load_components
from gie_core.weights.loading import parse_dtype
from gie_core.weights.reader import CheckpointError, CheckpointReader

logger = logging.getLogger("gie_core.train")

CACHE_VERSION = 1


def cached_contents(mode: str, region_weighting: bool = True) -> tuple[str, ...]:
    """The tensors a cache for ``mode`` holds per pair, as its row in :mod:`gie_core.engine.modes` needs:
    Qwen features (or, for learned queries, the Qwen input pixels), T5 tokens, CLIP(instruction)."""
    spec = fusion_mode(mode)
    names = ["target_moments", "reference"]
    if spec.needs_qwen:
        names.append("qwen_pixels" if spec.queries else "qwen")
    if spec.needs_t5:
        names.append("t5")
    if spec.pooled_from == "instruction":
        names.append("pooled")
    return tuple(names)


class FeatureCache:
    """Read and write per-pair cached tensors under ``root``."""

    def __init__(self, root: str | os.PathLike, dtype: str | torch.dtype = "bf16"):
        self.root = Path(root)
        self.dtype = parse_dtype(dtype)

    @property
    def info_path(self) -> Path:
        return self.root / "cache_info.json"

    def path(self, record: EditRecord, size: tuple[int, int]) -> Path:
        key = record.key
        return self.root / key[:2] / f"{key}-{size[0]}x{size[1]}.safetensors"

    def has(self, record: EditRecord, size: tuple[int, int]) -> bool:
        return self.path(record, size).is_file()

    def write(self, record: EditRecord, size: tuple[int, int], tensors: dict[str, torch.Tensor]) -> Path:
        data = {k: v.detach().to("cpu", self.dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in tensors.items()}
        return save_safetensors(data, self.path(record, size), metadata={"format": "pt", "instruction": record.instruction[:500]})

    def read(self, record: EditRecord, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """The pair's tensors (float32); KeyError when the pair is not cached."""
        p = self.path(record, size)
        if not p.is_file():
            raise KeyError(f"pair {record.source.name} -> {record.target.name} at {size[0]}x{size[1]} is not in the cache {self.root}")
        try:
            with CheckpointReader.open(p) as reader:
                return {k: reader.read(k).float() for k in reader.keys()}
        except CheckpointError as exc:
            raise OSError(f"cache file {p} is corrupt: {exc}") from None

    # -- run-level files ---------------------------------------------------------------
    def write_info(self, info: dict) -> None:
        atomic_write_text(self.info_path, json.dumps({"version": CACHE_VERSION, **info}, indent=2))

    def read_info(self) -> dict:
        if not self.info_path.is_file():
            raise FileNotFoundError(f"{self.root} is not a feature cache (no cache_info.json); run 'gie-train cache' first")
        return json.loads(self.info_path.read_text(encoding="utf-8"))

    def write_empty_pooled(self, pooled: torch.Tensor) -> None:
        save_safetensors({"pooled_empty": pooled.detach().float().cpu()}, self.root / "empty_pooled.safetensors")

    def read_empty_pooled(self) -> torch.Tensor:
        with CheckpointReader.open(self.root / "empty_pooled.safetensors") as reader:
            return reader.read("pooled_empty").float()

    def check_compatible(self, expected: dict) -> dict:
        """Fail, naming the field, when the cache was made for other settings than this run's."""
        info = self.read_info()
        for key, want in expected.items():
            have = info.get(key)
            if key == "contents":
                missing = sorted(set(want) - set(have or ()))
                if missing:
                    raise ValueError(f"the cache in {self.root} lacks {', '.join(missing)} (made for mode '{info.get('mode')}'); rebuild it")
            elif have != want:
                raise ValueError(f"the cache in {self.root} was made with {key} = {have!r} but this run uses {want!r}; rebuild it or change {key}")
        return info


def cache_info_for(cfg) -> dict:
    """The settings a cache must match to serve a run of ``cfg``."""
    return {
        "bucketing": cfg.data.bucketing,
        "resolution": cfg.data.resolution,
        "ratios": cfg.data.ratios,
        "region_weighting": cfg.data.region_weighting,
        "weight_scheme": cfg.train.weight_scheme,
    }


def build_cache(cfg, *, progress: bool = True) -> dict:
    """Encode every pair of ``cfg``'s data into ``cfg.data.cache_dir`` (the ``gie-train cache`` command).

    Runs on every process of an ``accelerate launch`` (pairs are split between them); existing
    files are kept, so an interrupted run resumes. Returns counts.
    """
    if not cfg.data.cache_dir:
        raise ValueError("data.cache_dir is not set")
    state = PartialState()
    weight_dtype = parse_dtype(cfg.train.mixed_precision)
    if state.device.type == "cpu" and weight_dtype != torch.float32:
        weight_dtype = torch.float32
    cache = FeatureCache(cfg.data.cache_dir, cfg.data.cache_dtype)
    problems = ProblemLog()
    records = read_dataset(cfg.data.data_txt, problems, cfg.data.region_weighting)
    with state.main_process_first():
        records, buckets = usable_pairs(records, problems, cfg.data.bucketing, cfg.data.resolution, cfg.data.ratios,
                                        Path(cfg.data.cache_dir) / "data_index")
    contents = cached_contents(cfg.model.mode)
    comps = _load_encoders(cfg, weight_dtype, contents, state.device)
    if state.is_main_process:
        cache.write_empty_pooled(comps.text.clip_pooled([""])[0:1])
        cache.write_info({
            **cache_info_for(cfg),
            "mode": cfg.model.mode,
            "contents": list(contents),
            "qwen_hidden": comps.connector.input_hidden_size,
            "vae": {"shift_factor": comps.vae.config.shift_factor, "scaling_factor": comps.vae.config.scaling_factor},
            "models": {k: v for k, v in comps.sources.items()} | {"kontext": str(cfg.model.kontext)},
        })

    todo = [i for i in range(len(records)) if i % state.num_processes == state.process_index and not cache.has(records[i], buckets[i])]
    dataset = EditDataset(records, buckets, bucketing=cfg.data.bucketing, weight_scheme=cfg.train.weight_scheme)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, todo), batch_size=1, collate_fn=collate, num_workers=cfg.data.num_workers
    )
    written = 0
    with torch.no_grad():
        for batch in tqdm(loader, total=len(todo), desc="caching", disable=not (progress and state.is_local_main_process)):
            problems.extend(batch["bad"])
            if batch["skipped"]:  # no pair of its bucket loads (reported above): nothing to cache
                continue
            i = batch["index"][0]
            if cache.has(records[i], buckets[i]):  # a replacement pair that is already done
                continue
            cache.write(records[i], buckets[i], _encode_pair(batch, comps, contents, state.device))
            written += 1
    state.wait_for_everyone()
    if problems.total:
        logger.warning(problems.summary())
    return {"pairs": len(records), "written": written, "bad": problems.total}


def _load_encoders(cfg, weight_dtype: torch.dtype, contents: tuple[str, ...], device: torch.device):
    """The encoders the cache needs (VAE, CLIP, T5 if the mode uses it, Qwen if its features are
    cached), on ``device``."""
    comps = load_components(cfg, weight_dtype=weight_dtype, need_qwen="qwen" in contents, need_clip=True,
                            need_t5=fusion_mode(cfg.model.mode).needs_t5, need_vae=True)
    comps.vae.to(device)
    comps.text.clip.to(device)
    if comps.text.t5 is not None:
        comps.text.t5.to(device)
    if comps.qwen is not None:
        comps.qwen.model.to(device)
    return comps


def _encode_pair(batch: dict, comps, contents: tuple[str, ...], device: torch.device) -> dict[str, torch.Tensor]:
    """The cached tensors of the one pair of ``batch`` (a :func:`collate` batch of size 1)."""
    instruction = batch["instruction"][0]
    vae, text = comps.vae, comps.text
    dist = vae.encode(batch["target"].to(device, vae.dtype)).latent_dist
    tensors = {
        "target_moments": dist.parameters[0],
        "reference": encode_reference(vae, batch["source"], device)[0],
    }
    if "qwen" in contents:
        tensors["qwen"] = comps.qwen.encode(batch["qwen_image"], instruction).hidden[0]
    elif "qwen_pixels" in contents:  # learned queries: the Qwen input itself (the queries change while training)
        tensors["qwen_pixels"] = torch.from_numpy(np.asarray(batch["qwen_image"][0], dtype=np.uint8).copy())
    if "t5" in contents:
        tensors["t5"] = text.t5_tokens([instruction])[0]
    if "pooled" in contents:
        tensors["pooled"] = text.clip_pooled([instruction])[0]
    if batch["region_weight"] is not None:
        tensors["region_weight"] = batch["region_weight"][0]
    return tensors
