"""ldm: a from-scratch Stable Diffusion (SD 1.x and 2.x) whose modules are the original checkpoint layout.

    sd = ldm.load("v1-5-pruned-emaonly.safetensors")
    result = ldm.txt2img(sd, "a photo of a cat", steps=25, seed=42)    # or ldm.generate(sd, ldm.Generation(...))
    result.images[0].save("cat.png")

    context = sd.encode_prompt(["a photo of a cat"])      # (1, 77, 768)
    eps = sd.unet(latents, timesteps, context)             # (B, 4, H/8, W/8)
    images = sd.vae.decode(latents / sd.scale_factor)      # (B, 3, H, W) in [-1, 1]

Where things live: `ldm.models` (UNet, VAE, text encoders, checkpoint loading), `ldm.sampling` (samplers,
schedules, denoisers, guidance), `ldm.generation` (the `Generation` request, the denoising core, txt2img/img2img,
PNG parameters), `ldm.accel` (CPU speed code, applied by `ldm.load` unless accelerate=False), `ldm.training`,
`ldm.data`, `ldm.demo`, `ldm.cli`.

`import ldm` imports nothing heavy: the names below load their module (and torch) on first use, so that the
command line answers `ldm --help` and argument errors without importing torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "CheckpointError": "ldm.models.checkpoint", "load": "ldm.models.checkpoint", "save": "ldm.models.checkpoint",
    "PRESETS": "ldm.config", "ModelConfig": "ldm.config", "load_config": "ldm.config", "preset": "ldm.config",
    "StableDiffusion": "ldm.models.stable_diffusion",
    "Generation": "ldm.generation.request", "RequestError": "ldm.generation.request",
    "Denoising": "ldm.generation.pipeline", "generate": "ldm.generation.pipeline", "txt2img": "ldm.generation.pipeline",
    "img2img": "ldm.generation.pipeline",
}
__all__ = ["CheckpointError", "Denoising", "Generation", "ModelConfig", "PRESETS", "RequestError", "StableDiffusion",
           "generate", "img2img", "load", "load_config", "preset", "save", "txt2img"]

if TYPE_CHECKING:
    from ldm.config import PRESETS, ModelConfig, load_config, preset
    from ldm.models.checkpoint import CheckpointError, load, save
    from ldm.generation.pipeline import Denoising, generate, img2img, txt2img
    from ldm.generation.request import Generation, RequestError
    from ldm.models.stable_diffusion import StableDiffusion


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ldm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
