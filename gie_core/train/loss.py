"""The flow-matching loss of the reference trainer, as pure functions.

For target latents ``x0`` (VAE ``sample()``, normalised), noise ``eps`` and ``sigma``:

- ``sigma = sigmoid(N(mean, std))`` (logit-normal), then the resolution shift
  ``s * sigma / (1 + (s - 1) * sigma)`` with ``s = exp(mu)`` and ``mu = shift_mu(target tokens)``
  (:mod:`gie_core.engine.schedule`, the same code the sampler's schedule uses);
- ``x_t = (1 - sigma) x0 + sigma eps``; the target is ``v = eps - x0``;
- the transformer sees the packed ``x_t`` tokens followed by the reference latents' tokens (ids
  ``(1, row, col)``), ``timestep = sigma``, guidance 1.0 and the conditioning; its prediction is
  sliced back to the target tokens and unpacked;
- loss = mean over every latent element of ``weight * (prediction - v)^2`` (weight 1, or the
  region weight map broadcast over channels).

The packing and ids come from :mod:`gie_core.engine.sampler`, the shift from :mod:`gie_core.engine.schedule`,
as sampling uses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gie_core.engine.sampler import latent_ids, latents_in, pack_latents, reference_tokens, unpack_latents
from gie_core.engine.schedule import shift_mu, shift_sigmas


Generators = torch.Generator | list[torch.Generator] | None


def standard_normal(shape: tuple[int, ...], generator: Generators = None) -> torch.Tensor:
    """N(0, 1) float32 noise of ``shape`` on the CPU; with a list of generators, sample ``i`` of the
    batch (dimension 0) is drawn from ``generator[i]``, so a pair's draws do not depend on the
    batch it is in."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generator])
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def sample_sigmas(
    batch_size: int,
    image_seq_len: int,
    generator: Generators = None,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    scheduler_config: dict | None = None,
) -> torch.Tensor:
    """Logit-normal sigmas [B] with the resolution shift of ``image_seq_len`` target tokens
    (``generator``: one, or one per sample)."""
    u = standard_normal((batch_size,), generator)
    sigmas = torch.sigmoid(logit_mean + logit_std * u)
    return shift_sigmas(sigmas, shift_mu(image_seq_len, scheduler_config))


def normalize_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """Raw VAE latents -> the transformer's latent space: ``(z - shift) * scale``."""
    return latents_in(latents, vae_config.shift_factor, vae_config.scaling_factor)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, float32
    prediction: torch.Tensor  # [B, C, h, w], the transformer's velocity for the target tokens
    target: torch.Tensor  # [B, C, h, w], eps - x0


def flow_matching_loss(
    transformer,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    context: torch.Tensor,
    pooled: torch.Tensor,
    reference: torch.Tensor | None = None,
    *,
    guidance: float = 1.0,
    region_weight: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
) -> LossOutput:
    """The reference loss for one batch.

    Shapes: ``x0``, ``noise`` [B, C, h, w] (normalised latents); ``sigmas`` [B] (already shifted);
    ``context`` [B, L, D]; ``pooled`` [B, P]; ``reference`` [B, C, h', w'] normalised VAE mode
    latents of the source image, or None; ``region_weight`` [B, 1, h, w] or None;
    ``context_mask`` [B, L] bool (False = padding), or None when nothing is padded.
    """
    b, _, h, w = x0.shape
    s = sigmas.to(x0.dtype).view(b, 1, 1, 1)
    x_t = (1.0 - s) * x0 + s * noise
    target = noise - x0
    tokens = pack_latents(x_t)  # [B, N, C*4]
    n_target = tokens.shape[1]
    img_ids = latent_ids(h // 2, w // 2)
    if reference is not None:
        ref_tokens, ref_ids = reference_tokens([reference])
        tokens = torch.cat([tokens, ref_tokens.to(tokens.dtype)], dim=1)  # target first, reference after
        img_ids = torch.cat([img_ids, ref_ids], dim=0)
    device = tokens.device
    txt_ids = torch.zeros(context.shape[1], 3, device=device)
    kwargs = {}
    if context_mask is not None:
        # [B, 1, 1, L + N]: padded context tokens are never attended to
        joint = torch.cat([context_mask.to(device=device, dtype=torch.bool), torch.ones(b, tokens.shape[1], dtype=torch.bool, device=device)], 1)
        kwargs["joint_attention_kwargs"] = {"attention_mask": joint[:, None, None, :]}
    guidance_vec = torch.full((b,), float(guidance), device=device, dtype=torch.float32)
    out = transformer(
        hidden_states=tokens,
        timestep=sigmas.to(device),
        guidance=guidance_vec if transformer.config.guidance_embeds else None,
        pooled_projections=pooled,
        encoder_hidden_states=context,
        txt_ids=txt_ids,
        img_ids=img_ids.to(device),
        return_dict=False,
        **kwargs,
    )[0]
    prediction = unpack_latents(out[:, :n_target], h, w)  # slice back to the target tokens
    squared = (prediction.float() - target.float()) ** 2
    if region_weight is not None:
        squared = squared * region_weight.to(squared.device, torch.float32)
    return LossOutput(squared.mean(), prediction, target)
