"""FLUX.1 Kontext sampling over diffusers' FluxTransformer2DModel, VAE and FlowMatch scheduler.

Follows diffusers' ``FluxKontextPipeline`` step for step (so outputs match it to float
precision) with the reference system's choices: reference images as Kontext tokens (VAE
*mode* latents, ids with first coordinate 1, appended after the target tokens), dynamic
shift on the target tokens only, a guidance embedding, optional true CFG, and callbacks for
progress and interruption instead of any UI import.

A run is three parts: :func:`prepare` (noise, ids, reference tokens, the :class:`Schedule`),
:func:`denoise` (the step loop) and :func:`decode`; :func:`sample` chains them. The run's values
come whole in one :class:`gie_core.engine.request.EditRequest` from
:func:`gie_core.engine.request.resolve_edit`, checked there and trusted here; only tensors
(conditioning, references, noise), the device and the callbacks travel beside it. The step loop
runs under the request's speed choices (:mod:`gie_core.engine.acceleration`: step cache,
attention backend, compiled blocks); with the defaults it is the plain loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from gie_core.constants import DEFAULT_REFERENCE_METHOD, FLUX_VAE_SCALING, FLUX_VAE_SHIFT, REFERENCE_METHODS
from gie_core.engine.acceleration import accelerated
from gie_core.engine.conditioning import Conditioning
from gie_core.engine.request import EditRequest
from gie_core.engine.schedule import Schedule

ProgressFn = Callable[[int, int], None]  # (steps done, total steps)
PreviewFn = Callable[[int, int, torch.Tensor], None]  # (steps done, total, predicted clean latents [B, 16, h, w])
InterruptFn = Callable[[], bool]  # True to stop (or raise its own exception)


class SamplingInterrupted(RuntimeError):
    """Raised when the interrupt callback asked sampling to stop."""


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
    if hasattr(vae, "encode_latents"):  # a latent codec (e.g. ComfyUI's own VAE, adapted by the nodes)
        return int(vae.downscale_factor)
    return 2 ** (len(vae.config.block_out_channels) - 1)


# A VAE is a diffusers AutoencoderKL, or any "latent codec": an object with ``downscale_factor``,
# ``encode_latents([B, 3, H, W] in [-1, 1]) -> normalised latents`` and
# ``decode_latents(normalised latents) -> [B, H, W, 3] in 0..1`` (the nodes adapt ComfyUI's VAE so).


def latents_in(raw: torch.Tensor, shift: float = FLUX_VAE_SHIFT, scale: float = FLUX_VAE_SCALING) -> torch.Tensor:
    """Raw VAE latents -> the transformer's latent space, ``(z - shift) * scale`` (what native
    Flux calls ``process_latent_in``)."""
    return (raw - shift) * scale


def latents_out(latents: torch.Tensor, shift: float = FLUX_VAE_SHIFT, scale: float = FLUX_VAE_SCALING) -> torch.Tensor:
    """The inverse of :func:`latents_in`."""
    return latents / scale + shift


@torch.no_grad()
def encode_reference(vae, image: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> normalised VAE mode latents [B, 16, H/8, W/8]."""
    if hasattr(vae, "encode_latents"):
        return vae.encode_latents(image).to(device)
    vae_dtype = next(vae.parameters()).dtype
    latents = vae.encode(image.to(device=device, dtype=vae_dtype)).latent_dist.mode()
    return latents_in(latents, vae.config.shift_factor, vae.config.scaling_factor)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [B, 16, h, w] -> images [B, H, W, 3] in 0..1."""
    if hasattr(vae, "decode_latents"):
        return vae.decode_latents(latents).float()
    vae_dtype = next(vae.parameters()).dtype
    latents = latents_out(latents, vae.config.shift_factor, vae.config.scaling_factor)
    image = vae.decode(latents.to(vae_dtype), return_dict=False)[0]
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()


def reference_tokens(
    reference_latents: Sequence[torch.Tensor], method: str = DEFAULT_REFERENCE_METHOD
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

        if hasattr(torch, "compiler") and hasattr(torch.compiler, "disable"):
            check = torch.compiler.disable(check)  # compiled blocks call it eagerly, never trace it

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


@dataclass
class Prepared:
    """Everything the step loop needs, on the device, and the request it runs. Token shapes:
    latents [B, N_target, 64], reference tokens [B, N_ref, 64], ids [N_target + N_ref, 3]."""

    request: EditRequest
    latents: torch.Tensor
    ref_tokens: torch.Tensor | None
    ids: torch.Tensor
    txt_ids: torch.Tensor
    neg_txt_ids: torch.Tensor | None
    positive: Conditioning
    negative: Conditioning | None
    guidance: torch.Tensor | None  # [B] float32, None when the model has no guidance embedding
    schedule: Schedule
    latent_height: int
    latent_width: int

    @property
    def n_target(self) -> int:
        return self.latents.shape[1]

    @property
    def batch_size(self) -> int:
        return self.request.batch_size

    @property
    def do_cfg(self) -> bool:
        return self.request.do_true_cfg


@torch.inference_mode()
def prepare(
    models: KontextModels,
    positive: Conditioning,
    references: torch.Tensor | Sequence[torch.Tensor] | None,
    request: EditRequest,
    *,
    negative: Conditioning | None = None,
    device: torch.device | str | None = None,
    noise: torch.Tensor | None = None,
    reference_latents: Sequence[torch.Tensor] | None = None,
) -> Prepared:
    """Noise, ids, reference tokens (VAE-encoded once) and the schedule of one ``request``.

    ``negative``: the negative conditioning (needed when the request has true CFG).
    ``reference_latents``: references already encoded (normalised latents [B, 16, h, w], e.g.
    from ComfyUI's ReferenceLatent), placed after the ``references`` images'. ``noise``: the
    initial noise [B, 16, h, w] instead of the request seed's."""
    if not isinstance(request, EditRequest):
        raise TypeError(f"request must be an EditRequest from gie_core.engine.request.resolve_edit, not {type(request).__name__}")
    if request.do_true_cfg and negative is None:
        raise ValueError(f"the request has true CFG scale {request.true_cfg:g} but no negative conditioning is given")
    transformer, batch = models.transformer, request.batch_size
    device = torch.device(device) if device is not None else next(transformer.parameters()).device
    dtype = next(transformer.parameters()).dtype
    factor = _vae_factor(models.vae)
    channels = transformer.config.in_channels // 4
    lat_h, lat_w = 2 * (request.height // (factor * 2)), 2 * (request.width // (factor * 2))

    pos = positive.expand(batch).to(device, dtype)
    neg = negative.expand(batch).to(device, dtype) if request.do_true_cfg else None
    ref_tokens, ref_ids = _reference_inputs(models.vae, references, reference_latents, request, channels, device, dtype)
    if noise is None:
        noise = make_noise(batch, channels, lat_h, lat_w, request.seed)
    latents = pack_latents(noise.to(device=device, dtype=dtype))  # [B, N_target, 64]
    ids = latent_ids(lat_h // 2, lat_w // 2).to(device, dtype)
    if ref_ids is not None:
        ids = torch.cat([ids, ref_ids], dim=0)  # target first, references after
    txt_ids = torch.zeros(pos.context.shape[1], 3, device=device, dtype=dtype)
    neg_txt_ids = torch.zeros(neg.context.shape[1], 3, device=device, dtype=dtype) if neg is not None else None
    schedule = Schedule.create(models.scheduler, request.steps, latents.shape[1], device)
    guidance = _guidance_vector(transformer, positive, request, device)
    return Prepared(request, latents, ref_tokens, ids, txt_ids, neg_txt_ids, pos, neg, guidance, schedule, lat_h, lat_w)


def _guidance_vector(transformer, positive: Conditioning, request: EditRequest, device) -> torch.Tensor | None:
    """The guidance embedding's input [B] (float32), None when the model has no guidance embedding.
    A guidance set on the conditioning (ComfyUI's FluxGuidance) wins over the request's."""
    if not transformer.config.guidance_embeds:
        return None
    guidance = request.guidance
    if positive.extra.get("guidance") is not None:
        guidance = float(positive.extra["guidance"])
    return torch.full([request.batch_size], guidance, device=device, dtype=torch.float32)


def _reference_inputs(vae, references, reference_latents, request: EditRequest, channels: int, device, dtype):
    """Reference tokens [B, N_ref, 64] and ids [N_ref, 3] (None, None without references): the
    images VAE-encoded, then the latents given encoded, each a shared one or one per image made,
    placed by the request's reference method."""
    batch = request.batch_size
    ref_list = [] if references is None else [references] if torch.is_tensor(references) else list(references)
    latents_list = []
    for i, ref in enumerate(ref_list):
        if ref.ndim != 4 or ref.shape[1] != 3:
            raise ValueError(f"reference {i} must be [batch, 3, H, W] in [-1, 1] but is {tuple(ref.shape)}")
        latents_list.append(encode_reference(vae, ref, device).to(dtype))
    for i, lat in enumerate(reference_latents or (), start=len(ref_list)):
        if lat.ndim != 4 or lat.shape[1] != channels or lat.shape[2] % 2 or lat.shape[3] % 2:
            raise ValueError(
                f"reference latent {i - len(ref_list)} must be [batch, {channels}, h, w] with even h, w "
                f"but is {tuple(lat.shape)}"
            )
        latents_list.append(lat.to(device=device, dtype=dtype))
    for i, lat in enumerate(latents_list):
        if lat.shape[0] not in (1, batch):
            raise ValueError(f"reference {i} has batch {lat.shape[0]} but {batch} images are being made")
        latents_list[i] = lat.expand(batch, -1, -1, -1) if lat.shape[0] == 1 else lat
    if not latents_list:
        return None, None
    tokens, ids = reference_tokens(latents_list, request.reference_method)
    return tokens.to(device, dtype), ids.to(device, dtype)


def _joint_cfg_inputs(run: Prepared):
    """With true CFG and the request's ``cfg_batch``, the positive and negative conditioning as
    one batch (context [2B, L, D], pooled [2B, P], guidance [2B]) when their token counts match;
    None when the two predictions run apart."""
    pos, neg = run.positive, run.negative
    if not (run.do_cfg and run.request.cfg_batch and neg.context.shape[1] == pos.context.shape[1]):
        return None
    guidance = run.guidance.repeat(2) if run.guidance is not None else None
    return torch.cat([pos.context, neg.context]), torch.cat([pos.pooled, neg.pooled]), guidance


def _velocity(transformer, run: Prepared, fast, i: int, t: torch.Tensor, latents: torch.Tensor, joint) -> torch.Tensor:
    """The velocity of step ``i`` at timestep ``t`` for the target tokens [B, N_target, 64],
    true-CFG guided when the request asks for it (``joint``: see :func:`_joint_cfg_inputs`)."""
    batch, dtype = run.batch_size, run.latents.dtype
    model_input = latents if run.ref_tokens is None else torch.cat([latents, run.ref_tokens], dim=1)

    def predict(x, tt, context, pooled, tids, guid, call="cond"):
        with fast.call(call, i, tt):  # the step cache's context: which call, which step
            out = transformer(hidden_states=x, timestep=tt / 1000, guidance=guid, pooled_projections=pooled,
                              encoder_hidden_states=context, txt_ids=tids, img_ids=run.ids, return_dict=False)[0]
        return out[:, :run.n_target]  # slice the prediction back to the target tokens

    if joint is not None:
        context, pooled, guidance = joint
        tt = t.expand(2 * batch).to(dtype)
        pred, neg_pred = predict(model_input.repeat(2, 1, 1), tt, context, pooled, run.txt_ids, guidance).chunk(2)
    else:
        tt = t.expand(batch).to(dtype)
        pred = predict(model_input, tt, run.positive.context, run.positive.pooled, run.txt_ids, run.guidance)
        if not run.do_cfg:
            return pred
        neg = run.negative
        neg_pred = predict(model_input, tt, neg.context, neg.pooled, run.neg_txt_ids, run.guidance, "uncond")
    return neg_pred + run.request.true_cfg * (pred - neg_pred)


@torch.inference_mode()
def denoise(
    transformer,
    run: Prepared,
    *,
    progress: ProgressFn | None = None,
    interrupt: InterruptFn | None = None,
    preview: PreviewFn | None = None,
) -> torch.Tensor:
    """The step loop of ``run`` (under its request's speed choices: step cache, attention
    backend, compiled blocks, see :mod:`gie_core.engine.acceleration`). Returns the normalised
    latents [B, 16, H/8, W/8].

    ``preview`` gets, after each step, the clean latents the step predicts
    (``x0 = x_t - sigma * velocity``, normalised, as ComfyUI's previewers take them)."""
    latents = run.latents
    joint = _joint_cfg_inputs(run)
    timesteps = run.schedule.timesteps
    total = len(timesteps)
    with _InterruptHooks(transformer, interrupt), _RopeCache(transformer), \
            accelerated(transformer, run.request.acceleration, steps=total, device=latents.device) as fast:
        for i, t in enumerate(timesteps):
            if interrupt is not None and interrupt():
                raise SamplingInterrupted("sampling was interrupted")
            velocity = _velocity(transformer, run, fast, i, t, latents, joint)
            if preview is not None:  # x_t = (1 - s) x0 + s eps and v = eps - x0, so x0 = x_t - s v
                x0 = latents.float() - (t.float() / 1000) * velocity.float()
                preview(i + 1, total, unpack_latents(x0, run.latent_height, run.latent_width))
            latents = run.schedule.step(velocity, t, latents)
            if progress is not None:
                progress(i + 1, total)
    return unpack_latents(latents, run.latent_height, run.latent_width)


decode = decode_latents


def sample(
    models: KontextModels,
    positive: Conditioning,
    references: torch.Tensor | Sequence[torch.Tensor] | None,
    request: EditRequest,
    *,
    negative: Conditioning | None = None,
    device: torch.device | str | None = None,
    noise: torch.Tensor | None = None,
    reference_latents: Sequence[torch.Tensor] | None = None,
    output: str = "image",
    progress: ProgressFn | None = None,
    interrupt: InterruptFn | None = None,
    preview: PreviewFn | None = None,
) -> torch.Tensor:
    """Edit: denoise the ``request``'s image conditioned on ``positive`` and the references.

    ``request``: a :class:`gie_core.engine.request.EditRequest` from
    :func:`gie_core.engine.request.resolve_edit`, carrying every value of the run (size, steps,
    guidance, seed, batch, true CFG, reference method, speed choices); it was checked there and
    is not checked again. ``references``: [B_ref, 3, H, W] in [-1, 1] (see
    ``images.prepare_reference``), or a list of such for several references per image, or None
    for plain text-to-image. ``B_ref`` is 1 (shared) or the request's batch. ``negative``: the
    negative conditioning for true CFG. Returns images [B, H, W, 3] in 0..1
    (``output="latent"``: the normalised latents [B, 16, H/8, W/8]).
    """
    if output not in ("image", "latent"):
        raise ValueError(f"output '{output}' is unknown; expected 'image' or 'latent'")
    run = prepare(models, positive, references, request, negative=negative, device=device, noise=noise,
                  reference_latents=reference_latents)
    latents = denoise(models.transformer, run, progress=progress, interrupt=interrupt, preview=preview)
    return latents if output == "latent" else decode(models.vae, latents)
