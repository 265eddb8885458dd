"""`StableDiffusion`: the root module whose `state_dict()` is the original single-file checkpoint.

    model.diffusion_model.*   the UNet                 (`sd.unet`)
    first_stage_model.*       the VAE                  (`sd.vae`)
    cond_stage_model.*        the text encoder         (`sd.text_encoder`)
    betas, alphas_cumprod...  the DDPM schedule buffers the original LatentDiffusion registers

The schedule buffers are derived from `config.schedule`; they are stored only so that a saved file has
exactly the original key set. SDXL files (sgm's `DiffusionEngine`) have no schedule buffers, and their text side is

    conditioner.embedders.N.*  the text encoders       (`sd.text_encoder`, a `Conditioner`)
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ldm.config import ModelConfig, Prediction, ScheduleConfig
from ldm.models.text_encoder import Conditioner, build_text_encoder
from ldm.models.tokenizer import CLIPTokenizer
from ldm.models.unet import UNetModel
from ldm.models.vae import AutoencoderKL
from ldm.sampling.schedules import betas_for

# The buffers CompVis `LatentDiffusion.register_schedule` stores, in the order it computes them.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def schedule_buffers(cfg: ScheduleConfig) -> dict[str, Tensor]:
    """DDPM quantities (Ho et al. 2020, eq. 4, 6-7) of the β schedule (`ldm.sampling.schedules.betas_for`), computed in
    float64, stored in fp32 as the original does."""
    betas = betas_for(cfg)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)  # v_posterior = 0
    out = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
    }
    return {k: out[k].float() for k in SCHEDULE_BUFFERS}


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model`, so its keys are `model.diffusion_model.*`."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


class StableDiffusion(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DiffusionWrapper(UNetModel(config.unet))
        self.first_stage_model = AutoencoderKL(config.vae)
        if config.sdxl:
            self.conditioner = Conditioner(config)
        else:
            self.cond_stage_model = build_text_encoder(config.text)
            for name, value in schedule_buffers(config.schedule).items():
                self.register_buffer(name, value)
        self._tokenizer: CLIPTokenizer | None = None
        # where the weights came from, for image metadata (set by `ldm.load`)
        self.source_name: str = config.name
        self.source_sha256: str | None = None

    # --- the three networks ------------------------------------------------------------------------------
    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> nn.Module:
        """The text side: SD's `cond_stage_model`, SDXL's `conditioner`."""
        return self.conditioner if self.config.sdxl else self.cond_stage_model

    @property
    def prediction(self) -> Prediction:
        return self.config.prediction

    @property
    def scale_factor(self) -> float:
        return self.config.vae.scale_factor

    @property
    def device(self) -> torch.device:
        return self.model.diffusion_model.time_embed[0].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.diffusion_model.time_embed[0].weight.dtype

    # --- text ----------------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> CLIPTokenizer:
        if self._tokenizer is None:
            self._tokenizer = CLIPTokenizer(pad_token=self.config.text.pad_token, max_length=self.config.text.max_length)
        return self._tokenizer

    def tokenize(self, prompts: str | list[str]) -> Tensor:
        """Prompts -> token ids (B, 77): start token, BPE ids, end token, padding."""
        return self.tokenizer(prompts)

    @torch.no_grad()
    def encode_tokens(self, ids: Tensor, clip_skip: int = 1) -> Tensor:
        """Token ids (B, 77) -> conditioning (B, 77, D)."""
        return self.encode_text(ids, clip_skip)[0]

    @torch.no_grad()
    def encode_text(self, ids: Tensor, clip_skip: int = 1) -> tuple[Tensor, Tensor | None]:
        """Token ids (B, 77) -> conditioning (B, 77, D) and, for SDXL, the pooled embedding (B, P)."""
        text = min(self.config.text_encoders, key=lambda t: t.layers)
        deepest = text.layers - (1 if text.layer == "penultimate" else 0)
        if not 1 <= clip_skip <= deepest:
            raise ValueError(f"clip_skip must be in [1, {deepest}] for this text encoder ({text.layers} "
                             f"layers), got {clip_skip}")
        if self.config.sdxl:
            return self.conditioner(ids.to(self.device), clip_skip=clip_skip)
        return self.cond_stage_model(ids.to(self.device), clip_skip=clip_skip), None

    def encode_prompt(self, prompts: str | list[str], clip_skip: int = 1) -> Tensor:
        """Prompts -> conditioning (B, 77, D)."""
        return self.encode_tokens(self.tokenize(prompts), clip_skip=clip_skip)

    def extra_repr(self) -> str:
        return f"config={self.config.name!r}, prediction={self.prediction!r}"
