"""Inpainting checkpoints (9-channel UNets, CompVis `LatentInpaintDiffusion`): detected from the weights, and the
same UNet outputs and the same final DDIM latents as diffusers' `StableDiffusionInpaintPipeline` on the same weights,
inputs and noise."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import ldm
from ldm.config import load_config
from ldm.models.checkpoint import detect_config, expected_shapes
from ldm.testing.pipeline_parity import clip_tokenizer, ddim_scheduler, init_image
from ldm.testing.reference import (compare_unet, random_model, reference_text, reference_unet, reference_vae)

REFERENCE = "/work/shared/reference/configs/v2-inpainting-inference.yaml"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """The tiny models run on one thread (see conftest.one_torch_thread)."""


@pytest.mark.parametrize("name", ["sd-v1-inpainting", "sd-v2-inpainting"])
def test_inpainting_checkpoints_are_told_by_their_weights(name):
    cfg = ldm.preset(name)
    assert cfg.inpainting and cfg.unet.in_channels == 9 and cfg.prediction == "eps"
    assert detect_config(expected_shapes(cfg), {}) == cfg
    assert not ldm.preset("sd-v1").inpainting


def test_the_original_inpainting_yaml_reads_as_the_preset():
    from pathlib import Path

    if not Path(REFERENCE).is_file():
        pytest.skip("the reference YAMLs are not in this checkout")
    cfg = load_config(REFERENCE)
    assert cfg.inpainting and cfg.unet == ldm.preset("sd-v2-inpainting").unet


def _mask(size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((size // 4, size // 8, size * 3 // 4, size * 5 // 8), fill=255)
    return mask


@pytest.mark.parametrize("name", ["tiny-inpainting", pytest.param("sd-v1-inpainting", marks=pytest.mark.slow)])
def test_inpainting_matches_diffusers(name):
    from diffusers import StableDiffusionInpaintPipeline

    cfg = ldm.preset(name)
    sd, checkpoint = random_model(cfg, seed=6)
    assert compare_unet(sd, reference_unet(cfg, checkpoint)).ok  # the 9-channel UNet, same inputs
    size = 64 if name.startswith("tiny") else 256
    f = cfg.vae.downsample_factor
    image, mask = init_image(size), _mask(size)
    result = ldm.img2img(sd, image, "a red circle", negative_prompt="blurry", mask=mask, mask_blur=0, strength=0.75,
                         steps=8, guidance=7.5, sampler="ddim", seed=11)
    # the masked image's latents as ldm computes them (the posterior's mean), handed to diffusers, which would
    # otherwise draw a posterior sample for them
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    repaint = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255 >= 0.5).float()[None, None]
    with torch.no_grad():
        masked = sd.vae.encode(pixels * (1 - repaint)).mean * sd.scale_factor
    pipe = StableDiffusionInpaintPipeline(vae=reference_vae(cfg, checkpoint), text_encoder=reference_text(cfg, checkpoint),
                                          tokenizer=clip_tokenizer(cfg), unet=reference_unet(cfg, checkpoint),
                                          scheduler=ddim_scheduler(cfg), safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt="a red circle", negative_prompt="blurry", image=image, mask_image=mask,
               masked_image_latents=masked, strength=0.75, num_inference_steps=8, guidance_scale=7.5, height=size,
               width=size, generator=torch.Generator().manual_seed(11), output_type="latent").images
    assert ref.shape == result.latents.shape == (1, 4, size // f, size // f)
    assert (result.latents - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_an_inpainting_model_also_runs_txt2img_and_unmasked_img2img():
    sd, _ = random_model(ldm.preset("tiny-inpainting"), seed=7)
    out = ldm.txt2img(sd, "a red circle", steps=2, seed=1)  # an all-grey image to repaint everywhere, as A1111
    assert out.images[0].size == (64, 64) and torch.isfinite(out.latents).all()
    assert ldm.img2img(sd, out.images[0], "a blue square", strength=0.5, steps=2, seed=1).images[0].size == (64, 64)
    with pytest.raises(ldm.RequestError, match="hires_scale is not available with an inpainting model"):
        ldm.txt2img(sd, "x", hires_scale=2)
