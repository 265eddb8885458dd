"""The Python API `txt2img` / `img2img`: parity with diffusers' pipelines, the img2img strength conventions,
callbacks, seeds and batch invariance, the NaN guards and input validation. All on random-weight tiny models.

Parity: a whole txt2img and img2img against diffusers' `StableDiffusionPipeline` / `StableDiffusionImg2ImgPipeline`
with DDIM, the same weights and the same noise; the comparison functions live in ldm/testing/pipeline_parity.py, and
`python tools/parity.py pipeline` prints the same figures as a table.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import ldm
import ldm.sampling.samplers as samplers_module
from ldm.sampling.denoisers import DiscreteDenoiser
from ldm.generation.images import fit_init_image, from_pil, to_pil
from ldm.generation.pipeline import NaNError, decode, img2img, resolve_schedule, txt2img
from ldm.sampling.samplers import generators_for, randn, sample
from ldm.sampling.schedules import alphas_cumprod_for, sigmas_from_alphas_cumprod
from ldm.testing import pipeline_parity as parity
from ldm.testing.reference import random_model

SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """The tiny models run on one thread (see conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def init_image() -> Image.Image:
    return parity.init_image(SIZE)


def encode_like_img2img(sd: ldm.StableDiffusion, image: Image.Image, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled init latent, starting noise) exactly as img2img draws them: posterior sample, then the noise,
    both from the image's own generator."""
    g = generators_for([seed])
    with torch.no_grad():
        posterior = sd.vae.encode(from_pil(image))
    init = (posterior.mean + posterior.std * randn(posterior.mean.shape[1:], g)) * sd.scale_factor
    return init, randn(init.shape[1:], g)


# --- parity with diffusers ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["tiny", "tiny-v2", "tiny-sdxl", pytest.param("sdxl", marks=pytest.mark.slow)])
def with_diffusers(request):
    cfg = ldm.preset(request.param)
    sd, checkpoint = random_model(cfg)
    return sd, parity.diffusers_pipelines(cfg, checkpoint)


def test_txt2img_matches_diffusers_ddim(with_diffusers):
    """Full txt2img (guidance 7.5, a negative prompt, 6 DDIM steps, 64x64) against StableDiffusionPipeline, which
    tokenizes and encodes the prompts itself: eps model (tiny) and v-prediction with OpenCLIP (tiny-v2); SDXL
    (tiny-sdxl, and the full-size base in the slow suite) against StableDiffusionXLPipeline, both text encoders, the
    pooled embedding and the size conditioning included. The weights are shared, not copied (24 GB suffice)."""
    sd, pipes = with_diffusers
    r = parity.txt2img_parity(sd, pipes, size=SIZE, steps=6)
    assert r.pixel <= parity.TOLERANCE, r
    assert r.latent <= 1e-4 * max(1.0, r.latent_scale), r


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_img2img_matches_diffusers_ddim(with_diffusers, strength):
    """img2img against StableDiffusionImg2ImgPipeline given generator=manual_seed(seed): it draws
    the posterior sample and the starting noise in the same order as ldm, so the runs agree to float error."""
    sd, pipes = with_diffusers
    r = parity.img2img_parity(sd, pipes, strength=strength, size=SIZE, steps=6)
    assert r.pixel <= parity.TOLERANCE, r
    assert r.latent <= 1e-4 * max(1.0, r.latent_scale), r


@pytest.mark.parametrize("steps, strength", [(6, 0.5), (10, 0.75), (50, 0.3), (10, 1.0), (100, 0.01), (7, 0.99)])
def test_img2img_start_is_diffusers_convention(steps, strength):
    """Where img2img starts, without networks. ldm and diffusers both run the last int(strength · steps) steps of
    the "leading" DDIM grid (CompVis t_enc, diffusers `get_timesteps`) and noise the clean latent to exactly the
    level of the first step run: ldm's VE start x_0 + σ_t ε, seen by the model as (x_0 + σ_t ε) / sqrt(σ_t² + 1),
    is diffusers' `add_noise(x_0, ε, t)` = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε. (CompVis img2img.py differs: it noises
    to the level one DDIM step above the first step it runs.)"""
    cfg = ldm.preset("tiny")
    t_ours, t_theirs, n_ours, n_theirs = parity.first_timesteps(cfg, steps, strength)
    assert (t_ours, n_ours) == (t_theirs, n_theirs) == ((steps - 1 - (steps - int(strength * steps))) *
                                                          (1000 // steps) + 1, int(strength * steps))

    seen = []

    def model_fn(x, t, cond):
        seen.append((x.clone(), t.clone()))
        return torch.zeros_like(x)

    denoiser = DiscreteDenoiser(model_fn, alphas_cumprod_for(cfg.schedule))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    sample(denoiser, eps, sampler="ddim", steps=steps, init_latent=x0, strength=strength)
    assert len(seen) == n_ours
    x_model, t_model = seen[0]
    assert t_model.item() == pytest.approx(t_theirs, abs=1e-6)
    scheduler = parity.ddim_scheduler(cfg)
    scheduler.set_timesteps(steps)
    expected = scheduler.add_noise(x0, eps, torch.tensor([t_theirs]))
    torch.testing.assert_close(x_model, expected, rtol=0, atol=1e-5)


# --- strength limits ------------------------------------------------------------------------------------------------

def test_img2img_strength_near_zero_gives_back_the_vae_round_trip(tiny, init_image):
    """strength 0.01 with 100 steps runs one step, from σ(t=1) = 0.041 to σ(t=0) = 0.029 for DDIM: the result is
    the encoded image (its posterior sample) up to noise of that level, which a random-weight UNet cannot remove.
    So its latents stay within σ(t=1) of the encoded image, and its pixels are far closer to the VAE round trip
    than those of strength 0.5."""
    seed = 4
    calls = []
    near_zero = img2img(tiny, init_image, "a prompt", strength=0.01, steps=100, sampler="ddim", seed=seed,
                        callback=lambda *a: calls.append(a[:2]))
    assert calls == [(1, 1)]
    init, _ = encode_like_img2img(tiny, init_image, seed)
    sigma_1 = float(sigmas_from_alphas_cumprod(alphas_cumprod_for(tiny.config.schedule))[1])
    assert (near_zero.latents - init).abs().mean() <= sigma_1
    round_trip = np.asarray(to_pil(decode(tiny, init))[0], dtype=np.float32)
    half = img2img(tiny, init_image, "a prompt", strength=0.5, steps=4, sampler="ddim", seed=seed)

    def distance(result):
        return np.abs(np.asarray(result.images[0], dtype=np.float32) - round_trip).mean()

    assert distance(near_zero) < distance(half) / 3


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_img2img_strength_one_is_txt2img_from_the_noised_image(tiny, init_image, sampler):
    """strength 1 runs every step of the schedule, like txt2img, from x_0 + σ_0 ε, σ_0 the first σ of the
    schedule (σ_max = 14.6 for the k-samplers, σ(t=667) for 3 DDIM steps): the image stays in the start at
    weight 1/σ_0 (sqrt(ᾱ) in VP scale, 0.068 at σ_max), as in CompVis, diffusers and A1111. So it is txt2img
    whose initial noise is ε + x_0/σ_0 (VP-scaled for ddim), not txt2img with the same seed (img2img's ε is also
    the generator's second draw, after the posterior sample)."""
    seed, steps = 8, 3
    i2i = img2img(tiny, init_image, "a prompt", strength=1.0, steps=steps, sampler=sampler, seed=seed)
    init, noise = encode_like_img2img(tiny, init_image, seed)
    sigma_max = float(sigmas_from_alphas_cumprod(alphas_cumprod_for(tiny.config.schedule))[-1])
    if sampler == "ddim":  # txt2img scales its noise by sqrt(σ² + 1) on the discrete grid (x_T in VP scale)
        sigma_start = float(sigmas_from_alphas_cumprod(alphas_cumprod_for(tiny.config.schedule))[
            (steps - 1) * (1000 // steps) + 1])
        latents = (init + sigma_start * noise) / (sigma_start ** 2 + 1) ** 0.5
    else:
        latents = noise + init / sigma_max
    t2i = txt2img(tiny, "a prompt", steps=steps, sampler=sampler, seed=seed, latents=latents)
    torch.testing.assert_close(i2i.latents, t2i.latents, rtol=1e-4, atol=1e-4 * t2i.latents.abs().max().item())


# --- Result, callbacks, seeds ------------------------------------------------------------------------------------

def test_result_holds_images_seeds_and_params(tiny):
    out = ldm.txt2img(tiny, ["a red circle", "a blue square"], negative_prompt="blurry", steps=2, batch_size=2, seed=41,
                       width=64, height=48, sampler="DPM++ 2M Exponential")
    assert [im.size for im in out.images] == [(64, 48)] * 4 and all(im.mode == "RGB" for im in out.images)
    assert out.seeds == [41, 42, 43, 44]
    assert out.prompts == ["a red circle", "a red circle", "a blue square", "a blue square"]
    assert out.latents.shape == (4, 4, 6, 8)
    p = out.params
    assert (p["mode"], p["sampler"], p["schedule"], p["sampler_display"]) == (
        "txt2img", "dpmpp_2m", "exponential", "DPM++ 2M Exponential")  # the A1111 name's schedule wins
    assert (p["steps"], p["guidance"], p["width"], p["height"], p["negative_prompt"]) == (2, 7.5, 64, 48, "blurry")
    assert out.image_params(3)["seed"] == 44 and out.image_params(3)["prompt"] == "a blue square"


@pytest.mark.parametrize("sampler, schedule, expected", [
    ("ddim", "karras", "discrete"), ("plms", None, "discrete"), ("DDPM", "exponential", "discrete"),
    ("dpmpp_2m", "karras", "karras"), ("euler", None, "discrete"), ("Euler a", "exponential", "exponential"),
    ("DPM++ 2M Karras", "exponential", "karras"), ("LMS Exponential", "karras", "exponential")])
def test_schedule_resolution(sampler, schedule, expected):
    """ddim/plms/ddpm keep their discrete grid (there is no "DDIM Karras" in A1111 or diffusers); an A1111 name's
    suffix wins over `schedule` (whose default is "karras")."""
    assert resolve_schedule(sampler, schedule) == expected


def test_ddim_runs_on_the_discrete_grid_by_default(tiny):
    out = txt2img(tiny, "x", steps=1, sampler="ddim", width=64, height=64, seed=0)
    assert (out.params["schedule"], out.params["sampler_display"]) == ("discrete", "DDIM")


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun"])
def test_txt2img_callback_every_step(tiny, sampler):
    """callback(step, total, latents) once per step (heun evaluates the model twice a step), step = 1..total."""
    calls = []
    out = txt2img(tiny, "x", steps=4, sampler=sampler, width=64, height=64, seed=1,
                  callback=lambda step, total, latents: calls.append((step, total, tuple(latents.shape))))
    assert calls == [(i, 4, (1, 4, 8, 8)) for i in range(1, 5)]
    assert len(out.images) == 1


def test_img2img_callback_runs_strength_times_steps(tiny, init_image):
    calls = []
    img2img(tiny, init_image, "x", strength=0.5, steps=6, seed=1, callback=lambda s, t, x: calls.append((s, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize("mode, sampler", [("txt2img", "euler_a"), ("img2img", "dpmpp_sde")])
def test_batch_image_equals_its_seed_alone(tiny, init_image, mode, sampler):
    """Image i of a batch is bit-identical to seed + i generated alone, with a stochastic sampler."""
    def run(seed, batch_size):
        if mode == "txt2img":
            return txt2img(tiny, "x", steps=3, sampler=sampler, width=64, height=64, seed=seed, batch_size=batch_size)
        return img2img(tiny, init_image, "x", strength=0.7, steps=4, sampler=sampler, seed=seed, batch_size=batch_size)

    batch = run(10, 3)
    for i in range(3):
        alone = run(10 + i, 1)
        assert torch.equal(batch.latents[i], alone.latents[0])
        assert batch.images[i].tobytes() == alone.images[0].tobytes()


def test_img2img_sampler_noise_continues_the_generator(tiny, init_image, monkeypatch):
    """The ancestral noise of img2img continues each image's generator after the posterior sample and the
    starting noise; it must not replay them (a fresh generator with the same seed would)."""
    draws = []
    original = samplers_module.randn

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        draws.append(out.clone())
        return out

    monkeypatch.setattr(samplers_module, "randn", spy)
    monkeypatch.setattr("ldm.generation.pipeline.randn", spy)
    img2img(tiny, init_image, "x", strength=0.6, steps=5, sampler="euler_a", seed=7)
    posterior_eps, start_noise, *ancestral = draws
    assert len(ancestral) == 2  # 3 steps; the last one, to σ = 0, adds no noise
    for z in ancestral:
        assert not torch.equal(z, posterior_eps) and not torch.equal(z, start_noise)
    g = generators_for([7])
    expected = [randn((4, 8, 8), g) for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(draws, expected))


# --- img2img sizes ---------------------------------------------------------------------------------------------------

def test_img2img_takes_the_image_at_its_own_size_rounded_down(tiny):
    image = parity.init_image(72).crop((0, 0, 70, 61))
    out = img2img(tiny, image, "x", strength=0.5, steps=2, seed=0)
    assert out.images[0].size == (64, 56)
    assert fit_init_image(image, None, None).tobytes() == image.crop((0, 0, 64, 56)).tobytes()


def test_img2img_resizes_with_lanczos_when_asked(tiny):
    image = parity.init_image(72).crop((0, 0, 70, 61))
    out = img2img(tiny, image, "x", strength=0.5, steps=2, seed=0, width=48, height=40)
    assert out.images[0].size == (48, 40)
    resized = fit_init_image(image, 48, 40)
    assert resized.tobytes() == image.resize((48, 40), Image.Resampling.LANCZOS).tobytes()
    assert fit_init_image(image, 48, None).size == (48, 40)  # one side given: the aspect ratio, to a multiple of 8


# --- NaN guards ----------------------------------------------------------------------------------------------------

def test_unet_nan_stops_with_a_clear_error(tiny, monkeypatch):
    monkeypatch.setattr(tiny.unet, "forward", lambda x, t, context: torch.full_like(x, float("nan")))
    with pytest.raises(NaNError, match=r"--precision fp32.*attention"):
        txt2img(tiny, "x", steps=2, width=64, height=64, seed=0)


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])  # the SDXL VAE overflows in fp16
def test_half_precision_vae_nan_decodes_again_in_fp32(monkeypatch, name):
    """A bf16 VAE whose decode overflows: one warning, a decode in fp32, a finite image; the VAE stays bf16."""
    sd = random_model(ldm.preset(name))[0]
    fp32_images = decode(sd, torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    sd.to(torch.bfloat16)
    from ldm.models.vae import AutoencoderKL

    vae_decode = AutoencoderKL.decode

    def overflowing(self, latents, **kwargs):  # a half-precision decode that overflows
        out = vae_decode(self, latents, **kwargs)
        return out if self.post_quant_conv.weight.dtype == torch.float32 else out * float("inf")

    monkeypatch.setattr(AutoencoderKL, "decode", overflowing)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = decode(sd, latents)
    assert [str(w.message) for w in caught] == ["VAE decode produced NaN/Inf in half precision; decoding again in fp32"]
    assert torch.isfinite(images).all() and images.dtype == torch.float32
    assert sd.vae.post_quant_conv.weight.dtype == torch.bfloat16
    # the fallback ran the fp32 cast of the bf16 weights: close to the fp32 model's decode
    assert (images - fp32_images).abs().max() < 0.1


# --- validation ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(width=100), r"width 100 is not a multiple of 8; use 96 or 104"),
    (dict(height=4), r"height 4 is not a multiple of 8; use 8 or 16"),
    (dict(steps=0), r"steps must be at least 1, got 0"),
    (dict(sampler="nope"), r"unknown sampler 'nope'; valid names: ddpm, ddim, plms, euler, euler_a"),
    (dict(seed=-1), r"seed must be in \[0, "),
    (dict(guidance=-1.0), r"guidance must be >= 0, got -1.0"),
    (dict(guidance=float("nan")), r"guidance must be a finite number, got nan"),
    (dict(guidance=float("inf")), r"guidance must be a finite number, got inf"),
    (dict(sampler="euler_a", eta=float("nan")), r"eta must be a finite number, got nan"),
    (dict(clip_skip=3), r"clip_skip must be in \[1, 2\] for this text encoder \(2 layers\), got 3"),
    (dict(guidance_interval=(2.0, 1.0)), r"guidance interval needs 0 <= lo < hi"),
    (dict(guidance_interval=(-1.0, None)), r"guidance interval needs 0 <= lo < hi"),
    (dict(guidance_interval=3.0), r"guidance interval must be a pair"),
    (dict(batch_size=0), r"batch_size must be at least 1, got 0"),
    (dict(latents=torch.zeros(1, 4, 4, 4)), r"latents must have shape \(1, 4, 8, 8\)"),
])
def test_txt2img_rejects_bad_input(tiny, kwargs, message):
    args = dict(steps=2, width=64, height=64, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        txt2img(tiny, "x", **args)


@pytest.mark.parametrize("kwargs, message", [
    (dict(strength=0.0), r"strength must be in \(0, 1\]"),
    (dict(strength=1.01), r"strength must be in \(0, 1\]"),
    (dict(strength=0.05, steps=10), r"runs no step"),
])
def test_img2img_rejects_bad_input(tiny, init_image, kwargs, message):
    with pytest.raises(ValueError, match=message):
        img2img(tiny, init_image, "x", **(dict(steps=2, seed=0) | kwargs))


def test_guidance_interval_defaults_to_the_model_and_skips_the_unconditional_pass(tiny, monkeypatch):
    """None takes the model's interval; outside it the UNet runs on the conditional half alone, so a model whose
    interval holds no step samples as guidance 1 does; an explicit interval overrides the model's."""
    args = dict(steps=4, width=64, height=64, seed=3, sampler="euler", batch_invariant=False)
    everywhere = txt2img(tiny, "x", **args)
    assert everywhere.params["guidance_interval"] is None
    batches = []
    forward = tiny.unet.forward
    # the UNet's batch is the context's: a guided pass gives it the latents once for both prompts
    monkeypatch.setattr(tiny.unet, "forward", lambda x, t, c: batches.append(c.shape[0]) or forward(x, t, c))
    monkeypatch.setattr(tiny, "config", tiny.config.replace(guidance_interval=(1e6, None)))  # above every σ
    unguided = txt2img(tiny, "x", **args)
    assert batches == [1] * 4 and unguided.params["guidance_interval"] == [1e6, None]
    assert torch.equal(unguided.latents, txt2img(tiny, "x", **(args | dict(guidance=1.0))).latents)
    batches.clear()
    explicit = txt2img(tiny, "x", guidance_interval=(0.0, float("inf")), **args)
    assert batches == [2] * 4 and explicit.params["guidance_interval"] == [0.0, None]
    assert torch.equal(explicit.latents, everywhere.latents)
