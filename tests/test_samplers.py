"""Samplers on analytic denoisers: convergence to the exact probability-flow ODE solution, sample statistics,
batch invariance of the seeds, classifier-free guidance and the public API.

For Gaussian data N(μ, s²) the exact denoiser is D(x, σ) = μ + s² / (s² + σ²) (x - μ) and the probability-flow
ODE dx/dσ = (x - D) / σ has the solution x(σ) = μ + (x(σ') - μ) sqrt(s² + σ²) / sqrt(s² + σ'²).
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch

from ldm.sampling.denoisers import DiscreteDenoiser, GaussianMixtureDenoiser, append_dims
from ldm.sampling.guidance import CFGDenoiser, rescale_guidance, v_to_x0, x0_to_v
from ldm.sampling.samplers import (ALIASES, DISCRETE_SAMPLERS, ETA_SAMPLERS, SAMPLERS, STOCHASTIC_SAMPLERS, generators_for,
                          randn, resolve_sampler, sample)
from ldm.sampling.schedules import alphas_cumprod_for, make_sigmas, sigmas_from_alphas_cumprod, t_to_sigma

AC = alphas_cumprod_for()
LOG_SIGMAS = sigmas_from_alphas_cumprod(AC).log()


class Analytic:
    """An analytic denoiser that carries SD's σ table, so `make_sigmas` and `sample` accept it."""
    log_sigmas = LOG_SIGMAS

    def __init__(self, data: GaussianMixtureDenoiser):
        self.data = data

    def __call__(self, x, sigma, **_):
        return self.data(x, sigma)


def eps_model(data: GaussianMixtureDenoiser):
    """An ε-prediction "network" for `DiscreteDenoiser`: (VP latent, t) -> exact ε."""
    def model(x_vp, t, cond=None):
        sigma = t_to_sigma(t.reshape(-1).cpu(), LOG_SIGMAS).to(x_vp.device, x_vp.dtype).expand(x_vp.shape[0])
        s = append_dims(sigma, x_vp.ndim)
        x = x_vp * (s ** 2 + 1).sqrt()
        return (x - data(x, sigma)) / s
    return model


# --- convergence to the probability-flow ODE ------------------------------------------------------------------

# Deterministic samplers (the ancestral and SDE ones at η = 0) and their global order on the Karras grid:
# - lms is a 4th-order Adams–Bashforth method; its Euler start-up caps the asymptotic order at 2, but only
#   beyond N ≈ 500 steps, where its error is ~1e-8.
# - plms combines ε with fixed-step Adams–Bashforth weights; on a grid that is not uniform in σ (any SD grid)
#   that is second order. On a uniform σ grid it reaches 4 (`test_plms_is_fourth_order_on_a_uniform_grid`).
# - dpmpp_3m_sde (η = 0) is DPM-Solver++(3M) as in k-diffusion and diffusers: D2 = (D1_0 - D1_1) / (r0 + r1)
#   estimates h² x̂_0''/2, but its weight φ_3 integrates h² x̂_0'', so each step errs by h³ x̂_0''/12 and the
#   method is second order (doubling the weight gives order 3). ldm keeps the k-diffusion algorithm.
DETERMINISTIC: dict[str, tuple[dict, float]] = {
    "euler": ({}, 1), "ddim": ({}, 1), "euler_a": ({"eta": 0.0}, 1),
    "heun": ({}, 2), "dpm2": ({}, 2), "dpm2_a": ({"eta": 0.0}, 2), "plms": ({}, 2),
    "dpmpp_2s_a": ({"eta": 0.0}, 2), "dpmpp_sde": ({"eta": 0.0}, 2), "dpmpp_2m": ({}, 2),
    "dpmpp_2m_sde": ({"eta": 0.0}, 2), "dpmpp_3m_sde": ({"eta": 0.0}, 2), "lms": ({}, 4),
}
ORDER_STEPS = (32, 64, 128, 256)
GAUSSIAN = GaussianMixtureDenoiser([0.5], [0.5])


def ode_errors(name: str, steps=ORDER_STEPS, sigmas_for=None) -> list[float]:
    """Max relative error against the exact ODE solution after running `name` on the Karras grid from σ_max to
    σ_min (no final step to 0, whose error does not shrink with N) for each step count."""
    kwargs, _ = DETERMINISTIC[name]
    x = torch.linspace(-3, 3, 64, dtype=torch.float64).reshape(1, 1, 8, 8)
    errors = []
    for n in steps:
        sigmas = sigmas_for(n) if sigmas_for else make_sigmas(LOG_SIGMAS, n, "karras", final="sigma_min")
        x_start = GAUSSIAN.mean + x * float(sigmas[0])
        exact = GAUSSIAN.gaussian_ode_solution(x_start, float(sigmas[0]), float(sigmas[-1]))
        out = SAMPLERS[name](GAUSSIAN, x_start, sigmas, **kwargs)
        errors.append(float((out - exact).abs().max() / exact.abs().max()))
    return errors


def measured_order(steps, errors) -> float:
    """Least-squares slope of -log(error) against log(steps)."""
    lx = torch.tensor(steps, dtype=torch.float64).log()
    ly = torch.tensor(errors, dtype=torch.float64).log()
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float(-(lx * ly).sum() / (lx * lx).sum())


@pytest.mark.parametrize("name", list(DETERMINISTIC))
def test_converges_to_the_ode_solution_at_its_order(name):
    errors = ode_errors(name)
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    expected = DETERMINISTIC[name][1]
    assert abs(measured_order(ORDER_STEPS, errors) - expected) < 0.35, (errors, expected)


def test_plms_is_fourth_order_on_a_uniform_grid():
    steps = (32, 64, 128, 256)
    errors = ode_errors("plms", steps, lambda n: torch.linspace(3.0, 0.5, n + 1, dtype=torch.float64))
    assert measured_order(steps, errors) > 3.6, errors


def test_every_sampler_is_covered():
    assert set(DETERMINISTIC) == set(SAMPLERS) - {"ddpm"}          # ddpm has no deterministic form


# --- data statistics at 50 steps -------------------------------------------------------------------------

# Data N(0.5, 1) (SD latents have roughly unit std) and 4 x 4 x 64 x 64 = 65536 samples. Tolerances:
# - mean: 5 standard errors, 5 s / sqrt(n) = 0.0195. Every step is affine in x - μ with zero-mean noise, so
#   the samplers carry no discretisation bias in the mean.
# - std: 5 standard errors, 5 s / sqrt(2n) = 0.0138, plus the discretisation bias b / N^p at N = 50 steps with
#   the sampler's order p (1 for euler, ddim, euler_a and ddpm, 2 for the rest). b = 4 bounds the error
#   constants seen in the convergence test (Euler: error x N ≈ 1.3; Heun: error x N² ≈ 3.7) and the
#   first-order ancestral samplers' under-dispersion (about 3 / N).
# The k-samplers run on the Karras schedule, A1111's pairing for them. On the "normal" (linspace) schedule the
# last step jumps 1.56 in λ (σ 0.139 -> 0.029), which the multistep SDE solvers take badly at 50 steps
# (dpmpp_2m_sde +6 %, dpmpp_3m_sde +37 % in std).
STATS_MEAN, STATS_STD = 0.5, 1.0
FIRST_ORDER = {"euler", "ddim", "euler_a", "ddpm"}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_reproduces_the_data_mean_and_std(name):
    gens = generators_for([101, 102, 103, 104])
    noise = randn((4, 64, 64), gens, dtype=torch.float64)
    denoiser = Analytic(GaussianMixtureDenoiser([STATS_MEAN], [STATS_STD]))
    schedule = None if name in DISCRETE_SAMPLERS else "karras"
    out = sample(denoiser, noise, sampler=name, steps=50, schedule=schedule, generators=gens,
                 init_latent=torch.full_like(noise, STATS_MEAN))       # start from the exact σ_max marginal
    n = out.numel()
    std_tol = 5 * STATS_STD / math.sqrt(2 * n) + 4 * STATS_STD / 50 ** (1 if name in FIRST_ORDER else 2)
    assert abs(float(out.mean()) - STATS_MEAN) < 5 * STATS_STD / math.sqrt(n)
    assert abs(float(out.std()) - STATS_STD) < std_tol


# --- noise, seeds and batch invariance ---------------------------------------------------------------------

def test_randn_draws_each_image_from_its_own_generator():
    a = randn((4, 8, 8), generators_for([1, 2, 3]))
    for i, seed in enumerate([1, 2, 3]):
        alone = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(a[i:i + 1], alone)
    assert randn((4, 8, 8), generators_for([5]), dtype=torch.float16).dtype == torch.float16
    assert torch.equal(randn((2, 2), generators_for([5]), dtype=torch.float16),
                       randn((2, 2), generators_for([5])).half())          # half runs see the float32 draw


def test_randn_is_device_independent():
    cpu = randn((4, 8, 8), generators_for([9, 10]))
    devices = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        out = randn((4, 8, 8), generators_for([9, 10]), device=device)
        assert out.device.type == device
        if device != "meta":
            assert torch.equal(out.cpu(), cpu)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU"):
            randn((4,), [torch.Generator("cuda").manual_seed(0)])


@pytest.mark.parametrize("name", sorted(STOCHASTIC_SAMPLERS))
def test_image_in_a_batch_equals_the_same_seed_alone(name):
    # The full path: noise from per-image generators, a discrete ε-model behind classifier-free guidance with a
    # per-image prompt, and the sampler's own noise draws. CPU, float32, bit for bit.
    seeds, prompts = [11, 22, 33], [0.5, -0.3, 0.9]
    inner = DiscreteDenoiser(_conditional_model([]), AC, "v")
    kwargs = {"eta": 0.7} if name == "ddim" else {}

    def run(idx):
        gens = generators_for([seeds[i] for i in idx])
        cond = torch.tensor([prompts[i] for i in idx]).reshape(-1, 1, 1)
        noise = randn((4, 16, 16), gens)
        guided = CFGDenoiser(inner, cond, torch.zeros_like(cond), scale=5.0)
        return sample(guided, noise, sampler=name, steps=6, generators=gens, **kwargs)

    batch = run([0, 1, 2])
    for i, seed in enumerate(seeds):
        assert torch.equal(batch[i:i + 1], run([i])), f"image {i} of the batch differs from seed {seed} alone"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(STOCHASTIC_SAMPLERS))
def test_same_seed_same_result_on_cuda(name):
    # Same seeds -> the same noise on any device (drawn on the CPU); results differ only by fp32 arithmetic.
    denoiser = DiscreteDenoiser(eps_model(GaussianMixtureDenoiser([-0.4, 0.8], [0.3, 0.5])), AC, "eps")

    def run(device):
        gens = generators_for([5, 6])
        noise = randn((4, 16, 16), gens, device=device)
        return sample(denoiser, noise, sampler=name, steps=8, generators=gens).cpu()

    assert torch.allclose(run("cuda"), run("cpu"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(STOCHASTIC_SAMPLERS))
def test_stochastic_samplers_need_one_generator_per_image(name):
    x = torch.zeros(2, 1, 4, 4)
    sigmas = make_sigmas(LOG_SIGMAS, 3, "karras")
    with pytest.raises(ValueError, match="generators"):
        SAMPLERS[name](Analytic(GAUSSIAN), x, sigmas, **({"eta": 1.0} if name == "ddim" else {}))
    with pytest.raises(ValueError, match="generators"):
        SAMPLERS[name](Analytic(GAUSSIAN), x, sigmas, generators=generators_for([1]),
                       **({"eta": 1.0} if name == "ddim" else {}))


# --- the sampler functions and `sample` ----------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SAMPLERS))
def test_samplers_leave_the_input_alone_and_report_every_step(name):
    x = randn((1, 4, 4), generators_for([3, 4]), dtype=torch.float64) * 14.6
    before = x.clone()
    sigmas = make_sigmas(LOG_SIGMAS, 5, "karras")
    seen = []
    kwargs = {"generators": generators_for([3, 4])} if name in STOCHASTIC_SAMPLERS else {}
    out = SAMPLERS[name](Analytic(GAUSSIAN), x, sigmas, callback=seen.append, **kwargs)
    assert torch.equal(x, before) and out.shape == x.shape and torch.isfinite(out).all()
    assert [info["i"] for info in seen] == list(range(5)) and all(info["total"] == 5 for info in seen)
    assert set(seen[0]) == {"i", "total", "sigma", "sigma_next", "x", "denoised"}
    assert seen[0]["sigma"] == float(sigmas[0]) and seen[-1]["sigma_next"] == 0.0


def test_ddim_eta_one_is_ddpm_and_eta_zero_is_euler():
    x = randn((2, 8, 8), generators_for([5]), dtype=torch.float64) * 14.6
    sigmas = make_sigmas(LOG_SIGMAS, 8, "discrete", spacing="leading")
    d = Analytic(GaussianMixtureDenoiser([-0.4, 0.8], [0.3, 0.5]))
    ddpm = SAMPLERS["ddpm"](d, x, sigmas, generators=generators_for([6]))
    ddim = SAMPLERS["ddim"](d, x, sigmas, eta=1.0, generators=generators_for([6]))
    assert torch.allclose(ddpm, ddim, rtol=1e-12, atol=1e-12)
    assert torch.allclose(SAMPLERS["ddim"](d, x, sigmas), SAMPLERS["euler"](d, x, sigmas), rtol=1e-12, atol=1e-12)


def test_sample_img2img_starts_part_way_down_the_schedule():
    d = Analytic(GAUSSIAN)
    gens = generators_for([1])
    noise = randn((1, 4, 4), gens, dtype=torch.float64)
    init = torch.full_like(noise, 0.3)
    seen = []
    sample(d, noise, sampler="euler", steps=10, init_latent=init, strength=0.55, callback=seen.append)
    full = make_sigmas(d, 10, "discrete", spacing="linspace")
    assert len(seen) == int(0.55 * 10) and seen[0]["sigma"] == float(full[10 - 5])
    assert torch.equal(seen[0]["x"], init + noise * float(full[5]))
    untouched = sample(d, noise, sampler="euler", steps=10, init_latent=init, strength=0.0)
    assert torch.equal(untouched, init)
    with pytest.raises(ValueError, match="init_latent"):
        sample(d, noise, sampler="euler", steps=10, strength=0.5)


def test_sample_txt2img_start_and_final_scale():
    d = Analytic(GAUSSIAN)
    noise = randn((1, 4, 4), generators_for([1]), dtype=torch.float64)
    for name, scale in [("ddim", lambda s: math.sqrt(s * s + 1)), ("euler", lambda s: s)]:
        seen = []
        sample(d, noise, sampler=name, steps=4, callback=seen.append)
        assert torch.allclose(seen[0]["x"], noise * scale(seen[0]["sigma"]), rtol=1e-15, atol=0)
    # DDIM on the CompVis grid stops at σ(t=0) and returns the VP latent there.
    seen = []
    out = sample(d, noise, sampler="DDIM", steps=4, callback=seen.append)
    final_step = torch.tensor([seen[-1]["sigma"], seen[-1]["sigma_next"]], dtype=torch.float64)
    last = SAMPLERS["ddim"](d, seen[-1]["x"], final_step)
    assert seen[-1]["sigma_next"] == pytest.approx(math.exp(float(LOG_SIGMAS[0])))
    assert torch.allclose(out, last / math.sqrt(seen[-1]["sigma_next"] ** 2 + 1), rtol=1e-14, atol=0)


def test_sample_schedule_selection_and_eta_errors():
    d = Analytic(GAUSSIAN)
    noise = randn((1, 4, 4), generators_for([1]), dtype=torch.float64)
    karras = make_sigmas(d, 6, "karras")
    for kwargs in [dict(sampler="DPM++ 2M Karras"), dict(sampler="dpmpp_2m", karras=True),
                   dict(sampler="dpmpp_2m", schedule="karras")]:
        seen = []
        sample(d, noise, steps=6, callback=seen.append, **kwargs)
        assert [info["sigma"] for info in seen] == karras[:-1].tolist()
    with pytest.raises(ValueError, match="takes no eta"):
        sample(d, noise, sampler="euler", steps=4, eta=0.5)
    with pytest.raises(ValueError, match="contradicts"):
        sample(d, noise, sampler="euler", steps=4, karras=True, schedule="exponential")


# --- names ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alias, expected", [
    ("Euler a", ("euler_a", None)), ("DPM++ 2M Karras", ("dpmpp_2m", "karras")), ("DPM++ SDE", ("dpmpp_sde", None)),
    ("DPM2 a", ("dpm2_a", None)), ("LMS", ("lms", None)), ("Heun", ("heun", None)), ("DDIM", ("ddim", None)),
    ("PLMS", ("plms", None)), ("DPM++ 2S a", ("dpmpp_2s_a", None)), ("DPM++ 2M SDE", ("dpmpp_2m_sde", None)),
    ("DPM++ 3M SDE Exponential", ("dpmpp_3m_sde", "exponential")), ("dpm++ 2m  karras", ("dpmpp_2m", "karras")),
    ("LMS Karras", ("lms", "karras")), ("euler_ancestral", ("euler_a", None)), ("dpmpp_2m", ("dpmpp_2m", None)),
])
def test_resolve_sampler_aliases(alias, expected):
    assert resolve_sampler(alias) == expected


def test_every_alias_resolves_and_unknown_names_list_the_valid_ones():
    assert len(SAMPLERS) == 14 and ETA_SAMPLERS <= STOCHASTIC_SAMPLERS <= set(SAMPLERS)
    for alias, (name, _) in ALIASES.items():
        assert resolve_sampler(alias)[0] == name in SAMPLERS
    with pytest.raises(ValueError, match="dpmpp_2m_sde") as info:
        resolve_sampler("UniPC")
    assert "unknown sampler 'UniPC'" in str(info.value)


def test_one_table_names_every_sampler_and_what_it_takes():
    """ldm.sampling.names.TABLE is the one registry: the functions come in its order, the sets are its flags, and the
    name an image's infotext records for each sampler and schedule reads back as the same sampler and schedule."""
    from ldm.sampling.names import TABLE, infotext_name

    assert tuple(SAMPLERS) == tuple(s.name for s in TABLE)
    assert DISCRETE_SAMPLERS == {"ddpm", "ddim", "plms"}
    assert ETA_SAMPLERS == {s.name for s in TABLE if s.eta} and "ddpm" not in ETA_SAMPLERS
    for s in TABLE:  # a stochastic sampler is one whose function takes the per-image generators
        assert ("generators" in inspect.signature(SAMPLERS[s.name]).parameters) == s.stochastic, s.name
        assert ("eta" in inspect.signature(SAMPLERS[s.name]).parameters) == s.eta, s.name
        for schedule in (None, "discrete", "karras", "exponential"):
            carried = None if s.discrete or schedule in (None, "discrete") else schedule
            assert resolve_sampler(infotext_name(s.name, schedule)) == (s.name, carried)
    assert infotext_name("dpmpp_2m", "karras") == "DPM++ 2M Karras" and infotext_name("ddim", "karras") == "DDIM"


def test_the_cli_help_lists_the_tables_samplers():
    import argparse
    import contextlib
    import io

    from ldm.cli import DEFAULT, build_parser
    from ldm.sampling.names import NAMES

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        build_parser("txt2img").parse_args(["txt2img", "--help"])
    text = " ".join(out.getvalue().split())
    assert ", ".join(NAMES) in text and f"(default {DEFAULT.sampler})" in text
    assert "noise scale of " + ", ".join(n for n in NAMES if n in ETA_SAMPLERS) in text
    assert isinstance(build_parser(), argparse.ArgumentParser)


# --- denoiser adapters ------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_discrete_denoiser_recovers_the_exact_denoiser(prediction):
    data = GaussianMixtureDenoiser([-0.4, 0.8], [0.3, 0.5])
    eps = eps_model(data)

    def model(x_vp, t, cond=None):
        if prediction == "eps":
            return eps(x_vp, t)
        s = append_dims(t_to_sigma(t.reshape(-1), LOG_SIGMAS).to(x_vp.dtype), x_vp.ndim)
        x = x_vp * (s ** 2 + 1).sqrt()
        return x0_to_v(x, s.flatten(), x - s * eps(x_vp, t))
    denoiser = DiscreteDenoiser(model, AC, prediction)
    x = randn((2, 4, 4), generators_for([1, 2]), dtype=torch.float64) * 3
    sigma = torch.tensor([2.0, 0.1], dtype=torch.float64)
    assert torch.allclose(denoiser(x, sigma), data(x, sigma), rtol=1e-10, atol=1e-12)
    assert denoiser.sigma_min == pytest.approx(0.0292, abs=1e-4)
    assert denoiser.sigma_max == pytest.approx(14.61, abs=1e-2)


def test_discrete_denoiser_quantize_rounds_the_timestep():
    seen = []
    denoiser = DiscreteDenoiser(lambda x, t, c: seen.append(t) or torch.zeros_like(x), AC, "eps", quantize=True)
    sigma = t_to_sigma(torch.tensor([500.4, 20.6]), LOG_SIGMAS).float()
    denoiser(torch.zeros(2, 1, 2, 2), sigma)
    assert seen[0].tolist() == [500.0, 21.0] and seen[0].dtype == torch.float32
    with pytest.raises(ValueError, match="prediction"):
        DiscreteDenoiser(lambda *a: None, AC, "x0")  # type: ignore[arg-type]


# --- classifier-free guidance ------------------------------------------------------------------------------

def _conditional_model(calls):
    """A v-model whose data mean is the conditioning scalar: cond has shape (B, 1, 1)."""
    def model(x_vp, t, cond):
        calls.append(x_vp.shape[0])
        sigma = t_to_sigma(t.reshape(-1).cpu(), LOG_SIGMAS).to(x_vp.device, x_vp.dtype)
        s = append_dims(sigma, x_vp.ndim)
        x = x_vp * (s ** 2 + 1).sqrt()
        mu = cond.reshape(-1, 1, 1, 1)
        x0 = mu + 0.25 / (0.25 + s ** 2) * (x - mu) + 0.1 * torch.tanh(x)
        return x0_to_v(x, sigma, x0)
    return model


def test_cfg_batches_uncond_and_cond_and_skips_uncond_at_scale_one():
    calls = []
    inner = DiscreteDenoiser(_conditional_model(calls), AC, "v")
    cond, uncond = torch.tensor([[[1.0]], [[-1.0]]]), torch.tensor([[[0.0]], [[0.3]]])   # uncond: negative prompts
    x = randn((1, 4, 4), generators_for([1, 2])) * 3
    sigma = torch.full((2,), 1.5)
    guided = CFGDenoiser(inner, cond, uncond, scale=7.5)(x, sigma)
    assert calls == [4]
    c, u = inner(x, sigma, cond=cond), inner(x, sigma, cond=uncond)
    assert torch.allclose(guided, u + 7.5 * (c - u), rtol=1e-5, atol=1e-5)
    calls.clear()
    assert torch.equal(CFGDenoiser(inner, cond, uncond, scale=1.0)(x, sigma), inner(x, sigma, cond=cond))
    assert calls == [2, 2]
    assert torch.equal(CFGDenoiser(inner, cond, None, scale=1.0).log_sigmas, inner.log_sigmas)
    with pytest.raises(ValueError, match="uncond"):
        CFGDenoiser(inner, cond, None, scale=5.0)


def test_cfg_gives_a_latent_sharing_model_the_latents_once():
    """With `shares_latents` the model gets x once and both conditionings of each latent ([uncond, cond], as
    UNetModel takes them); guidance, interval included, comes out the same as with x doubled."""
    calls = []
    plain_model = _conditional_model([])

    def sharing_model(x_vp, t, cond):
        calls.append((x_vp.shape[0], cond.shape[0]))
        k = cond.shape[0] // x_vp.shape[0]
        return plain_model(torch.cat([x_vp] * k), torch.cat([t] * k), cond)

    shared = DiscreteDenoiser(sharing_model, AC, "v", shares_latents=True)
    plain = DiscreteDenoiser(plain_model, AC, "v")
    cond, uncond = torch.tensor([[[1.0]], [[-1.0]]]), torch.tensor([[[0.0]], [[0.3]]])
    x = randn((1, 4, 4), generators_for([1, 2])) * 3
    for sigma, interval in [(torch.full((2,), 1.5), None), (torch.tensor([0.5, 2.0]), (1.0, None))]:
        calls.clear()
        ours = CFGDenoiser(shared, cond, uncond, scale=7.5, interval=interval)(x, sigma)
        assert calls == [(2, 4)]
        assert torch.equal(ours, CFGDenoiser(plain, cond, uncond, scale=7.5, interval=interval)(x, sigma))
    assert torch.equal(shared(x, sigma, cond=torch.cat([uncond, cond])),
                       plain(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([uncond, cond])))


def test_cfg_guidance_interval_guides_only_inside_it():
    """Kynkäänniemi et al. 2024: guidance for lo < σ <= hi, the conditional pass alone (batch B) elsewhere, and
    per sample when a batch straddles a bound."""
    calls = []
    inner = DiscreteDenoiser(_conditional_model(calls), AC, "v")
    cond, uncond = torch.tensor([[[1.0]], [[-1.0]]]), torch.tensor([[[0.0]], [[0.3]]])
    x = randn((1, 4, 4), generators_for([1, 2])) * 3
    plain = CFGDenoiser(inner, cond, uncond, scale=7.5)
    limited = CFGDenoiser(inner, cond, uncond, scale=7.5, interval=(1.0, 4.0))
    for level, guided in ((0.5, False), (1.0, False), (1.5, True), (4.0, True), (6.0, False)):
        sigma = torch.full((2,), level)
        calls.clear()
        out = limited(x, sigma)
        assert calls == ([4] if guided else [2]), level
        expected = plain(x, sigma) if guided else inner(x, sigma, cond=cond)
        assert torch.equal(out, expected), level
    sigma = torch.tensor([0.5, 1.5])  # one sample on each side of lo
    out = limited(x, sigma)
    assert torch.equal(out[1], plain(x, sigma)[1])
    assert torch.allclose(out[0], inner(x, sigma, cond=cond)[0], rtol=1e-6, atol=1e-6)
    open_ended = CFGDenoiser(inner, cond, uncond, scale=7.5, interval=(1.0, float("inf")))
    assert open_ended.interval == (1.0, None)
    assert torch.equal(open_ended(x, torch.full((2,), 1e4)), plain(x, torch.full((2,), 1e4)))
    for bad in ((2.0, 1.0), (-0.1, None), (1.0, 1.0), (float("nan"), None), "1-2", (1.0,)):
        with pytest.raises(ValueError, match="guidance interval"):
            CFGDenoiser(inner, cond, uncond, scale=7.5, interval=bad)


def test_guidance_rescale_matches_diffusers_on_v_predictions():
    rescale_noise_cfg = pytest.importorskip(
        "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion").rescale_noise_cfg
    model = _conditional_model([])
    inner = DiscreteDenoiser(model, AC, "v")
    cond, uncond = torch.tensor([[[1.0]], [[-1.0]]], dtype=torch.float64), torch.zeros(2, 1, 1, dtype=torch.float64)
    x = randn((2, 4, 4), generators_for([1, 2]), dtype=torch.float64) * 3
    sigma = torch.full((2,), 2.0, dtype=torch.float64)
    ours = CFGDenoiser(inner, cond, uncond, scale=6.0, guidance_rescale=0.7)(x, sigma)
    # diffusers' pipeline: guide the v-predictions, rescale them (Lin et al. eq. 15-16), then x_0 from v.
    t = inner.sigma_to_t(sigma).double()
    x_vp = x / (append_dims(sigma, 4) ** 2 + 1).sqrt()
    v_u, v_c = model(x_vp, t, uncond), model(x_vp, t, cond)
    v = rescale_noise_cfg(v_u + 6.0 * (v_c - v_u), v_c, guidance_rescale=0.7)
    assert torch.allclose(ours, v_to_x0(x, sigma, v), rtol=1e-12, atol=1e-12)
    assert torch.allclose(rescale_guidance(v, v, 1.0), v)                    # nothing to rescale
