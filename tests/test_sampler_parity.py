"""Parity of ldm's samplers with diffusers' schedulers, the independent reference.

Both sides get the same model function and the same noise. The model is the exact ε- (or v-) prediction of a
two-component Gaussian-mixture data distribution (`GaussianMixtureDenoiser`), a smooth non-linear function of x
and t, so the errors measure how far the algorithms agree. diffusers' scheduler is driven step by step
(`set_timesteps`, `scale_model_input`, `step`); ldm's sampler runs on its own σ schedule through
`DiscreteDenoiser`. Noise: diffusers' schedulers draw through `randn_tensor`, which is patched to draw from the
same per-image CPU generators, in the same order, as `ldm.sampling.samplers.randn`.

The error is max |ldm - diffusers| / max |diffusers| over the final latents. Tolerances (from the issue): 1e-5 in
float64, 1e-4 in float32. diffusers keeps its σ tables in float32 and casts the latent to float32 inside some
schedulers (Euler, Euler ancestral, DPM-Solver), so even the float64 runs agree only to ~1e-7.

Where the algorithms coincide only under conditions, the cases say so:
- diffusers rounds the timesteps of its Karras schedules for DPM-Solver (and KDPM2), like k-diffusion's
  discrete models: those cases use `DiscreteDenoiser(quantize=True)`. KDPM2 rounds only its full steps and not
  its midpoints, which no single denoiser reproduces, so KDPM2 is compared on "leading" and exponential grids.
- DPMSolverSinglestepScheduler(order 2) is DPM-Solver++(2S) = `dpmpp_2s_a` with η = 0 when every odd point of
  its grid is the λ-midpoint of its neighbours; the case installs that grid into the scheduler.
- diffusers' SDE-DPM-Solver++ of order 3 has a sign error in its D2 weight, so `dpmpp_3m_sde` is compared at
  η = 0 against the order-3 ODE solver.
- diffusers' LMSDiscreteScheduler integrates its Lagrange polynomials with scipy's `quad`; scipy is not a test
  dependency, so `integrate` is replaced by Gauss–Legendre quadrature, exact for these polynomials.

Run `python tools/parity.py samplers` for the table of errors.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import types
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch

from ldm.sampling.denoisers import DiscreteDenoiser, GaussianMixtureDenoiser, append_dims
from ldm.sampling.samplers import SAMPLERS, generators_for, randn
from ldm.sampling.schedules import alphas_cumprod_for, make_sigmas, sigmas_from_alphas_cumprod, t_to_sigma

diffusers = pytest.importorskip("diffusers")

AC = alphas_cumprod_for()                                   # SD's schedule, float64
LOG_SIGMAS = sigmas_from_alphas_cumprod(AC).log()
DATA = GaussianMixtureDenoiser(means=(-0.5, 0.7), stds=(0.3, 0.6), weights=(0.35, 0.65))
SHAPE = (2, 4, 8, 8)
SEEDS = (7, 8)
TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-4}
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

_PATCHED_MODULES = ["ddim", "ddpm", "euler_ancestral_discrete", "k_dpm_2_ancestral_discrete",
                    "dpmsolver_multistep", "dpmsolver_singlestep"]


def model_fn(prediction: str) -> Callable:
    """The network both sides call: (VP latent, timestep t) -> exact ε or v of the mixture data."""
    def model(x_vp: torch.Tensor, t: torch.Tensor, cond: object = None) -> torch.Tensor:
        sigma = t_to_sigma(torch.as_tensor(t).reshape(-1), LOG_SIGMAS).expand(x_vp.shape[0])
        s = append_dims(sigma.to(x_vp.dtype), x_vp.ndim)
        x = x_vp * (s ** 2 + 1).sqrt()                       # VE latent
        x0 = DATA(x, sigma.to(x_vp.dtype))
        eps = (x - x0) / s
        return eps if prediction == "eps" else (eps - s * x0) / (s ** 2 + 1).sqrt()  # v = α ε - σ_VP x_0
    return model


def _gauss_legendre_quad(f, a, b, **_):
    nodes, weights = np.polynomial.legendre.leggauss(8)   # exact for polynomials of degree <= 15
    mid, half = (a + b) / 2, (b - a) / 2
    return sum(float(w * f(mid + half * n)) for n, w in zip(nodes, weights)) * half, 0.0


@contextlib.contextmanager
def patched_diffusers(run_dtype: torch.dtype):
    """Route diffusers' scheduler noise through ldm's per-image CPU draw, and give LMS a quadrature."""
    def fake_randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return randn(tuple(shape[1:]), generator, dtype=run_dtype)
    saved = []
    for name in _PATCHED_MODULES:
        mod = importlib.import_module(f"diffusers.schedulers.scheduling_{name}")
        saved.append((mod, "randn_tensor", mod.randn_tensor))
        mod.randn_tensor = fake_randn_tensor
    lms = importlib.import_module("diffusers.schedulers.scheduling_lms_discrete")
    saved.append((lms, "integrate", getattr(lms, "integrate", None)))
    lms.integrate = types.SimpleNamespace(quad=_gauss_legendre_quad)
    try:
        yield
    finally:
        for mod, attr, value in saved:
            setattr(mod, attr, value)


def _scheduler_class(cls_name: str) -> type:
    # `diffusers.LMSDiscreteScheduler` is a placeholder that demands scipy; the module itself imports without it.
    if cls_name == "LMSDiscreteScheduler":
        return importlib.import_module("diffusers.schedulers.scheduling_lms_discrete").LMSDiscreteScheduler
    return getattr(diffusers, cls_name)


def _scheduler(cls_name: str, steps: int, **config):
    sched = _scheduler_class(cls_name)(**SD_BETAS, **config)
    sched.alphas_cumprod = AC.clone()                        # both sides on the float64 schedule
    if hasattr(sched, "final_alpha_cumprod") and not config.get("set_alpha_to_one", False):
        sched.final_alpha_cumprod = AC[0].clone()
    sched.set_timesteps(steps)
    return sched


def _singlestep_on_midpoint_grid(steps: int, sigmas: torch.Tensor):
    """DPMSolverSinglestepScheduler(order 2) on the grid σ_0, m_0, σ_1, m_1, ..., σ_{n-1}, 0 with m_i the
    λ-midpoint of σ_i and σ_{i+1}: its (1, 2) order pairs are then DPM-Solver++(2S) steps with r = 1/2."""
    sched = _scheduler("DPMSolverSinglestepScheduler", steps, solver_order=2, algorithm_type="dpmsolver++",
                       lower_order_final=True, final_sigmas_type="zero")
    grid = []
    for i in range(steps - 1):
        grid += [float(sigmas[i]), math.sqrt(float(sigmas[i]) * float(sigmas[i + 1]))]
    grid += [float(sigmas[steps - 1]), 0.0]
    n = len(grid) - 1
    sched.sigmas = torch.tensor(grid, dtype=torch.float32)
    sched.timesteps = DiscreteDenoiser(None, AC).sigma_to_t(torch.tensor(grid[:-1])).to(torch.float32)
    sched.num_inference_steps = n
    sched.order_list = sched.get_order_list(n)
    return sched


@dataclass(frozen=True)
class Case:
    label: str                       # row of the report
    sampler: str                     # ldm sampler name
    reference: str                   # diffusers scheduler (and how it is configured)
    make: Callable                   # steps -> configured diffusers scheduler
    schedule: str = "discrete"
    spacing: str = "leading"
    final: str = "zero"
    vp: bool = False                 # does the diffusers scheduler work on VP latents?
    steps: int = 12
    prediction: str = "eps"
    quantize: bool = False
    dtype: torch.dtype = torch.float64
    kwargs: dict = field(default_factory=dict)        # ldm sampler keyword arguments (eta)
    step_kwargs: dict = field(default_factory=dict)   # diffusers step() keyword arguments


def _cases() -> list[Case]:
    lead = dict(timestep_spacing="leading", steps_offset=1)
    ddim = dict(clip_sample=False, set_alpha_to_one=False, **lead)
    dpm = dict(algorithm_type="dpmsolver++", solver_order=2)
    cases = [
        Case("ddim", "ddim", "DDIMScheduler", lambda n: _scheduler("DDIMScheduler", n, **ddim),
             final="sigma_min", vp=True),
        Case("ddim η=0.5", "ddim", "DDIMScheduler, eta=0.5", lambda n: _scheduler("DDIMScheduler", n, **ddim),
             final="sigma_min", vp=True, kwargs=dict(eta=0.5), step_kwargs=dict(eta=0.5)),
        Case("ddim trailing", "ddim", "DDIMScheduler, trailing, set_alpha_to_one",
             lambda n: _scheduler("DDIMScheduler", n, clip_sample=False, set_alpha_to_one=True,
                                  timestep_spacing="trailing"), spacing="trailing", vp=True, steps=10),
        Case("plms", "plms", "PNDMScheduler(skip_prk_steps)",
             lambda n: _scheduler("PNDMScheduler", n, skip_prk_steps=True, set_alpha_to_one=False, **lead),
             final="sigma_min", vp=True),
        Case("ddpm", "ddpm", "DDPMScheduler", lambda n: _scheduler("DDPMScheduler", n, clip_sample=False, **lead),
             vp=True),
        Case("euler", "euler", "EulerDiscreteScheduler", lambda n: _scheduler("EulerDiscreteScheduler", n, **lead)),
        Case("euler karras", "euler", "EulerDiscreteScheduler(karras)",
             lambda n: _scheduler("EulerDiscreteScheduler", n, use_karras_sigmas=True), schedule="karras"),
        Case("euler_a", "euler_a", "EulerAncestralDiscreteScheduler",
             lambda n: _scheduler("EulerAncestralDiscreteScheduler", n, **lead)),
        Case("heun", "heun", "HeunDiscreteScheduler", lambda n: _scheduler("HeunDiscreteScheduler", n, **lead)),
        Case("heun karras", "heun", "HeunDiscreteScheduler(karras)",
             lambda n: _scheduler("HeunDiscreteScheduler", n, use_karras_sigmas=True), schedule="karras"),
        Case("lms", "lms", "LMSDiscreteScheduler", lambda n: _scheduler("LMSDiscreteScheduler", n, **lead)),
        Case("lms karras", "lms", "LMSDiscreteScheduler(karras)",
             lambda n: _scheduler("LMSDiscreteScheduler", n, use_karras_sigmas=True), schedule="karras"),
        Case("dpm2", "dpm2", "KDPM2DiscreteScheduler", lambda n: _scheduler("KDPM2DiscreteScheduler", n, **lead)),
        Case("dpm2 exponential", "dpm2", "KDPM2DiscreteScheduler(exponential)",
             lambda n: _scheduler("KDPM2DiscreteScheduler", n, use_exponential_sigmas=True),
             schedule="exponential"),
        Case("dpm2_a", "dpm2_a", "KDPM2AncestralDiscreteScheduler",
             lambda n: _scheduler("KDPM2AncestralDiscreteScheduler", n, **lead)),
        Case("dpm2_a exponential", "dpm2_a", "KDPM2AncestralDiscreteScheduler(exponential)",
             lambda n: _scheduler("KDPM2AncestralDiscreteScheduler", n, use_exponential_sigmas=True),
             schedule="exponential"),
        Case("dpmpp_2m karras", "dpmpp_2m", "DPMSolverMultistepScheduler(dpmsolver++, karras)",
             lambda n: _scheduler("DPMSolverMultistepScheduler", n, use_karras_sigmas=True, **dpm),
             schedule="karras", vp=True, quantize=True),
        Case("dpmpp_2m trailing", "dpmpp_2m", "DPMSolverMultistepScheduler(dpmsolver++, trailing)",
             lambda n: _scheduler("DPMSolverMultistepScheduler", n, timestep_spacing="trailing", **dpm),
             spacing="trailing", vp=True, steps=10),
        Case("dpmpp_2m_sde karras", "dpmpp_2m_sde", "DPMSolverMultistepScheduler(sde-dpmsolver++, karras)",
             lambda n: _scheduler("DPMSolverMultistepScheduler", n, use_karras_sigmas=True,
                                  algorithm_type="sde-dpmsolver++", solver_order=2),
             schedule="karras", vp=True, quantize=True),
        Case("dpmpp_2m_sde trailing", "dpmpp_2m_sde", "DPMSolverMultistepScheduler(sde-dpmsolver++, trailing)",
             lambda n: _scheduler("DPMSolverMultistepScheduler", n, timestep_spacing="trailing",
                                  algorithm_type="sde-dpmsolver++", solver_order=2),
             spacing="trailing", vp=True, steps=10),
        # k-diffusion's 3M starts with the "heun" form of the second-order step (weight φ_2 = (e^-h - 1)/h + 1).
        Case("dpmpp_3m_sde η=0 karras", "dpmpp_3m_sde",
             "DPMSolverMultistepScheduler(dpmsolver++, order 3, heun, karras)",
             lambda n: _scheduler("DPMSolverMultistepScheduler", n, use_karras_sigmas=True,
                                  algorithm_type="dpmsolver++", solver_order=3, solver_type="heun"),
             schedule="karras", vp=True, quantize=True, steps=16, kwargs=dict(eta=0.0)),
        Case("dpmpp_2s_a η=0 karras", "dpmpp_2s_a", "DPMSolverSinglestepScheduler(order 2, midpoint grid)",
             lambda n: _singlestep_on_midpoint_grid(n, make_sigmas(LOG_SIGMAS, n, "karras")),
             schedule="karras", vp=True, kwargs=dict(eta=0.0)),
        # v-prediction
        Case("ddim v", "ddim", "DDIMScheduler(v_prediction)",
             lambda n: _scheduler("DDIMScheduler", n, prediction_type="v_prediction", **ddim),
             final="sigma_min", vp=True, prediction="v"),
        Case("euler v", "euler", "EulerDiscreteScheduler(v_prediction)",
             lambda n: _scheduler("EulerDiscreteScheduler", n, prediction_type="v_prediction", **lead),
             prediction="v"),
        Case("dpmpp_2m karras v", "dpmpp_2m", "DPMSolverMultistepScheduler(v_prediction, karras)",
             lambda n: _scheduler("DPMSolverMultistepScheduler", n, use_karras_sigmas=True,
                                  prediction_type="v_prediction", **dpm),
             schedule="karras", vp=True, quantize=True, prediction="v"),
        # float32
        Case("euler_a fp32", "euler_a", "EulerAncestralDiscreteScheduler",
             lambda n: _scheduler("EulerAncestralDiscreteScheduler", n, **lead), dtype=torch.float32),
        Case("ddim fp32", "ddim", "DDIMScheduler", lambda n: _scheduler("DDIMScheduler", n, **ddim),
             final="sigma_min", vp=True, dtype=torch.float32),
        Case("dpmpp_2m karras fp32", "dpmpp_2m", "DPMSolverMultistepScheduler(dpmsolver++, karras)",
             lambda n: _scheduler("DPMSolverMultistepScheduler", n, use_karras_sigmas=True, **dpm),
             schedule="karras", vp=True, quantize=True, dtype=torch.float32),
    ]
    return cases


CASES = _cases()


def run_case(case: Case) -> tuple[float, float]:
    """(max relative error of the final latents, max relative difference of the σ grids) for one case."""
    model = model_fn(case.prediction)
    sigmas = make_sigmas(LOG_SIGMAS, case.steps, case.schedule, spacing=case.spacing, final=case.final)
    noise = randn(SHAPE[1:], generators_for(SEEDS), dtype=case.dtype)
    x_start = noise * math.sqrt(float(sigmas[0]) ** 2 + 1)             # x_T = noise in VP scale

    # ldm
    denoiser = DiscreteDenoiser(model, AC, case.prediction, quantize=case.quantize)
    fn = SAMPLERS[case.sampler]
    extra = {"generators": generators_for(SEEDS)} if "generators" in inspect.signature(fn).parameters else {}
    ours = fn(denoiser, x_start, sigmas, **case.kwargs, **extra) / math.sqrt(float(sigmas[-1]) ** 2 + 1)

    # diffusers
    with patched_diffusers(case.dtype):
        sched = case.make(case.steps)
        x = noise if case.vp else x_start
        takes_generator = "generator" in inspect.signature(sched.step).parameters
        gens = generators_for(SEEDS)
        for t in sched.timesteps:
            out = model(sched.scale_model_input(x, t), t)
            kw = dict(case.step_kwargs, **({"generator": gens} if takes_generator else {}))
            x = sched.step(out, t, x, **kw).prev_sample.to(case.dtype)
    ref_sigmas = torch.unique_consecutive(sched.sigmas.double()) if not case.vp else None
    sigma_err = 0.0
    if ref_sigmas is not None and len(ref_sigmas) == len(sigmas):
        sigma_err = float(((ref_sigmas - sigmas).abs() / sigmas.clamp(min=1e-12)).max())
    return float((ours - x).abs().max() / x.abs().max()), sigma_err


@pytest.mark.parametrize("case", CASES, ids=[c.label for c in CASES])
def test_parity_with_diffusers(case: Case):
    err, _ = run_case(case)
    assert err <= TOLERANCE[case.dtype], f"{case.label} vs {case.reference}: relative error {err:.2e}"


def test_every_sampler_with_a_diffusers_counterpart_is_covered():
    # dpmpp_sde needs torchsde's Brownian tree in diffusers (DPMSolverSDEScheduler); it is not installed.
    assert {c.sampler for c in CASES} == set(SAMPLERS) - {"dpmpp_sde"}
