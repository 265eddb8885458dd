"""Noise schedules: the SD training schedule, σ <-> t, timestep spacings and σ schedules, against closed forms,
the CompVis definitions and diffusers' schedulers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.config import ScheduleConfig
from ldm.sampling.schedules import (alphas_cumprod_for, betas_for, exponential_sigmas, karras_sigmas, make_sigmas,
                           sigma_to_t, sigmas_from_alphas_cumprod, start_index, t_to_sigma, timesteps)


def reference():
    """diffusers, the independent reference (a test dependency); tests that need it skip without it."""
    return pytest.importorskip("diffusers")

AC = alphas_cumprod_for()
LOG_SIGMAS = sigmas_from_alphas_cumprod(AC).log()
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(((a - b).abs() / b.abs().clamp(min=1e-12)).max())


# --- training schedule -------------------------------------------------------------------------------------

def test_sd_betas_are_scaled_linear_in_float64():
    betas = betas_for(ScheduleConfig())
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert math.isclose(float(betas[0]), 0.00085, rel_tol=1e-12)
    assert math.isclose(float(betas[-1]), 0.012, rel_tol=1e-12)
    root = betas.sqrt()
    assert torch.allclose(root[1:] - root[:-1], (root[1] - root[0]).expand(999), rtol=1e-9, atol=0)


def test_alphas_cumprod_matches_diffusers_to_float32_rounding():
    diffusers = reference()
    ref = diffusers.DDPMScheduler(**SD_BETAS).alphas_cumprod
    assert _rel(alphas_cumprod_for(), ref) < 2e-5   # diffusers' cumprod runs in float32
    assert torch.allclose(alphas_cumprod_for(), torch.cumprod(1 - betas_for(), 0), rtol=0, atol=0)


def test_linear_schedule_and_unknown_schedule():
    betas = betas_for(ScheduleConfig(beta_schedule="linear", beta_start=1e-4, beta_end=2e-2))
    assert torch.allclose(betas, torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64))
    with pytest.raises(ValueError, match="beta_schedule"):
        betas_for(ScheduleConfig(beta_schedule="cosine"))  # type: ignore[arg-type]


# --- sigma <-> t -----------------------------------------------------------------------------------------

def test_sigma_t_round_trip_and_integer_points():
    sigmas = LOG_SIGMAS.exp()
    ts = torch.arange(1000, dtype=torch.float64)
    assert torch.allclose(sigma_to_t(sigmas, LOG_SIGMAS), ts, atol=1e-9, rtol=0)
    assert torch.allclose(t_to_sigma(ts, LOG_SIGMAS), sigmas, rtol=1e-12, atol=0)
    t = torch.tensor([0.0, 0.25, 17.5, 500.123, 998.9, 999.0], dtype=torch.float64)
    assert torch.allclose(sigma_to_t(t_to_sigma(t, LOG_SIGMAS), LOG_SIGMAS), t, atol=1e-9, rtol=0)


def test_sigma_to_t_is_log_linear_and_clamped():
    mid = t_to_sigma(torch.tensor([10.5], dtype=torch.float64), LOG_SIGMAS)
    assert math.isclose(float(mid), math.exp((float(LOG_SIGMAS[10]) + float(LOG_SIGMAS[11])) / 2), rel_tol=1e-12)
    ends = sigma_to_t(torch.tensor([1e-6, 0.0, 100.0], dtype=torch.float64), LOG_SIGMAS)
    assert ends.tolist() == [0.0, 0.0, 999.0]


def test_sigma_to_t_matches_diffusers():
    diffusers = reference()
    sched = diffusers.EulerDiscreteScheduler(**SD_BETAS)
    sigmas = np.array([14.6, 7.3, 1.01, 0.5, 0.0301, 0.0292], dtype=np.float64)
    ref = sched._sigma_to_t(sigmas, LOG_SIGMAS.numpy())
    assert np.allclose(sigma_to_t(torch.from_numpy(sigmas), LOG_SIGMAS).numpy(), ref, atol=1e-9, rtol=0)


# --- timestep spacings -----------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [10, 20, 25, 50, 100])
def test_leading_is_the_compvis_ddim_grid(steps):
    compvis = np.asarray(list(range(0, 1000, 1000 // steps))) + 1     # CompVis make_ddim_timesteps("uniform")
    assert timesteps("leading", steps).tolist() == compvis[::-1].astype(float).tolist()


def test_leading_has_exactly_the_requested_steps():
    # CompVis' range(0, 1000, 1000 // 3) has 4 elements; ldm, like diffusers, gives 3.
    assert timesteps("leading", 3).tolist() == [667.0, 334.0, 1.0]


@pytest.mark.parametrize("kind", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [4, 10, 20, 50])
def test_spacings_match_diffusers(kind, steps):
    diffusers = reference()
    ddim = diffusers.DDIMScheduler(**SD_BETAS, timestep_spacing=kind, steps_offset=1 if kind == "leading" else 0)
    ddim.set_timesteps(steps)
    ours = timesteps(kind, steps)
    if kind == "linspace":                       # DDIM rounds the linspace grid; the k-schedulers do not
        assert ours.round().long().tolist() == ddim.timesteps.tolist()
        euler = diffusers.EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="linspace")
        euler.set_timesteps(steps)
        assert torch.allclose(ours, euler.timesteps.double(), atol=1e-4, rtol=0)
    else:
        assert ours.long().tolist() == ddim.timesteps.tolist()


def test_spacing_errors():
    with pytest.raises(ValueError, match="spacing"):
        timesteps("uniform", 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        timesteps("leading", 0)


# --- sigma schedules -------------------------------------------------------------------------------------

def test_karras_is_edm_eq5():
    s = karras_sigmas(5, 0.1, 10.0, rho=7.0)
    i = torch.arange(5, dtype=torch.float64)
    expected = (10.0 ** (1 / 7) + i / 4 * (0.1 ** (1 / 7) - 10.0 ** (1 / 7))) ** 7
    assert torch.allclose(s, expected, rtol=1e-14, atol=0)
    assert math.isclose(float(s[0]), 10.0, rel_tol=1e-14) and math.isclose(float(s[-1]), 0.1, rel_tol=1e-14)


def test_exponential_is_log_uniform():
    s = exponential_sigmas(6, 0.1, 10.0)
    ratios = s[1:] / s[:-1]
    assert torch.allclose(ratios, ratios[0].expand(5), rtol=1e-12, atol=0)


@pytest.mark.parametrize("schedule, config", [
    ("discrete", dict(timestep_spacing="leading", steps_offset=1)),
    ("discrete", dict(timestep_spacing="trailing")),
    ("karras", dict(use_karras_sigmas=True)),
    ("exponential", dict(use_exponential_sigmas=True)),
])
@pytest.mark.parametrize("steps", [7, 20])
def test_make_sigmas_matches_diffusers_euler(schedule, config, steps):
    diffusers = reference()
    sched = diffusers.EulerDiscreteScheduler(**SD_BETAS, **config)
    sched.alphas_cumprod = AC.clone()
    sched.set_timesteps(steps)
    spacing = config.get("timestep_spacing", "linspace")
    ours = make_sigmas(LOG_SIGMAS, steps, schedule, spacing=spacing)
    assert ours.dtype == torch.float64 and ours.shape == (steps + 1,) and float(ours[-1]) == 0.0
    assert _rel(ours[:-1], sched.sigmas[:-1]) < 1e-6                    # diffusers stores float32


def test_make_sigmas_linspace_interpolates_in_log_sigma():
    diffusers = reference()
    # diffusers' Euler interpolates σ linearly between integer timesteps; k-diffusion (and ldm) in log σ.
    sched = diffusers.EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="linspace")
    sched.alphas_cumprod = AC.clone()
    sched.set_timesteps(20)
    assert _rel(make_sigmas(LOG_SIGMAS, 20, "normal")[:-1], sched.sigmas[:-1]) < 1e-4


def test_make_sigmas_final_sigma_min_and_denoiser_source():
    class Source:
        log_sigmas = LOG_SIGMAS
    s = make_sigmas(Source(), 10, "discrete", spacing="leading", final="sigma_min")
    assert math.isclose(float(s[-1]), math.exp(float(LOG_SIGMAS[0])), rel_tol=1e-12)
    assert math.isclose(float(s[0]), float(t_to_sigma(torch.tensor(901.0), LOG_SIGMAS)), rel_tol=1e-12)
    with pytest.raises(ValueError, match="sigma schedule"):
        make_sigmas(LOG_SIGMAS, 10, "cosine")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        make_sigmas(object(), 10)


def test_start_index_follows_compvis_t_enc():
    assert start_index(50, 0.75) == 50 - int(0.75 * 50)
    assert start_index(10, 1.0) == 0 and start_index(10, 0.0) == 10
    assert start_index(7, 0.5) == 4                    # t_enc = int(3.5) = 3 steps run
    with pytest.raises(ValueError, match="strength"):
        start_index(10, 1.5)
