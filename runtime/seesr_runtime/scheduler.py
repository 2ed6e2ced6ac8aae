"""DDPM sampling in numpy, configured from the plain dict stored in the bundle manifest.

Reproduces diffusers' ``DDPMScheduler`` as SeeSR uses it (epsilon prediction,
``fixed_small`` variance, "leading" timesteps with ``steps_offset``), computing
in float32 as torch does. The variance noise is an argument, not drawn here, so
a caller can replay any random stream.

Twin: diffusers' ``DDPMScheduler`` (what the torch reference steps with, via
``seesr_export.reference.ddpm_step``); held equal by ``tests/test_runtime_parity.py``
(``test_scheduler_matches_diffusers``, ``test_scheduler_add_noise_matches_diffusers``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import OptionError
from .tensors import FloatArray


@dataclass(frozen=True)
class DDPMConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: list[float] | None = None
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> DDPMConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in known})


class DDPMScheduler:
    """``set_timesteps``, ``add_noise`` and ``step`` of a DDPM sampler."""

    init_noise_sigma = 1.0

    def __init__(self, config: DDPMConfig | dict[str, Any]):
        self.config = config if isinstance(config, DDPMConfig) else DDPMConfig.from_dict(config)
        c = self.config
        if c.prediction_type != "epsilon" or c.variance_type != "fixed_small":
            raise ValueError(
                f"only epsilon prediction with fixed_small variance is supported "
                f"(got {c.prediction_type}, {c.variance_type})"
            )
        self.betas = _betas(c)
        self.alphas_cumprod = np.cumprod(np.float32(1.0) - self.betas, dtype=np.float32)
        self.timesteps = np.array([], dtype=np.int64)
        self.num_inference_steps = 0

    def set_timesteps(self, steps: int) -> npt.NDArray[np.int64]:
        n = self.config.num_train_timesteps
        if not 1 <= steps <= n:
            raise ValueError(f"steps must be in 1..{n}, got {steps}")
        spacing = self.config.timestep_spacing
        t: npt.NDArray[np.floating] | npt.NDArray[np.integer]
        if spacing == "leading":
            t = (np.arange(steps) * (n // steps)).round()[::-1] + self.config.steps_offset
        elif spacing == "trailing":
            t = np.round(np.arange(n, 0, -n / steps)) - 1
        elif spacing == "linspace":
            t = np.linspace(0, n - 1, steps).round()[::-1]
        else:
            raise ValueError(f"unknown timestep_spacing {spacing!r}")
        if t.min() < 0 or t.max() >= n:  # diffusers would index past the schedule at the first step
            bad = int(t.max() if t.max() >= n else t.min())
            raise OptionError(
                f"steps {steps} reach timestep {bad} with this bundle's scheduler ({spacing} spacing, "
                f"steps_offset {self.config.steps_offset}), outside 0..{n - 1}"
            )
        self.timesteps = t.astype(np.int64)
        self.num_inference_steps = steps
        return self.timesteps

    def add_noise(self, original: FloatArray, noise: FloatArray, t: int) -> FloatArray:
        a: np.float32 = self.alphas_cumprod[t]
        return (a ** np.float32(0.5) * original + (np.float32(1.0) - a) ** np.float32(0.5) * noise).astype(np.float32)

    def previous_timestep(self, t: int) -> int:
        return t - self.config.num_train_timesteps // self.num_inference_steps

    def step(self, eps: FloatArray, t: int, sample: FloatArray, noise: FloatArray) -> FloatArray:
        """x_t -> x_{t-1}; ``noise`` (standard normal, like ``sample``) is scaled by the step's std."""
        prev_t = self.previous_timestep(t)
        one, half = np.float32(1.0), np.float32(0.5)
        a_t: np.float32 = self.alphas_cumprod[t]
        a_prev: np.float32 = self.alphas_cumprod[prev_t] if prev_t >= 0 else one
        beta_t = one - a_t / a_prev
        x0 = (sample - (one - a_t) ** half * eps) / a_t**half
        if self.config.clip_sample:
            r = np.float32(self.config.clip_sample_range)
            x0 = np.clip(x0, -r, r)
        mean = (a_prev**half * beta_t / (one - a_t)) * x0 + (
            (a_t / a_prev) ** half * (one - a_prev) / (one - a_t)
        ) * sample
        if t > 0:
            variance = max((one - a_prev) / (one - a_t) * beta_t, np.float32(1e-20))
            mean = mean + variance**half * noise
        return mean.astype(np.float32)


def _betas(c: DDPMConfig) -> FloatArray:
    n = c.num_train_timesteps
    if c.trained_betas is not None:
        return np.asarray(c.trained_betas, dtype=np.float32)
    if c.beta_schedule == "linear":
        return _linspace32(c.beta_start, c.beta_end, n)
    if c.beta_schedule == "scaled_linear":
        return _linspace32(c.beta_start**0.5, c.beta_end**0.5, n) ** 2
    raise ValueError(f"unsupported beta_schedule {c.beta_schedule!r}")


def _linspace32(start: float, end: float, n: int) -> FloatArray:
    # Like torch.linspace in float32 (stepping from both ends); agrees with it to a few ULP.
    first, last = np.float32(start), np.float32(end)
    step = (last - first) / np.float32(n - 1)
    i = np.arange(n, dtype=np.float32)
    front = first + step * i
    back = last - step * (np.float32(n - 1) - i)
    return np.where(np.arange(n) < n // 2, front, back).astype(np.float32)
