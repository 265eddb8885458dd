"""Pipeline parity with diffusers: the comparisons behind `tests/test_pipeline.py` and `tools/parity.py pipeline`.

Runs a whole txt2img and img2img with ldm and with diffusers' `StableDiffusionPipeline` /
`StableDiffusionImg2ImgPipeline` on the same seeded weights (`ldm.testing.reference`), the same DDIM schedule
(CompVis "leading" grid, `steps_offset=1`, eta 0, last step to ᾱ_0) and the same noise, and measures the max abs
difference of the decoded images in [0, 1] and of the final latents, fp32 on the CPU.

The diffusers side runs its own text path: prompt strings through transformers' CLIPTokenizer (built offline
from the BPE vocabulary open_clip ships, as in tests/test_tokenizer.py) and transformers' CLIPTextModel.

Noise: ldm draws image i's noise on the CPU from `torch.Generator().manual_seed(seed + i)`. txt2img hands the
same unit-variance draw to both as `latents=` (diffusers scales it by `init_noise_sigma` = 1 for DDIM). For
img2img, diffusers is given `generator=torch.Generator().manual_seed(seed)`; it draws the VAE posterior sample
and then the starting noise from it, in the same order and shapes as ldm, so nothing is patched.

img2img conventions, which agree: both run the last int(strength · steps) steps of the grid (diffusers
`get_timesteps`, CompVis t_enc) and noise the clean latent to exactly the level of the first step run
(diffusers `add_noise` at `timesteps[t_start]`; ldm x_0 + σ_start ε, the same point in VE scale). CompVis'
`img2img.py` differs: it noises to the level one DDIM step higher than the first step it runs.

`tests/test_pipeline.py` asserts on these functions (max abs pixel difference <= 1e-3); `tools/parity.py pipeline`
prints the same figures as a table. diffusers and transformers are imported inside the functions that use them.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

import ldm
from ldm.config import ModelConfig, TextEncoderConfig
from ldm.generation.pipeline import decode, img2img, txt2img
from ldm.sampling.samplers import generators_for, randn
from ldm.sampling.schedules import start_index, timesteps
from ldm.testing.reference import (reference_sdxl_text, reference_text, reference_unet, reference_vae,
                                   write_clip_tokenizer_files)

if TYPE_CHECKING:
    import transformers
    from diffusers import (DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline,
                           StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline)

TOLERANCE = 1e-3  # max abs pixel difference in [0, 1], fp32 (the figure)
PROMPT, NEGATIVE = "a red circle on a blue background", "blurry, low quality"
GUIDANCE = 7.5


# --- the diffusers side ------------------------------------------------------------------------------------------

@cache
def _tokenizer_dir() -> Path:
    """vocab.json and merges.txt for transformers' CLIPTokenizer (`reference.write_clip_tokenizer_files`), in
    a temporary folder removed at exit."""
    directory = Path(tempfile.mkdtemp(prefix="ldm-clip-tokenizer-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return write_clip_tokenizer_files(directory)


def clip_tokenizer(cfg: ModelConfig, text: TextEncoderConfig | None = None) -> transformers.CLIPTokenizer:
    """SD1 pads with <|endoftext|>; SD2 (OpenCLIP) pads with id 0, which is "!" (diffusers' SD2 tokenizer config);
    `text`: which of an SDXL model's encoders (its bigG pads as SD2's does)."""
    import transformers

    text = text or cfg.text
    pad = {"pad_token": "!"} if text.pad_token == 0 else {}
    return transformers.CLIPTokenizer.from_pretrained(str(_tokenizer_dir()), model_max_length=text.max_length, **pad)


def ddim_scheduler(cfg: ModelConfig) -> DDIMScheduler:
    """diffusers' DDIM as CompVis runs it: "leading" grid with offset 1, the last step to ᾱ_0, no clipping."""
    from diffusers import DDIMScheduler

    s = cfg.schedule
    return DDIMScheduler(num_train_timesteps=s.num_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
                         beta_schedule=s.beta_schedule, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type="v_prediction" if cfg.prediction == "v" else "epsilon")


@dataclass
class Pipelines:
    txt2img: StableDiffusionPipeline | StableDiffusionXLPipeline
    img2img: StableDiffusionImg2ImgPipeline | StableDiffusionXLImg2ImgPipeline


def diffusers_pipelines(cfg: ModelConfig, checkpoint: dict[str, torch.Tensor]) -> Pipelines:
    if cfg.sdxl:
        return _sdxl_pipelines(cfg, checkpoint)
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    parts = dict(vae=reference_vae(cfg, checkpoint), text_encoder=reference_text(cfg, checkpoint),
                 tokenizer=clip_tokenizer(cfg), unet=reference_unet(cfg, checkpoint), scheduler=ddim_scheduler(cfg),
                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipes = Pipelines(StableDiffusionPipeline(**parts), StableDiffusionImg2ImgPipeline(**parts))
    for p in (pipes.txt2img, pipes.img2img):
        p.set_progress_bar_config(disable=True)
    return pipes


def _sdxl_pipelines(cfg: ModelConfig, checkpoint: dict[str, torch.Tensor]) -> Pipelines:
    """diffusers' SDXL base pipelines: CLIP-L as `text_encoder` and the bigG as `text_encoder_2`, each with its
    tokenizer."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    clip_l, bigg = reference_sdxl_text(cfg, checkpoint)
    parts = dict(vae=reference_vae(cfg, checkpoint), text_encoder=clip_l, text_encoder_2=bigg,
                 tokenizer=clip_tokenizer(cfg, cfg.text), tokenizer_2=clip_tokenizer(cfg, cfg.text_2),
                 unet=reference_unet(cfg, checkpoint), scheduler=ddim_scheduler(cfg))
    pipes = Pipelines(StableDiffusionXLPipeline(**parts), StableDiffusionXLImg2ImgPipeline(**parts))
    for p in (pipes.txt2img, pipes.img2img):
        p.set_progress_bar_config(disable=True)
    return pipes


@torch.no_grad()
def _decode_reference(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
    """diffusers' decode and `output_type="pt"` post-processing: (B, 3, H, W) in [0, 1]."""
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)


# --- comparisons -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Parity:
    case: str
    pixel: float   # max |ours - diffusers| of the decoded images in [0, 1]
    latent: float  # max |ours - diffusers| of the final latents (scaled, as the UNet sees them)
    latent_scale: float  # max |diffusers latents|

    @property
    def ok(self) -> bool:
        return self.pixel <= TOLERANCE


def init_image(size: int, seed: int = 1) -> Image.Image:
    """A seeded init image: a smooth gradient with noise, so the VAE sees structure at every scale."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size)
    base = torch.stack([ramp[None, :].expand(size, size), ramp[:, None].expand(size, size),
                        1 - ramp[None, :].expand(size, size)], dim=-1)
    pixels = (0.7 * base + 0.3 * torch.rand(size, size, 3, generator=g)) * 255
    return Image.fromarray(pixels.round().to(torch.uint8).numpy())


@torch.no_grad()
def txt2img_parity(sd: ldm.StableDiffusion, pipes: Pipelines, *, size: int = 64, steps: int = 6, seed: int = 3,
                   prompt: str = PROMPT, negative: str = NEGATIVE, guidance: float = GUIDANCE) -> Parity:
    f = sd.config.vae.downsample_factor
    noise = randn((sd.config.unet.in_channels, size // f, size // f), generators_for([seed]))
    ours = txt2img(sd, prompt, negative_prompt=negative, steps=steps, guidance=guidance, sampler="ddim",
                   width=size, height=size, seed=seed, latents=noise)
    ref = pipes.txt2img(prompt=prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                        height=size, width=size, latents=noise.clone(), output_type="latent").images
    return _compare(f"{sd.config.name} txt2img", sd, ours.latents, pipes.txt2img, ref)


@torch.no_grad()
def img2img_parity(sd: ldm.StableDiffusion, pipes: Pipelines, *, strength: float = 0.5, size: int = 64,
                   steps: int = 6, seed: int = 3, prompt: str = PROMPT, negative: str = NEGATIVE,
                   guidance: float = GUIDANCE) -> Parity:
    init = init_image(size)
    ours = img2img(sd, init, prompt, negative_prompt=negative, strength=strength, steps=steps, guidance=guidance,
                   sampler="ddim", seed=seed)
    ref = pipes.img2img(prompt=prompt, negative_prompt=negative, image=init, strength=strength,
                        num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                        generator=torch.Generator().manual_seed(seed)).images
    return _compare(f"{sd.config.name} img2img strength {strength}", sd, ours.latents, pipes.img2img, ref)


def _compare(case: str, sd: ldm.StableDiffusion, ours: torch.Tensor, pipe: StableDiffusionPipeline,
             ref_latents: torch.Tensor) -> Parity:
    ours_px = (decode(sd, ours) + 1) / 2
    ref_px = _decode_reference(pipe, ref_latents)
    return Parity(case, (ours_px - ref_px).abs().max().item(), (ours - ref_latents).abs().max().item(),
                  ref_latents.abs().max().item())


def first_timesteps(cfg: ModelConfig, steps: int, strength: float) -> tuple[int, int, int, int]:
    """img2img: (ldm's first timestep, diffusers' first timestep, ldm's number of steps, diffusers' number).
    ldm's come from the grid and `start_index` its sampler uses; diffusers' from its own `get_timesteps`."""
    from diffusers import StableDiffusionImg2ImgPipeline

    ours = timesteps("leading", steps, cfg.schedule.num_timesteps)[start_index(steps, strength):]
    pipe = StableDiffusionImg2ImgPipeline.__new__(StableDiffusionImg2ImgPipeline)  # get_timesteps reads .scheduler
    pipe.scheduler = ddim_scheduler(cfg)
    pipe.scheduler.set_timesteps(steps)
    theirs, n = StableDiffusionImg2ImgPipeline.get_timesteps(pipe, steps, strength, "cpu")
    return int(ours[0]) if len(ours) else -1, int(theirs[0]) if len(theirs) else -1, len(ours), int(n)
