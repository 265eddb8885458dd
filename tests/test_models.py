"""The module trees are the checkpoint: key/shape coverage of the full presets, forward shapes, round trips."""
import ast
import dataclasses
from pathlib import Path

import pytest
import torch

import ldm
from ldm import accel
from ldm.models.checkpoint import expected_shapes
from ldm.config import PRESETS, load_config, preset
from ldm.testing.reference import random_model

DATA = Path(__file__).parent / "data"
REFERENCE_CONFIGS = Path(__file__).parents[2] / "shared" / "reference" / "configs"


def reference_keys(name: str) -> dict[str, tuple[int, ...]]:
    """key -> shape from the committed lists, taken from real SD 1.5 / SD 2.1 files (see shared/reference)."""
    rows = (line.rstrip("\n").split("\t") for line in (DATA / name).read_text().splitlines()[1:])
    return {key: tuple(ast.literal_eval(shape)) for key, _dtype, shape in rows}


@pytest.mark.parametrize("preset_name,keys_file", [("sd-v1", "sd15_keys.tsv"), ("sd-v2", "sd21_keys.tsv"),
                                                   ("sd-v2-base", "sd21_keys.tsv")])
def test_full_presets_match_real_checkpoint_keys_exactly(preset_name, keys_file):
    ours = expected_shapes(preset(preset_name))
    ref = reference_keys(keys_file)
    assert sorted(set(ours) - set(ref)) == []
    assert sorted(set(ref) - set(ours)) == []
    assert {k: v for k, v in ours.items() if ref[k] != v} == {}


@pytest.mark.parametrize("yaml_name,preset_name", [("v1-inference", "sd-v1"), ("v2-inference", "sd-v2-base"),
                                                   ("v2-inference-v", "sd-v2")])
def test_original_inference_yamls_map_onto_presets(yaml_name, preset_name):
    path = REFERENCE_CONFIGS / f"{yaml_name}.yaml"
    if not path.exists():
        pytest.skip("shared/reference is not beside the checkout")
    assert load_config(path).replace(name=preset_name) == preset(preset_name)


@pytest.mark.parametrize("name", ["tiny", "tiny-v2"])
def test_tiny_forward_shapes(name):
    torch.manual_seed(0)
    sd = ldm.StableDiffusion(preset(name))
    cfg = sd.config
    ctx = sd.encode_prompt(["a photo of a cat", "a dog"])
    assert ctx.shape == (2, 77, cfg.text.width)
    # a latent side that is not a multiple of 2**levels still meets its skip connections
    for h, w in [(8, 8), (6, 10)]:
        x = torch.randn(2, 4, h, w)
        assert sd.unet(x, torch.tensor([10, 999]), ctx).shape == x.shape
    images = sd.vae.decode(torch.randn(1, 4, 8, 6))
    assert images.shape == (1, 3, 64, 48)
    posterior = sd.vae.encode(images)
    assert posterior.mean.shape == (1, 4, 8, 6)
    g = [torch.Generator().manual_seed(1)]
    assert torch.equal(posterior.sample(g), posterior.sample([torch.Generator().manual_seed(1)]))


@pytest.mark.parametrize("name", ["tiny", "tiny-v2"])
@pytest.mark.parametrize("attention", [(1, 2), (2,), ()])
def test_an_accelerated_unet_shares_latents_across_contexts(name, attention):
    """Accelerated (`ldm.accel`): k * B contexts for B latents give the result of the latents repeated k times, bit
    for bit (the same embedding and layouts; the tiny presets' layers round each row alike whatever the batch); the
    plain UNet refuses them. The layers before the first cross-attention run on the B latents only (for the tiny
    presets' (2,), conv_in and a whole level of skips; without any transformer, the whole UNet)."""
    cfg = preset(name)
    cfg = cfg.replace(unet=dataclasses.replace(cfg.unet, attention_resolutions=attention))
    sd, _ = random_model(cfg)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(6, 77, cfg.unet.context_dim, generator=g)
    with pytest.raises(ValueError, match="give one context per latent"):
        sd.unet(x, torch.tensor([10, 700]), context)
    accel.accelerate(sd)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    context = torch.randn(6, 77, cfg.unet.context_dim, generator=g)
    batches = []
    sd.unet.input_blocks[1].register_forward_hook(lambda m, i, out: batches.append(out.shape[0]))
    with torch.no_grad():
        shared = sd.unet(x, t, context)
        repeated = sd.unet(torch.cat([x] * 3), torch.cat([t] * 3), context)
    first_has_attention = 1 in attention
    assert batches == [6 if first_has_attention else 2, 6]
    assert shared.shape == repeated.shape == (6, 4, 8, 8)
    assert torch.equal(shared, repeated)
    with pytest.raises(ValueError, match="multiple"):
        sd.unet(x, t, context[:3])
    with pytest.raises(ValueError, match="one timestep per latent"):
        sd.unet(x, torch.cat([t] * 3), context)


def test_bad_shapes_raise_clear_errors():
    sd = ldm.StableDiffusion(preset("tiny"))
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        sd.unet(torch.randn(1, 3, 8, 8), torch.tensor([1]), torch.randn(1, 77, 32))
    with pytest.raises(ValueError, match="context"):
        sd.unet(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.randn(1, 77, 768))
    with pytest.raises(ValueError, match="multiple of 8"):
        sd.vae.encode(torch.randn(1, 3, 60, 64))


@pytest.mark.parametrize("name", ["tiny", "tiny-v2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_save_load_round_trip_is_exact(tmp_path, name, dtype):
    torch.manual_seed(0)
    sd = ldm.StableDiffusion(preset(name)).to(dtype)
    path = ldm.save(sd, tmp_path / "m.safetensors")
    back = ldm.load(path, dtype=dtype)
    assert back.config == sd.config
    a, b = sd.state_dict(), back.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with pytest.raises(FileExistsError):
        ldm.save(sd, path)


def test_presets_are_consistent():
    for name, cfg in PRESETS.items():
        assert cfg.name == name
        assert ldm.ModelConfig.from_dict(cfg.to_dict()) == cfg
