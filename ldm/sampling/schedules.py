"""Noise schedules: the DDPM training schedule, sigma <-> timestep conversion, timestep spacings and the sigma
schedules the samplers run on.

Notation (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"; Karras et al. 2022, "Elucidating the Design
Space of Diffusion-Based Generative Models", EDM):

| symbol  | code              | meaning                                                                      |
|---------|-------------------|------------------------------------------------------------------------------|
| T       | `num_timesteps`   | number of training timesteps (1000 for SD)                                   |
| t       | `t`               | training timestep, 0 .. T-1; real-valued between the integers                |
| β_t     | `betas`           | per-step noise variance of the forward process (Ho et al. eq. 2)             |
| ᾱ_t     | `alphas_cumprod`  | Π_{s<=t} (1 - β_s) (Ho et al. eq. 4: x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε)   |
| σ       | `sigma`           | variance-exploding noise level sqrt((1 - ᾱ_t) / ᾱ_t), so x_t / sqrt(ᾱ_t) = x_0 + σ ε |
| λ       | `-log(sigma)`     | half the log signal-to-noise ratio, DPM-Solver's λ                           |

Everything here is computed in float64 on the CPU and returned as float64 tensors; callers cast. Schedules are
plain functions: no object keeps a step counter.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ldm.config import ScheduleConfig

Spacing = Literal["leading", "trailing", "linspace"]
SigmaSchedule = Literal["discrete", "normal", "karras", "exponential"]
FinalSigma = Literal["zero", "sigma_min"]

# The SD training schedule: "scaled linear" betas from 0.00085 to 0.012 over 1000 steps (CompVis
# `linear_start`/`linear_end`). `ScheduleConfig()`'s defaults are exactly these constants.
SD_SCHEDULE = ScheduleConfig()
KARRAS_RHO = 7.0        # EDM eq. (5), the value Karras et al. found best
LEADING_OFFSET = 1      # CompVis DDIM grid `range(0, T, T // S) + 1` (diffusers' `steps_offset=1`)


# --- the training schedule ------------------------------------------------------------------------------

def betas_for(cfg: ScheduleConfig = SD_SCHEDULE) -> Tensor:
    """β_1..β_T in float64. "scaled_linear" is linear in sqrt(β) (CompVis `make_beta_schedule("linear")`, which
    despite its name squares a linspace of square roots); "linear" is linear in β (Ho et al. 2020 §4)."""
    n = cfg.num_timesteps
    if cfg.beta_schedule == "scaled_linear":
        return torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n, dtype=torch.float64) ** 2
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float64)
    raise ValueError(f"unknown beta_schedule {cfg.beta_schedule!r}; expected 'scaled_linear' or 'linear'")


def alphas_cumprod_for(cfg: ScheduleConfig = SD_SCHEDULE) -> Tensor:
    """ᾱ_t = Π_{s<=t} (1 - β_s) (Ho et al. 2020, eq. 4 notation), float64, shape (T,)."""
    return torch.cumprod(1.0 - betas_for(cfg), dim=0)


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """σ_t = sqrt((1 - ᾱ_t) / ᾱ_t): the VE noise level of each training timestep, increasing in t."""
    ac = alphas_cumprod.to(torch.float64)
    return ((1.0 - ac) / ac).sqrt()


# --- sigma <-> t by log-sigma interpolation ---------------------------------------------------------------

def sigma_to_t(sigma: Tensor, log_sigmas: Tensor) -> Tensor:
    """The real-valued timestep whose σ is `sigma`, interpolating linearly in log σ between the integer timesteps
    (k-diffusion `DiscreteSchedule.sigma_to_t`). Clamped to [0, T-1]; σ = 0 maps to t = 0."""
    log_sigmas = log_sigmas.to(torch.float64)
    log_sigma = torch.as_tensor(sigma, dtype=torch.float64).clamp(min=1e-30).log()
    # log_sigmas increases with t; low is the last timestep with log σ_low <= log σ.
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((log_sigma - lo) / (hi - lo)).clamp(0.0, 1.0)
    return low.to(torch.float64) + w


def t_to_sigma(t: Tensor, log_sigmas: Tensor) -> Tensor:
    """σ at a real-valued timestep t: linear interpolation of log σ between the neighbouring integer timesteps
    (k-diffusion `DiscreteSchedule.t_to_sigma`). The inverse of `sigma_to_t` on [0, T-1]."""
    log_sigmas = log_sigmas.to(torch.float64)
    t = torch.as_tensor(t, dtype=torch.float64).clamp(0, len(log_sigmas) - 1)
    low = t.floor().long().clamp(max=len(log_sigmas) - 2)
    w = t - low
    return ((1.0 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()


# --- timestep spacings (discrete samplers) and sigma schedules (k-samplers) -------------------------------

def timesteps(kind: Spacing, steps: int, num_train: int = 1000) -> Tensor:
    """`steps` training timesteps, descending, float64 (Lin et al. 2023, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Table 2):

    - "leading": the CompVis DDIM grid, k * (T // S) + 1 for k = 0..S-1 (diffusers `steps_offset=1`). CompVis
      builds it as `range(0, T, T // S) + 1`, which has one element more than S when S does not divide T
      evenly enough (S = 3 gives 4 steps); like diffusers, this always gives exactly S.
    - "trailing": round(T - k * T / S) - 1 for k = 0..S-1, so the first step is at t = T - 1.
    - "linspace": S points evenly spaced from T - 1 to 0, not rounded (k-diffusion's "normal" schedule).
    """
    if not 1 <= steps <= num_train:
        raise ValueError(f"steps must be in [1, {num_train}], got {steps}")
    k = torch.arange(steps, dtype=torch.float64)  # k = 0 is the noisiest step
    if kind == "leading":
        return (steps - 1 - k) * (num_train // steps) + LEADING_OFFSET
    if kind == "trailing":
        return torch.round(num_train - k * (num_train / steps)) - 1
    if kind == "linspace":
        return torch.linspace(num_train - 1, 0, steps, dtype=torch.float64)
    raise ValueError(f"unknown timestep spacing {kind!r}; expected 'leading', 'trailing' or 'linspace'")


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> Tensor:
    """n noise levels from σ_max down to σ_min, evenly spaced in σ^(1/ρ) (EDM eq. 5). No final zero."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """n noise levels from σ_max down to σ_min, evenly spaced in log σ (k-diffusion `get_sigmas_exponential`)."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


def make_sigmas(source: Tensor | object, steps: int, schedule: SigmaSchedule = "discrete", *,
                spacing: Spacing = "linspace", rho: float = KARRAS_RHO, final: FinalSigma = "zero") -> Tensor:
    """The σ schedule a sampler runs on: `steps` noise levels, descending, then one final level. float64, shape
    (steps + 1,).

    `source` is a denoiser with a `log_sigmas` attribute (`DiscreteDenoiser`, `CFGDenoiser`) or the log σ table
    itself. `schedule`:

    - "discrete" (alias "normal"): the model's own σ at the timesteps of `spacing`, log-interpolated between
      integer timesteps;
    - "karras": EDM eq. (5) with ρ = `rho` between the model's σ_min and σ_max;
    - "exponential": evenly spaced in log σ between the same ends.

    `final` is the level after the last step: "zero" (a fully denoised sample, k-diffusion) or "sigma_min", the
    σ of t = 0, where CompVis DDIM/PLMS stop (their ᾱ_prev of the last step is ᾱ_0).
    """
    log_sigmas = getattr(source, "log_sigmas", source)
    if not isinstance(log_sigmas, Tensor):
        raise TypeError(f"make_sigmas needs a denoiser with `log_sigmas` or a tensor, got {type(source).__name__}")
    log_sigmas = log_sigmas.to("cpu", torch.float64)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    sigma_min, sigma_max = float(log_sigmas[0].exp()), float(log_sigmas[-1].exp())
    if schedule in ("discrete", "normal"):
        sigmas = t_to_sigma(timesteps(spacing, steps, num_train=len(log_sigmas)), log_sigmas)
    elif schedule == "karras":
        sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho)
    elif schedule == "exponential":
        sigmas = exponential_sigmas(steps, sigma_min, sigma_max)
    else:
        raise ValueError(f"unknown sigma schedule {schedule!r}; expected 'discrete' (or 'normal'), 'karras' or "
                         "'exponential'")
    if final not in ("zero", "sigma_min"):
        raise ValueError(f"final must be 'zero' or 'sigma_min', got {final!r}")
    last = 0.0 if final == "zero" else sigma_min
    return torch.cat([sigmas, sigmas.new_tensor([last])])


def start_index(steps: int, strength: float) -> int:
    """Index of the first σ to run for img2img at `strength`: the sampler runs the last t_enc = int(strength *
    steps) steps (CompVis `img2img.py`), so the first steps - t_enc are skipped."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return steps - int(strength * steps)
