"""End-to-end `ldm txt2img` / `ldm img2img` on a tiny random-weight checkpoint: files and metadata, exact replay
from a PNG, batch invariance, safe writing, progress output, NaN guards, and every bad-input case (exit code 2,
one line on stderr, no file). The CLI runs in-process through `ldm.cli.main`, except one subprocess run that
proves a user mistake exits with 2 and no traceback end to end.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

import ldm
from ldm.accel import cpu
from ldm.cli import main
from ldm.accel.cpu import ALLOW_EMULATED_BF16_ENV, CPUFeatures
from ldm.generation.images import parse_infotext
from ldm.testing.reference import random_model

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--W", "64", "--H", "64", "--steps", "3"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """The tiny models run on one thread (see conftest.one_torch_thread)."""


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    sd, _ = random_model(ldm.preset("tiny"))
    return ldm.save(sd, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Run in a scratch folder with a scratch hash cache (file_sha256 writes one)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LDM_CACHE", str(tmp_path / "cache"))


@pytest.fixture()
def init_png(tmp_path) -> Path:
    """A 70x61 init image: img2img crops it to 64x56."""
    g = torch.Generator().manual_seed(3)
    pixels = (torch.rand(61, 70, 3, generator=g) * 255).to(torch.uint8).numpy()
    path = tmp_path / "init.png"
    Image.fromarray(pixels).save(path)
    return path


def run(capsys, *args) -> tuple[int, str, str]:
    """`ldm ARGS` in-process, on the CPU whatever the machine (bit-exact comparisons assume it)."""
    args = [str(a) for a in args]
    if args[0] in ("txt2img", "img2img") and "--device" not in args:
        args += ["--device", "cpu"]
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def txt2img(capsys, ckpt, outdir, *args, prompt="a red circle, blue background"):
    return run(capsys, "txt2img", prompt, "--ckpt", ckpt, "--outdir", outdir, "--quiet", *FAST, *args)


def pngs(outdir: Path) -> list[Path]:
    return sorted(outdir.glob("*.png"))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def ldm_params(path: Path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.info["ldm"])


# --- files and metadata ----------------------------------------------------------------------------------------

def test_txt2img_writes_png_with_a1111_and_ldm_metadata(capsys, ckpt, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = txt2img(capsys, ckpt, out, "--seed", "5", "--negative-prompt", "blurry, dark",
                                   "--scale", "6", "--sampler", "euler_a", prompt="a red circle, blue background")
    assert code == 0 and stderr == ""
    files = pngs(out)
    assert [p.name for p in files] == ["00000-5.png"] and stdout.split() == [str(files[0])]
    assert os.listdir(out) == ["00000-5.png"]  # no temporary file left
    with Image.open(files[0]) as im:
        assert im.size == (64, 64) and im.format == "PNG"
        info = parse_infotext(im.info["parameters"])
        stored = json.loads(im.info["ldm"])
    sha = hashlib.sha256(Path(ckpt).read_bytes()).hexdigest()
    assert info["prompt"] == "a red circle, blue background" and info["negative_prompt"] == "blurry, dark"
    assert (info["Steps"], info["Sampler"], info["CFG scale"], info["Seed"], info["Size"]) == (
        "3", "Euler a Karras", "6.0", "5", "64x64")
    assert (info["Model hash"], info["Model"]) == (sha[:10], "tiny")
    assert stored["model_sha256"] == sha
    assert (stored["sampler"], stored["schedule"], stored["seed"], stored["steps"]) == ("euler_a", "karras", 5, 3)
    assert (stored["precision"], stored["device"], stored["version"]) == ("fp32", "cpu", ldm.__version__)
    assert (stored["prompt"], stored["negative_prompt"], stored["guidance"]) == (
        "a red circle, blue background", "blurry, dark", 6.0)
    # the mode of any file this process creates (mkstemp alone would give 0600)
    umask = os.umask(0)
    os.umask(umask)
    assert files[0].stat().st_mode & 0o777 == 0o666 & ~umask


def test_ddim_metadata_names_no_karras(capsys, ckpt, tmp_path):
    """ddim keeps its discrete grid whatever the default schedule: A1111 has no "DDIM Karras"."""
    code, _, _ = txt2img(capsys, ckpt, tmp_path / "out", "--seed", "1", "--sampler", "ddim", "--steps", "2")
    assert code == 0
    path, = pngs(tmp_path / "out")
    assert ldm_params(path)["schedule"] == "discrete"
    with Image.open(path) as im:
        assert parse_infotext(im.info["parameters"])["Sampler"] == "DDIM"


def test_from_png_replays_bit_exactly_and_flags_override(capsys, ckpt, tmp_path):
    code, _, _ = txt2img(capsys, ckpt, tmp_path / "a", "--seed", "77", "--sampler", "dpmpp_sde", "--scale", "5",
                         "--negative-prompt", "ugly", "--H", "48", prompt="a blue square")
    assert code == 0
    first, = pngs(tmp_path / "a")
    # replay with nothing but the PNG (and --quiet, which is not stored)
    code, _, _ = run(capsys, "txt2img", "--from-png", first, "--outdir", tmp_path / "b", "--quiet")
    assert code == 0
    replay, = pngs(tmp_path / "b")
    assert replay.name == first.name
    assert np.array_equal(pixels(replay), pixels(first))
    assert ldm_params(replay) == ldm_params(first)
    # a flag on the command line overrides the stored value; the rest is kept
    code, _, _ = run(capsys, "txt2img", "--from-png", first, "--outdir", tmp_path / "c", "--quiet", "--steps", "4")
    assert code == 0
    changed, = pngs(tmp_path / "c")
    p, q = ldm_params(changed), ldm_params(first)
    assert p["steps"] == 4
    assert {k: v for k, v in p.items() if k != "steps"} == {k: v for k, v in q.items() if k != "steps"}
    assert not np.array_equal(pixels(changed), pixels(first))


def test_guidance_interval_flag_is_stored_and_replayed(capsys, ckpt, tmp_path):
    code, _, _ = txt2img(capsys, ckpt, tmp_path / "a", "--seed", "5", "--guidance-interval", "1.5", "inf")
    assert code == 0
    first, = pngs(tmp_path / "a")
    assert ldm_params(first)["guidance_interval"] == [1.5, None]
    code, _, _ = txt2img(capsys, ckpt, tmp_path / "plain", "--seed", "5")  # the tiny model guides every step
    assert code == 0
    plain, = pngs(tmp_path / "plain")
    assert ldm_params(plain)["guidance_interval"] is None
    assert not np.array_equal(pixels(plain), pixels(first))
    code, _, _ = run(capsys, "txt2img", "--from-png", first, "--outdir", tmp_path / "b", "--quiet")
    assert code == 0
    replay, = pngs(tmp_path / "b")
    assert np.array_equal(pixels(replay), pixels(first))


def test_img2img_crops_to_a_multiple_of_8_and_replays(capsys, ckpt, tmp_path, init_png):
    code, _, _ = run(capsys, "img2img", "a green circle", "--init-img", init_png, "--ckpt", ckpt, "--outdir",
                     tmp_path / "a", "--quiet", "--steps", "4", "--strength", "0.5", "--seed", "9")
    assert code == 0
    first, = pngs(tmp_path / "a")
    with Image.open(first) as im:
        assert im.size == (64, 56)
        assert parse_infotext(im.info["parameters"])["Denoising strength"] == "0.5"
    code, _, _ = run(capsys, "img2img", "--from-png", first, "--outdir", tmp_path / "b", "--quiet")
    assert code == 0
    replay, = pngs(tmp_path / "b")
    assert np.array_equal(pixels(replay), pixels(first))


def test_img2img_resizes_when_size_is_given(capsys, ckpt, tmp_path, init_png):
    code, _, _ = run(capsys, "img2img", "x", "--init-img", init_png, "--ckpt", ckpt, "--outdir", tmp_path / "a",
                     "--quiet", "--steps", "2", "--strength", "0.5", "--seed", "9", "--W", "48", "--H", "40")
    assert code == 0
    path, = pngs(tmp_path / "a")
    with Image.open(path) as im:
        assert im.size == (48, 40)


# --- seeds and batches -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_sde"])
def test_image_i_of_a_batch_is_the_batch_1_image_of_its_seed(capsys, ckpt, tmp_path, sampler):
    code, _, _ = txt2img(capsys, ckpt, tmp_path / "batch", "--n-samples", "4", "--seed", "10", "--sampler", sampler)
    assert code == 0
    batch = pngs(tmp_path / "batch")
    assert [p.name for p in batch] == ["00000-10.png", "00001-11.png", "00002-12.png", "00003-13.png"]
    for i, path in enumerate(batch):
        out = tmp_path / f"single{i}"
        assert txt2img(capsys, ckpt, out, "--seed", str(10 + i), "--sampler", sampler)[0] == 0
        single, = pngs(out)
        assert np.array_equal(pixels(single), pixels(path)), f"image {i}"
        assert ldm_params(single) == ldm_params(path)
        assert single.read_bytes() == path.read_bytes()


def test_n_iter_continues_the_seeds_and_writes_a_grid(capsys, ckpt, tmp_path, monkeypatch):
    from ldm.accel import optimize

    packed = []  # the layers whose weights were packed (CPU), once per packing
    real = optimize._packed
    monkeypatch.setattr(optimize, "_packed", lambda m, reorder: real(m, lambda w: packed.append(m) or reorder(w)))
    code, stdout, _ = txt2img(capsys, ckpt, tmp_path / "out", "--n-samples", "2", "--n-iter", "2", "--seed", "20",
                              "--steps", "2", "--grid")
    assert code == 0
    if optimize.mkldnn_available():  # both batches ran on weights packed once
        assert packed and len(packed) == len(set(packed))
    names = [p.name for p in pngs(tmp_path / "out")]
    assert names == ["00000-20.png", "00001-21.png", "00002-22.png", "00003-23.png", "00004-grid.png"]
    assert len(stdout.split()) == 5
    with Image.open(tmp_path / "out" / "00004-grid.png") as grid:
        assert grid.size == (128, 128)
    # seed 22 came from the second batch; alone it is the same image
    assert txt2img(capsys, ckpt, tmp_path / "single", "--seed", "22", "--steps", "2")[0] == 0
    assert np.array_equal(pixels(pngs(tmp_path / "single")[0]), pixels(tmp_path / "out" / "00002-22.png"))


# --- safe writing ------------------------------------------------------------------------------------------------

def test_never_overwrites_an_existing_file(capsys, ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000-5.png").write_bytes(b"precious")
    assert txt2img(capsys, ckpt, out, "--seed", "5", "--steps", "1")[0] == 0
    assert (out / "00000-5.png").read_bytes() == b"precious"
    assert [p.name for p in pngs(out)] == ["00000-5.png", "00001-5.png"]
    # a writer that picks a taken name (as a concurrent one could) moves on instead of replacing the file
    monkeypatch.setattr("ldm.generation.images.next_index", lambda outdir: 0)
    before = (out / "00001-5.png").read_bytes()
    assert txt2img(capsys, ckpt, out, "--seed", "5", "--steps", "1")[0] == 0
    assert (out / "00000-5.png").read_bytes() == b"precious" and (out / "00001-5.png").read_bytes() == before
    assert sorted(os.listdir(out)) == ["00000-5.png", "00001-5.png", "00002-5.png"]


def test_interrupted_save_leaves_only_complete_files(capsys, ckpt, tmp_path, monkeypatch):
    """Ctrl-C while the second PNG is half written: exit 130, the first PNG complete, nothing else."""
    real_save = Image.Image.save
    calls = []

    def save(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 2:
            fp.write(b"\x89PNG\r\n\x1a\n half an image")
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "out"
    code, stdout, stderr = txt2img(capsys, ckpt, out, "--seed", "1", "--n-samples", "3", "--steps", "1")
    assert code == 130 and "interrupted" in stderr
    assert os.listdir(out) == ["00000-1.png"] and stdout.split() == [str(out / "00000-1.png")]
    with Image.open(out / "00000-1.png") as im:
        im.verify()


def test_interrupted_sampling_leaves_only_complete_files(capsys, ckpt, tmp_path, monkeypatch):
    """Ctrl-C in the middle of the second batch's sampling: the first batch's files are complete, no other file
    exists."""
    from ldm.generation.pipeline import Denoising

    real_next = Denoising.__next__
    batches = []

    def next_interrupted_in_batch_2(self):
        if self not in batches:
            batches.append(self)
        step = real_next(self)
        if len(batches) == 2 and step.i == 1:
            raise KeyboardInterrupt
        return step

    monkeypatch.setattr(Denoising, "__next__", next_interrupted_in_batch_2)
    out = tmp_path / "out"
    code, _, stderr = txt2img(capsys, ckpt, out, "--seed", "1", "--n-samples", "2", "--n-iter", "2", "--steps", "3")
    assert code == 130 and "interrupted" in stderr and len(batches) == 2
    assert sorted(os.listdir(out)) == ["00000-1.png", "00001-2.png"]
    for name in os.listdir(out):
        with Image.open(out / name) as im:
            im.verify()


# --- progress and quiet ------------------------------------------------------------------------------------------

def test_progress_bar_shows_its_rate_and_quiet_silences_it(capsys, ckpt, tmp_path, monkeypatch):
    import tqdm

    # refresh on every step, so that the rate shows however fast the steps are
    monkeypatch.setattr(tqdm, "tqdm", functools.partial(tqdm.tqdm, mininterval=0))
    code, _, stderr = run(capsys, "txt2img", "x", "--ckpt", ckpt, "--outdir", tmp_path / "a", *FAST, "--seed", "1")
    assert code == 0
    assert re.search(r"batch 1/1:.*\d+(\.\d+)?(it/s|s/it)", stderr), stderr
    assert "loaded tiny.safetensors" in stderr
    code, _, stderr = txt2img(capsys, ckpt, tmp_path / "b", "--seed", "1")
    assert code == 0 and stderr == ""


# --- NaN guards --------------------------------------------------------------------------------------------------

def test_unet_nan_stops_with_a_clear_error_and_no_file(capsys, ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr("ldm.models.unet.UNetModel.__call__", lambda self, x, t, context: torch.full_like(x, float("nan")))
    code, stdout, stderr = txt2img(capsys, ckpt, tmp_path / "out", "--seed", "1")
    assert code == 1 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1
    assert "NaN" in stderr and "--precision fp32" in stderr and "attention" in stderr
    assert not pngs(tmp_path / "out")


def test_half_precision_vae_nan_decodes_again_in_fp32_with_one_warning(capsys, ckpt, tmp_path, monkeypatch):
    from ldm.models.vae import AutoencoderKL

    real_decode = AutoencoderKL.decode

    def overflowing(self, latents):  # a half-precision decode that overflows, as SD 1.x's VAE can in fp16
        out = real_decode(self, latents)
        return out if self.post_quant_conv.weight.dtype == torch.float32 else out * float("nan")

    monkeypatch.setattr(AutoencoderKL, "decode", overflowing)
    monkeypatch.setenv(ALLOW_EMULATED_BF16_ENV, "1")  # on every CPU: bf16 is refused where it is not native
    code, _, stderr = txt2img(capsys, ckpt, tmp_path / "out", "--seed", "1", "--precision", "bf16", "--device", "cpu")
    assert code == 0
    assert stderr.splitlines() == [
        "ldm txt2img: warning: VAE decode produced NaN/Inf in half precision; decoding again in fp32"]
    path, = pngs(tmp_path / "out")
    assert ldm_params(path)["precision"] == "bf16"
    assert pixels(path).std() > 0


# --- bad input: exit code 2, one line, no file ---------------------------------------------------------------------

def _truncated_safetensors(path: Path) -> Path:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header) + 100) + header)
    return path


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (1-bit greyscale) and which holds no pixel data."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"") + chunk(b"IEND", b""))
    return path


def _png_without_metadata(path: Path) -> Path:
    Image.new("RGB", (16, 16)).save(path, pnginfo=PngImagePlugin.PngInfo())
    return path


BAD = {  # name: (command, extra args (with {tmp}, {init} substituted), fragments the message must hold)
    "width not a multiple of 8": ("txt2img", ["--W", "100"], ["--width 100", "multiple of 8", "96 or 104"]),
    "height not a multiple of 8": ("txt2img", ["--H", "65"], ["--height 65", "64 or 72"]),
    "width below 8": ("txt2img", ["--W", "4"], ["--width 4", "8 or 16"]),
    "img2img width": ("img2img", ["--init-img", "{init}", "--W", "50"], ["--width 50", "48 or 56"]),
    "steps 0": ("txt2img", ["--steps", "0"], ["--steps", "at least 1", "got 0"]),
    "steps negative": ("txt2img", ["--steps", "-3"], ["--steps", "at least 1"]),
    "strength 0": ("img2img", ["--init-img", "{init}", "--strength", "0"], ["--strength", "(0, 1]", "got 0.0"]),
    "strength above 1": ("img2img", ["--init-img", "{init}", "--strength", "1.5"], ["--strength", "(0, 1]"]),
    "strength negative": ("img2img", ["--init-img", "{init}", "--strength", "-0.2"], ["--strength", "(0, 1]"]),
    "guidance interval reversed": ("txt2img", ["--guidance-interval", "2", "1"],
                                   ["--guidance-interval", "0 <= lo < hi", "1 inf"]),
    "guidance interval not a number": ("txt2img", ["--guidance-interval", "low", "inf"],
                                       ["--guidance-interval", "pair (lo, hi)"]),
    "strength runs no step": ("img2img", ["--init-img", "{init}", "--strength", "0.1"], ["runs no step"]),
    "unknown sampler": ("txt2img", ["--sampler", "dpm_fast"],
                        ["unknown sampler 'dpm_fast'", "ddim", "plms", "euler_a", "dpmpp_2m", "dpmpp_sde", "DPM++ 2M"]),
    "missing checkpoint": ("txt2img", ["--ckpt", "{tmp}/nope.safetensors"],
                           ["checkpoint not found", "nope.safetensors"]),
    "checkpoint is a folder": ("txt2img", ["--ckpt", "{tmp}"], ["checkpoint not found"]),
    "checkpoint not a model": ("txt2img", ["--ckpt", "{tmp}/notes.txt"], ["notes.txt is not a checkpoint"]),
    "truncated checkpoint": ("txt2img", ["--ckpt", "{tmp}/cut.safetensors"], ["truncated safetensors"]),
    "missing init image": ("img2img", ["--init-img", "{tmp}/nope.png"], ["image not found", "nope.png"]),
    "unreadable init image": ("img2img", ["--init-img", "{tmp}/notes.txt"], ["cannot read image", "notes.txt"]),
    "truncated init image": ("img2img", ["--init-img", "{tmp}/cut.png"], ["cannot read image", "cut.png"]),
    "init image smaller than 8": ("img2img", ["--init-img", "{tmp}/speck.png"], ["5x5", "at least 8x8"]),
    "init image too large to open": ("img2img", ["--init-img", "{tmp}/bomb.png"],
                                     ["cannot read image", "bomb.png", "exceeds limit", "Resize it"]),
    "no init image": ("img2img", [], ["img2img needs --init-img"]),
    "outdir under a file": ("txt2img", ["--outdir", "{tmp}/notes.txt/out"], ["not writable", "--outdir"]),
    "outdir is a file": ("txt2img", ["--outdir", "{tmp}/notes.txt"], ["notes.txt exists and is not a folder"]),
    "empty prompt file": ("txt2img", ["--from-file", "{tmp}/empty.txt", "--prompt-none"], ["empty.txt is empty"]),
    "blank prompt file": ("txt2img", ["--from-file", "{tmp}/blank.txt", "--prompt-none"], ["blank.txt is empty"]),
    "missing prompt file": ("txt2img", ["--from-file", "{tmp}/nope.txt", "--prompt-none"], ["prompt file not found"]),
    "no prompt": ("txt2img", ["--prompt-none"], ["no prompt"]),
    "png without ldm metadata": ("txt2img", ["--from-png", "{tmp}/plain.png"], ["has no ldm metadata"]),
    "missing png": ("txt2img", ["--from-png", "{tmp}/nope.png"], ["image not found"]),
    "n-samples 0": ("txt2img", ["--n-samples", "0"], ["--n-samples must be at least 1"]),
    "negative seed": ("txt2img", ["--seed", "-1"], ["--seed must be in [0, 2**32)"]),
    "negative scale": ("txt2img", ["--scale", "-2"], ["--scale must be >= 0"]),
    "clip skip 0": ("txt2img", ["--clip-skip", "0"], ["--clip-skip must be at least 1"]),
    "clip skip past the first layer": ("txt2img", ["--clip-skip", "100"],
                                       ["clip_skip must be in [1, 2]", "(2 layers)", "got 100"]),
    "scale not a number": ("txt2img", ["--scale", "nan"], ["--scale must be a finite number, got nan"]),
    "scale infinite": ("txt2img", ["--scale", "inf"], ["--scale must be a finite number, got inf"]),
    "eta not a number": ("txt2img", ["--sampler", "euler_a", "--eta", "nan"], ["--eta must be a finite number"]),
    "strength not a number": ("img2img", ["--init-img", "{init}", "--strength", "nan"], ["--strength must be a finite"]),
    "eta for a sampler without eta": ("txt2img", ["--sampler", "dpmpp_2m", "--eta", "0.5"], ["takes no eta"]),
    "missing config file": ("txt2img", ["--config", "{tmp}/nope.yaml"], ["--config file not found"]),
    "unknown preset": ("txt2img", ["--config", "sd-v9"], ["unknown preset 'sd-v9'"]),
    "missing vae file": ("txt2img", ["--vae", "{tmp}/nope.safetensors"], ["--vae file not found"]),
    "config is a training config": ("txt2img", ["--config", "{tmp}/train.yaml"],
                                    ["train.yaml is not an SD inference config", "no 'model.params' section"]),
    "config without a unet section": ("txt2img", ["--config", "{tmp}/no-unet.yaml"],
                                      ["no-unet.yaml", "no 'model.params.unet_config' section"]),
    "config without a unet field": ("txt2img", ["--config", "{tmp}/no-channels.yaml"],
                                    ["'model.params.unet_config.params' section has no 'model_channels'"]),
    "config of another layout": ("txt2img", ["--config", "{tmp}/other.yaml"],
                                 ["other.yaml is not an SD model config", "['epochs', 'lr']"]),
    "size beyond the machine's memory": ("txt2img", ["--W", "65536", "--H", "65536"],
                                         ["65536x65536", "needs at least", "GiB of memory", "this cpu has"]),
    "batch beyond the machine's memory": ("txt2img", ["--W", "8192", "--H", "8192", "--n-samples", "400"],
                                          ["8192x8192 x 400 image(s)", "fewer images per call"]),
    "img2img size beyond the machine's memory": ("img2img", ["--init-img", "{init}", "--W", "65536", "--H", "65536"],
                                                 ["65536x65536", "needs at least"]),
}


@pytest.fixture()
def bad_files(tmp_path) -> Path:
    d = tmp_path / "files"
    d.mkdir()
    (d / "notes.txt").write_text("not a model, not an image\n")
    (d / "empty.txt").write_text("")
    (d / "blank.txt").write_text("\n   \n\t\n")
    _truncated_safetensors(d / "cut.safetensors")
    _png_without_metadata(d / "plain.png")
    Image.new("RGB", (5, 5)).save(d / "speck.png")
    _png_header(d / "bomb.png", 20000, 20000)  # 400 M pixels: PIL refuses to decode it
    (d / "train.yaml").write_text("run_dir: runs/x\nmodel:\n  preset: tiny\ntrain:\n  max_steps: 10\n")
    (d / "no-unet.yaml").write_text("model:\n  params:\n    first_stage_config: {}\n")
    (d / "no-channels.yaml").write_text("model:\n  params:\n    unet_config:\n      params: {in_channels: 4}\n"
                                        "    first_stage_config:\n      params: {embed_dim: 4, ddconfig: {}}\n")
    (d / "other.yaml").write_text("lr: 0.1\nepochs: 3\n")
    whole = d / "whole.png"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(whole)
    (d / "cut.png").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return d


@pytest.fixture()
def unreadable(monkeypatch):
    """Make paths unreadable: chmod 000, and, since root reads anyway, opening them raises PermissionError."""
    import builtins
    import io

    paths: set[str] = set()
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) in paths:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)

    def make(path: Path) -> Path:
        path.chmod(0)
        paths.add(os.path.abspath(path))
        return path

    yield make
    for path in paths:
        os.chmod(path, 0o644)


@pytest.mark.parametrize("what", ["checkpoint", "prompt file", "init image"])
def test_unreadable_file_exits_2_with_one_line(capsys, ckpt, tmp_path, init_png, unreadable, what):
    out = tmp_path / "out"
    if what == "checkpoint":
        path = tmp_path / "copy.safetensors"
        path.write_bytes(Path(ckpt).read_bytes())
        unreadable(path)
        args = ["txt2img", "x", "--ckpt", path]
    elif what == "prompt file":
        path = tmp_path / "prompts.txt"
        path.write_text("a prompt\n")
        unreadable(path)
        args = ["txt2img", "--from-file", path, "--ckpt", ckpt]
    else:
        unreadable(init_png)
        path = init_png
        args = ["img2img", "x", "--init-img", init_png, "--ckpt", ckpt]
    code, stdout, stderr = run(capsys, *args, "--outdir", out, "--quiet")
    assert code == 2 and stdout == ""
    assert len(stderr.splitlines()) == 1 and "Permission denied" in stderr and path.name in stderr, stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line_and_no_file(capsys, ckpt, tmp_path, bad_files, init_png, case):
    command, extra, fragments = BAD[case]
    extra = [a.format(tmp=bad_files, init=init_png) for a in extra]
    prompt = [] if "--prompt-none" in extra else ["a prompt"]
    extra = [a for a in extra if a != "--prompt-none"]
    if "--ckpt" not in extra and "--from-png" not in extra:
        extra += ["--ckpt", str(ckpt)]
    if "--outdir" not in extra:
        extra += ["--outdir", str(tmp_path / "out")]
    if command == "img2img" and "--strength" not in extra:
        extra += ["--strength", "0.5"]
    before = sorted(p for p in tmp_path.rglob("*") if "cache" not in p.parts)
    code, stdout, stderr = run(capsys, command, *prompt, "--steps", "3", "--seed", "1", "--quiet", *extra)
    assert code == 2, stderr
    assert stdout == ""
    assert len(stderr.splitlines()) == 1 and stderr.startswith(f"ldm {command}: error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in stderr, (fragment, stderr)
    after = sorted(p for p in tmp_path.rglob("*") if "cache" not in p.parts)
    assert [p for p in after if p not in before and not p.is_dir()] == []  # no file written anywhere


def test_bf16_on_a_cpu_without_native_bf16_is_refused_before_loading(capsys, ckpt, tmp_path, monkeypatch):
    """As on a 2-core AMD EPYC with AVX2 only (where oneDNN's bf16 kernels also raise): one line naming what the CPU
    lacks and the fix, exit code 2, the checkpoint never read; on a CPU with AVX-512 BF16 bf16 runs."""
    monkeypatch.delenv(ALLOW_EMULATED_BF16_ENV, raising=False)
    monkeypatch.setattr(cpu, "cpu_features", lambda: CPUFeatures("AVX2", avx512_bf16=False, amx=False))
    monkeypatch.setattr(ldm.models.checkpoint, "read_state_dict", lambda *a, **k: pytest.fail("the checkpoint was read"))
    out = tmp_path / "out"
    code, stdout, stderr = txt2img(capsys, ckpt, out, "--precision", "bf16")
    assert code == 2 and stdout == "" and not out.exists()
    assert stderr.splitlines() == ["ldm txt2img: error: --precision bf16: this CPU (AVX2) has no native bf16 "
                                   "arithmetic (AVX-512 BF16 or AMX), so bf16 would run emulated and slower than "
                                   "fp32; use --precision fp32"]
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ALLOW_EMULATED_BF16_ENV, raising=False)
    monkeypatch.setattr(cpu, "cpu_features", lambda: CPUFeatures("AVX512", avx512_bf16=True, amx=False))
    code, _, stderr = txt2img(capsys, ckpt, out, "--precision", "bf16", "--seed", "2")
    assert code == 0, stderr
    assert ldm_params(pngs(out)[0])["precision"] == "bf16"


def test_bad_input_end_to_end_in_a_subprocess(ckpt, tmp_path):
    """`python -m ldm`: exit code 2, one line, no traceback, no output folder."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "ldm", "txt2img", "a prompt", "--ckpt", str(ckpt), "--W", "100",
                           "--outdir", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "LDM_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["ldm txt2img: error: --width 100 is not a multiple of 8; use 96 or 104"]
    assert not out.exists()


def test_from_png_of_the_other_mode_is_a_usage_error(capsys, ckpt, tmp_path, init_png):
    out = tmp_path / "out"
    code, _, _ = run(capsys, "img2img", "--ckpt", str(ckpt), "a green square", "--init-img", str(init_png),
                     "--steps", "4", "--strength", "0.5", "--seed", "3", "--outdir", str(out), "--quiet")
    assert code == 0
    code, _, stderr = run(capsys, "txt2img", "--from-png", str(pngs(out)[0]), "--outdir", str(tmp_path / "replay"))
    assert code == 2 and "ldm img2img --from-png" in stderr
    assert not (tmp_path / "replay").exists()


def test_a_failure_after_loading_leaves_no_empty_output_folder(capsys, ckpt, tmp_path):
    # --eta is checked against the sampler only once the model is loaded
    out = tmp_path / "new" / "folder"
    code, _, stderr = run(capsys, "txt2img", "--ckpt", str(ckpt), "x", "--sampler", "dpmpp_2m", "--eta", "0.5",
                          "--outdir", str(out), "--quiet")
    assert code == 2 and "eta" in stderr
    assert not (tmp_path / "new").exists()
