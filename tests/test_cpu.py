"""What the CPU supports, asked at run time (`ldm.accel.cpu`), and the Python API's refusals of what cannot work: bf16 on
a CPU that would only emulate it, and an image size whose memory need exceeds the machine."""
import pytest
import torch

import ldm
from ldm.accel import cpu
from ldm.generation import pipeline
from ldm.accel.cpu import ALLOW_EMULATED_BF16_ENV, CPUFeatures
from ldm.testing.reference import random_model

AVX2 = CPUFeatures("AVX2", avx512_bf16=False, amx=False)
SAPPHIRE_RAPIDS = CPUFeatures("AVX512", avx512_bf16=True, amx=True)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """The tiny models run on one thread (see conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    sd, _ = random_model(ldm.preset("tiny"))
    return ldm.save(sd, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def test_cpu_features_are_pytorchs_own_answers():
    features = cpu.cpu_features()
    assert features.capability == torch.backends.cpu.get_cpu_capability()
    assert features.avx512_bf16 == torch.cpu._is_avx512_bf16_supported()
    assert features.amx == torch.cpu._is_amx_tile_supported()
    assert features.describe().startswith(features.capability)
    # oneDNN's bf16 kernels need at least AVX-512 BW/VL/DQ, which every CPU with AVX-512 BF16 has
    assert not features.avx512_bf16 or cpu.onednn_supports(torch.bfloat16)
    assert cpu.onednn_supports(torch.float32) == torch.backends.mkldnn.is_available()
    assert not cpu.onednn_supports(torch.float64)


@pytest.mark.parametrize("features, refused", [(AVX2, True), (SAPPHIRE_RAPIDS, False)])
def test_loading_bf16_is_refused_where_the_cpu_would_emulate_it(ckpt, monkeypatch, features, refused):
    monkeypatch.delenv(ALLOW_EMULATED_BF16_ENV, raising=False)
    monkeypatch.setattr(cpu, "cpu_features", lambda: features)
    if refused:
        with pytest.raises(ValueError, match=r"this CPU \(AVX2\) has no native bf16 arithmetic \(AVX-512 BF16 or "
                                             r"AMX\).*allow_emulated_bf16=True"):
            ldm.load(ckpt, dtype=torch.bfloat16)
    else:
        assert ldm.load(ckpt, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert ldm.load(ckpt).dtype == torch.float32  # fp32 always loads
    assert ldm.load(ckpt, dtype=torch.bfloat16, allow_emulated_bf16=True).dtype == torch.bfloat16
    monkeypatch.setenv(ALLOW_EMULATED_BF16_ENV, "1")
    assert ldm.load(ckpt, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_emulated_bf16_generates_the_same_image_as_on_a_cpu_with_onednn_bf16_refused(ckpt, monkeypatch):
    """A forced bf16 model where oneDNN has no bf16 (every CPU, simulated) runs the plain layers, packs nothing and
    gives a finite image, bit-identical to the same call with the fast path switched off."""
    from ldm.accel import optimize

    monkeypatch.setattr(optimize, "onednn_supports", lambda dtype: dtype == torch.float32)
    sd = ldm.load(ckpt, dtype=torch.bfloat16, allow_emulated_bf16=True)
    kwargs = dict(steps=3, width=64, height=64, seed=5)
    fast = pipeline.txt2img(sd, "a red circle", **kwargs)
    assert not optimize.is_packed(sd)
    plain = pipeline.txt2img(ldm.load(ckpt, dtype=torch.bfloat16, allow_emulated_bf16=True, accelerate=False),
                             "a red circle", **kwargs)
    assert torch.isfinite(fast.latents).all()
    assert torch.equal(fast.latents, plain.latents)


def test_a_size_beyond_the_machines_memory_is_refused_before_any_work(ckpt, monkeypatch):
    sd = ldm.load(ckpt)
    monkeypatch.setattr(pipeline, "randn", lambda *a, **k: pytest.fail("generation started"))
    with pytest.raises(ValueError, match=r"65536x65536 x 1 image\(s\) needs at least [\d.]+ GiB of memory \(model "
                                         r"[\d.]+ [MG]iB, UNet [\d.]+ GiB, VAE [\d.]+ GiB, images [\d.]+ GiB\) and "
                                         r"this cpu has [\d.]+ GiB; use --vae-tiling"):
        pipeline.txt2img(sd, "x", width=65536, height=65536)
    from PIL import Image

    with pytest.raises(ValueError, match="65536x65536 x 2 image"):
        pipeline.img2img(sd, Image.new("RGB", (64, 64)), "x", width=65536, height=65536, batch_size=2)


def test_memory_estimate_follows_the_options_and_bounds_a_real_call(ckpt, monkeypatch):
    """The estimate is a lower bound: tiling shrinks the VAE's part to one tile, a batch decoded at once multiplies
    it; a 3 GiB machine (faked) refuses 4096 px untiled and accepts it tiled; and a real 64 px call fits."""
    sd = ldm.load(ckpt)
    whole = pipeline.memory_needed(sd, 4096, 4096, images=2, unet_rows=2, vae_images=1, tile_size=None)
    tiled = pipeline.memory_needed(sd, 4096, 4096, images=2, unet_rows=2, vae_images=1, tile_size=512)
    batch = pipeline.memory_needed(sd, 4096, 4096, images=2, unet_rows=2, vae_images=2, tile_size=None)
    assert whole["VAE"] == 64 * tiled["VAE"] and batch["VAE"] == 2 * whole["VAE"]
    assert whole["UNet"] == tiled["UNet"] and whole["images"] == 2 * 3 * 4096 * 4096 * 5
    monkeypatch.setattr(pipeline, "machine_memory", lambda device: 3 << 30)
    monkeypatch.setattr(pipeline, "randn", lambda *a, **k: pytest.fail("generation started"))
    with pytest.raises(ValueError, match="use --vae-tiling"):
        pipeline.txt2img(sd, "x", width=4096, height=4096, guidance=1.0)
    pipeline.check_memory(sd, 4096, 4096, 1, 1, 1, tile_size=512)  # tiled: fits
    monkeypatch.undo()
    result = pipeline.txt2img(sd, "x", width=64, height=64, steps=1, seed=0)
    assert result.images[0].size == (64, 64)


def test_machine_memory_is_at_least_the_physical_memory():
    import os

    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert pipeline.machine_memory(torch.device("cpu")) >= physical > 0
