"""Samplers: plain functions of a denoiser, a starting latent and a σ schedule (k-diffusion style).

Every sampler has the signature

    sample_NAME(denoiser, x, sigmas, *, extra_args=None, callback=None, [eta=..., generators=...]) -> Tensor

Each is written as a generator of its steps (`sample_NAME.steps(denoiser, x, sigmas, ...)` yields a `Step` per step
and returns the last latent); the `sampler` decorator makes the function that runs them all.

- `denoiser(x, sigma, **extra_args)` returns the x_0 prediction D(x, σ); x is in the variance-exploding
  parametrisation x = x_0 + σ ε of Karras et al. 2022 (EDM) and `sigma` has shape (B,). See `ldm.sampling.denoisers`.
- `x` is the latent at σ = sigmas[0]; it is not modified. The return value is the latent at σ = sigmas[-1].
- `sigmas` is a descending 1-D tensor of noise levels, usually ending with 0 (`schedules.make_sigmas`).
- `callback`, if given, is called once per step, before the update, with a dict: `i` (step), `total` (number
  of steps), `sigma`, `sigma_next`, `x` (the latent at `sigma`) and `denoised` (D(x, sigma)).
- `generators` (stochastic samplers): one CPU `torch.Generator` per image; every noise draw for image i comes
  from generators[i] (see `randn`), so an image does not depend on its batch or on the device.

Samplers know nothing of text, the VAE or integer timesteps, and keep no state between calls.

Notation: d = (x - D(x, σ)) / σ is dx/dσ of the probability-flow ODE (EDM eq. 3 with σ(t) = t, s(t) = 1);
λ = -log σ; h = λ_next - λ. The discrete-time samplers DDPM, DDIM and PLMS are written in the same VE variables:
a VP latent x_t is the VE latent times sqrt(ᾱ_t) = 1 / sqrt(σ² + 1), and their updates are invariant to that scale.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ldm.sampling.denoisers import Denoiser
from ldm.sampling.names import (ALIASES, DISCRETE_SAMPLERS, DISPLAY_NAMES, ETA_SAMPLERS, NAMES,  # noqa: F401 (API)
                               STOCHASTIC_SAMPLERS, display_name, infotext_name, resolve_sampler)
from ldm.sampling.schedules import SigmaSchedule, Spacing, make_sigmas, start_index

Callback = Callable[[dict], None]


# --- noise -----------------------------------------------------------------------------------------------

def generators_for(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with that image's seed."""
    return [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]


def randn(shape: Sequence[int], generators: Sequence[torch.Generator], *, dtype: torch.dtype = torch.float32,
          device: torch.device | str = "cpu") -> Tensor:
    """Standard normal noise of shape (len(generators), *shape). Image i's slice is drawn on the CPU from
    generators[i] alone, then the batch moves to `device`, so it is the same for any batch and any device. It
    is drawn in float32 (float64 when `dtype` is float64) and then cast, so half-precision runs see the
    float32 draw."""
    for g in generators:
        if g.device.type != "cpu":
            raise ValueError(f"noise is drawn on the CPU for device-independent seeds; got a generator on "
                             f"{g.device}. Use generators_for(seeds).")
    draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    noise = torch.cat([torch.randn((1, *shape), generator=g, dtype=draw_dtype) for g in generators])
    return noise.to(device=device, dtype=dtype)


def _noise_like(x: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    return randn(x.shape[1:], generators, dtype=x.dtype, device=x.device)


def _check_generators(name: str, x: Tensor, generators: Sequence[torch.Generator] | None, needed: bool) -> None:
    if not needed:
        return
    if generators is None:
        raise ValueError(f"sampler {name!r} draws noise at every step: pass generators=generators_for(seeds), "
                         "one per image")
    if len(generators) != x.shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {x.shape[0]}; pass one per image")


# --- shared pieces ---------------------------------------------------------------------------------------

def _floats(sigmas: Tensor) -> list[float]:
    # Per-step scalar arithmetic runs in Python float64; only the latents are tensors.
    return [float(s) for s in sigmas.detach().to("cpu", torch.float64)]


def _sigma(x: Tensor, sigma: float) -> Tensor:
    return x.new_full((x.shape[0],), sigma)


def _to_d(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """dx/dσ = (x - D(x, σ)) / σ, the probability-flow ODE of EDM eq. (3) with σ(t) = t."""
    return (x - denoised) / sigma


def _ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(σ_down, σ_up) for a step from σ to σ_next that adds fresh noise: σ_up² = η² σ_next² (σ² - σ_next²) / σ²
    is the DDPM posterior variance (Ho et al. 2020 eq. 7, in VE variables; DDIM eq. 16 for η != 1), and
    σ_down² = σ_next² - σ_up² is where the deterministic part of the step lands."""
    if sigma_next == 0.0 or eta == 0.0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
    return math.sqrt(sigma_next ** 2 - sigma_up ** 2), sigma_up


@dataclass(frozen=True)
class Step:
    """What a sampler yields at step i of `total`, before its update: x at σ = sigma, and D(x, σ)."""
    i: int
    total: int
    sigma: float
    sigma_next: float
    x: Tensor
    denoised: Tensor


Steps = Generator[Step, None, Tensor]  # yields a Step per step, returns the last latent


def run_steps(steps: Steps, callback: Callback | None = None) -> Tensor:
    """Runs a sampler's steps to the end; `callback`, if given, gets each step as a dict (k-diffusion's callback)."""
    while True:
        try:
            step = next(steps)
        except StopIteration as done:
            return done.value
        if callback is not None:
            callback(dict(vars(step)))


def sampler(steps_fn: Callable[..., Steps]) -> Callable[..., Tensor]:
    """A sampler written as a generator of its steps -> the k-diffusion function `sample_NAME(denoiser, x, sigmas,
    *, callback=None, ...)` that returns the last latent; the generator stays available as `.steps`."""
    @functools.wraps(steps_fn)
    def run(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, callback: Callback | None = None, **kwargs) -> Tensor:
        return run_steps(steps_fn(denoiser, x, sigmas, **kwargs), callback)
    run.steps = steps_fn
    return run


# --- discrete-time samplers, written on σ -----------------------------------------------------------------

@sampler
def sample_ddpm(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, generators: Sequence[torch.Generator] | None = None,
                extra_args: dict | None = None) -> Steps:
    """Ancestral sampling of Ho et al. 2020 ("Denoising Diffusion Probabilistic Models"), Algorithm 2, with the
    posterior q(x_{t-1} | x_t, x_0) of eq. (6)-(7) and x_0 predicted by the model. On a strided grid this is
    DDPMScheduler with `variance_type="fixed_small"`. In VE variables (σ → σ_next) the posterior is Gaussian with
    mean x̂_0 + (σ_next / σ)² (x - x̂_0) and variance σ_next² (1 - (σ_next / σ)²)."""
    extra_args, s = extra_args or {}, _floats(sigmas)
    _check_generators("ddpm", x, generators, needed=len(s) > 1)
    for i in range(len(s) - 1):
        denoised = denoiser(x, _sigma(x, s[i]), **extra_args)
        yield Step(i, len(s) - 1, s[i], s[i + 1], x, denoised)
        ratio = (s[i + 1] / s[i]) ** 2
        x = denoised + ratio * (x - denoised)                                 # posterior mean μ̃_t, eq. (7)
        if s[i + 1] > 0:
            x = x + _noise_like(x, generators) * (s[i + 1] * math.sqrt(1.0 - ratio))  # sqrt(β̃_t), eq. (7)
    return x


@sampler
def sample_ddim(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, eta: float = 0.0,
                generators: Sequence[torch.Generator] | None = None, extra_args: dict | None = None) -> Steps:
    """DDIM, Song et al. 2021 ("Denoising Diffusion Implicit Models"), eq. (12) with σ_t(η) of eq. (16). In VE
    variables eq. (12) reads x_next = x̂_0 + σ_down ε̂ + σ_up z with ε̂ = (x - x̂_0) / σ: for η = 0 it is Euler's
    method on the probability-flow ODE, for η = 1 it is DDPM. The CompVis grid stops at σ(t = 0), not 0."""
    extra_args, s = extra_args or {}, _floats(sigmas)
    _check_generators("ddim", x, generators, needed=eta > 0 and len(s) > 1)
    for i in range(len(s) - 1):
        denoised = denoiser(x, _sigma(x, s[i]), **extra_args)
        yield Step(i, len(s) - 1, s[i], s[i + 1], x, denoised)
        sigma_down, sigma_up = _ancestral_step(s[i], s[i + 1], eta)
        x = denoised + (sigma_down / s[i]) * (x - denoised)                  # "predicted x_0" + "direction to x_t"
        if sigma_up > 0:
            x = x + _noise_like(x, generators) * sigma_up                     # "random noise", eq. (12)
    return x


@sampler
def sample_plms(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None) -> Steps:
    """PLMS, the pseudo linear multistep method of Liu et al. 2022 ("Pseudo Numerical Methods for Diffusion
    Models on Manifolds", §3), as in CompVis `PLMSSampler` and diffusers' PNDMScheduler(skip_prk_steps=True):
    fixed-step Adams–Bashforth combinations (orders 2, 3, 4) of the last ε predictions, each applied with the
    DDIM transfer. The first step is a pseudo improved Euler step, which evaluates the model once more. In VE
    variables ε̂ = d and the transfer is x + (σ_next - σ) ε̂. The fixed weights assume steps uniform in σ; on
    SD's grids the method is second order."""
    extra_args, s = extra_args or {}, _floats(sigmas)
    old_eps: list[Tensor] = []
    for i in range(len(s) - 1):
        denoised = denoiser(x, _sigma(x, s[i]), **extra_args)
        yield Step(i, len(s) - 1, s[i], s[i + 1], x, denoised)
        eps = _to_d(x, s[i], denoised)
        dt = s[i + 1] - s[i]
        if not old_eps and s[i + 1] > 0:                                      # pseudo improved Euler
            x_2 = x + eps * dt
            eps_next = _to_d(x_2, s[i + 1], denoiser(x_2, _sigma(x, s[i + 1]), **extra_args))
            eps_prime = (eps + eps_next) / 2
        elif not old_eps:
            eps_prime = eps
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x + eps_prime * dt
        old_eps = (old_eps + [eps])[-3:]
    return x


# --- k-diffusion samplers ----------------------------------------------------------------------------------

@sampler
def sample_euler(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None) -> Steps:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, EDM Algorithm 1 without its second-order
    correction)."""
    extra_args, s = extra_args or {}, _floats(sigmas)
    for i in range(len(s) - 1):
        denoised = denoiser(x, _sigma(x, s[i]), **extra_args)
        yield Step(i, len(s) - 1, s[i], s[i + 1], x, denoised)
        x = x + _to_d(x, s[i], denoised) * (s[i + 1] - s[i])
    return x


@sampler
def sample_euler_a(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, eta: float = 1.0,
                   generators: Sequence[torch.Generator] | None = None, extra_args: dict | None = None) -> Steps:
    """Euler ancestral (k-diffusion `sample_euler_ancestral`): an Euler step of the probability-flow ODE (EDM
    eq. 3) down to σ_down, then fresh noise of std σ_up, the DDPM posterior split of Ho et al. 2020 eq. (7)."""
    extra_args, s = extra_args or {}, _floats(sigmas)
    _check_generators("euler_a", x, generators, needed=eta > 0 and len(s) > 1)
    for i in range(len(s) - 1):
        denoised = denoiser(x, _sigma(x, s[i]), **extra_args)
        yield Step(i, len(s) - 1, s[i], s[i + 1], x, denoised)
        sigma_down, sigma_up = _ancestral_step(s[i], s[i + 1], eta)
        x = x + _to_d(x, s[i], denoised) * (sigma_down - s[i])
        if sigma_up > 0:
            x = x + _noise_like(x, generators) * sigma_up
    return x


@sampler
def sample_heun(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None) -> Steps:
    """Heun's second-order method, Karras et al. 2022 (EDM) Algorithm 1; the last step to σ = 0 is Euler."""
    extra_args, s = extra_args or {}, _floats(sigmas)
    for i in range(len(s) - 1):
        denoised = denoiser(x, _sigma(x, s[i]), **extra_args)
        yield Step(i, len(s) - 1, s[i], s[i + 1], x, denoised)
        d, dt = _to_d(x, s[i], denoised), s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = _to_d(x_2, s[i + 1], denoiser(x_2, _sigma(x, s[i + 1]), **extra_args))
        x = x + (d + d_2) / 2 * dt                                            # trapezoidal rule, Alg. 1 line 8
    return x


def _dpm2_step(denoiser: Denoiser, x: Tensor, d: Tensor, sigma: float, sigma_to: float, extra_args: dict) -> Tensor:
    # Midpoint in log σ (DPM-Solver-2's s_i with r = 1/2), then a full step with the midpoint's slope.
    sigma_mid = math.sqrt(sigma * sigma_to)
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = _to_d(x_2, sigma_mid, denoiser(x_2, _sigma(x, sigma_mid), **extra_args))
    return x + d_2 * (sigma_to - sigma)


@sampler
def sample_dpm2(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None) -> Steps:
    """DPM-Solver-2 (Lu et al. 2022, "DPM-Solver", Algorithm 1 with r1 = 1/2) in k-diffusion's σ form
    (`sample_dpm_2`, after EDM Algorithm 2): a midpoint step whose midpoint is the geometric mean of σ and
    σ_next. The last step to σ = 0 is Euler."""
    extra_args, s = extra_args or {}, _floats(sigmas)
    for i in range(len(s) - 1):
        denoised = denoiser(x, _sigma(x, s[i]), **extra_args)
        yield Step(i, len(s) - 1, s[i], s[i + 1], x, denoised)
        d = _to_d(x, s[i], denoised)
        if s[i + 1] == 0:
            x = x + d * (s[i + 1] - s[i])
        else:
            x = _dpm2_step(denoiser, x, d, s[i], s[i + 1], extra_args)
    return x


@sampler
def sample_dpm2_a(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, eta: float = 1.0,
                  generators: Sequence[torch.Generator] | None = None, extra_args: dict | None = None) -> Steps:
    """Ancestral DPM-Solver-2 (k-diffusion `sample_dpm_2_ancestral`): a DPM-Solver-2 step (Lu et al. 2022,
    Algorithm 1, r1 = 1/2) down to σ_down, then fresh noise of std σ_up (Ho et al. 2020 eq. 7)."""
    extra_args, s = extra_args or {}, _floats(sigmas)
    _check_generators("dpm2_a", x, generators, needed=eta > 0 and len(s) > 1)
    for i in range(len(s) - 1):
        denoised = denoiser(x, _sigma(x, s[i]), **extra_args)
        yield Step(i, len(s) - 1, s[i], s[i + 1], x, denoised)
        sigma_down, sigma_up = _ancestral_step(s[i], s[i + 1], eta)
        d = _to_d(x, s[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - s[i])
        else:
            x = _dpm2_step(denoiser, x, d, s[i], sigma_down, extra_args)
        if sigma_up > 0:
            x = x + _noise_like(x, generators) * sigma_up
    return x


def _lms_coefficient(s: list[float], i: int, j: int, order: int) -> float:
    # ∫_{σ_i}^{σ_{i+1}} ℓ_j(τ) dτ for the Lagrange basis polynomial ℓ_j through σ_i, σ_{i-1}, ..., σ_{i-order+1}
    # that is 1 at σ_{i-j}. τ is shifted by σ_i for conditioning; the integral is exact.
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            poly = poly * np.polynomial.Polynomial([-(s[i - k] - s[i]), 1.0]) / (s[i - j] - s[i - k])
    antiderivative = poly.integ()
    return float(antiderivative(s[i + 1] - s[i]) - antiderivative(0.0))


@sampler
def sample_lms(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, order: int = 4, extra_args: dict | None = None) -> Steps:
    """Linear multistep (k-diffusion `sample_lms`): the variable-step Adams–Bashforth method (Hairer, Nørsett &
    Wanner, "Solving Ordinary Differential Equations I", §III.5) of order `order` on the probability-flow ODE,
    integrating the Lagrange interpolant of the last `order` slopes over [σ_i, σ_{i+1}]. It starts with order 1
    and raises the order by one per step."""
    extra_args, s = extra_args or {}, _floats(sigmas)
    ds: list[Tensor] = []
    for i in range(len(s) - 1):
        denoised = denoiser(x, _sigma(x, s[i]), **extra_args)
        yield Step(i, len(s) - 1, s[i], s[i + 1], x, denoised)
        ds = (ds + [_to_d(x, s[i], denoised)])[-order:]
        cur_order = min(i + 1, order)
        coeffs = [_lms_coefficient(s, i, j, cur_order) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


@sampler
def sample_dpmpp_2s_a(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, eta: float = 1.0,
                      generators: Sequence[torch.Generator] | None = None, extra_args: dict | None = None) -> Steps:
    """Ancestral DPM-Solver++(2S) (Lu et al. 2022b, "DPM-Solver++", Algorithm 1 with r = 1/2; k-diffusion
    `sample_dpmpp_2s_ancestral`): a two-stage data-prediction step to σ_down, then noise of std σ_up. With
    η = 0 it is the deterministic DPM-Solver++(2S), diffusers' DPMSolverSinglestepScheduler(solver_order=2) on a
    grid whose odd points are the λ-midpoints."""
    extra_args, s = extra_args or {}, _floats(sigmas)
    _check_generators("dpmpp_2s_a", x, generators, needed=eta > 0 and len(s) > 1)
    for i in range(len(s) - 1):
        denoised = denoiser(x, _sigma(x, s[i]), **extra_args)
        yield Step(i, len(s) - 1, s[i], s[i + 1], x, denoised)
        sigma_down, sigma_up = _ancestral_step(s[i], s[i + 1], eta)
        if sigma_down == 0:
            x = x + _to_d(x, s[i], denoised) * (sigma_down - s[i])
        else:
            h = math.log(s[i]) - math.log(sigma_down)                         # λ_down - λ
            sigma_mid = s[i] * math.exp(-h / 2)                               # λ_mid = λ + r h
            x_2 = math.exp(-h / 2) * x - math.expm1(-h / 2) * denoised        # first-order stage to λ_mid
            denoised_2 = denoiser(x_2, _sigma(x, sigma_mid), **extra_args)
            x = math.exp(-h) * x - math.expm1(-h) * denoised_2                # Alg. 1: D_i = x̂_0(u_i) for r = 1/2
        if sigma_up > 0:
            x = x + _noise_like(x, generators) * sigma_up
    return x


@sampler
def sample_dpmpp_sde(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, eta: float = 1.0, r: float = 0.5,
                     generators: Sequence[torch.Generator] | None = None, extra_args: dict | None = None) -> Steps:
    """Stochastic DPM-Solver++ (k-diffusion `sample_dpmpp_sde`): two ancestral data-prediction stages per step,
    to λ + r h and to λ + h, after DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1).

    Deviation from k-diffusion: its noise comes from a torchsde Brownian tree over σ. Here the two increments
    of the Brownian path on [σ_mid, σ] and [σ_next, σ_mid] are drawn from the images' own generators, and the
    second stage uses their normalised sum, which has the Brownian tree's joint distribution (correlation
    sqrt((σ - σ_mid) / (σ - σ_next)) between the stages) but is not the same realisation for a given seed."""
    extra_args, s = extra_args or {}, _floats(sigmas)
    _check_generators("dpmpp_sde", x, generators, needed=eta > 0 and len(s) > 1)
    fac = 1 / (2 * r)
    for i in range(len(s) - 1):
        denoised = denoiser(x, _sigma(x, s[i]), **extra_args)
        yield Step(i, len(s) - 1, s[i], s[i + 1], x, denoised)
        if s[i + 1] == 0:
            x = x + _to_d(x, s[i], denoised) * (s[i + 1] - s[i])
            continue
        h = math.log(s[i]) - math.log(s[i + 1])
        sigma_mid = s[i] * math.exp(-r * h)
        if eta > 0:                                                           # Brownian increments over σ
            z_1, z_2 = _noise_like(x, generators), _noise_like(x, generators)
            a, b = s[i] - sigma_mid, sigma_mid - s[i + 1]
            noise_1, noise_2 = z_1, (math.sqrt(a) * z_1 + math.sqrt(b) * z_2) / math.sqrt(a + b)
        # Stage 1: to λ + r h
        sigma_down, sigma_up = _ancestral_step(s[i], sigma_mid, eta)
        x_2 = denoised + (sigma_down / s[i]) * (x - denoised)                # first-order DPM-Solver++ step
        if sigma_up > 0:
            x_2 = x_2 + noise_1 * sigma_up
        denoised_2 = denoiser(x_2, _sigma(x, sigma_mid), **extra_args)
        # Stage 2: to λ + h with the combined data prediction
        sigma_down, sigma_up = _ancestral_step(s[i], s[i + 1], eta)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = denoised_d + (sigma_down / s[i]) * (x - denoised_d)
        if sigma_up > 0:
            x = x + noise_2 * sigma_up
    return x


@sampler
def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, extra_args: dict | None = None) -> Steps:
    """DPM-Solver++(2M), Lu et al. 2022b ("DPM-Solver++"), Algorithm 2: a multistep exponential integrator in λ on
    the data prediction, first order on the first step and on the last step to σ = 0."""
    extra_args, s = extra_args or {}, _floats(sigmas)
    old_denoised, h_last = None, None
    for i in range(len(s) - 1):
        denoised = denoiser(x, _sigma(x, s[i]), **extra_args)
        yield Step(i, len(s) - 1, s[i], s[i + 1], x, denoised)
        if s[i + 1] == 0:
            x = denoised
            continue
        h = math.log(s[i]) - math.log(s[i + 1])
        denoised_d = denoised
        if old_denoised is not None:
            r = h_last / h                                                    # Alg. 2: r_i = h_{i-1} / h_i
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (s[i + 1] / s[i]) * x - math.expm1(-h) * denoised_d
        old_denoised, h_last = denoised, h
    return x


@sampler
def sample_dpmpp_2m_sde(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, eta: float = 1.0,
                        solver_type: str = "midpoint", generators: Sequence[torch.Generator] | None = None,
                        extra_args: dict | None = None) -> Steps:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, "DPM-Solver++": DPM-Solver++(2M) for the diffusion SDE, whose
    exponential integrator weights become 1 - e^{-2h}; k-diffusion `sample_dpmpp_2m_sde`, diffusers
    `algorithm_type="sde-dpmsolver++"`).
    η scales the injected noise: η = 0 is the ODE solver DPM-Solver++(2M) in exponential form. k-diffusion
    draws the noise from a Brownian tree; over disjoint steps its increments are independent normals, which is
    what the per-image generators give."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    extra_args, s = extra_args or {}, _floats(sigmas)
    _check_generators("dpmpp_2m_sde", x, generators, needed=eta > 0 and len(s) > 1)
    old_denoised, h_last = None, None
    for i in range(len(s) - 1):
        denoised = denoiser(x, _sigma(x, s[i]), **extra_args)
        yield Step(i, len(s) - 1, s[i], s[i + 1], x, denoised)
        if s[i + 1] == 0:
            x = denoised
            continue
        h = math.log(s[i]) - math.log(s[i + 1])
        eta_h = eta * h
        phi_1 = -math.expm1(-h - eta_h)
        x = (s[i + 1] / s[i]) * math.exp(-eta_h) * x + phi_1 * denoised
        if old_denoised is not None:
            r = h_last / h
            if solver_type == "midpoint":
                x = x + 0.5 * phi_1 * (1 / r) * (denoised - old_denoised)
            else:
                x = x + (phi_1 / (h + eta_h) + 1) * (1 / r) * (denoised - old_denoised)
        if eta > 0:
            x = x + _noise_like(x, generators) * (s[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)))
        old_denoised, h_last = denoised, h
    return x


@sampler
def sample_dpmpp_3m_sde(denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, eta: float = 1.0,
                        generators: Sequence[torch.Generator] | None = None, extra_args: dict | None = None) -> Steps:
    """SDE-DPM-Solver++(3M) (the third-order multistep DPM-Solver++ of Lu et al. 2022b with SDE weights;
    k-diffusion `sample_dpmpp_3m_sde`). η = 0 is DPM-Solver++(3M); diffusers' DPMSolverMultistepScheduler
    (order 3, `solver_type="heun"`) matches it.

    Deviations, both kept for compatibility with k-diffusion/A1111 images:
    - diffusers' order-3 "sde-dpmsolver++" update has the wrong sign on the constant of its D2 weight
      ((1 - e^{-2h} - 2h) / (2h)² - 1/2 where the integral gives + 1/2); this follows k-diffusion.
    - The D2 term is half the exact one: D2 = (D1_0 - D1_1) / (r0 + r1) ≈ h² x̂_0'' / 2 while φ_3 integrates
      h² x̂_0''. Each step then errs by h³ x̂_0'' / 12 and the method is second order, not third (measured in
      tests/test_samplers.py; doubling the D2 term gives order 3)."""
    extra_args, s = extra_args or {}, _floats(sigmas)
    _check_generators("dpmpp_3m_sde", x, generators, needed=eta > 0 and len(s) > 1)
    denoised_1 = denoised_2 = None
    h_1 = h_2 = None
    for i in range(len(s) - 1):
        denoised = denoiser(x, _sigma(x, s[i]), **extra_args)
        yield Step(i, len(s) - 1, s[i], s[i + 1], x, denoised)
        if s[i + 1] == 0:
            x = denoised
            continue
        h = math.log(s[i]) - math.log(s[i + 1])
        h_eta = h * (eta + 1)
        x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        if h_2 is not None:                                                   # third order
            r0, r1 = h_1 / h, h_2 / h
            d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            x = x + phi_2 * d1 - phi_3 * d2
        elif h_1 is not None:                                                 # second order
            x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
        if eta > 0:
            x = x + _noise_like(x, generators) * (s[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)))
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


# --- registry, names and the convenience entry point ------------------------------------------------------

# each name of ldm.sampling.names.TABLE (which says what the sampler takes) -> its function, in the table's order
SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm, "ddim": sample_ddim, "plms": sample_plms,
    "euler": sample_euler, "euler_a": sample_euler_a, "heun": sample_heun,
    "dpm2": sample_dpm2, "dpm2_a": sample_dpm2_a, "lms": sample_lms,
    "dpmpp_2s_a": sample_dpmpp_2s_a, "dpmpp_sde": sample_dpmpp_sde, "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde, "dpmpp_3m_sde": sample_dpmpp_3m_sde,
}


def sample(denoiser: Denoiser, noise: Tensor, *, callback: Callback | None = None, **options) -> Tensor:
    """`sample_steps` run to the end: the final latent; `callback`, if given, gets each step as a dict."""
    return run_steps(sample_steps(denoiser, noise, **options), callback)


def sample_steps(denoiser: Denoiser, noise: Tensor, *, sampler: str = "euler_a", steps: int = 20,
                 schedule: SigmaSchedule | None = None, karras: bool = False, spacing: Spacing | None = None,
                 eta: float | None = None, generators: Sequence[torch.Generator] | None = None,
                 init_latent: Tensor | None = None, strength: float = 1.0, extra_args: dict | None = None) -> Steps:
    """Run `sampler` for `steps` steps from unit-variance `noise` (B, C, H, W), yielding each `Step`, and return
    the final latent in the model's own (VP) scale, x / sqrt(σ_last² + 1), which is x itself when the schedule
    ends at 0. Nothing runs until the first step is asked for; closing the generator stops between two steps.

    - `sampler`: any name `resolve_sampler` accepts; an A1111 name may carry its schedule ("DPM++ 2M Karras").
    - `schedule`/`karras`: "discrete" (default), "karras" (also `karras=True`) or "exponential".
    - `spacing`: timestep spacing of the "discrete" schedule; default "leading" (CompVis, diffusers' SD config)
      for ddpm/ddim/plms and "linspace" (k-diffusion/A1111 "normal") for the others. DDIM and PLMS on the
      "discrete" schedule stop at σ(t = 0) as CompVis does (ᾱ_prev of the last step is ᾱ_0).
    - txt2img (`init_latent` None): the start is noise · sqrt(σ_max² + 1) for ddpm/ddim/plms (x_T = noise in VP
      scale, as CompVis and diffusers) and noise · σ_max for the k-samplers (as k-diffusion and A1111).
    - img2img: `init_latent` (the clean latent) and `strength`; the first steps - int(strength · steps) steps are
      skipped (CompVis t_enc) and the start is init_latent + σ_start · noise, i.e. sqrt(ᾱ) x_0 + sqrt(1 - ᾱ) ε in
      VP scale at exactly the level of the first step run (CompVis encodes one DDIM step higher).
    - `eta`: noise scale of the samplers in ETA_SAMPLERS (default: 0 for ddim, 1 for the others).
    - `generators`: one CPU generator per image (`generators_for(seeds)`), for the STOCHASTIC_SAMPLERS; draw
      `noise` from the same generators first (`randn(shape, generators)`).
    """
    name, alias_schedule = resolve_sampler(sampler)
    if karras:
        if schedule not in (None, "karras"):
            raise ValueError(f"karras=True contradicts schedule={schedule!r}")
        schedule = "karras"
    schedule = schedule or alias_schedule or "discrete"
    discrete = name in DISCRETE_SAMPLERS
    final = "sigma_min" if name in ("ddim", "plms") and schedule in ("discrete", "normal") else "zero"
    sigmas = make_sigmas(denoiser, steps, schedule, spacing=spacing or ("leading" if discrete else "linspace"),
                         final=final)
    if init_latent is None:
        if strength != 1.0:
            raise ValueError(f"strength={strength} needs an init_latent (img2img)")
        x = noise * (math.sqrt(float(sigmas[0]) ** 2 + 1) if discrete else float(sigmas[0]))
    else:
        if init_latent.shape != noise.shape:
            raise ValueError(f"init_latent has shape {tuple(init_latent.shape)} but noise has {tuple(noise.shape)}")
        sigmas = sigmas[start_index(steps, strength):]
        x = init_latent + noise * float(sigmas[0])
    kwargs: dict = {}
    if eta is not None:
        if name not in ETA_SAMPLERS:
            raise ValueError(f"sampler {name!r} takes no eta; these do: {', '.join(sorted(ETA_SAMPLERS))}")
        kwargs["eta"] = eta
    if name in STOCHASTIC_SAMPLERS:
        kwargs["generators"] = generators
    x = yield from SAMPLERS[name].steps(denoiser, x, sigmas, extra_args=extra_args, **kwargs)
    return x / math.sqrt(float(sigmas[-1]) ** 2 + 1)
