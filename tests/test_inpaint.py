"""Inpainting with an ordinary (4-channel) checkpoint, as A1111 does it: the pixels the blurred mask keeps come back
bit for bit, an empty mask gives the input back, the masked-content modes, invert, resizing and errors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

import ldm
from ldm.cli import main
from ldm.generation.images import parse_infotext, save_png
from ldm.testing.reference import random_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """The tiny models run on one thread (see conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def sd():
    return random_model(ldm.preset("tiny"), seed=5)[0]


def _image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def _mask(box=(16, 16, 40, 48)) -> Image.Image:
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


@pytest.mark.parametrize("content", ["original", "fill", "latent noise", "latent nothing"])
def test_pixels_outside_the_feathered_mask_come_back_bit_for_bit(sd, content):
    image, mask = _image(), _mask()
    out = ldm.img2img(sd, image, "a red circle", mask=mask, mask_blur=4, masked_content=content, strength=0.8,
                      steps=4, seed=1)
    got, before = np.asarray(out.images[0]), np.asarray(image)
    feathered = np.asarray(_mask((16 - 12, 16 - 12, 40 + 12, 48 + 12)))  # 3 sigma of the blur around the box
    assert (got[feathered == 0] == before[feathered == 0]).all()
    assert (got[20:44, 20:36] != before[20:44, 20:36]).any()  # inside, repainted
    assert out.params["masked_content"] == content and out.params["mask_blur"] == 4


def test_an_empty_mask_gives_the_input_back_and_invert_swaps(sd):
    image = _image()
    out = ldm.img2img(sd, image, "x", mask=Image.new("L", (64, 64), 0), strength=0.8, steps=3, seed=2)
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(image))
    inverted = ldm.img2img(sd, image, "x", mask=Image.new("L", (64, 64), 255), mask_invert=True, strength=0.8,
                           steps=3, seed=2)
    assert np.array_equal(np.asarray(inverted.images[0]), np.asarray(image))


def test_a_mask_of_another_size_is_resized_with_a_note(sd):
    with pytest.warns(UserWarning, match="the mask is 32x32 and the image 64x64"):
        ldm.img2img(sd, _image(), "x", mask=_mask().resize((32, 32)), strength=0.5, steps=2, seed=3)


def test_mask_errors(sd, tmp_path, capsys):
    with pytest.raises(ldm.RequestError, match="mask needs an init image"):
        ldm.Generation("x", mask=_mask())
    with pytest.raises(ldm.RequestError, match="masked_content must be one of fill, original"):
        ldm.Generation("x", init_image=_image(), mask=_mask(), masked_content="blur")
    ckpt, init, mask = tmp_path / "m.safetensors", tmp_path / "init.png", tmp_path / "mask.png"
    ldm.save(sd, ckpt)
    _image().save(init)
    _mask().save(mask)
    (tmp_path / "notes.txt").write_text("not an image")
    base = ["img2img", "x", "--ckpt", str(ckpt), "--init-img", str(init), "--steps", "2", "--quiet"]
    assert main([*base, "--mask", str(tmp_path / "notes.txt"), "--outdir", str(tmp_path / "a")]) == 2
    assert "--mask: cannot read image" in capsys.readouterr().err
    assert main([*base, "--mask", str(mask), "--masked-content", "fill", "--outdir", str(tmp_path / "b")]) == 0
    written = next((tmp_path / "b").glob("*.png"))
    from ldm.generation.images import parse_infotext

    info = parse_infotext(Image.open(written).info["parameters"])
    assert (info["Mask blur"], info["Masked content"], info["Inpaint area"]) == ("4", "fill", "Whole picture")
    assert main(["img2img", "--from-png", str(written), "--outdir", str(tmp_path / "c"), "--quiet"]) == 0
    replayed = next((tmp_path / "c").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(replayed)), np.asarray(Image.open(written)))  # mask replayed too


def test_outpainting_extends_the_canvas_and_keeps_the_image(sd, tmp_path):
    image = _image()
    out = ldm.img2img(sd, image, "a wide landscape", outpaint=(32, 0, 0, 16), mask_blur=2, strength=1.0, steps=3,
                      seed=4, masked_content="fill")
    got = np.asarray(out.images[0])
    assert out.images[0].size == (96, 80)
    assert np.array_equal(got[:56, 40:], np.asarray(image)[:56, 8:])  # the image, away from the feathered seam
    assert out.params["outpaint"] == [32, 0, 0, 16]
    with pytest.raises(ldm.RequestError, match="outpaint takes 4 multiples of 8"):
        ldm.Generation("x", init_image=image, outpaint=(30, 0, 0, 0))
    ckpt, init = tmp_path / "m.safetensors", tmp_path / "init.png"
    ldm.save(sd, ckpt)
    image.save(init)
    assert main(["img2img", "x", "--ckpt", str(ckpt), "--init-img", str(init), "--outpaint", "right=16,top=8",
                 "--steps", "2", "--quiet", "--outdir", str(tmp_path / "o")]) == 0
    assert Image.open(next((tmp_path / "o").glob("*.png"))).size == (80, 72)
    assert main(["img2img", "x", "--ckpt", str(ckpt), "--init-img", str(init), "--outpaint", "up=16",
                 "--outdir", str(tmp_path / "p")]) == 2
    written = next((tmp_path / "o").glob("*.png"))
    assert main(["img2img", "--from-png", str(written), "--quiet", "--outdir", str(tmp_path / "r")]) == 0
    assert np.array_equal(np.asarray(Image.open(next((tmp_path / "r").glob("*.png")))), np.asarray(Image.open(written)))


def test_inpaint_only_masked_works_on_the_box_and_pastes_it_back(sd, tmp_path):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (128, 160, 3), dtype=np.uint8))
    mask = Image.new("L", (160, 128), 0)
    ImageDraw.Draw(mask).rectangle((100, 20, 130, 50), fill=255)
    seen = []
    out = ldm.img2img(sd, image, "a red circle", mask=mask, inpaint_area="masked", inpaint_padding=8, mask_blur=2,
                      strength=0.9, steps=3, seed=2, callback=lambda i, n, x: seen.append(tuple(x.shape[2:])))
    assert out.images[0].size == (160, 128) and seen[0] == (8, 8)  # worked at the model's 64 x 64
    got, before = np.asarray(out.images[0]), np.asarray(image)
    outside = np.ones((128, 160), dtype=bool)
    outside[20 - 8:50 + 9, 100 - 8:130 + 9] = False  # the box and its feather
    assert (got[outside] == before[outside]).all()
    assert (got[25:45, 105:125] != before[25:45, 105:125]).any()
    png = save_png(out.images[0], tmp_path, "2", out.image_params(0))
    info = parse_infotext(Image.open(png).info["parameters"])
    assert (info["Inpaint area"], info["Masked area padding"]) == ("Only masked", "8")
    with pytest.raises(ldm.RequestError, match="inpaint_area must be 'whole' or 'masked'"):
        ldm.Generation("x", init_image=image, mask=mask, inpaint_area="crop")


def test_no_colour_shift_inside_a_flat_masked_region():
    """The bundled model (a trained VAE) repainting the middle of a flat picture of a background it knows, lightly:
    the repainted area keeps the colour the VAE gives the picture back as (the mean within 4 of 255 per channel),
    the rest is the picture itself."""
    from ldm.data.shapes import COLOURS
    from ldm.demo import DEMO_CHECKPOINT

    demo = ldm.load(DEMO_CHECKPOINT)
    colour = COLOURS["blue"]  # a background the model knows
    image = Image.new("RGB", (64, 64), colour)
    mask = _mask((16, 16, 48, 48)).resize((64, 64))
    out = ldm.img2img(demo, image, "blue background", mask=mask, mask_blur=0, strength=0.3, steps=10, seed=3)
    got = np.asarray(out.images[0]).astype(float)
    inside = got[20:44, 20:44].reshape(-1, 3).mean(axis=0)
    # the colour this VAE gives the flat picture back as (its own fidelity, not the pipeline's)
    from ldm.generation.images import from_pil
    from ldm.generation.pipeline import decode

    import torch

    with torch.no_grad():
        latents = demo.vae.encode(from_pil(image)).mean * demo.scale_factor
        round_trip = ((decode(demo, latents)[0, :, 20:44, 20:44] + 1) * 127.5).reshape(3, -1).mean(dim=1).numpy()
    assert np.abs(inside - round_trip).max() <= 4, (inside, round_trip)
    assert (got[:16] == colour).all() and (got[49:] == colour).all()  # the rectangle includes row 48
