"""Independent references for the parity tests and `tools/parity.py`.

ldm's networks are compared with diffusers' `UNet2DConditionModel` and `AutoencoderKL` and transformers'
`CLIPTextModel`, given the same weights. The weights cross over through diffusers' own original-to-diffusers
conversion functions (`diffusers.loaders.single_file_utils`) and are loaded with `strict=True`, so a key that ldm
names differently from the original checkpoints fails loudly instead of being skipped.

    cfg = ldm.preset("tiny")
    sd, checkpoint = random_model(cfg)         # seeded weights; checkpoint = sd.state_dict()
    unet = reference_unet(cfg, checkpoint)     # diffusers, strict
    errors = compare_all(sd, checkpoint)       # [Error(component, rel, abs, scale), ...]

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
from ldm.config import ModelConfig
from ldm.models.tokenizer import find_vocab

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

TOLERANCE = 1e-4  # relative error allowed in fp32 (the figure)

PROMPTS = ["a photo of an astronaut riding a horse on the moon", "", "red circle, blue background"]

# Latent side for the UNet and image side for the VAE: small enough for a 2-core CPU, deep enough that the
# latent reaches 4x4 at the UNet's lowest level and the VAE's mid-block attention sees more than one position.
PROBE_SIZES: dict[str, tuple[int, int]] = {"tiny": (8, 64), "tiny-v2": (8, 64), "sd-v1": (32, 128), "sd-v2": (32, 128)}
DEFAULT_PROBE_SIZE = (32, 128)


# --- the CompVis inference YAML, as a dict ------------------------------------------------------------------------

def original_config(cfg: ModelConfig) -> dict[str, Any]:
    """The `v1-inference.yaml` / `v2-inference(-v).yaml` that describes `cfg`, as the dict diffusers' config
    creators read. CompVis hard-codes 32 GroupNorm groups, so `norm_groups` has no field here; see
    `reference_unet_config` and `reference_vae_config`."""
    u, v, t, s = cfg.unet, cfg.vae, cfg.text, cfg.schedule
    unet: dict[str, Any] = {
        "in_channels": u.in_channels, "out_channels": u.out_channels, "model_channels": u.model_channels,
        "attention_resolutions": list(u.attention_resolutions), "num_res_blocks": u.num_res_blocks,
        "channel_mult": list(u.channel_mult), "use_spatial_transformer": True,
        "use_linear_in_transformer": u.use_linear_in_transformer, "transformer_depth": u.transformer_depth,
        "context_dim": u.context_dim, "legacy": False,
    }
    # The YAMLs carry exactly one of the two (SD1: num_heads: 8, SD2: num_head_channels: 64).
    if u.num_head_channels is not None:
        unet["num_head_channels"] = u.num_head_channels
    else:
        unet["num_heads"] = u.num_heads
    ddconfig = {"double_z": True, "z_channels": v.z_channels, "resolution": 256, "in_channels": v.in_channels,
                "out_ch": v.out_ch, "ch": v.ch, "ch_mult": list(v.ch_mult), "num_res_blocks": v.num_res_blocks,
                "attn_resolutions": [], "dropout": 0.0}
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


# --- seeded weights -----------------------------------------------------------------------------------------------

NORM_TYPES = (nn.GroupNorm, nn.LayerNorm)


def _draw(module: nn.Module, name: str, shape: torch.Size, g: torch.Generator) -> Tensor:
    """One tensor of seeded weights, unlike every other one and unlike any framework's init: norm scales near 1,
    biases and embeddings small but non-zero, matrices with std 1/sqrt(fan_in) so activations keep their size."""
    noise = torch.randn(shape, generator=g)
    if isinstance(module, NORM_TYPES):
        return 1.0 + 0.1 * noise if name == "weight" else 0.1 * noise
    if len(shape) >= 2 and not isinstance(module, nn.Embedding) and name != "positional_embedding":
        return noise / shape[1:].numel() ** 0.5
    return 0.1 * noise  # biases, embeddings, scalars (zero-initialised by default in CLIP and MHA)


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
            tensors[f"{module_name}.{name}" if module_name else name] = _draw(module, name, p.shape, g)
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
    from transformers import CLIPTextConfig

    t = cfg.text
    layers = t.layers - (1 if t.layer == "penultimate" else 0)
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


def reference_text(cfg: ModelConfig, checkpoint: dict[str, Tensor]) -> CLIPTextModel:
    from transformers import CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(reference_text_config(cfg))
    # the one non-persistent buffer, (1, 77) positions, as CLIPTextEmbeddings makes it
    getattr(model, "text_model", model).embeddings.register_buffer("position_ids", torch.arange(cfg.text.max_length)[None], persistent=False)
    return _adopt(model, convert_text(cfg, checkpoint, model))


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


@torch.no_grad()
def compare_vae(sd: ldm.StableDiffusion, vae: AutoencoderKL, seed: int = 2) -> list[Error]:
    g = torch.Generator().manual_seed(seed)
    side = probe_sizes(sd.config)[1]
    images = torch.rand(2, 3, side, side, generator=g) * 2 - 1
    f = sd.config.vae.downsample_factor
    latents = torch.randn(2, sd.config.vae.embed_dim, side // f, side // f, generator=g)
    ours, ref = sd.vae.encode(images), vae.encode(images).latent_dist
    return [error("vae encode mean", ours.mean, ref.mean), error("vae encode logvar", ours.logvar, ref.logvar),
            error("vae decode", sd.vae.decode(latents), vae.decode(latents).sample)]


@torch.no_grad()
def compare_text(sd: ldm.StableDiffusion, text: CLIPTextModel) -> Error:
    ids = sd.tokenize(PROMPTS)
    return error("text", sd.encode_tokens(ids), text(input_ids=ids).last_hidden_state)


def compare_all(sd: ldm.StableDiffusion, checkpoint: dict[str, Tensor]) -> list[Error]:
    """All components, each reference built just before its comparison and freed after it."""
    cfg = sd.config
    return [compare_unet(sd, reference_unet(cfg, checkpoint)), *compare_vae(sd, reference_vae(cfg, checkpoint)),
            compare_text(sd, reference_text(cfg, checkpoint))]
