"""Independent references for the parity tests and `tools/parity.py`.

ldm's networks are compared with diffusers' `UNet2DConditionModel` and `AutoencoderKL` and transformers'
`CLIPTextModel`, given the same weights. The weights cross over through diffusers' own original-to-diffusers
conversion functions (`diffusers.loaders.single_file_utils`) and are loaded with `strict=True`, so a key that ldm
names differently from the original checkpoints fails loudly instead of being skipped.

    cfg = ldm.preset("tiny")
    sd, checkpoint = random_model(cfg)         # seeded weights; checkpoint = sd.state_dict()
    unet = reference_unet(cfg, checkpoint)     # diffusers, strict
    errors = compare_all(sd, checkpoint)       # [Error(component, rel, abs, scale), ...]

SDXL (`sdxl`, `sdxl-refiner` and their tiny presets) is compared the way diffusers' SDXL pipelines run it: the UNet
with `added_cond_kwargs` (pooled embedding and time ids), CLIP-L as a `CLIPTextModel` and OpenCLIP bigG as a
`CLIPTextModelWithProjection`, each conditioning with `hidden_states[-2]`, the pooled embedding `text_embeds`:

    sd, checkpoint = random_model(ldm.preset("tiny-sdxl"))
    ours = sdxl_outputs(sd)                                  # {component: tensor}
    errors = compare_outputs(ours, sdxl_reference_outputs(sd.config, checkpoint))

Error metric: rel = max|ours - ref| / max|ref|, computed in float64.

diffusers and transformers are imported inside the functions that build the references, so that importing this
module (for `random_model`, say) costs no more than torch and ldm.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

import ldm
from ldm.models.checkpoint import build_and_adopt
from ldm.config import ModelConfig, TextEncoderConfig
from ldm.models.tokenizer import CLIPTokenizer, find_vocab

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

TOLERANCE = 1e-4  # relative error allowed in fp32 (the figure)

PROMPTS = ["a photo of an astronaut riding a horse on the moon", "", "red circle, blue background"]

# Latent side for the UNet and image side for the VAE: small enough for a 2-core CPU, deep enough that the
# latent reaches 4x4 at the UNet's lowest level and the VAE's mid-block attention sees more than one position.
PROBE_SIZES: dict[str, tuple[int, int]] = {"tiny": (8, 64), "tiny-v2": (8, 64), "sd-v1": (32, 128), "sd-v2": (32, 128),
                                            "tiny-sdxl": (8, 64), "tiny-sdxl-refiner": (8, 64),
                                            # 2.6 B parameters on 2 cores: the lowest level at 4x4 / 2x2 is enough
                                            "sdxl": (16, 64), "sdxl-refiner": (16, 64)}
DEFAULT_PROBE_SIZE = (32, 128)


# --- the CompVis inference YAML, as a dict ------------------------------------------------------------------------

def original_config(cfg: ModelConfig) -> dict[str, Any]:
    """The `v1-inference.yaml` / `v2-inference(-v).yaml` (sgm's `sd_xl_base.yaml` / `sd_xl_refiner.yaml` for SDXL)
    that describes `cfg`, as the dict diffusers' config creators read. CompVis hard-codes 32 GroupNorm groups, so
    `norm_groups` has no field here; see `reference_unet_config` and `reference_vae_config`."""
    u, v, t, s = cfg.unet, cfg.vae, cfg.text, cfg.schedule
    unet: dict[str, Any] = {
        "in_channels": u.in_channels, "out_channels": u.out_channels, "model_channels": u.model_channels,
        "attention_resolutions": list(u.attention_resolutions), "num_res_blocks": u.num_res_blocks,
        "channel_mult": list(u.channel_mult), "use_spatial_transformer": True,
        "use_linear_in_transformer": u.use_linear_in_transformer, "context_dim": u.context_dim, "legacy": False,
        # sd_xl_base.yaml: [1, 2, 10], one per level; sd_xl_refiner.yaml and the CompVis YAMLs: one for all
        "transformer_depth": u.transformer_depth if isinstance(u.transformer_depth, int) else list(u.transformer_depth),
    }
    # The YAMLs carry exactly one of the two (SD1: num_heads: 8, SD2 and SDXL: num_head_channels: 64).
    if u.num_head_channels is not None:
        unet["num_head_channels"] = u.num_head_channels
    else:
        unet["num_heads"] = u.num_heads
    ddconfig = {"double_z": True, "z_channels": v.z_channels, "resolution": 256, "in_channels": v.in_channels,
                "out_ch": v.out_ch, "ch": v.ch, "ch_mult": list(v.ch_mult), "num_res_blocks": v.num_res_blocks,
                "attn_resolutions": [], "dropout": 0.0}
    if cfg.sdxl:
        return sgm_config(cfg, unet, ddconfig)
    if t.kind == "open-clip":
        cond = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                "params": {"freeze": True, "layer": t.layer}}
    else:
        cond = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "parameterization": cfg.prediction, "linear_start": s.beta_start, "linear_end": s.beta_end,
        "timesteps": s.num_timesteps, "image_size": cfg.image_size // v.downsample_factor, "channels": v.z_channels,
        "conditioning_key": "crossattn", "scale_factor": v.scale_factor,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                               "params": {"embed_dim": v.embed_dim, "ddconfig": ddconfig}},
        "cond_stage_config": cond,
    }}}


# sgm's names for the vector conditions (`input_key` of each ConcatTimestepEmbedderND) and the width of the Fourier
# embedding of each number (`outdim`), which diffusers calls addition_time_embed_dim.
SGM_VECTOR_KEYS = {"original_size": "original_size_as_tuple", "crop_coords_top_left": "crop_coords_top_left",
                   "target_size": "target_size_as_tuple", "aesthetic_score": "aesthetic_score"}
SDXL_TIME_EMBED_DIM = 256


def sgm_config(cfg: ModelConfig, unet: dict[str, Any], ddconfig: dict[str, Any]) -> dict[str, Any]:
    """sgm's `sd_xl_base.yaml` / `sd_xl_refiner.yaml` for an SDXL `cfg`: a DiffusionEngine whose UNet is the
    `network_config` (`num_classes: sequential` and `adm_in_channels`: the vector y through `label_emb`), and whose
    `conditioner_config` lists the text encoders then one timestep embedder per vector condition."""
    text_embedders: list[dict[str, Any]] = []
    for t in cfg.text_encoders:
        if t.kind == "open-clip":  # ViT-bigG: penultimate hidden state, and the pooled output for y
            text_embedders.append({"target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2", "params": {
                "arch": "ViT-bigG-14", "version": "laion2b_s39b_b160k", "freeze": True, "layer": t.layer,
                "always_return_pooled": True, "legacy": False}})
        else:  # ViT-L: hidden_states[layer_idx], the penultimate block's output, without the final LayerNorm
            text_embedders.append({"target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
                                   "params": {"layer": "hidden", "layer_idx": t.layers - 1}})
    embedders = [{"is_trainable": False, "input_key": "txt", **e} for e in text_embedders]
    embedders += [{"is_trainable": False, "input_key": SGM_VECTOR_KEYS[name],
                   "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
                   "params": {"outdim": SDXL_TIME_EMBED_DIM}} for name in cfg.vector]
    network = {**unet, "num_classes": "sequential", "adm_in_channels": cfg.unet.adm_in_channels,
               "spatial_transformer_attn_type": "softmax-xformers"}
    del network["use_spatial_transformer"]  # sgm's UNetModel has no such argument: it always uses transformers
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": cfg.vae.scale_factor, "disable_first_stage_autocast": True,
        "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": network},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": embedders}},
        "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": {
            "embed_dim": cfg.vae.embed_dim, "ddconfig": {"attn_type": "vanilla-xformers", **ddconfig}}},
    }}}


# --- seeded weights -----------------------------------------------------------------------------------------------

NORM_TYPES = (nn.GroupNorm, nn.LayerNorm)


def seeded_weight(module: nn.Module, name: str, shape: torch.Size, g: torch.Generator) -> Tensor:
    """One tensor of seeded weights, unlike every other one and unlike any framework's init: norm scales near 1,
    biases and embeddings small but non-zero, matrices with std 1/sqrt(fan_in) so activations keep their size."""
    noise = torch.randn(shape, generator=g)  # scaled in place: the full SDXL draws 14 GB, once
    if isinstance(module, NORM_TYPES):
        return noise.mul_(0.1).add_(1.0) if name == "weight" else noise.mul_(0.1)
    if len(shape) >= 2 and not isinstance(module, nn.Embedding) and name != "positional_embedding":
        return noise.div_(shape[1:].numel() ** 0.5)
    return noise.mul_(0.1)  # biases, embeddings, scalars (zero-initialised by default in CLIP and MHA)


def random_model(cfg: ModelConfig, seed: int = 0) -> tuple[ldm.StableDiffusion, dict[str, Tensor]]:
    """An fp32 StableDiffusion whose every parameter is drawn from a seeded generator, and its state_dict (an
    original-layout checkpoint sharing storage with the model). No default init runs: the model is built on the
    meta device and adopts the drawn tensors through ldm's own strict loader."""
    with torch.device("meta"):
        skeleton = ldm.StableDiffusion(cfg)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module_name, module in skeleton.named_modules():
        for name, p in module.named_parameters(recurse=False):
            tensors[f"{module_name}.{name}" if module_name else name] = seeded_weight(module, name, p.shape, g)
    sd = build_and_adopt(cfg, tensors, source=f"random {cfg.name} weights").eval()
    return sd, sd.state_dict()


# --- diffusers / transformers references ---------------------------------------------------------------------------

def _heads_per_block(cfg: ModelConfig) -> list[int]:
    """Head COUNT per UNet level: what diffusers calls `attention_head_dim` (diffusers issue #2011)."""
    return [cfg.unet.heads(cfg.unet.model_channels * m)[0] for m in cfg.unet.channel_mult]


def reference_unet_config(cfg: ModelConfig, checkpoint: dict[str, Tensor]) -> dict[str, Any]:
    from diffusers.loaders import single_file_utils as sfu

    config = sfu.create_unet_diffusers_config_from_ldm(original_config(cfg), checkpoint)
    # The creator assumes the CompVis constant of 32 groups and reads num_head_channels only for linear
    # projections (SD2); the tiny presets use 8 groups and a 16-wide head with 1x1-conv projections.
    config["norm_num_groups"] = cfg.unet.norm_groups
    if config["attention_head_dim"] is None:
        config["attention_head_dim"] = _heads_per_block(cfg)
    config["sample_size"] = cfg.image_size // cfg.vae.downsample_factor
    if cfg.sdxl:
        # The creator takes `num_classes: sequential` for SDXL's added conditioning (pooled text and time ids,
        # add_embedding = label_emb) only at SDXL's context widths, 2048 and 1280; at the tiny presets' widths it
        # would build a class embedding instead. The full sizes get these values from the creator itself.
        config.update(addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
                      class_embed_type=None, projection_class_embeddings_input_dim=cfg.unet.adm_in_channels)
    return config


def reference_vae_config(cfg: ModelConfig, checkpoint: dict[str, Tensor]) -> dict[str, Any]:
    from diffusers.loaders import single_file_utils as sfu

    config = sfu.create_vae_diffusers_config_from_ldm(original_config(cfg), checkpoint)
    config["norm_num_groups"] = cfg.vae.norm_groups
    config["sample_size"] = cfg.image_size
    return config


def _adopt(model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """Strict load onto a meta-built model, sharing the checkpoint's storage (no copy of a 3 GB UNet)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    if isinstance(model, (UNet2DConditionModel, AutoencoderKL)):
        # diffusers' textbook attention (baddbmm, softmax), not the SDPA kernel ldm uses by default
        model.set_attn_processor(AttnProcessor())
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"reference tensors left on the meta device: {left[:5]}")
    return model.eval()


def reference_unet(cfg: ModelConfig, checkpoint: dict[str, Tensor]) -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    config = reference_unet_config(cfg, checkpoint)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return _adopt(unet, sfu.convert_ldm_unet_checkpoint(checkpoint, config))


def reference_vae(cfg: ModelConfig, checkpoint: dict[str, Tensor]) -> AutoencoderKL:
    from diffusers import AutoencoderKL
    from diffusers.loaders import single_file_utils as sfu

    config = reference_vae_config(cfg, checkpoint)
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    return _adopt(vae, sfu.convert_ldm_vae_checkpoint(checkpoint, config))


# transformers keeps this as a non-persistent buffer; the original checkpoints store it.
CLIP_POSITION_IDS = "text_model.embeddings.position_ids"
OPEN_CLIP_BLOCKS = "cond_stage_model.model.transformer.resblocks."


def reference_text_config(cfg: ModelConfig) -> CLIPTextConfig:
    """transformers' config for the text tower, written out here rather than taken from ldm. For SD2 it is what
    diffusers ships as stable-diffusion-2's text_encoder: GELU, and one layer fewer, because the penultimate
    block's output (then the final LayerNorm) is the conditioning."""
    t = cfg.text
    return clip_text_config(t, layers=t.layers - (1 if t.layer == "penultimate" else 0))


def clip_text_config(t: TextEncoderConfig, layers: int) -> CLIPTextConfig:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.width * t.mlp_ratio,
                          num_hidden_layers=layers, num_attention_heads=t.heads, max_position_embeddings=t.max_length,
                          hidden_act=t.activation, layer_norm_eps=1e-5, projection_dim=t.projection_dim,
                          attn_implementation="eager")


def convert_text(cfg: ModelConfig, checkpoint: dict[str, Tensor], text_model: CLIPTextModel) -> dict[str, Tensor]:
    """diffusers' conversion of the text encoder keys, made to fit transformers 5's CLIPTextModel."""
    from diffusers.loaders import single_file_utils as sfu

    if cfg.text.kind == "open-clip":
        if cfg.text.layer == "penultimate":
            # diffusers drops block 23 of the 24-block ViT-H by name (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE); smaller
            # towers need their own last block dropped the same way.
            last = f"{OPEN_CLIP_BLOCKS}{cfg.text.layers - 1}."
            checkpoint = {k: v for k, v in checkpoint.items() if not k.startswith(last)}
        state = sfu.convert_open_clip_checkpoint(text_model, checkpoint)
    else:
        state = sfu.convert_ldm_clip_checkpoint(checkpoint)
        state.pop(CLIP_POSITION_IDS)
    if hasattr(text_model, "text_model"):  # transformers 4 nests the layers under `text_model.`
        return state
    # transformers >= 5.6 flattened CLIPTextModel; diffusers' own loader strips the prefix the same way.
    return {k.removeprefix("text_model."): v for k, v in state.items()}


def _position_ids(model: nn.Module, max_length: int) -> None:
    """The one non-persistent buffer, (1, 77) positions, as CLIPTextEmbeddings makes it (lost on the meta device)."""
    embeddings = getattr(model, "text_model", model).embeddings
    embeddings.register_buffer("position_ids", torch.arange(max_length)[None], persistent=False)


def reference_text(cfg: ModelConfig, checkpoint: dict[str, Tensor]) -> CLIPTextModel:
    from transformers import CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(reference_text_config(cfg))
    _position_ids(model, cfg.text.max_length)
    return _adopt(model, convert_text(cfg, checkpoint, model))


# SDXL's text encoders by role: the name of each in the comparisons, and the token that pads its ids (diffusers'
# SDXL tokenizers: CLIP-L's pads with <|endoftext|>, the bigG's `tokenizer_2` with "!", id 0).
SDXL_TEXT_NAMES = {"hf-clip": "CLIP-L", "open-clip": "OpenCLIP-bigG"}
SDXL_PAD_TOKENS = {"hf-clip": 49407, "open-clip": 0}
CLIP_END_TOKEN = 49407


def reference_sdxl_text(cfg: ModelConfig,
                        checkpoint: dict[str, Tensor]) -> list[CLIPTextModel | CLIPTextModelWithProjection]:
    """SDXL's text encoders as diffusers' SDXL pipelines hold them, in `cfg.text_encoders` order (base: text_encoder,
    text_encoder_2; refiner: text_encoder_2 alone): CLIP-L a `CLIPTextModel`, the bigG a
    `CLIPTextModelWithProjection`, both with all their layers (the pipelines read `hidden_states[-2]`)."""
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    models: list[CLIPTextModel | CLIPTextModelWithProjection] = []
    for i, t in enumerate(cfg.text_encoders):
        cls = CLIPTextModelWithProjection if t.kind == "open-clip" else CLIPTextModel
        with torch.device("meta"):
            model = cls(clip_text_config(t, layers=t.layers))
        _position_ids(model, t.max_length)
        if t.kind == "open-clip":  # logit_scale, CLIP's image-text temperature, has no place in a text model
            state = sfu.convert_open_clip_checkpoint(model, checkpoint, prefix=f"conditioner.embedders.{i}.model.")
        else:
            state = sfu.convert_ldm_clip_checkpoint(checkpoint, remove_prefix=f"conditioner.embedders.{i}.transformer.")
            state.pop(CLIP_POSITION_IDS)
        if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel (see convert_text)
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        models.append(_adopt(model, state))
    return models


# --- SD 1.5 in diffusers' format, offline ------------------------------------------------------------------------

# The diffusers-format configs of the SD 1.5 repository (runwayml / stable-diffusion-v1-5), written locally so
# that diffusers needs no hub access. The tokenizer, safety checker and feature extractor are not loaded (they
# hold no weights of the single file; ldm builds its tokenizer lazily), so both loaders build the same three
# networks from the same file. Read by tools/bench.py (load, txt2img) and tools/gpu.py (speed).
SD15_DIFFUSERS_CONFIGS = {
    "model_index.json": {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
        "feature_extractor": [None, None], "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": [None, None], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "requires_safety_checker": False,
    },
    "scheduler/scheduler_config.json": {
        "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "clip_sample": False,
    },
    "unet/config.json": {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    },
    "vae/config.json": {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
        "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "scaling_factor": 0.18215,
    },
    "text_encoder/config.json": {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "quick_gelu",
        "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
        "max_position_embeddings": 77, "projection_dim": 768, "vocab_size": 49408, "layer_norm_eps": 1e-05,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    },
}


# --- the SD CLIP tokenizer, offline ------------------------------------------------------------------------------

def write_clip_tokenizer_files(directory: Path) -> Path:
    """vocab.json and merges.txt for transformers' CLIPTokenizer in `directory`, derived from the BPE vocabulary
    open_clip ships (found by `ldm.models.tokenizer.find_vocab` without importing open_clip): the files of the hub's SD
    tokenizer, which is out of reach here. transformers' byte table keeps this independent of ldm's tokenizer."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.decompress(find_vocab().read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return directory


# --- comparisons ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Error:
    component: str
    rel: float    # max|ours - ref| / max|ref|
    abs: float    # max|ours - ref|
    scale: float  # max|ref|

    @property
    def ok(self) -> bool:
        return self.rel <= TOLERANCE


def assert_close(*errors: Error) -> None:
    """AssertionError listing every error over TOLERANCE (what the parity tests assert)."""
    bad = [e for e in errors if not e.ok]
    assert not bad, "\n".join(f"{e.component}: rel {e.rel:.2e} > {TOLERANCE:.0e} (abs {e.abs:.2e}, max|ref| "
                              f"{e.scale:.2e})" for e in bad)


def error(component: str, ours: Tensor, ref: Tensor) -> Error:
    if ours.shape != ref.shape:
        raise ValueError(f"{component}: ours has shape {tuple(ours.shape)}, the reference {tuple(ref.shape)}")
    diff = (ours.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    return Error(component, diff / scale, diff, scale)


def probe_sizes(cfg: ModelConfig) -> tuple[int, int]:
    return PROBE_SIZES.get(cfg.name, DEFAULT_PROBE_SIZE)


def unet_inputs(cfg: ModelConfig, seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Latents (2, 4, s, s), two different timesteps, and a context (2, 77, D)."""
    g = torch.Generator().manual_seed(seed)
    side = probe_sizes(cfg)[0]
    x = torch.randn(2, cfg.unet.in_channels, side, side, generator=g)
    context = torch.randn(2, cfg.text.max_length, cfg.unet.context_dim, generator=g)
    return x, torch.tensor([10, 981]), context


@torch.no_grad()
def compare_unet(sd: ldm.StableDiffusion, unet: UNet2DConditionModel) -> Error:
    x, t, context = unet_inputs(sd.config)
    return error("unet", sd.unet(x, t, context), unet(x, t, encoder_hidden_states=context).sample)


def vae_inputs(cfg: ModelConfig, seed: int = 2) -> tuple[Tensor, Tensor]:
    """Images (2, 3, s, s) in [-1, 1] and latents (2, 4, s/8, s/8)."""
    g = torch.Generator().manual_seed(seed)
    side = probe_sizes(cfg)[1]
    images = torch.rand(2, 3, side, side, generator=g) * 2 - 1
    f = cfg.vae.downsample_factor
    latents = torch.randn(2, cfg.vae.embed_dim, side // f, side // f, generator=g)
    return images, latents


@torch.no_grad()
def vae_outputs(sd: ldm.StableDiffusion) -> dict[str, Tensor]:
    images, latents = vae_inputs(sd.config)
    posterior = sd.vae.encode(images)
    return {"vae encode mean": posterior.mean, "vae encode logvar": posterior.logvar,
            "vae decode": sd.vae.decode(latents)}


@torch.no_grad()
def reference_vae_outputs(cfg: ModelConfig, vae: AutoencoderKL) -> dict[str, Tensor]:
    images, latents = vae_inputs(cfg)
    posterior = vae.encode(images).latent_dist
    return {"vae encode mean": posterior.mean, "vae encode logvar": posterior.logvar,
            "vae decode": vae.decode(latents).sample}


def compare_outputs(ours: dict[str, Tensor], refs: dict[str, Tensor]) -> list[Error]:
    """One Error per component of `refs`, in its order; ours must have the same components."""
    if set(ours) != set(refs):
        raise ValueError(f"ours has components {sorted(ours)}, the reference {sorted(refs)}")
    return [error(name, ours[name], ref) for name, ref in refs.items()]


def compare_vae(sd: ldm.StableDiffusion, vae: AutoencoderKL) -> list[Error]:
    return compare_outputs(vae_outputs(sd), reference_vae_outputs(sd.config, vae))


@torch.no_grad()
def compare_text(sd: ldm.StableDiffusion, text: CLIPTextModel) -> Error:
    ids = sd.tokenize(PROMPTS)
    return error("text", sd.encode_tokens(ids), text(input_ids=ids).last_hidden_state)


# --- SDXL --------------------------------------------------------------------------------------------------------

# The vector conditions of the two probe rows: different numbers in each, so that a swapped pair (height and width,
# or original and target size) shows.
SDXL_CONDITIONS = [
    {"original_size": (1024.0, 768.0), "crop_coords_top_left": (0.0, 32.0), "target_size": (1024.0, 1024.0),
     "aesthetic_score": (6.0,)},
    {"original_size": (512.0, 896.0), "crop_coords_top_left": (48.0, 0.0), "target_size": (832.0, 1216.0),
     "aesthetic_score": (2.5,)},
]


def sdxl_unet_inputs(cfg: ModelConfig, seed: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Latents (2, 4, s, s), two timesteps, a context (2, 77, D) and a pooled embedding (2, P); the vector
    conditions are SDXL_CONDITIONS."""
    x, t, context = unet_inputs(cfg, seed)
    pooled = torch.randn(2, cfg.text_encoders[-1].projection_dim, generator=torch.Generator().manual_seed(seed + 100))
    return x, t, context, pooled


def diffusers_time_ids(cfg: ModelConfig, conditions: dict[str, tuple[float, ...]]) -> list[float]:
    """`add_time_ids` as diffusers' SDXL pipelines assemble them (`_get_add_time_ids`): original size, crop
    top-left, then the target size, or the aesthetic score where the model wants one (the refiner)."""
    last = conditions["aesthetic_score"] if "aesthetic_score" in cfg.vector else conditions["target_size"]
    return [*conditions["original_size"], *conditions["crop_coords_top_left"], *last]


@torch.no_grad()
def sdxl_unet_output(sd: ldm.StableDiffusion) -> Tensor:
    """Ours: y from `sd.text_encoder.vector`, one row at a time (each with its own conditions)."""
    x, t, context, pooled = sdxl_unet_inputs(sd.config)
    y = torch.cat([sd.text_encoder.vector(pooled[i : i + 1], c) for i, c in enumerate(SDXL_CONDITIONS)])
    return sd.unet(x, t, context, y)


@torch.no_grad()
def reference_sdxl_unet_output(cfg: ModelConfig, unet: UNet2DConditionModel) -> Tensor:
    x, t, context, pooled = sdxl_unet_inputs(cfg)
    time_ids = torch.tensor([diffusers_time_ids(cfg, c) for c in SDXL_CONDITIONS])
    return unet(x, t, encoder_hidden_states=context,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


def compare_sdxl_unet(sd: ldm.StableDiffusion, unet: UNet2DConditionModel) -> Error:
    return error("unet", sdxl_unet_output(sd), reference_sdxl_unet_output(sd.config, unet))


@torch.no_grad()
def sdxl_text_outputs(sd: ldm.StableDiffusion) -> dict[str, Tensor]:
    """Ours: the context cut into each encoder's part, and the pooled embedding."""
    context, pooled = sd.encode_text(sd.tokenize(PROMPTS))
    parts = context.split([t.width for t in sd.config.text_encoders], dim=-1)
    out = {f"text {SDXL_TEXT_NAMES[t.kind]}": part for t, part in zip(sd.config.text_encoders, parts)}
    out[f"pooled {SDXL_TEXT_NAMES[sd.config.text_encoders[-1].kind]}"] = pooled
    return out


def pad_after_end(ids: Tensor, pad: int) -> Tensor:
    """Token rows with everything after each row's first end token set to `pad`."""
    first_end = (ids == CLIP_END_TOKEN).int().argmax(dim=1, keepdim=True)  # (B, 1)
    return ids.masked_fill(torch.arange(ids.shape[1]) > first_end, pad)


@torch.no_grad()
def reference_sdxl_text_outputs(cfg: ModelConfig, encoders: list[nn.Module]) -> dict[str, Tensor]:
    """As diffusers' `StableDiffusionXLPipeline.encode_prompt`: each encoder's `hidden_states[-2]` on its own ids
    (padded as its tokenizer pads), and the last encoder's `text_embeds` as the pooled embedding."""
    ids = CLIPTokenizer(max_length=cfg.text.max_length)(PROMPTS)  # padded with the end token, re-padded below
    out = {}
    for t, encoder in zip(cfg.text_encoders, encoders):
        result = encoder(input_ids=pad_after_end(ids, SDXL_PAD_TOKENS[t.kind]), output_hidden_states=True)
        out[f"text {SDXL_TEXT_NAMES[t.kind]}"] = result.hidden_states[-2]
    out[f"pooled {SDXL_TEXT_NAMES[cfg.text_encoders[-1].kind]}"] = result.text_embeds
    return out


def compare_sdxl_text(sd: ldm.StableDiffusion, encoders: list[nn.Module]) -> list[Error]:
    return compare_outputs(sdxl_text_outputs(sd), reference_sdxl_text_outputs(sd.config, encoders))


def sdxl_outputs(sd: ldm.StableDiffusion) -> dict[str, Tensor]:
    """Ours, every compared SDXL output: the UNet (with y), each text encoder's part of the context, the pooled
    embedding, the VAE."""
    return {"unet": sdxl_unet_output(sd), **sdxl_text_outputs(sd), **vae_outputs(sd)}


def sdxl_reference_outputs(cfg: ModelConfig, checkpoint: dict[str, Tensor]) -> dict[str, Tensor]:
    """The references' outputs for `sdxl_outputs`, each network built just before it runs and freed after it, so
    that at most one of them is alive (they share the checkpoint's storage; the full UNet alone is 10 GB in fp32)."""
    out = {"unet": reference_sdxl_unet_output(cfg, reference_unet(cfg, checkpoint))}
    out.update(reference_sdxl_text_outputs(cfg, reference_sdxl_text(cfg, checkpoint)))
    out.update(reference_vae_outputs(cfg, reference_vae(cfg, checkpoint)))
    return out


# --- all components -------------------------------------------------------------------------------------------------

def compare_all(sd: ldm.StableDiffusion, checkpoint: dict[str, Tensor]) -> list[Error]:
    """All components, each reference built just before its comparison and freed after it."""
    cfg = sd.config
    if cfg.sdxl:
        return compare_outputs(sdxl_outputs(sd), sdxl_reference_outputs(cfg, checkpoint))
    return [compare_unet(sd, reference_unet(cfg, checkpoint)), *compare_vae(sd, reference_vae(cfg, checkpoint)),
            compare_text(sd, reference_text(cfg, checkpoint))]
