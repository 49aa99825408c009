"""FLUX.1 Kontext sampling over diffusers' FluxTransformer2DModel, VAE and FlowMatch scheduler.

Follows diffusers' ``FluxKontextPipeline`` step for step (so outputs match it to float
precision) with the reference system's choices: reference images as Kontext tokens (VAE
*mode* latents, ids with first coordinate 1, appended after the target tokens), dynamic
shift on the target tokens only, a guidance embedding, optional true CFG, and callbacks for
progress and interruption instead of any UI import.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .conditioning import Conditioning
from .constants import (
    BASE_IMAGE_SEQ_LEN,
    BASE_SHIFT,
    DEFAULT_GUIDANCE,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    DEFAULT_TRUE_CFG,
    MAX_IMAGE_SEQ_LEN,
    MAX_SHIFT,
)
from .images import check_output_size

ProgressFn = Callable[[int, int], None]  # (steps done, total steps)
InterruptFn = Callable[[], bool]  # True to stop (or raise its own exception)

REFERENCE_METHODS = ("index", "offset")


class SamplingInterrupted(RuntimeError):
    """Raised when the interrupt callback asked sampling to stop."""


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = BASE_IMAGE_SEQ_LEN,
    max_seq_len: int = MAX_IMAGE_SEQ_LEN,
    base_shift: float = BASE_SHIFT,
    max_shift: float = MAX_SHIFT,
) -> float:
    """FLUX's resolution-dependent shift ``mu``, linear in the number of target tokens."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)*(W/2), C*4] (2x2 patches as tokens)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """[B, (H/2)*(W/2), C*4] -> [B, C, H, W]."""
    b, _, d = tokens.shape
    x = tokens.view(b, latent_height // 2, latent_width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, latent_height, latent_width)


def latent_ids(token_rows: int, token_cols: int, index: float = 0.0, row_offset: int = 0, col_offset: int = 0) -> torch.Tensor:
    """Position ids [rows*cols, 3] = (index, row, col) of a packed latent grid."""
    ids = torch.zeros(token_rows, token_cols, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(token_rows)[:, None] + row_offset
    ids[..., 2] = torch.arange(token_cols)[None, :] + col_offset
    return ids.reshape(token_rows * token_cols, 3)


@dataclass
class KontextModels:
    """The three parts sampling needs. ``scheduler`` is copied per run (it is stateful)."""

    transformer: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object


def _vae_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_reference(vae, image: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> normalised VAE mode latents [B, 16, H/8, W/8]."""
    vae_dtype = next(vae.parameters()).dtype
    latents = vae.encode(image.to(device=device, dtype=vae_dtype)).latent_dist.mode()
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [B, 16, h, w] -> images [B, H, W, 3] in 0..1."""
    vae_dtype = next(vae.parameters()).dtype
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    image = vae.decode(latents.to(vae_dtype), return_dict=False)[0]
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()


def reference_tokens(
    reference_latents: Sequence[torch.Tensor], method: str = "index"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack reference latents [B, 16, h, w] into tokens [B, N, 64] and ids [N, 3].

    One reference gets first id coordinate 1 (as Kontext was trained). Several: ``index``
    gives reference i the coordinate i+1; ``offset`` keeps 1 and places them side by side
    in (row, col) space, as ComfyUI's FluxKontextMultiReferenceLatentMethod does.
    """
    if method not in REFERENCE_METHODS:
        raise ValueError(f"reference method '{method}' is unknown; expected one of {', '.join(REFERENCE_METHODS)}")
    tokens, ids = [], []
    h_used = w_used = 0
    for i, lat in enumerate(reference_latents):
        rows, cols = lat.shape[2] // 2, lat.shape[3] // 2
        row_off = col_off = 0
        if method == "index":
            index = i + 1
        else:
            index = 1
            if rows + h_used > cols + w_used:
                col_off = w_used
            else:
                row_off = h_used
            h_used = max(h_used, rows + row_off)
            w_used = max(w_used, cols + col_off)
        tokens.append(pack_latents(lat))
        ids.append(latent_ids(rows, cols, index, row_off, col_off))
    return torch.cat(tokens, dim=1), torch.cat(ids, dim=0)


class _InterruptHooks:
    """Checks the interrupt callback before every transformer block, so a stop request is
    honoured within a step rather than only between steps."""

    def __init__(self, transformer, interrupt: InterruptFn | None):
        self.handles = []
        if interrupt is None:
            return

        def check(*_):
            if interrupt():
                raise SamplingInterrupted("sampling was interrupted")

        for name in ("transformer_blocks", "single_transformer_blocks"):
            for block in getattr(transformer, name, []):
                self.handles.append(block.register_forward_pre_hook(check))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


class _RopeCache:
    """Reuse the rotary tables across steps: the token ids never change during one sampling
    run, but the transformer recomputes cos/sin from them on every call (and twice per step
    with true CFG). Restored on exit."""

    def __init__(self, transformer):
        self.pos_embed = getattr(transformer, "pos_embed", None)
        self.ids = self.value = None

    def __enter__(self):
        if self.pos_embed is not None:
            original = self.pos_embed.forward

            def cached(ids):
                if self.ids is None or self.ids.shape != ids.shape or not torch.equal(self.ids, ids):
                    self.ids, self.value = ids.clone(), original(ids)
                return self.value

            self.pos_embed.forward = cached
        return self

    def __exit__(self, *exc):
        if self.pos_embed is not None:
            del self.pos_embed.forward  # back to the class's forward
        self.ids = self.value = None


def make_noise(batch_size: int, channels: int, latent_height: int, latent_width: int, seed: int) -> torch.Tensor:
    """Initial noise from a CPU generator, so a seed gives the same image on any device."""
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn((batch_size, channels, latent_height, latent_width), generator=generator, dtype=torch.float32)


@torch.inference_mode()
def sample(
    models: KontextModels,
    positive: Conditioning,
    references: torch.Tensor | Sequence[torch.Tensor] | None,
    *,
    width: int,
    height: int,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    seed: int = DEFAULT_SEED,
    batch_size: int = 1,
    true_cfg: float = DEFAULT_TRUE_CFG,
    negative: Conditioning | None = None,
    reference_method: str = "index",
    cfg_batch: bool = True,
    device: torch.device | str | None = None,
    noise: torch.Tensor | None = None,
    progress: ProgressFn | None = None,
    interrupt: InterruptFn | None = None,
    output: str = "image",
) -> torch.Tensor:
    """Edit: denoise a ``width`` x ``height`` image conditioned on ``positive`` and the references.

    ``references``: [B_ref, 3, H, W] in [-1, 1] (see ``images.prepare_reference``), or a list of
    such for several references per image, or None for plain text-to-image. ``B_ref`` is 1
    (shared) or ``batch_size``. Returns images [B, H, W, 3] in 0..1 (``output="latent"``: the
    normalised latents [B, 16, H/8, W/8]). With true CFG and ``cfg_batch``, the positive and
    negative predictions run as one batch when their token counts match (turn it off to halve
    activation memory on small cards).
    """
    check_output_size(width, height)
    if steps < 1:
        raise ValueError(f"steps is {steps} but must be at least 1")
    if batch_size < 1:
        raise ValueError(f"batch size is {batch_size} but must be at least 1")
    do_cfg = true_cfg > 1.0
    if do_cfg and negative is None:
        raise ValueError(f"true CFG scale {true_cfg} needs a negative conditioning")

    transformer, vae = models.transformer, models.vae
    device = torch.device(device) if device is not None else next(transformer.parameters()).device
    dtype = next(transformer.parameters()).dtype
    factor = _vae_factor(vae)
    channels = transformer.config.in_channels // 4
    lat_h, lat_w = 2 * (height // (factor * 2)), 2 * (width // (factor * 2))

    pos = positive.expand(batch_size).to(device, dtype)
    neg = negative.expand(batch_size).to(device, dtype) if do_cfg else None
    if "guidance" in positive.extra and positive.extra["guidance"] is not None:
        guidance = float(positive.extra["guidance"])  # ComfyUI's FluxGuidance sets it on the conditioning

    # Reference tokens: encoded once, shared by every step.
    ref_tokens = ref_ids = None
    if references is not None:
        ref_list = [references] if torch.is_tensor(references) else list(references)
        latents_list = []
        for i, ref in enumerate(ref_list):
            if ref.ndim != 4 or ref.shape[1] != 3:
                raise ValueError(f"reference {i} must be [batch, 3, H, W] in [-1, 1] but is {tuple(ref.shape)}")
            lat = encode_reference(vae, ref, device).to(dtype)
            if lat.shape[0] not in (1, batch_size):
                raise ValueError(f"reference {i} has batch {lat.shape[0]} but {batch_size} images are being made")
            latents_list.append(lat.expand(batch_size, -1, -1, -1) if lat.shape[0] == 1 else lat)
        ref_tokens, ref_ids = reference_tokens(latents_list, reference_method)
        ref_tokens, ref_ids = ref_tokens.to(device, dtype), ref_ids.to(device, dtype)

    if noise is None:
        noise = make_noise(batch_size, channels, lat_h, lat_w, seed)
    latents = pack_latents(noise.to(device=device, dtype=dtype))  # [B, N_target, 64]
    n_target = latents.shape[1]
    ids = latent_ids(lat_h // 2, lat_w // 2).to(device, dtype)
    if ref_ids is not None:
        ids = torch.cat([ids, ref_ids], dim=0)  # target first, references after
    txt_ids = torch.zeros(pos.context.shape[1], 3, device=device, dtype=dtype)
    neg_txt_ids = torch.zeros(neg.context.shape[1], 3, device=device, dtype=dtype) if do_cfg else None

    scheduler = type(models.scheduler).from_config(models.scheduler.config)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    cfg = scheduler.config
    mu = calculate_shift(
        n_target,
        cfg.get("base_image_seq_len", BASE_IMAGE_SEQ_LEN),
        cfg.get("max_image_seq_len", MAX_IMAGE_SEQ_LEN),
        cfg.get("base_shift", BASE_SHIFT),
        cfg.get("max_shift", MAX_SHIFT),
    )
    scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
    scheduler.set_begin_index(0)
    timesteps = scheduler.timesteps

    guidance_vec = (
        torch.full([batch_size], guidance, device=device, dtype=torch.float32)
        if transformer.config.guidance_embeds
        else None
    )

    def predict(model_input, t, context, pooled, tids, guid):
        out = transformer(
            hidden_states=model_input,
            timestep=t / 1000,
            guidance=guid,
            pooled_projections=pooled,
            encoder_hidden_states=context,
            txt_ids=tids,
            img_ids=ids,
            return_dict=False,
        )[0]
        return out[:, :n_target]  # slice the prediction back to the target tokens

    joint_cfg = do_cfg and cfg_batch and neg.context.shape[1] == pos.context.shape[1]
    if joint_cfg:
        both_context = torch.cat([pos.context, neg.context])  # [2B, L, D]
        both_pooled = torch.cat([pos.pooled, neg.pooled])
        both_guidance = guidance_vec.repeat(2) if guidance_vec is not None else None

    total = len(timesteps)
    with _InterruptHooks(transformer, interrupt), _RopeCache(transformer):
        for i, t in enumerate(timesteps):
            if interrupt is not None and interrupt():
                raise SamplingInterrupted("sampling was interrupted")
            model_input = latents if ref_tokens is None else torch.cat([latents, ref_tokens], dim=1)
            if joint_cfg:
                tt = t.expand(2 * batch_size).to(dtype)
                noise_pred, neg_pred = predict(
                    model_input.repeat(2, 1, 1), tt, both_context, both_pooled, txt_ids, both_guidance
                ).chunk(2)
                noise_pred = neg_pred + true_cfg * (noise_pred - neg_pred)
            else:
                tt = t.expand(batch_size).to(dtype)
                noise_pred = predict(model_input, tt, pos.context, pos.pooled, txt_ids, guidance_vec)
                if do_cfg:
                    neg_pred = predict(model_input, tt, neg.context, neg.pooled, neg_txt_ids, guidance_vec)
                    noise_pred = neg_pred + true_cfg * (noise_pred - neg_pred)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if progress is not None:
                progress(i + 1, total)

    latents = unpack_latents(latents, lat_h, lat_w)
    if output == "latent":
        return latents
    return decode_latents(vae, latents)
