"""txt2img and img2img: text -> conditioning -> sampler over the UNet -> VAE decode.

The pipeline only glues the pieces: `StableDiffusion` (networks), `denoisers.DiscreteDenoiser` (the UNet as
D(x, σ)), `guidance.CFGDenoiser` (classifier-free guidance) and `samplers.sample` (the sampler loop).

Seeds: image i of a call gets seed `seed + i` (AUTOMATIC1111's convention) and its own CPU generator, which draws
its initial noise, its VAE posterior sample (img2img) and every ancestral/SDE noise of the sampler. So image i
of a batch is bit-identical to the same seed generated alone, on any device.

Memory options, which leave the image as it is (up to float summation order): `vae_tiling` runs the VAE in
tiles (`ldm.models.tiling`: exact, no seams), `vae_slicing` runs it one image at a time, and `attention_slicing`
computes attention a slice of query rows at a time (`ldm.models.attention`).
"""
from __future__ import annotations

import contextlib
import os
import random
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ldm import __version__

from ldm.models import attention
from ldm.config import Interval, check_interval
from ldm.sampling.denoisers import DiscreteDenoiser
from ldm.sampling.guidance import CFGDenoiser
from ldm.generation.images import fit_init_image, from_pil, init_image_size, to_pil
from ldm.accel.optimize import for_inference, largest_activation, release_derived_weights, sampling_memory
from ldm.sampling.names import DISCRETE_SAMPLERS, STOCHASTIC_SAMPLERS, infotext_name, resolve_sampler
from ldm.sampling.samplers import generators_for, randn, sample
from ldm.sampling.schedules import alphas_cumprod_for
from ldm.models.tiling import DEFAULT_TILE_SIZE, check_tile_size

StepCallback = Callable[[int, int, Tensor], None]
MAX_SEED = 2 ** 32 - 1


class NaNError(RuntimeError):
    """The UNet produced NaN or Inf: usually fp16 overflow."""


@dataclass
class Result:
    """The images of one call, each image's seed, and every parameter needed to make them again."""
    images: list[Image.Image]
    seeds: list[int]
    prompts: list[str]
    params: dict[str, Any]
    latents: Tensor = field(repr=False)

    def image_params(self, i: int) -> dict[str, Any]:
        """The parameters that regenerate image i alone (its prompt and seed, batch size 1)."""
        return {**self.params, "prompt": self.prompts[i], "seed": self.seeds[i]}


def check_size(width: int, height: int, multiple: int = 8) -> None:
    for name, v in (("width", width), ("height", height)):
        if v < multiple or v % multiple:
            lo = max(multiple, v // multiple * multiple)
            raise ValueError(f"{name} {v} is not a multiple of {multiple}; use {lo} or {lo + multiple}")


def machine_memory(device: torch.device) -> int:
    """Bytes of memory `device` has in all: a GPU's own, or the host's RAM plus swap."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("SwapTotal:"):
                total += int(line.split()[1]) * 1024
    return total


def memory_needed(sd, width: int, height: int, images: int, unet_rows: int, vae_images: int,
                  tile_size: int | None) -> dict[str, int]:
    """A lower bound of the bytes a call needs beyond the loaded model, by part: the UNet's largest activation
    (`unet_rows` latents per call; its input and output at once), the VAE's (a full-resolution ResBlock holds its
    input, normalised input and output at the first level's width, for `vae_images` images at once, or one tile
    of `tile_size` pixels) and the `images` decoded (float tensors, then 8-bit pictures)."""
    f = sd.config.vae.downsample_factor
    unet = 2 * largest_activation(sd.unet, unet_rows, height // f, width // f)
    if tile_size is not None:
        vae_images, height_vae, width_vae = 1, min(height, tile_size), min(width, tile_size)
    else:
        height_vae, width_vae = height, width
    vae = 3 * vae_images * sd.config.vae.ch * sd.config.vae.ch_mult[0] * height_vae * width_vae * sd.dtype.itemsize
    pictures = images * 3 * height * width * (4 + 1)
    return {"UNet": unet, "VAE": vae, "images": pictures}


def check_memory(sd, width: int, height: int, images: int, unet_rows: int, vae_images: int,
                 tile_size: int | None) -> None:
    """ValueError, before anything is allocated, when the lower bound of `memory_needed` plus the model exceeds all
    the memory of the model's device, with the estimate and what would lower it."""
    parts = memory_needed(sd, width, height, images, unet_rows, vae_images, tile_size)
    model = sum(t.numel() * t.element_size() for t in [*sd.parameters(), *sd.buffers()])
    have = machine_memory(sd.device)
    if model + sum(parts.values()) <= have:
        return
    largest = max(parts, key=parts.get)
    fix = {"UNet": "a smaller size", "VAE": "--vae-tiling (vae_tiling=True) or a smaller size",
           "images": "fewer images per call or a smaller size"}[largest]
    detail = ", ".join(f"{name} {_gib(n)}" for name, n in parts.items())
    raise ValueError(f"{width}x{height} x {images} image(s) needs at least {_gib(model + sum(parts.values()))} of "
                     f"memory (model {_gib(model)}, {detail}) and this {sd.device.type} has {_gib(have)}; use "
                     f"{fix}")


def _check_fits(sd, width: int, height: int, images: int, guidance: float, invariant: bool,
                memory: MemoryOptions) -> None:
    check_memory(sd, width, height, images, rows_per_unet_call(images, invariant, guidance),
                 1 if memory.image_by_image(invariant) else images, memory.tile_size)


def rows_per_unet_call(images: int, image_by_image: bool, guidance: float) -> int:
    """Latents per UNet call of `generate`: one image's or the whole batch's, doubled by the unconditional pass."""
    return (1 if image_by_image else images) * (1 if guidance == 1.0 else 2)


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


def random_seed() -> int:
    return random.SystemRandom().randrange(MAX_SEED)


def _as_list(prompt: str | Sequence[str], batch_size: int) -> list[str]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("no prompt given")
    return [p for p in prompts for _ in range(batch_size)]


def _negatives(negative_prompt: str | Sequence[str], n: int, per_prompt: int) -> list[str]:
    if isinstance(negative_prompt, str):
        return [negative_prompt] * n
    negatives = list(negative_prompt)
    if len(negatives) * per_prompt != n:
        raise ValueError(f"got {len(negatives)} negative prompts for {n // per_prompt} prompts")
    return [p for p in negatives for _ in range(per_prompt)]


def resolve_schedule(sampler: str, schedule: str | None) -> str:
    """The σ schedule a call runs on. ddim, plms and ddpm always run on their own discrete timestep grid (CompVis,
    diffusers and A1111 offer no "DDIM Karras"); an A1111 name that carries a schedule ("DPM++ 2M Exponential")
    wins over `schedule`; otherwise `schedule`, "discrete" when None."""
    name, alias_schedule = resolve_sampler(sampler)
    if name in DISCRETE_SAMPLERS:
        return "discrete"
    return alias_schedule or schedule or "discrete"


def make_denoiser(sd, cond: Tensor, uncond: Tensor | None, guidance: float, guidance_rescale: float = 0.0,
                  guidance_interval: Interval | None = None) -> CFGDenoiser:
    """The UNet as a guided denoiser D(x, σ) on the model's training schedule (float64)."""
    unet = sd.unet

    def model_fn(x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        out = unet(x, t, context)
        if not torch.isfinite(out).all():
            raise NaNError("the UNet produced NaN/Inf values (fp16 overflow?). Try --precision fp32, or keep "
                           "attention in fp32 (--upcast-attention, or ldm.models.attention.set_backend(upcast=True))")
        return out

    base = DiscreteDenoiser(model_fn, alphas_cumprod_for(sd.config.schedule), sd.prediction, shares_latents=True)
    return CFGDenoiser(base, cond, uncond if guidance != 1.0 else None, guidance, guidance_rescale,
                       guidance_interval)


class ImageByImage:
    """A guided denoiser run one image at a time.

    CPU convolutions (oneDNN) choose their blocking by batch size, so the same image computed in a batch of 4
    and alone differ in the last bits. Running each image's [uncond, cond] pair as its own batch makes image i
    of a batch bit-identical to the same seed generated alone. On CPU this costs little: convolutions at these
    sizes are compute-bound, not batch-bound.
    """

    def __init__(self, denoisers: list[CFGDenoiser]):
        self.denoisers = denoisers

    @property
    def log_sigmas(self) -> Tensor:
        return self.denoisers[0].log_sigmas

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        return torch.cat([d(x[i:i + 1], sigma[i:i + 1]) for i, d in enumerate(self.denoisers)])


@torch.no_grad()
def decode(sd, latents: Tensor, nan_fallback: bool = True, image_by_image: bool = False,
           tile_size: int | None = None) -> Tensor:
    """Scaled latents -> images in [-1, 1], one image at a time if asked (batch invariance, less memory), in tiles
    of tile_size x tile_size pixels if given (less memory, see `ldm.models.tiling`)."""
    if image_by_image and latents.shape[0] > 1:
        images = torch.cat([_decode(sd, z[None], nan_fallback, tile_size) for z in latents])
    else:
        images = _decode(sd, latents, nan_fallback, tile_size)
    release_derived_weights(sd.vae)  # inside a packed block: not held through the next call's sampling
    return images


def _decode(sd, latents: Tensor, nan_fallback: bool, tile_size: int | None) -> Tensor:
    """Scaled latents -> images in [-1, 1]. If a half-precision decode gives NaN/Inf, decode again in fp32 (as
    A1111 does) with a one-line warning."""

    def vae_decode(z: Tensor) -> Tensor:
        return sd.vae.decode(z) if tile_size is None else sd.vae.decode(z, tiled=True, tile_size=tile_size)

    images = vae_decode(latents / sd.scale_factor)
    if nan_fallback and sd.vae.post_quant_conv.weight.dtype != torch.float32 and not torch.isfinite(images).all():
        warnings.warn("VAE decode produced NaN/Inf in half precision; decoding again in fp32", stacklevel=2)
        vae_dtype = sd.vae.post_quant_conv.weight.dtype
        sd.vae.float()
        try:
            images = vae_decode(latents.float() / sd.scale_factor)
        finally:
            sd.vae.to(vae_dtype)
    return images.float().clamp(-1, 1)


@dataclass(frozen=True)
class MemoryOptions:
    """How to spend less memory; none of them changes the image beyond float summation order.

    `vae_tiling`: run the VAE in tiles of `vae_tile_size` pixels (exact and seam-free, see `ldm.models.tiling`).
    `vae_slicing`: decode one image at a time (None: when the call is batch invariant, see `txt2img`).
    `attention_slicing`: query rows per attention slice, "auto", or None to keep the process-wide setting."""
    vae_tiling: bool = False
    vae_tile_size: int = DEFAULT_TILE_SIZE
    vae_slicing: bool | None = None
    attention_slicing: attention.SliceSize = None

    def check(self, sd) -> MemoryOptions:
        """Raise ValueError for a bad value before any work is done."""
        check_tile_size(self.vae_tile_size, sd.config.vae.downsample_factor)
        attention.check_slice_size(self.attention_slicing)
        return self

    @property
    def tile_size(self) -> int | None:
        return self.vae_tile_size if self.vae_tiling else None

    def image_by_image(self, batch_invariant: bool) -> bool:
        return batch_invariant if self.vae_slicing is None else self.vae_slicing

    def sliced_attention(self) -> AbstractContextManager:
        """Attention slicing for the duration of a call, the previous setting restored after, even on error."""
        return nullcontext() if self.attention_slicing is None else attention.slicing(self.attention_slicing)

    def params(self, batch_invariant: bool) -> dict[str, Any]:
        """What a PNG records: how the image was made (the CLI does not replay it, see `ldm.cli.png_to_options`)."""
        return {"vae_tiling": self.tile_size, "vae_slicing": self.image_by_image(batch_invariant),
                "attention_slicing": attention.get_slicing() if self.attention_slicing is None
                else self.attention_slicing}


@torch.no_grad()
def generate(sd, prompts: list[str], negatives: list[str], *, steps: int, guidance: float, sampler: str,
             schedule: str | None, width: int, height: int, seeds: list[int], clip_skip: int = 1,
             eta: float | None = None, guidance_rescale: float = 0.0, guidance_interval: Interval | None = None,
             init_latents: Tensor | None = None, strength: float = 1.0, noise: Tensor | None = None,
             callback: StepCallback | None = None,
             image_by_image: bool = True, generators: list[torch.Generator] | None = None) -> Tensor:
    """The core shared by txt2img and img2img: returns the final scaled latents (B, 4, h, w).

    `noise` is the unit-variance starting noise (default: drawn from each image's generator); `init_latents`
    (img2img) are the scaled clean latents to noise to the level `strength` selects. `image_by_image` runs the
    UNet on one image's guidance pair at a time (see `ImageByImage`). `generators` (default: fresh ones from
    `seeds`) must be the ones that drew `noise`, so that the sampler's own noise continues their streams
    instead of repeating the draws already used."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not guidance >= 0 or guidance == float("inf"):
        raise ValueError(f"guidance scale must be a finite number >= 0, got {guidance}")
    if eta is not None and not 0 <= eta < float("inf"):
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    if init_latents is not None and int(strength * steps) < 1:
        raise ValueError(f"strength {strength} with {steps} steps runs no step (int(strength * steps) = 0); "
                         "raise the strength or the number of steps")
    check_size(width, height, sd.config.vae.downsample_factor)
    name, _ = resolve_sampler(sampler)
    f = sd.config.vae.downsample_factor
    shape = (sd.config.unet.in_channels, height // f, width // f)
    generators = generators if generators is not None else generators_for(seeds)
    if noise is None:
        noise = randn(shape, generators, device=sd.device)
    elif tuple(noise.shape) != (len(prompts), *shape):
        raise ValueError(f"latents must have shape {(len(prompts), *shape)}, got {tuple(noise.shape)}")
    cond = sd.encode_prompt(prompts, clip_skip=clip_skip)
    uncond = sd.encode_prompt(negatives, clip_skip=clip_skip) if guidance != 1.0 else None
    if image_by_image and len(prompts) > 1:
        denoiser = ImageByImage([make_denoiser(sd, cond[i:i + 1], None if uncond is None else uncond[i:i + 1],
                                               guidance, guidance_rescale, guidance_interval)
                                 for i in range(len(prompts))])
    else:
        denoiser = make_denoiser(sd, cond, uncond, guidance, guidance_rescale, guidance_interval)

    def on_step(info: dict) -> None:
        if callback is not None:
            callback(info["i"] + 1, info["total"], info["x"])

    rows = rows_per_unet_call(len(prompts), image_by_image, guidance)
    with sampling_memory(sd.unet, rows, *shape[1:], sd.device):
        return sample(denoiser, noise.to(sd.device, torch.float32), sampler=sampler, steps=steps,
                      schedule=resolve_schedule(sampler, schedule),
                      eta=eta, generators=generators if name in STOCHASTIC_SAMPLERS else None,
                      init_latent=init_latents, strength=strength, callback=on_step)


def _params(sd, *, mode: str, sampler: str, schedule: str | None, steps: int, guidance: float, width: int,
            height: int, negative_prompt: Any, clip_skip: int, eta: float | None, guidance_rescale: float,
            guidance_interval: Interval | None, extra: dict[str, Any]) -> dict[str, Any]:
    name, _ = resolve_sampler(sampler)
    schedule = resolve_schedule(sampler, schedule)
    return {
        "mode": mode, "sampler": name, "schedule": schedule, "sampler_display": infotext_name(name, schedule),
        "steps": steps, "guidance": guidance, "width": width, "height": height,
        "negative_prompt": negative_prompt if isinstance(negative_prompt, str) else list(negative_prompt),
        "clip_skip": clip_skip, "eta": eta, "guidance_rescale": guidance_rescale,
        "guidance_interval": None if guidance_interval is None else list(guidance_interval),
        "model": getattr(sd, "source_name", sd.config.name), "model_sha256": getattr(sd, "source_sha256", None),
        "prediction": sd.prediction, "dtype": str(sd.dtype).replace("torch.", ""), "device": str(sd.device),
        "version": __version__, **extra,
    }


def model_interval(sd, interval: Interval | None) -> Interval | None:
    """The guidance interval asked for, or the model's own when None (checked: ValueError if invalid)."""
    return check_interval(sd.config.guidance_interval if interval is None else interval)


def _batch_invariant(sd, flag: bool | None) -> bool:
    return sd.device.type == "cpu" if flag is None else flag


def _seeds(seed: int | None, n: int) -> list[int]:
    seed = random_seed() if seed is None else int(seed)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}], got {seed}")
    return [(seed + i) % (MAX_SEED + 1) for i in range(n)]


def txt2img(sd, prompt: str | Sequence[str], *, negative_prompt: str | Sequence[str] = "", steps: int = 30,
            guidance: float = 7.5, sampler: str = "dpmpp_2m", schedule: str | None = "karras",
            width: int | None = None, height: int | None = None, seed: int | None = None, batch_size: int = 1,
            latents: Tensor | None = None, clip_skip: int = 1, eta: float | None = None,
            guidance_rescale: float = 0.0, guidance_interval: Interval | None = None,
            callback: StepCallback | None = None, batch_invariant: bool | None = None, vae_tiling: bool = False,
            vae_tile_size: int = DEFAULT_TILE_SIZE, vae_slicing: bool | None = None,
            attention_slicing: int | str | None = None) -> Result:
    """Generate images from text. `prompt` may be a list (one image per prompt, times `batch_size`); image i gets
    seed `seed + i`. `latents` (B, 4, h, w) replaces the initial unit-variance noise. `schedule` is the σ schedule
    of the k-samplers (see `resolve_schedule`: ddim/plms/ddpm keep their discrete grid). `batch_invariant` (default:
    on for CPU) runs the networks image by image so that a batch equals its images generated alone, bit for bit.
    `guidance_interval` (lo, hi) applies guidance only at noise levels lo < σ <= hi (hi None: no bound; see
    `ldm.sampling.guidance`); None takes the model's own (`config.guidance_interval`, None for SD: every step).

    Memory (see `MemoryOptions`): `vae_tiling` decodes in tiles of `vae_tile_size` pixels; `vae_slicing` decodes
    one image at a time (default: when batch invariant); `attention_slicing` (query rows per slice, or "auto")
    slices attention for this call only."""
    memory = MemoryOptions(vae_tiling, vae_tile_size, vae_slicing, attention_slicing).check(sd)
    interval = model_interval(sd, guidance_interval)
    width = width or sd.config.image_size
    height = height or sd.config.image_size
    invariant = _batch_invariant(sd, batch_invariant)
    prompts = _as_list(prompt, batch_size)
    negatives = _negatives(negative_prompt, len(prompts), batch_size)
    seeds = _seeds(seed, len(prompts))
    check_size(width, height, sd.config.vae.downsample_factor)
    _check_fits(sd, width, height, len(prompts), guidance, invariant, memory)
    with memory.sliced_attention(), for_inference(sd):
        out = generate(sd, prompts, negatives, steps=steps, guidance=guidance, sampler=sampler, schedule=schedule,
                       width=width, height=height, seeds=seeds, clip_skip=clip_skip, eta=eta,
                       guidance_rescale=guidance_rescale, guidance_interval=interval, noise=latents, callback=callback,
                       image_by_image=invariant)
        images = decode(sd, out, image_by_image=memory.image_by_image(invariant), tile_size=memory.tile_size)
        params = _params(sd, mode="txt2img", sampler=sampler, schedule=schedule, steps=steps, guidance=guidance,
                         width=width, height=height, negative_prompt=negative_prompt, clip_skip=clip_skip, eta=eta,
                         guidance_rescale=guidance_rescale, guidance_interval=interval,
                         extra=memory.params(invariant))
    params["batch_invariant"] = invariant
    return Result(to_pil(images), seeds, prompts, params, out)


def img2img(sd, image: Image.Image | Tensor, prompt: str | Sequence[str], *, strength: float = 0.75,
            negative_prompt: str | Sequence[str] = "", steps: int = 30, guidance: float = 7.5,
            sampler: str = "dpmpp_2m", schedule: str | None = "karras", width: int | None = None,
            height: int | None = None, seed: int | None = None, batch_size: int = 1, clip_skip: int = 1,
            eta: float | None = None, guidance_rescale: float = 0.0, guidance_interval: Interval | None = None,
            callback: StepCallback | None = None, batch_invariant: bool | None = None, vae_tiling: bool = False,
            vae_tile_size: int = DEFAULT_TILE_SIZE, vae_slicing: bool | None = None,
            attention_slicing: int | str | None = None) -> Result:
    """Re-imagine `image`: encode it, noise it to the level set by `strength` and sample from there.

    The sampler runs the last int(strength * steps) steps of the schedule (CompVis), starting from the image's
    latent noised to the level of the first step it runs (as diffusers). Strength 1 runs every step from
    x_0 + σ_max ε, so the image keeps a small weight (1 / σ_max ≈ 0.07), as in CompVis, diffusers and A1111. An image is taken at its own size rounded down to a multiple of 8 unless
    width/height ask for another size (resized with Lanczos). A tensor image is (3, H, W) or (1, 3, H, W) in [-1, 1].
    The memory and guidance options are those of `txt2img`; `vae_tiling` also encodes the init image in tiles.
    """
    memory = MemoryOptions(vae_tiling, vae_tile_size, vae_slicing, attention_slicing).check(sd)
    interval = model_interval(sd, guidance_interval)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    invariant = _batch_invariant(sd, batch_invariant)
    prompts = _as_list(prompt, batch_size)
    negatives = _negatives(negative_prompt, len(prompts), batch_size)
    f = sd.config.vae.downsample_factor
    if isinstance(image, Image.Image):
        size = init_image_size(image.size, width, height, f)
        check_size(*size, f)
        _check_fits(sd, *size, len(prompts), guidance, invariant, memory)
        pixels = from_pil(fit_init_image(image, width, height, f))
    else:
        pixels = image[None] if image.ndim == 3 else image
        if pixels.shape[0] != 1:
            raise ValueError(f"img2img takes one init image, got a batch of {pixels.shape[0]}")
        _check_fits(sd, pixels.shape[-1], pixels.shape[-2], len(prompts), guidance, invariant, memory)
    height, width = pixels.shape[-2:]
    seeds = _seeds(seed, len(prompts))
    generators = generators_for(seeds)
    with memory.sliced_attention(), for_inference(sd):
        with torch.no_grad():
            posterior = sd.vae.encode(pixels.to(sd.device), tiled=memory.vae_tiling, tile_size=memory.vae_tile_size)
        release_derived_weights(sd.vae)  # the encoder's, not needed while sampling
        # image i's posterior sample, then its starting noise, both from its own generator
        eps = randn(posterior.mean.shape[1:], generators, device=sd.device)
        init = (posterior.mean + posterior.std * eps.to(posterior.mean.dtype)).float() * sd.scale_factor
        noise = randn(init.shape[1:], generators, device=sd.device)
        out = generate(sd, prompts, negatives, steps=steps, guidance=guidance, sampler=sampler, schedule=schedule,
                       width=int(width), height=int(height), seeds=seeds, clip_skip=clip_skip, eta=eta,
                       guidance_rescale=guidance_rescale, guidance_interval=interval, init_latents=init, strength=strength, noise=noise,
                       callback=callback, image_by_image=invariant, generators=generators)
        images = decode(sd, out, image_by_image=memory.image_by_image(invariant), tile_size=memory.tile_size)
        params = _params(sd, mode="img2img", sampler=sampler, schedule=schedule, steps=steps, guidance=guidance,
                         width=int(width), height=int(height), negative_prompt=negative_prompt, clip_skip=clip_skip,
                         eta=eta, guidance_rescale=guidance_rescale, guidance_interval=interval,
                         extra={"strength": strength, **memory.params(invariant)})
    params["batch_invariant"] = invariant
    return Result(to_pil(images), seeds, prompts, params, out)
