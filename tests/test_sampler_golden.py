"""Golden numbers: a short, seeded run of every sampler on an analytic model, so that any silent change to a
sampler, a schedule, the denoiser adapter or the noise draws shows up.

Each run: `ldm.sampling.samplers.sample` with the sampler's default schedule, 4 steps, seeds (0, 1), float64, latents of
shape (2, 1, 4, 4), and `DiscreteDenoiser` over the exact ε of a two-component Gaussian mixture.

To regenerate tests/data/sampler_golden.json after an intended change (and say why in the commit):

    LDM_REGEN_GOLDEN=1 python -m pytest -q tests/test_sampler_golden.py
    # or: python -m tests.test_sampler_golden
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ldm.sampling.denoisers import DiscreteDenoiser, GaussianMixtureDenoiser, append_dims
from ldm.sampling.samplers import SAMPLERS, generators_for, randn, sample
from ldm.sampling.schedules import alphas_cumprod_for, sigmas_from_alphas_cumprod, t_to_sigma

GOLDEN = Path(__file__).parent / "data" / "sampler_golden.json"
REGENERATE = os.environ.get("LDM_REGEN_GOLDEN") == "1"
STEPS, SEEDS, SHAPE = 4, (0, 1), (1, 4, 4)
# float64 all the way; the tolerance leaves room for last-bit differences of exp/log between CPUs.
RTOL, ATOL = 1e-9, 1e-12

AC = alphas_cumprod_for()
LOG_SIGMAS = sigmas_from_alphas_cumprod(AC).log()
DATA = GaussianMixtureDenoiser(means=(-0.5, 0.7), stds=(0.3, 0.6), weights=(0.35, 0.65))


def _eps(x_vp: torch.Tensor, t: torch.Tensor, cond: object = None) -> torch.Tensor:
    sigma = t_to_sigma(t.reshape(-1), LOG_SIGMAS).to(x_vp.dtype).expand(x_vp.shape[0])
    s = append_dims(sigma, x_vp.ndim)
    x = x_vp * (s ** 2 + 1).sqrt()
    return (x - DATA(x, sigma)) / s


def golden_run(name: str) -> torch.Tensor:
    gens = generators_for(SEEDS)
    noise = randn(SHAPE, gens, dtype=torch.float64)
    return sample(DiscreteDenoiser(_eps, AC, "eps"), noise, sampler=name, steps=STEPS, generators=gens)


def regenerate() -> None:
    about = "tests/test_sampler_golden.py: sample(), 4 steps, seeds (0, 1), float64, shape (2, 1, 4, 4)"
    rows = ",\n".join(f"  {json.dumps(name)}: {json.dumps(golden_run(name).flatten().tolist())}" for name in SAMPLERS)
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(f'{{\n "about": {json.dumps(about)},\n "samplers": {{\n{rows}\n }}\n}}\n')


@pytest.fixture(scope="module")
def golden() -> dict[str, list[float]]:
    if REGENERATE:
        regenerate()
    return json.loads(GOLDEN.read_text())["samplers"]


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_matches_its_golden_numbers(name, golden):
    assert name in golden, f"no golden numbers for {name!r}; regenerate (see the module docstring)"
    expected = torch.tensor(golden[name], dtype=torch.float64)
    out = golden_run(name).flatten()
    assert torch.allclose(out, expected, rtol=RTOL, atol=ATOL), (
        f"{name} changed: max abs difference {float((out - expected).abs().max()):.3e}")


def test_golden_runs_differ_between_samplers(golden):
    values = {tuple(v) for v in golden.values()}
    assert len(values) == len(golden) == len(SAMPLERS)


if __name__ == "__main__":
    regenerate()
    print(f"wrote {GOLDEN}")
