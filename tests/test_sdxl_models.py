"""SDXL base and refiner: parity with diffusers and transformers given the same weights, the key coverage of the
real single files (tests/data/sdxl_*_keys.tsv, written from sgm's code), detection, and save/load round trips.

Parity (ldm.testing.reference): the UNet with its vector y against diffusers' UNet2DConditionModel with
`added_cond_kwargs` (pooled embedding and time ids), each text encoder's part of the context and the pooled embedding
against transformers' CLIPTextModel (CLIP-L) and CLIPTextModelWithProjection (bigG) as diffusers' SDXL pipelines
use them, the VAE against AutoencoderKL. The tiny presets run in the fast suite; the full sizes with `pytest -m slow`
(about 15 GB of memory). Tolerance: max|ours - ref| / max|ref| <= 1e-4 in fp32.
"""
import ast
import gc
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ldm
from ldm.config import preset
from ldm.models.checkpoint import CheckpointError, detect_config
from ldm.testing import reference
from ldm.testing.reference import (TOLERANCE, assert_close, compare_outputs, compare_sdxl_text, compare_sdxl_unet,
                                   compare_vae, random_model, reference_sdxl_text, reference_unet, reference_unet_config,
                                   reference_vae, reference_vae_config, sdxl_outputs, sdxl_reference_outputs,
                                   sdxl_unet_output, vae_inputs)

DATA = Path(__file__).parent / "data"
KEY_FILES = {"sdxl": "sdxl_base_keys.tsv", "sdxl-refiner": "sdxl_refiner_keys.tsv"}
TINY = ["tiny-sdxl", "tiny-sdxl-refiner"]


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """As conftest's `one_torch_thread`, but per test, so that the full-size test keeps every thread: tiny models
    gain nothing from a second one, and on a busy 2-core machine OpenMP's spinning makes this file 5x slower."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=TINY)
def model(request):
    """(StableDiffusion with seeded weights, its state_dict), once per tiny SDXL preset."""
    return random_model(preset(request.param))


@pytest.fixture(scope="module")
def tiny_xl():
    return random_model(preset("tiny-sdxl"))


# --- parity ---------------------------------------------------------------------------------------------------------

def test_unet_with_vector_matches_diffusers(model):
    sd, checkpoint = model
    assert_close(compare_sdxl_unet(sd, reference_unet(sd.config, checkpoint)))


def test_text_encoders_and_pooled_match_transformers(model):
    sd, checkpoint = model
    errors = compare_sdxl_text(sd, reference_sdxl_text(sd.config, checkpoint))
    expected = ["text OpenCLIP-bigG", "pooled OpenCLIP-bigG"]
    assert [e.component for e in errors] == (["text CLIP-L", *expected] if sd.config.text_2 else expected)
    assert_close(*errors)


def test_vae_matches_diffusers(model):
    sd, checkpoint = model
    assert_close(*compare_vae(sd, reference_vae(sd.config, checkpoint)))


def test_base_prompts_are_padded_differently_for_the_two_encoders(tiny_xl):
    """CLIP-L's ids end in end tokens, the bigG's in zeros: the comparison covers sgm's re-padding."""
    sd, _ = tiny_xl
    assert sd.tokenize(["a cat"])[0, -1].item() == 49407
    assert reference.pad_after_end(sd.tokenize(["a cat"]), 0)[0, -1].item() == 0


# --- the comparisons can fail ---------------------------------------------------------------------------------------

UNET = "model.diffusion_model."
CLIP_L = "conditioner.embedders.0.transformer.text_model.encoder.layers.0."
BIG_G = "conditioner.embedders.1.model."
SWAPS = [
    pytest.param("unet", UNET + "label_emb.0.2.weight", UNET + "time_embed.2.weight", id="unet-label-emb-time-embed"),
    pytest.param("unet", UNET + "input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight",
                 UNET + "input_blocks.3.1.transformer_blocks.0.attn2.to_v.weight", id="unet-attn2-k-v"),
    pytest.param("text", CLIP_L + "self_attn.q_proj.weight", CLIP_L + "self_attn.k_proj.weight", id="clip-l-q-k"),
    pytest.param("text", BIG_G + "transformer.resblocks.1.ln_1.weight", BIG_G + "transformer.resblocks.1.ln_2.weight",
                 id="big-g-ln1-ln2"),
]


@pytest.mark.parametrize("component,key_a,key_b", SWAPS)
def test_swapped_weights_are_detected(tiny_xl, component, key_a, key_b):
    """Negative control: the reference gets two same-shaped tensors swapped; the error must be far above tolerance."""
    sd, checkpoint = tiny_xl
    assert checkpoint[key_a].shape == checkpoint[key_b].shape
    swapped = {**checkpoint, key_a: checkpoint[key_b], key_b: checkpoint[key_a]}
    if component == "unet":
        errors = [compare_sdxl_unet(sd, reference_unet(sd.config, swapped))]
    else:
        errors = compare_sdxl_text(sd, reference_sdxl_text(sd.config, swapped))
    assert max(e.rel for e in errors) > 100 * TOLERANCE


def test_transposed_text_projection_shows_in_the_pooled_embedding_only(tiny_xl):
    """The tiny bigG's text_projection is square: transposed, only the pooled embedding moves."""
    sd, checkpoint = tiny_xl
    key = BIG_G + "text_projection"
    assert checkpoint[key].shape[0] == checkpoint[key].shape[1]
    errors = {e.component: e for e in compare_sdxl_text(sd, reference_sdxl_text(
        sd.config, {**checkpoint, key: checkpoint[key].T.contiguous()}))}
    assert errors["pooled OpenCLIP-bigG"].rel > 100 * TOLERANCE
    assert_close(errors["text CLIP-L"], errors["text OpenCLIP-bigG"])


@pytest.mark.parametrize("order", ["target-first", "height-width"])
def test_time_ids_in_another_order_are_detected(tiny_xl, monkeypatch, order):
    sd, checkpoint = tiny_xl
    unet = reference_unet(sd.config, checkpoint)
    assert_close(compare_sdxl_unet(sd, unet))

    def reordered(cfg, conditions):
        if order == "target-first":
            return [*conditions["target_size"], *conditions["crop_coords_top_left"], *conditions["original_size"]]
        return [*conditions["original_size"][::-1], *conditions["crop_coords_top_left"], *conditions["target_size"]]

    monkeypatch.setattr(reference, "diffusers_time_ids", reordered)
    assert compare_sdxl_unet(sd, unet).rel > 100 * TOLERANCE


@pytest.mark.parametrize("build,key,raises,match", [
    # diffusers' conversion itself looks label_emb up for text_time
    pytest.param(reference_unet, UNET + "label_emb.0.0.weight", KeyError, "label_emb.0.0.weight", id="unet-label-emb"),
    pytest.param(reference_unet, UNET + "middle_block.1.proj_in.weight", RuntimeError, "Missing key", id="unet"),
    pytest.param(reference_sdxl_text, CLIP_L + "mlp.fc1.weight", RuntimeError, "Missing key", id="clip-l"),
    pytest.param(reference_sdxl_text, BIG_G + "ln_final.weight", RuntimeError, "Missing key", id="big-g"),
])
def test_misnamed_key_fails_the_strict_load(tiny_xl, build, key, raises, match):
    """A key that ldm names differently from sgm's layout cannot slip through the conversion."""
    sd, checkpoint = tiny_xl
    renamed = dict(checkpoint)
    renamed[key.replace(".weight", "_x.weight")] = renamed.pop(key)
    with pytest.raises(raises, match=match):
        build(sd.config, renamed)


# --- the configs handed to diffusers ----------------------------------------------------------------------------------

# From the unet/config.json of stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0 on the hub.
DIFFUSERS_UNET_CONFIGS = {
    "sdxl": {
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280], "class_embed_type": None, "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "layers_per_block": 2,
        "norm_num_groups": 32, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
        "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    },
    "sdxl-refiner": {
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "attention_head_dim": [6, 12, 24, 24],
        "block_out_channels": [384, 768, 1536, 1536], "class_embed_type": None, "cross_attention_dim": 1280,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "layers_per_block": 2, "norm_num_groups": 32, "projection_class_embeddings_input_dim": 2560,
        "sample_size": 128, "transformer_layers_per_block": 4, "use_linear_projection": True,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    },
}


@pytest.mark.parametrize("name", ["sdxl", "sdxl-refiner"])
def test_full_size_reference_configs_are_diffusers_own(name):
    """The hub's configs, and the tiny-preset overrides change nothing at the real sizes: diffusers' creator
    chooses the added conditioning itself from sgm's config."""
    from diffusers.loaders import single_file_utils as sfu

    cfg = preset(name)
    with torch.device("meta"):
        checkpoint = ldm.StableDiffusion(cfg).state_dict()
    ours = reference_unet_config(cfg, checkpoint)
    assert {k: ours[k] for k in DIFFUSERS_UNET_CONFIGS[name]} == DIFFUSERS_UNET_CONFIGS[name]
    creators = sfu.create_unet_diffusers_config_from_ldm(reference.original_config(cfg), checkpoint)
    assert {k: v for k, v in creators.items() if k != "sample_size"} == \
        {k: ours[k] for k in creators if k != "sample_size"}
    vae = reference_vae_config(cfg, checkpoint)
    assert (vae["scaling_factor"], vae["norm_num_groups"], vae["block_out_channels"]) == (0.13025, 32,
                                                                                          [128, 256, 512, 512])


# --- the real files' keys, detection ----------------------------------------------------------------------------------

def reference_keys(name: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (dtype, shape) from the committed lists, written from sgm's code (tests/data/make_sdxl_keys.py)."""
    rows = (line.split("\t") for line in (DATA / name).read_text().splitlines()[1:])
    return {key: (dtype, tuple(ast.literal_eval(shape))) for key, dtype, shape in rows}


@pytest.mark.parametrize("name", ["sdxl", "sdxl-refiner"])
def test_full_presets_have_exactly_the_real_keys_and_shapes(name):
    with torch.device("meta"):
        state = ldm.StableDiffusion(preset(name)).state_dict()
    ref = reference_keys(KEY_FILES[name])
    assert sorted(set(state) - set(ref)) == []
    assert sorted(set(ref) - set(state)) == []
    assert {k: tuple(v.shape) for k, v in state.items() if tuple(v.shape) != ref[k][1]} == {}
    # the files store the floats as F16 and the position ids as I64; ours are floats and int64 alike
    assert {k for k, v in state.items() if v.is_floating_point() != (ref[k][0] == "F16")} == set()


@pytest.mark.parametrize("name", ["sdxl", "sdxl-refiner"])
def test_the_real_key_lists_are_detected_as_their_presets(name):
    shapes = {key: shape for key, (_dtype, shape) in reference_keys(KEY_FILES[name]).items()}
    assert detect_config(shapes, {}) == preset(name)


# --- files ------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def assert_same_outputs(a: ldm.StableDiffusion, b: ldm.StableDiffusion) -> None:
    """Bit-identical UNet (with y), context and pooled embedding, and VAE decode."""
    assert torch.equal(sdxl_unet_output(a), sdxl_unet_output(b))
    ids = a.tokenize(["a photo of a cat", ""])
    for x, y in zip(a.encode_text(ids), b.encode_text(ids)):
        assert torch.equal(x, y)
    latents = vae_inputs(a.config)[1]
    assert torch.equal(a.vae.decode(latents), b.vae.decode(latents))


def test_save_then_load_gives_identical_outputs(model, tmp_path):
    sd, _ = model
    path = ldm.save(sd, tmp_path / "xl.safetensors")
    loaded = ldm.load(path, accelerate=False)  # the config comes from the file's metadata
    assert loaded.config == sd.config
    assert_same_outputs(sd, loaded)


def test_file_without_metadata_needs_and_takes_the_config(model, tmp_path):
    sd, checkpoint = model
    path = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(path))
    full = "sdxl" if sd.config.text_2 else "sdxl-refiner"  # what the keys alone point to
    with pytest.raises(CheckpointError, match=f"does not match the {full} architecture; pass config="):
        ldm.load(path)
    loaded = ldm.load(path, config=sd.config.name, accelerate=False)
    assert loaded.config == sd.config
    assert_same_outputs(sd, loaded)


def test_missing_keys_are_reported_by_name(tiny_xl, tmp_path):
    _, checkpoint = tiny_xl
    gone = [UNET + "label_emb.0.0.weight", BIG_G + "text_projection"]
    path = tmp_path / "missing.safetensors"
    save_file({k: v.contiguous() for k, v in checkpoint.items() if k not in gone}, str(path))
    with pytest.raises(CheckpointError, match="2 missing keys") as err:
        ldm.load(path, config="tiny-sdxl")
    assert all(key in str(err.value) for key in gone)


# --- full sizes -------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["sdxl", "sdxl-refiner"])
def test_full_size_matches_diffusers_and_transformers(name):
    """The real architectures with seeded weights (base: 3.5 B parameters, 14 GB in fp32). Ours runs first and is
    freed; each reference is then built from the checkpoint, sharing its tensors, and freed after its outputs, so the
    weights are in memory once. UNet latents 2x4x16x16, VAE images 2x3x64x64."""
    cfg = preset(name)
    sd, checkpoint = random_model(cfg)
    ours = sdxl_outputs(sd)
    del sd
    gc.collect()
    refs = sdxl_reference_outputs(cfg, checkpoint)
    del checkpoint
    gc.collect()
    assert_close(*compare_outputs(ours, refs))
