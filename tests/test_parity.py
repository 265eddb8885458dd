"""Parity with independent references given identical weights: the UNet and the VAE against diffusers'
UNet2DConditionModel and AutoencoderKL, the text encoders against transformers' CLIPTextModel.

The weights are seeded draws unlike any init (no two tensors alike), so a swapped key shows; they cross over
through diffusers' own original-to-diffusers conversion and a strict load, so a misnamed key fails. The tiny
presets run in the fast suite, the full sd-v1 and sd-v2 sizes with `pytest -m slow`. Tolerance: relative error
max|ours - ref| / max|ref| <= 1e-4 in fp32.
"""
import copy
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

import ldm
from ldm.models import attention
from ldm.config import preset
from ldm.testing.reference import (TOLERANCE, assert_close, compare_text, compare_unet, compare_vae, error,
                                   original_config, random_model, reference_text, reference_unet, reference_unet_config,
                                   reference_vae, reference_vae_config, unet_inputs)

REFERENCE_CONFIGS = Path(__file__).parents[2] / "shared" / "reference" / "configs"

PRESETS = ["tiny", "tiny-v2", *(pytest.param(name, marks=pytest.mark.slow) for name in ("sd-v1", "sd-v2"))]


@pytest.fixture(scope="module", params=PRESETS)
def model(request):
    """(StableDiffusion with seeded weights, its state_dict), built once per preset; the full sizes take ~20 s."""
    return random_model(preset(request.param))


@pytest.fixture(scope="module")
def tiny():
    return random_model(preset("tiny"))


# --- parity ---------------------------------------------------------------------------------------------------------

def test_unet_matches_diffusers(model):
    sd, checkpoint = model
    assert_close(compare_unet(sd, reference_unet(sd.config, checkpoint)))


def test_vae_matches_diffusers(model):
    sd, checkpoint = model
    assert_close(*compare_vae(sd, reference_vae(sd.config, checkpoint)))


def test_text_encoder_matches_transformers(model):
    sd, checkpoint = model
    assert (sd.tokenize(["a cat"])[0, -1] == sd.config.text.pad_token).item()  # the prompts include padding
    assert_close(compare_text(sd, reference_text(sd.config, checkpoint)))


# --- the comparison can fail ----------------------------------------------------------------------------------------

BLOCK = "model.diffusion_model.output_blocks.1.1.transformer_blocks.0."  # tiny: the upsampling stage
TEXT_LAYER = "cond_stage_model.transformer.text_model.encoder.layers.1."
SWAPS = [
    pytest.param("unet", BLOCK + "attn1.to_q.weight", BLOCK + "attn1.to_k.weight", id="unet-attn1-q-k"),
    pytest.param("unet", BLOCK + "norm1.weight", BLOCK + "norm2.weight", id="unet-norm1-norm2"),
    pytest.param("vae", "first_stage_model.decoder.mid.attn_1.q.weight",
                 "first_stage_model.decoder.mid.attn_1.k.weight", id="vae-decoder-attn-q-k"),
    pytest.param("text", TEXT_LAYER + "self_attn.q_proj.weight", TEXT_LAYER + "self_attn.k_proj.weight",
                 id="text-q-k"),
]


@pytest.mark.parametrize("component,key_a,key_b", SWAPS)
def test_swapped_weights_are_detected(tiny, component, key_a, key_b):
    """Negative control: the reference gets two same-shaped tensors swapped; the error must be far above tolerance."""
    sd, checkpoint = tiny
    assert checkpoint[key_a].shape == checkpoint[key_b].shape
    swapped = {**checkpoint, key_a: checkpoint[key_b], key_b: checkpoint[key_a]}
    if component == "unet":
        errors = [compare_unet(sd, reference_unet(sd.config, swapped))]
    elif component == "vae":
        errors = compare_vae(sd, reference_vae(sd.config, swapped))
    else:
        errors = [compare_text(sd, reference_text(sd.config, swapped))]
    assert max(e.rel for e in errors) > 100 * TOLERANCE


@pytest.mark.parametrize("build,key", [
    pytest.param(reference_unet, "model.diffusion_model.input_blocks.3.1.proj_in.weight", id="unet"),
    pytest.param(reference_vae, "first_stage_model.encoder.mid.attn_1.proj_out.weight", id="vae"),
    pytest.param(reference_text, "cond_stage_model.transformer.text_model.final_layer_norm.weight", id="text"),
])
def test_misnamed_key_fails_the_strict_load(tiny, build, key):
    """A key that ldm names differently from the original layout cannot slip through the conversion."""
    sd, checkpoint = tiny
    renamed = dict(checkpoint)
    renamed[key.replace(".weight", "_x.weight")] = renamed.pop(key)
    with pytest.raises(RuntimeError, match="Missing key"):
        build(sd.config, renamed)


def test_seeded_weights_are_all_distinct_and_non_zero(tiny):
    sd, _ = tiny
    params = dict(sd.named_parameters())
    assert all(p.abs().max() > 0 for p in params.values())
    by_shape: dict[tuple, list[str]] = {}
    for name, p in params.items():
        by_shape.setdefault(tuple(p.shape), []).append(name)
    for names in by_shape.values():
        for i, a in enumerate(names):
            assert not any(torch.equal(params[a], params[b]) for b in names[i + 1:]), a


# --- the configs handed to diffusers ----------------------------------------------------------------------------------

# Keys of the original YAMLs that do not shape the networks.
NON_ARCHITECTURE_KEYS = {"use_checkpoint", "use_fp16", "image_size", "monitor", "lossconfig"}
COMPARED_PARAMS = ("parameterization", "linear_start", "linear_end", "timesteps", "scale_factor", "channels",
                   "conditioning_key", "unet_config", "first_stage_config", "cond_stage_config")


def mismatches(ours, theirs, where=""):
    if not isinstance(theirs, dict):
        return [] if ours == theirs else [f"{where}: ours {ours!r}, yaml {theirs!r}"]
    if not isinstance(ours, dict):
        return [f"{where}: ours {ours!r}, yaml a mapping"]
    return [m for k, v in theirs.items() if k not in NON_ARCHITECTURE_KEYS
            for m in (mismatches(ours[k], v, f"{where}.{k}") if k in ours else [f"{where}.{k}: missing in ours"])]


@pytest.mark.parametrize("preset_name,yaml_name", [("sd-v1", "v1-inference"), ("sd-v2", "v2-inference-v"),
                                                   ("sd-v2-base", "v2-inference")])
def test_original_config_matches_the_inference_yaml(preset_name, yaml_name):
    path = REFERENCE_CONFIGS / f"{yaml_name}.yaml"
    if not path.exists():
        pytest.skip("shared/reference is not beside the checkout")
    theirs = yaml.safe_load(path.read_text())["model"]["params"]
    ours = original_config(preset(preset_name))["model"]["params"]
    assert mismatches(ours, {k: theirs[k] for k in COMPARED_PARAMS if k in theirs}) == []


@pytest.mark.parametrize("preset_name,heads", [("sd-v1", 8), ("sd-v2", [5, 10, 20, 20])], ids=["sd-v1", "sd-v2"])
def test_full_size_reference_configs_are_diffusers_own(preset_name, heads):
    """For the real sizes the tiny-preset overrides (8 groups, head counts) must change nothing."""
    cfg = preset(preset_name)
    with torch.device("meta"):
        checkpoint = ldm.StableDiffusion(cfg).state_dict()
    unet = reference_unet_config(cfg, checkpoint)
    assert (unet["attention_head_dim"], unet["norm_num_groups"]) == (heads, 32)
    assert unet["use_linear_projection"] == (preset_name == "sd-v2")
    assert reference_vae_config(cfg, checkpoint)["norm_num_groups"] == 32


# --- attention backends -----------------------------------------------------------------------------------------------

@torch.no_grad()
def test_math_and_sdpa_backends_agree(tiny):
    sd, _ = tiny
    x, t, context = unet_inputs(sd.config)
    images = torch.linspace(-1, 1, 2 * 3 * 64 * 64).reshape(2, 3, 64, 64)
    outputs = {}
    for backend in ("sdpa", "math"):
        with attention.options(backend=backend):
            outputs[backend] = sd.unet(x, t, context), sd.vae.encode(images).mean
    for name, ours, ref in zip(("unet", "vae"), outputs["math"], outputs["sdpa"]):
        assert error(name, ours, ref).rel <= 1e-5


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@torch.no_grad()
def test_upcast_attention_runs_in_bf16(tiny, backend):
    sd, _ = tiny
    x, t, context = unet_inputs(sd.config)
    expected = sd.unet(x, t, context)
    unet = copy.deepcopy(sd.unet).to(torch.bfloat16)
    with attention.options(backend=backend, upcast=True):
        out = unet(x.bfloat16(), t, context.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert error("unet bf16", out.float(), expected).rel < 0.05


# --- loading a plain safetensors file ---------------------------------------------------------------------------------

@torch.no_grad()
def test_load_of_a_file_without_ldm_metadata_gives_identical_outputs(tiny, tmp_path):
    sd, checkpoint = tiny
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(path))
    with safe_open(str(path), framework="pt") as f:
        assert not f.metadata()
    with pytest.raises(ldm.CheckpointError, match="config="):
        ldm.load(path)  # tiny is no preset that keys alone can tell
    loaded = ldm.load(path, config="tiny", accelerate=False)  # the plain networks: bit for bit
    assert loaded.config == sd.config
    x, t, context = unet_inputs(sd.config)
    ids = sd.tokenize(["a photo of a cat", ""])
    latents = x[:, :, :4, :4]
    for a, b in [(sd.unet(x, t, context), loaded.unet(x, t, context)),
                 (sd.vae.decode(latents), loaded.vae.decode(latents)),
                 (sd.encode_tokens(ids), loaded.encode_tokens(ids))]:
        assert torch.equal(a, b)
