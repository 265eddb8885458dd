"""ldm: a from-scratch Stable Diffusion (SD 1.x and 2.x) whose modules are the original checkpoint layout.

    sd = ldm.load("v1-5-pruned-emaonly.safetensors")
    context = sd.encode_prompt(["a photo of a cat"])      # (1, 77, 768)
    eps = sd.unet(latents, timesteps, context)             # (B, 4, H/8, W/8)
    images = sd.vae.decode(latents / sd.scale_factor)      # (B, 3, H, W) in [-1, 1]
"""
__version__ = "0.1.0"

from .checkpoint import CheckpointError, load, save  # noqa: E402
from .config import PRESETS, ModelConfig, load_config, preset  # noqa: E402
from .model import StableDiffusion  # noqa: E402

__all__ = ["CheckpointError", "ModelConfig", "PRESETS", "StableDiffusion", "load", "load_config", "preset", "save"]
