"""The FLUX flow-matching schedule: the resolution shift ``mu`` and the timesteps of one run.

Sampling (:class:`Schedule`) and the trainer's loss (:func:`shift_sigmas` of logit-normal
sigmas) use the same shift code, so a model trained here is sampled at the noise levels it
was trained at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from gie_core.constants import BASE_IMAGE_SEQ_LEN, BASE_SHIFT, MAX_IMAGE_SEQ_LEN, MAX_SHIFT

__all__ = ["Schedule", "calculate_shift", "shift_mu", "shift_sigmas"]


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


def shift_mu(image_seq_len: int, scheduler_config=None) -> float:
    """``mu`` for ``image_seq_len`` target tokens, with a scheduler config's constants (FLUX's by default)."""
    cfg = scheduler_config or {}
    return calculate_shift(
        image_seq_len,
        cfg.get("base_image_seq_len", BASE_IMAGE_SEQ_LEN),
        cfg.get("max_image_seq_len", MAX_IMAGE_SEQ_LEN),
        cfg.get("base_shift", BASE_SHIFT),
        cfg.get("max_shift", MAX_SHIFT),
    )


def shift_sigmas(sigmas, mu: float):
    """FLUX's exponential time shift: ``s * sigma / (1 + (s - 1) * sigma)`` with ``s = exp(mu)``
    (what diffusers' FlowMatchEulerDiscreteScheduler does with ``use_dynamic_shifting``)."""
    s = math.exp(mu)
    return (sigmas * s) / (1 + (s - 1) * sigmas)


@dataclass
class Schedule:
    """The timesteps of one sampling run and the scheduler that steps through them.

    ``scheduler`` is a fresh copy of the model's (schedulers are stateful); ``mu`` is the shift
    of this run's ``image_seq_len`` target tokens; ``sigmas`` the unshifted linear sigmas
    ``1 .. 1/steps`` the reference passes in.
    """

    scheduler: object
    steps: int
    mu: float
    sigmas: np.ndarray

    @classmethod
    def create(cls, scheduler_template, steps: int, image_seq_len: int, device=None) -> Schedule:
        scheduler = type(scheduler_template).from_config(scheduler_template.config)
        sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = shift_mu(image_seq_len, scheduler.config)
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
        scheduler.set_begin_index(0)
        return cls(scheduler, steps, mu, sigmas)

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    def step(self, velocity: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """One Euler step of the flow ODE."""
        return self.scheduler.step(velocity, t, latents, return_dict=False)[0]
