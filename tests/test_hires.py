"""A1111's hires fix as a second pass of the same request: the upscaled size, one numbering of the steps of both
passes, A1111's infotext fields, replay from the PNG, and the errors."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

import ldm
from ldm.cli import main
from ldm.generation.images import parse_infotext, read_png_params, save_png
from ldm.generation.pipeline import Denoising
from ldm.testing.reference import random_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """The tiny models run on one thread (see conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def sd():
    return random_model(ldm.preset("tiny"), seed=3)[0]


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (nearest)", "Lanczos"])
def test_the_hires_pass_upscales_and_numbers_its_steps_after_the_first(sd, upscaler):
    request = ldm.Generation("a red circle", seed=2, steps=4, width=64, height=48, sampler="euler", hires_scale=2,
                             hires_steps=6, hires_denoise=0.5, hires_upscaler=upscaler)
    run = Denoising(sd, request)
    steps = list(run)
    assert [s.i for s in steps] == list(range(7)) and {s.total for s in steps} == {7}  # 4 + int(0.5 * 6)
    assert [tuple(s.x.shape[2:]) for s in steps] == [(6, 8)] * 4 + [(12, 16)] * 3
    result = run.result
    assert result.images[0].size == (128, 96) and result.latents.shape == (1, 4, 12, 16)
    base = ldm.txt2img(sd, "a red circle", seed=2, steps=4, width=64, height=48, sampler="euler")
    assert torch.equal(steps[3].x, _step_x(sd, base.request, 3))  # the first pass is the plain txt2img
    assert (result.params["width"], result.params["final_width"]) == (64, 128)


def _step_x(sd, request, i):
    return list(Denoising(sd, request))[i].x


def test_hires_parameters_go_into_the_infotext_and_replay(sd, tmp_path):
    result = ldm.txt2img(sd, "a blue square", seed=4, steps=3, width=64, height=64, hires_scale=1.5,
                         hires_denoise=0.6, hires_upscaler="latent (bicubic)")
    png = save_png(result.images[0], tmp_path, "4", result.image_params(0))
    info = parse_infotext(Image.open(png).info["parameters"])
    assert (info["Hires upscale"], info["Hires upscaler"], info["Denoising strength"], info["Size"]) == \
        ("1.5", "Latent (bicubic)", "0.6", "64x64")
    assert "Hires steps" not in info  # 0: as many as the first pass, as A1111 leaves it out
    replay = ldm.Generation.from_params(read_png_params(png))
    assert replay.hires_upscaler == "Latent (bicubic)" and result.images[0].size == (96, 96)
    assert torch.equal(ldm.generate(sd, replay).latents, result.latents)


def test_hires_errors_name_the_field(sd, tmp_path, capsys):
    with pytest.raises(ldm.RequestError, match="hires_upscaler must be one of Latent, .*Lanczos"):
        ldm.Generation("x", hires_scale=2, hires_upscaler="ESRGAN_4x")
    with pytest.raises(ldm.RequestError, match=r"hires_scale must be in \[1, 8\]"):
        ldm.Generation("x", hires_scale=0.5)
    with pytest.raises(ldm.RequestError, match="hires_scale is for txt2img"):
        ldm.Generation("x", hires_scale=2, init_image=Image.new("RGB", (64, 64)))
    ckpt = tmp_path / "m.safetensors"
    ldm.save(sd, ckpt)
    assert main(["txt2img", "x", "--ckpt", str(ckpt), "--hires-scale", "0.5", "--outdir", str(tmp_path / "o")]) == 2
    assert "--hires-scale must be in [1, 8], got 0.5" in capsys.readouterr().err
    assert main(["txt2img", "x", "--ckpt", str(ckpt), "--W", "64", "--H", "64", "--steps", "2", "--hires-scale", "2",
                 "--hires-upscaler", "nearest", "--quiet", "--outdir", str(tmp_path / "o")]) == 0
    assert Image.open(next((tmp_path / "o").glob("*.png"))).size == (128, 128)
