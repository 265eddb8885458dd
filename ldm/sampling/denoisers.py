"""Denoisers: adapters that turn a noise-predicting network into D(x, σ) ≈ E[x_0 | x], the function every sampler
calls, plus an exact analytic denoiser for tests.

Samplers work in the variance-exploding parametrisation of Karras et al. 2022 (EDM): x = x_0 + σ ε. A
discrete-time DDPM model was trained on x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε, which is the same point scaled by
sqrt(ᾱ_t) = 1 / sqrt(σ² + 1). EDM eq. (7) writes any such model as

    D(x, σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x, t(σ))

with (EDM Table 1, "VP" column, σ_data = 1 for v-prediction as in k-diffusion):

| prediction | c_skip          | c_out                  | c_in              |
|------------|-----------------|------------------------|-------------------|
| ε          | 1               | -σ                     | 1 / sqrt(σ² + 1)  |
| v          | 1 / (σ² + 1)    | -σ / sqrt(σ² + 1)      | 1 / sqrt(σ² + 1)  |

(v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x_0, Salimans & Ho 2022, "Progressive Distillation", §4.)
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ldm.config import Prediction
from ldm.sampling.schedules import sigma_to_t, sigmas_from_alphas_cumprod, t_to_sigma

# model_fn(x_t, t, cond) -> ε or v: x_t is the VP-scaled latent (B, C, H, W), t the timesteps (B,).
ModelFn = Callable[[Tensor, Tensor, object], Tensor]
# A denoiser: D(x, sigma, **extra_args) -> x_0 prediction, with x (B, ...) in the VE parametrisation, sigma (B,).
Denoiser = Callable[..., Tensor]


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """(B,) -> (B, 1, ..., 1) with `ndim` dimensions, to broadcast a per-sample scalar over a batch."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Scalings of σ up to ~15 lose digits in half precision; compute them in at least float32.
    return torch.promote_types(dtype, torch.float32)


class DiscreteDenoiser:
    """D(x, σ) over a discrete-time ε- or v-prediction model (k-diffusion `DiscreteEpsDDPMDenoiser` /
    `DiscreteVDDPMDenoiser`).

    The model is called at the real-valued timestep t(σ) found by log-σ interpolation of its training schedule;
    `quantize=True` rounds t to the nearest integer timestep, as A1111 and k-diffusion's discrete models do by
    default (diffusers also rounds for its Karras schedules of DPM-Solver and KDPM2). The σ table is kept on the
    CPU in float64 (`sigmas`, `log_sigmas`); conversions run there and only t travels to the model's device.

    `shares_latents=True` declares that model_fn takes k conditionings per latent, as `UNetModel` does (k * B
    context rows for B latents, output (k * B, ...)), as an accelerated UNet does (`ldm.accel.forwards`); `CFGDenoiser` then hands it x once for both of its passes,
    and this denoiser returns the k x_0 predictions, (k * B, ...).
    """

    def __init__(self, model_fn: ModelFn, alphas_cumprod: Tensor, prediction: Prediction = "eps", *,
                 quantize: bool = False, shares_latents: bool = False):
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.model_fn = model_fn
        self.prediction = prediction
        self.quantize = quantize
        self.shares_latents = shares_latents
        self.sigmas = sigmas_from_alphas_cumprod(alphas_cumprod.detach().to("cpu"))  # (T,), increasing
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        t = sigma_to_t(sigma.detach().to("cpu", torch.float64), self.log_sigmas)
        return t.round() if self.quantize else t

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return t_to_sigma(t.detach().to("cpu", torch.float64), self.log_sigmas)

    def get_scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in) of EDM eq. (7) for this model's prediction type (see the module table)."""
        c_in = 1.0 / (sigma ** 2 + 1.0).sqrt()
        if self.prediction == "eps":
            return torch.ones_like(sigma), -sigma, c_in
        return 1.0 / (sigma ** 2 + 1.0), -sigma * c_in, c_in

    def __call__(self, x: Tensor, sigma: Tensor, cond: object = None) -> Tensor:
        """x: (B, ...) VE latent, sigma: (B,). Returns the x_0 prediction, shape and dtype of x."""
        dtype = _compute_dtype(x.dtype)
        s = append_dims(sigma.to(x.device, dtype), x.ndim)
        c_skip, c_out, c_in = self.get_scalings(s)
        t = self.sigma_to_t(sigma).to(x.device, torch.float64 if x.dtype == torch.float64 else torch.float32)
        out = self.model_fn((x * c_in).to(x.dtype), t, cond)
        if out.shape[0] != x.shape[0]:  # shared latents: one prediction per conditioning, k per latent
            k = out.shape[0] // x.shape[0]
            x, c_skip, c_out = (torch.cat([v] * k) for v in (x, c_skip, c_out))  # as the model repeated x
        return (x.to(dtype) * c_skip + out.to(dtype) * c_out).to(x.dtype)


class GaussianMixtureDenoiser:
    """The exact denoiser E[x_0 | x_0 + σ ε = x] when every element of x_0 is drawn independently from the 1-D
    mixture Σ_k w_k N(μ_k, s_k²). A smooth, non-linear stand-in for a trained network in tests.

    Tweedie / Bayes: x ~ Σ_k w_k N(μ_k, s_k² + σ²), and within component k, E[x_0 | x, k] = μ_k + s_k² / (s_k²
    + σ²) (x - μ_k); the posterior component weights are w_k N(x; μ_k, s_k² + σ²) normalised. With one component
    the probability-flow ODE dx/dσ = (x - D(x, σ)) / σ (EDM eq. 3 with σ(t) = t) has the closed-form solution
    x(σ) = μ + (x(σ') - μ) sqrt(s² + σ²) / sqrt(s² + σ'²), which `gaussian_ode_solution` returns.
    """

    def __init__(self, means: Sequence[float], stds: Sequence[float], weights: Sequence[float] | None = None):
        if len(means) != len(stds) or (weights is not None and len(weights) != len(means)):
            raise ValueError(f"means, stds and weights need one entry per component, got {len(means)}, "
                             f"{len(stds)} and {None if weights is None else len(weights)}")
        weights = weights if weights is not None else [1.0 / len(means)] * len(means)
        self.means = torch.tensor(means, dtype=torch.float64)
        self.stds = torch.tensor(stds, dtype=torch.float64)
        self.log_weights = torch.tensor(weights, dtype=torch.float64).log()

    @property
    def mean(self) -> float:
        """Mean of the data distribution."""
        return float((self.log_weights.exp() * self.means).sum())

    @property
    def std(self) -> float:
        """Standard deviation of the data distribution."""
        w = self.log_weights.exp()
        second = (w * (self.stds ** 2 + self.means ** 2)).sum()
        return float((second - (w * self.means).sum() ** 2).sqrt())

    def __call__(self, x: Tensor, sigma: Tensor, cond: object = None) -> Tensor:
        dtype = _compute_dtype(x.dtype)
        x_ = x.to(dtype)
        s2 = append_dims(sigma.to(x.device, dtype), x.ndim) ** 2
        # Elementwise over the (few) components, so that no reduction mixes elements or images.
        log_p, x0 = [], []
        for log_w, mu, s in zip(self.log_weights.tolist(), self.means.tolist(), self.stds.tolist()):
            var = s * s + s2                                                # marginal variance of component k
            log_p.append(log_w - 0.5 * ((x_ - mu) ** 2 / var + var.log()))
            x0.append(mu + (s * s) / var * (x_ - mu))                       # E[x_0 | x, k]
        top = log_p[0]
        for lp in log_p[1:]:
            top = torch.maximum(top, lp)
        post = [(lp - top).exp() for lp in log_p]                           # unnormalised posterior weights
        return (sum(w * m for w, m in zip(post, x0)) / sum(post)).to(x.dtype)

    def gaussian_ode_solution(self, x: Tensor, sigma_from: float, sigma_to: float) -> Tensor:
        """Exact probability-flow ODE solution from σ = `sigma_from` to `sigma_to` (one component only)."""
        if len(self.means) != 1:
            raise ValueError("the closed-form ODE solution exists for a single Gaussian component only")
        mu, s = float(self.means[0]), float(self.stds[0])
        return mu + (x - mu) * (math.sqrt(s * s + sigma_to ** 2) / math.sqrt(s * s + sigma_from ** 2))


class Handoff:
    """Two denoisers in turn, as A1111's refiner: `first` at high noise, `second` from the step whose timestep
    (the nearest of the schedule to σ) is at least `switch_at` of the way from T - 1 to 0: with T = 1000 and 0.8,
    the steps at t <= 199 (A1111's "Refiner switch at", diffusers' denoising_end / denoising_start). Both are
    guided denoisers of the same latent space; the sampler's state carries over the switch."""

    def __init__(self, first: Denoiser, second: Denoiser, switch_at: float):
        if not 0.0 < switch_at < 1.0:
            raise ValueError(f"switch_at must be in (0, 1), got {switch_at}")
        self.first, self.second = first, second
        self.switch_at = float(switch_at)

    @property
    def log_sigmas(self) -> Tensor:
        return self.first.log_sigmas

    def uses_second(self, sigma: Tensor) -> bool:
        sigmas = self.log_sigmas.exp()
        t = int(torch.argmin((sigmas - sigma.max().to(sigmas)).abs()))
        return (len(sigmas) - 1 - t) / len(sigmas) >= self.switch_at

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        return (self.second if self.uses_second(sigma) else self.first)(x, sigma)
