"""txt2img and img2img: a `Generation` request -> conditioning -> sampler over the UNet -> VAE decode.

`Denoising` is the core both run on: it yields after every sampler step and can be cancelled between steps;
`txt2img`, `img2img` and `generate` run it to the end. The pipeline only glues the pieces: `StableDiffusion`
(networks), `denoisers.DiscreteDenoiser` (the UNet as D(x, σ)), `guidance.CFGDenoiser` (classifier-free guidance),
`samplers.sample_steps` (the sampler loop) and `inpainting` (masks, outpainting). The model is used as it is handed
over: an accelerated one (`ldm.accel`, what `ldm.load` returns) runs its speed code, a plain one the plain
networks; the pipeline changes neither.

Seeds: image i of a call gets seed `seed + i` (AUTOMATIC1111's convention) and its own CPU generator, which draws
its initial noise, its VAE posterior sample (img2img) and every ancestral/SDE noise of the sampler. So image i
of a batch is bit-identical to the same seed generated alone, on any device.

Memory options, which leave the image as it is (up to float summation order): `vae_tiling` runs the VAE in
tiles (`ldm.models.tiling`: exact, no seams), `vae_slicing` runs it one image at a time, and `attention_slicing`
computes attention a slice of query rows at a time (`ldm.models.attention`).
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import os
import random
import threading
import warnings
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ldm import __version__, accel
from ldm.accel.optimize import largest_activation
from ldm.adapters.embeddings import Embedding, EmbeddingError, for_model
from ldm.adapters.embeddings import find as find_embeddings
from ldm.adapters.lora import LoRA, LoRAError, fuse, release_spare, using
from ldm.config import Interval, check_interval
from ldm.generation import inpainting
from ldm.generation.images import fit_init_image, from_pil, init_image_size, to_pil
from ldm.generation.prompts import encode_with_pooled
from ldm.generation.prompts import words as prompt_words
from ldm.generation.request import (HIRES_UPSCALERS, MAX_SEED, Generation, RequestError, check_size_multiple,
                                    lora_file)
from ldm.models import attention
from ldm.sampling.denoisers import DiscreteDenoiser, Handoff
from ldm.sampling.guidance import CFGDenoiser, Conditioning
from ldm.sampling.names import STOCHASTIC_SAMPLERS
from ldm.sampling.samplers import Step, generators_for, randn, sample_steps
from ldm.sampling.schedules import alphas_cumprod_for

StepCallback = Callable[[int, int, Tensor], None]


class NaNError(RuntimeError):
    """The UNet produced NaN or Inf: usually fp16 overflow."""


@dataclass
class Result:
    """The images of one request, each image's seed, and every parameter needed to make them again."""
    images: list[Image.Image]
    seeds: list[int]
    prompts: list[str]
    params: dict[str, Any]
    latents: Tensor = field(repr=False)
    request: Generation | None = field(default=None, repr=False)

    def image_params(self, i: int) -> dict[str, Any]:
        """The parameters that regenerate image i alone (its prompt and seed, batch size 1)."""
        return {**self.params, "prompt": self.prompts[i], "seed": self.seeds[i]}


def check_size(width: int, height: int, multiple: int = 8) -> None:
    check_size_multiple("width", width, multiple)
    check_size_multiple("height", height, multiple)


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


def available_memory(device: torch.device) -> int:
    """Bytes the device has free now: a GPU's free memory, or the host's MemAvailable (all of it if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return machine_memory(device)


def _tiling_needed(sd, width: int, height: int, images: int, unet_rows: int, vae_images: int,
                   tile_size: int) -> bool:
    """Whether the untiled call's memory estimate (beyond the loaded model) exceeds the memory free now while the
    tiled one fits: then the VAE runs in tiles, which gives the same image."""
    untiled = sum(memory_needed(sd, width, height, images, unet_rows, vae_images, None).values())
    tiled = sum(memory_needed(sd, width, height, images, unet_rows, vae_images, tile_size).values())
    free = available_memory(sd.device)
    if untiled > free and release_spare(sd):  # the spare weights of an earlier LoRA merge go first
        free = available_memory(sd.device)
    return untiled > free >= tiled


def rows_per_unet_call(images: int, image_by_image: bool, guidance: float) -> int:
    """Latents per UNet call of `generate`: one image's or the whole batch's, doubled by the unconditional pass."""
    return (1 if image_by_image else images) * (1 if guidance == 1.0 else 2)


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


def random_seed() -> int:
    return random.SystemRandom().randrange(MAX_SEED)


def resolve_schedule(sampler: str, schedule: str | None) -> str:
    """The σ schedule a request with this sampler and schedule runs on (`Generation.resolved_schedule`)."""
    return Generation(sampler=sampler, schedule=schedule).resolved_schedule


def make_denoiser(sd, cond: Tensor | Conditioning, uncond: Tensor | Conditioning | None, guidance: float,
                  guidance_rescale: float = 0.0, guidance_interval: Interval | None = None,
                  concat: Tensor | None = None) -> CFGDenoiser:
    """The UNet as a guided denoiser D(x, σ) on the model's training schedule (float64). `concat` (an inpainting
    model's mask and masked-image latents, (1, 5, h, w)) joins the UNet's input after the (scaled) latents, as
    CompVis' "hybrid" conditioning does."""
    unet = sd.unet

    def model_fn(x: Tensor, t: Tensor, cond: Tensor | Conditioning) -> Tensor:
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype).expand(x.shape[0], -1, -1, -1)], dim=1)
        out = unet(x, t, cond.context, cond.y) if isinstance(cond, Conditioning) else unet(x, t, cond)
        if not torch.isfinite(out).all():
            raise NaNError("the UNet produced NaN/Inf values (fp16 overflow?). Try --precision fp32, or keep "
                           "attention in fp32 (--upcast-attention, or Generation(upcast_attention=True))")
        return out

    base = DiscreteDenoiser(model_fn, alphas_cumprod_for(sd.config.schedule), sd.prediction,
                            shares_latents=accel.shares_latents(unet))
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
    accel.release(sd.vae)  # not held through the next call's sampling
    return images


def _decode(sd, latents: Tensor, nan_fallback: bool, tile_size: int | None) -> Tensor:
    """Scaled latents -> images in [-1, 1]. If a half-precision decode gives NaN/Inf, decode again in fp32 (as
    A1111 does) with a one-line warning."""

    tiling = {} if tile_size is None else {"tiled": True, "tile_size": tile_size}
    images = sd.vae.decode(latents / sd.scale_factor, **tiling)
    if nan_fallback and sd.vae.post_quant_conv.weight.dtype != torch.float32 and not torch.isfinite(images).all():
        warnings.warn("VAE decode produced NaN/Inf in half precision; decoding again in fp32", stacklevel=2)
        # a copy in fp32: the model's own VAE may be serving other calls meanwhile
        vae = copy.deepcopy(sd.vae).float()
        images = vae.decode(latents.float() / sd.scale_factor, **tiling)
        del vae
    return images.float().clamp(-1, 1)


# --- the denoising core -------------------------------------------------------------------------------------------

def model_interval(sd, interval: Interval | None) -> Interval | None:
    """The guidance interval asked for, or the model's own when None (checked: ValueError if invalid)."""
    return check_interval(sd.config.guidance_interval if interval is None else interval)


def _size(sd, request: Generation) -> tuple[int, int]:
    """(width, height) of the request's images: as asked, else the model's native size (txt2img) or the init
    image's own size rounded down to a multiple of the VAE's factor (img2img)."""
    f = sd.config.vae.downsample_factor
    image = request.init_image
    if image is None:
        size = request.width or sd.config.image_size, request.height or sd.config.image_size
    elif isinstance(image, Image.Image):
        try:
            size = init_image_size(image.size, request.width, request.height, f)
        except ValueError as e:
            raise RequestError("init_image", str(e)) from None
    else:
        if image.ndim not in (3, 4) or image.shape[-3] != 3 or (image.ndim == 4 and image.shape[0] != 1):
            raise RequestError("init_image", f"init_image takes one image, (3, H, W) or (1, 3, H, W), got shape "
                                             f"{tuple(image.shape)}")
        size = int(image.shape[-1]), int(image.shape[-2])
    check_size(*size, f)
    return size


def _pixels(sd, request: Generation) -> Tensor:
    """The init image of an img2img request as (1, 3, H, W) in [-1, 1] at the size the request asks for."""
    image = request.init_image
    if isinstance(image, Image.Image):
        return from_pil(fit_init_image(image, request.width, request.height, sd.config.vae.downsample_factor))
    return image[None] if image.ndim == 3 else image


class Denoising:
    """One request run step by step: iterating yields the sampler's `Step` after each step (the latent x at σ, and
    the model's x_0 prediction `denoised`, a preview); `result` holds the `Result` once the iteration ends.

        run = Denoising(sd, Generation("a red circle", steps=20))
        for step in run:
            bar.update(step.i + 1)
        images = run.result.images

    `cancel()`, from any thread, stops it before the next step: the iteration then ends, `cancelled` is True and
    `result` None. Nothing runs until the first step is asked for. Each step runs without autograd and with the
    request's attention settings, in a context of its own: between steps, the caller's thread has its own
    settings, and a run may be resumed from another thread (a server's worker)."""

    def __init__(self, sd, request: Generation):
        self._steps = None  # before anything can fail: __del__ looks at it
        self.request = request.check(sd)
        self.result: Result | None = None
        self.cancelled = False
        self._cancel = threading.Event()
        self._context = contextvars.copy_context()
        self._steps = _denoise(sd, request)

    def cancel(self) -> None:
        self._cancel.set()

    def close(self) -> None:
        """Stops the run here and now, in the thread that drives it (`cancel` is for other threads): the run's
        cleanup (kept heap memory, derived weights) happens in its own context. Also what an abandoned run gets."""
        if self._steps is not None:
            steps, self._steps = self._steps, None
            self._context.run(steps.close)

    def __del__(self) -> None:
        with contextlib.suppress(RuntimeError):  # its context is running elsewhere: that run ends it
            self.close()

    def __iter__(self) -> Iterator[Step]:
        return self

    def __next__(self) -> Step:
        if self._steps is None:
            raise StopIteration
        if self._cancel.is_set():
            self.close()
            self.cancelled = True
            raise StopIteration
        try:
            with torch.no_grad():
                return self._context.run(next, self._steps)
        except StopIteration as done:
            self._steps, self.result = None, done.value
            raise StopIteration from None
        except BaseException:
            self._steps = None
            raise


def _denoise(sd, request: Generation) -> Generator[Step, None, Result]:
    """The core that txt2img and img2img share: prompts -> conditioning, (img2img) the init image -> latents, the
    sampler's steps over the guided UNet, the VAE decode. Run by `Denoising`, which gives it its context."""
    asked = request  # what the image's parameters record
    if any(request.outpaint):
        request = inpainting.outpainted(request)
    paste = None
    if request.inpaint_area == "masked" and request.mask is not None:
        request, paste = inpainting.only_masked(sd, request)
    f = sd.config.vae.downsample_factor
    invariant = sd.device.type == "cpu" if request.batch_invariant is None else request.batch_invariant
    vae_by_image = invariant if request.vae_slicing is None else request.vae_slicing
    prompts = request.prompts
    seeds = request.seeds(random_seed() if request.seed is None else request.seed)
    generators = generators_for(seeds)
    interval = model_interval(sd, request.guidance_interval)
    width, height = _size(sd, request)
    final = request.hires_size(width, height, f) if request.hires else (width, height)
    if request.hires:
        check_size(*final, f)
    rows = rows_per_unet_call(len(prompts), invariant, request.guidance)
    vae_images = 1 if vae_by_image else len(prompts)
    if not request.vae_tiling and _tiling_needed(sd, *final, len(prompts), rows, vae_images, request.vae_tile_size):
        warnings.warn(f"{final[0]}x{final[1]}: the VAE's memory estimate exceeds what this machine has free; "
                      f"decoding in tiles of {request.vae_tile_size} px (vae_tiling)", stacklevel=2)
        request = request.replace(vae_tiling=True)
    check_memory(sd, *final, len(prompts), rows, vae_images, request.tile_size)
    settings = {"backend": request.attention, "upcast": request.upcast_attention}
    if request.attention_slicing is not None:
        settings["slice_size"] = request.attention_slicing
    loras = read_loras(request)
    embeddings = read_embeddings(sd, request, prompts + request.negative_prompts)
    refiner = refiner_model(sd, request)
    with attention.options(**settings) as used, _merged(sd, loras):
        shape = (sd.config.vae.embed_dim, height // f, width // f)  # the latents' channels: the VAE's
        init = None
        masks = inpainting.masks_for(sd, request, width, height) if request.mask is not None else None
        known = _pixels(sd, request) if request.img2img else None  # the init image: its latents, an inpainting UNet's
        if request.img2img:
            pixels = known
            if masks is not None and request.masked_content == "fill":
                pixels = inpainting.fill(pixels, masks[1])
            # image i's posterior sample, then its starting noise, both from its own generator
            init = _encode(sd, request, pixels, generators)
        if request.latents is None:
            noise = randn(shape, generators, device=sd.device)
        elif tuple(request.latents.shape) != (len(prompts), *shape):
            raise RequestError("latents", f"latents must have shape {(len(prompts), *shape)}, got "
                                          f"{tuple(request.latents.shape)}")
        else:
            noise = request.latents
        concat = inpainting.inpainting_input(sd, request, known, masks, width, height) if sd.config.inpainting else None
        texts = encode_texts(sd, request, prompts, embeddings)
        denoiser = _guided_denoiser(sd, request, texts, (width, height), interval, invariant, concat)
        if refiner is not None:  # A1111's refiner: the rest of the steps on another model
            refiner_embeddings = read_embeddings(refiner, request, prompts + request.negative_prompts)
            refined = _guided_denoiser(refiner, request, encode_texts(refiner, request, prompts, refiner_embeddings),
                                       (width, height), model_interval(refiner, request.guidance_interval), invariant)
            denoiser = Handoff(denoiser, refined, request.refiner_switch)
        if masks is not None and concat is None:  # an ordinary model: held to the known latents (A1111)
            keep = masks[2]
            if request.masked_content == "latent noise":
                init = init * keep + randn(init.shape[1:], generators, device=sd.device) * (1 - keep)
            elif request.masked_content == "latent nothing":
                init = init * keep
            denoiser = inpainting.MaskedDenoiser(denoiser, init, keep)
        strength = request.strength if request.img2img else 1.0
        hires_steps = request.hires_steps or request.steps
        first = int(strength * request.steps)  # the steps an img2img pass runs of its schedule (all for txt2img)
        total = first + (int(request.hires_denoise * hires_steps) if request.hires else 0)
        latents = yield from _sample(sd, request, denoiser, noise, init, strength, request.steps, generators,
                                     invariant, offset=0, total=total)
        if request.hires:  # A1111's hires fix: upscale, then img2img at the larger size
            init = _upscale(sd, request, latents, final, generators, vae_by_image)
            noise = randn(init.shape[1:], generators, device=sd.device)
            if sd.config.sdxl:  # conditioned on the larger size
                denoiser = _guided_denoiser(sd, request, texts, final, interval, invariant)
            latents = yield from _sample(sd, request, denoiser, noise, init, request.hires_denoise, hires_steps,
                                         generators, invariant, offset=first, total=total)
        images = decode(sd, latents, image_by_image=vae_by_image, tile_size=request.tile_size)
    pictures = to_pil(images)
    if masks is not None:  # the pixels the blurred mask keeps, exactly as they were
        image = request.init_image
        original = (fit_init_image(image, request.width, request.height, f).convert("RGB")
                    if isinstance(image, Image.Image) else to_pil(_pixels(sd, request))[0])
        pictures = [Image.composite(p, original, masks[0]) for p in pictures]
    if paste is not None:
        pictures = [paste(p) for p in pictures]
    params = {**asked.params(), "width": int(width), "height": int(height), "final_width": int(final[0]),
              "final_height": int(final[1]), "guidance_interval":
              None if interval is None else list(interval), "attention": used.backend,
              "upcast_attention": used.upcast, "attention_slicing": used.slice_size, "vae_slicing": vae_by_image,
              "vae_tiling": request.tile_size,
              "batch_invariant": invariant, "model": getattr(sd, "source_name", sd.config.name),
              "model_sha256": getattr(sd, "source_sha256", None), "prediction": sd.prediction,
              "dtype": str(sd.dtype).replace("torch.", ""), "device": str(sd.device), "version": __version__}
    if loras:
        params["lora_hashes"] = [[lora.name, weight, lora.hash] for lora, weight in loras]
    if embeddings:
        params["ti_hashes"] = [[e.name, e.hash] for e in embeddings.values()]
    if refiner is not None:
        params.update(refiner_model=refiner.source_name, refiner_sha256=refiner.source_sha256)
    return Result(pictures, seeds, request.texts, params, latents, asked)


def _sample(sd, request: Generation, denoiser, noise: Tensor, init: Tensor | None, strength: float, steps: int,
            generators, invariant: bool, offset: int, total: int) -> Generator[Step, None, Tensor]:
    """One sampling pass of the request's sampler; its steps are numbered from `offset` out of `total` (the steps of
    all passes)."""
    name = request.sampler_name
    run = sample_steps(denoiser, noise.to(sd.device, torch.float32), sampler=name, steps=steps,
                       schedule=request.resolved_schedule, eta=request.eta,
                       generators=generators if name in STOCHASTIC_SAMPLERS else None, init_latent=init,
                       strength=strength)
    with accel.sampling(sd.unet, rows_per_unet_call(noise.shape[0], invariant, request.guidance), *noise.shape[2:]):
        while True:
            try:
                step = next(run)
            except StopIteration as done:
                return done.value
            yield dataclasses.replace(step, i=offset + step.i, total=total)


def _upscale(sd, request: Generation, latents: Tensor, size: tuple[int, int], generators,
             image_by_image: bool) -> Tensor:
    """The hires fix's starting point: the first pass's latents at `size` (width, height) pixels, by latent
    interpolation, or decoded, resized with PIL and encoded again (a posterior sample from each image's
    generator, as img2img draws it)."""
    kind, mode, antialias = HIRES_UPSCALERS[request.hires_upscaler]
    f = sd.config.vae.downsample_factor
    if kind == "latent":
        return F.interpolate(latents, size=(size[1] // f, size[0] // f), mode=mode, antialias=antialias)
    images = decode(sd, latents, image_by_image=image_by_image, tile_size=request.tile_size)
    resample = Image.Resampling.LANCZOS if mode == "lanczos" else Image.Resampling.NEAREST
    pixels = torch.cat([from_pil(im.resize(size, resample)) for im in to_pil(images)])
    return _encode(sd, request, pixels, generators)


def _encode(sd, request: Generation, pixels: Tensor, generators) -> Tensor:
    """Scaled latents of `pixels` in [-1, 1]: a posterior sample per image, drawn from that image's generator (the
    request's VAE tiling applies); the encoder's derived weights are freed, not needed while sampling."""
    posterior = sd.vae.encode(pixels.to(sd.device), tiled=request.vae_tiling, tile_size=request.vae_tile_size)
    accel.release(sd.vae)
    eps = randn(posterior.mean.shape[1:], generators, device=sd.device)
    return (posterior.mean + posterior.std * eps.to(posterior.mean.dtype)).float() * sd.scale_factor


def read_embeddings(sd, request: Generation, prompts: list[str]) -> dict[str, Embedding]:
    """The embeddings of the request's folder that words of `prompts` name, checked against the text encoder."""
    words = set().union(*map(prompt_words, prompts))
    try:
        found = find_embeddings(request.embeddings_dir, words, request.ti_hashes)
        return {name: for_model(Embedding.read(path).named(name), sd.config)
                for name, path in found.items()}
    except EmbeddingError as e:
        raise RequestError("embeddings_dir", str(e)) from None


def read_loras(request: Generation) -> list[tuple[LoRA, float]]:
    """The request's LoRA files (its `loras`, then its prompts' <lora:name:weight> tags), read."""
    out = []
    for name, weight in [*request.loras, *request.lora_tags]:
        try:
            out.append((LoRA.read(lora_file(name, request.lora_dir, request.lora_hashes)), weight))
        except LoRAError as e:
            raise RequestError("loras", str(e)) from None
    return out



def fuse_loras(sd, requests: list[Generation]) -> list[tuple[LoRA, float]]:
    """Fuses into `sd` for good (`ldm.adapters.lora.fuse`) the LoRAs that all these requests name, when they name
    the same ones: for a process that runs these requests and ends, such as `ldm txt2img`, which then writes no
    merged weight anew. Returns the LoRAs fused (none where the requests name none, or different ones)."""
    sets = [read_loras(request) for request in requests]
    keys = {tuple((lora.source, weight) for lora, weight in loras) for loras in sets}
    if not sets or not sets[0] or len(keys) > 1:
        return []
    try:
        fuse(sd, sets[0])
    except LoRAError as e:
        raise RequestError("loras", str(e)) from None
    return sets[0]

# The refiner last loaded by path, kept for the next request: (path, size, mtime, dtype, device) -> model.
_refiners: dict[tuple, Any] = {}
_refiners_lock = threading.Lock()


def forget_refiner() -> None:
    """Frees the refiner kept from the last request that named one by its file."""
    with _refiners_lock:
        _refiners.clear()


def refiner_model(sd, request: Generation):
    """The request's refiner, as a model of `sd`'s dtype and device: the one given, or the file loaded (and kept for
    the next request, one at a time); None without a refiner. RequestError when it cannot serve `sd`."""
    refiner = request.refiner
    if refiner is None:
        return None
    if isinstance(refiner, (str, os.PathLike)):
        from ldm.models.checkpoint import CheckpointError, load, loaded_bytes

        path = Path(refiner)
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, sd.dtype, str(sd.device))
        with _refiners_lock:
            if key not in _refiners:
                _refiners.clear()  # one refiner in memory at a time
                need, free = loaded_bytes(path, sd.dtype), available_memory(sd.device)
                if need > free and release_spare(sd):  # the spare weights of an earlier LoRA merge go first
                    free = available_memory(sd.device)
                if need > free:
                    raise RequestError("refiner", f"refiner {path.name}: its weights take {_gib(need)} in "
                                                  f"{str(sd.dtype).removeprefix('torch.')} beside the model, and "
                                                  f"{_gib(free)} are free; free memory, or run without a refiner")
                try:
                    model = load(path, device=sd.device, dtype=sd.dtype, accelerate=accel.is_accelerated(sd.unet))
                except (CheckpointError, ValueError) as e:
                    raise RequestError("refiner", f"refiner {path}: {e}") from None
                from ldm.generation.images import file_sha256

                model.source_sha256 = file_sha256(path)
                _refiners[key] = model
            refiner = _refiners[key]
    if (refiner.config.vae.embed_dim, refiner.config.vae.downsample_factor) != \
            (sd.config.vae.embed_dim, sd.config.vae.downsample_factor):
        raise RequestError("refiner", f"refiner {refiner.source_name} works on other latents than {sd.source_name} "
                                      "(another VAE); pick a refiner of the same family, e.g. sdxl-refiner for SDXL")
    if sd.config.inpainting or refiner.config.inpainting:
        raise RequestError("refiner", "a refiner does not combine with inpainting models")
    return refiner


@contextlib.contextmanager
def _merged(sd, loras: list[tuple[LoRA, float]]) -> Iterator[None]:
    """The model with these LoRAs merged for the block (shared with other runs using the same ones)."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(using(sd, loras))
        except LoRAError as e:
            raise RequestError("loras", str(e)) from None
        yield


@dataclass(frozen=True)
class Texts:
    """The encoded prompts of a request: `context` (B + N, M, D), the B prompts then the N negative prompts (none
    without guidance), and SDXL's pooled embeddings (B + N, P)."""
    context: Tensor
    pooled: Tensor | None
    prompts: int


def encode_texts(sd, request: Generation, prompts: list[str], embeddings: dict[str, Embedding]) -> Texts:
    """The prompts and (with guidance) the negative prompts, encoded as A1111 reads them (emphasis, BREAK, chunks
    of 75 tokens, the negatives padded to the prompts' chunks and back). For SDXL, negative prompts that are all
    empty are zeros, context and pooled alike, as A1111 (and diffusers' base pipeline) make them."""
    negatives = request.negative_prompts if request.guidance != 1.0 else []
    context, pooled = encode_with_pooled(sd, prompts + negatives, clip_skip=request.clip_skip, embeddings=embeddings)
    n = len(prompts)
    if sd.config.sdxl and negatives and not any(negatives):
        context = torch.cat([context[:n], torch.zeros_like(context[n:])])
        pooled = torch.cat([pooled[:n], torch.zeros_like(pooled[n:])])
    return Texts(context, pooled, n)


# A1111's defaults for SDXL's conditions: no crop, and the refiner's aesthetic score (its options
# sdxl_refiner_high_aesthetic_score / _low_ for the negative prompts)
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5


def conditioning(sd, texts: Texts, size: tuple[int, int]) -> tuple[Tensor | Conditioning, Tensor | Conditioning | None]:
    """(cond, uncond) for the UNet: the contexts, and for SDXL their vector y, with the image's size (w, h) as both
    its original and its target size (A1111)."""
    n = texts.prompts
    uncond = texts.context[n:] if len(texts.context) > n else None
    if not sd.config.sdxl:
        return texts.context[:n], uncond
    width, height = size

    def vector(rows: slice, score: float) -> Tensor:
        return sd.text_encoder.vector(texts.pooled[rows], {
            "original_size": (height, width), "crop_coords_top_left": (0, 0), "target_size": (height, width),
            "aesthetic_score": (score,)})

    cond = Conditioning(texts.context[:n], vector(slice(None, n), AESTHETIC_SCORE))
    if uncond is None:
        return cond, None
    return cond, Conditioning(uncond, vector(slice(n, None), NEGATIVE_AESTHETIC_SCORE))


def _guided_denoiser(sd, request: Generation, texts: Texts, size: tuple[int, int], interval: Interval | None,
                     image_by_image: bool, concat: Tensor | None = None):
    """The UNet as a guided denoiser of the encoded prompts for images of `size` (w, h), one image's guidance pair
    at a time if asked."""
    guidance = request.guidance
    cond, uncond = conditioning(sd, texts, size)
    if image_by_image and texts.prompts > 1:
        return ImageByImage([make_denoiser(sd, cond[i:i + 1], None if uncond is None else uncond[i:i + 1], guidance,
                                           request.guidance_rescale, interval, concat) for i in range(texts.prompts)])
    return make_denoiser(sd, cond, uncond, guidance, request.guidance_rescale, interval, concat)


def generate(sd, request: Generation, callback: StepCallback | None = None) -> Result:
    """Runs `request` to the end (`Denoising`); `callback(step, total, latents)` after each step."""
    run = Denoising(sd, request)
    for step in run:
        if callback is not None:
            callback(step.i + 1, step.total, step.x)
    return run.result


def txt2img(sd, prompt: str | Sequence[str], *, callback: StepCallback | None = None, **options: Any) -> Result:
    """Images from text: `generate(sd, Generation(prompt, **options))`; the options are `Generation`'s fields."""
    return generate(sd, Generation(prompt, **options), callback)


def img2img(sd, image: Image.Image | Tensor, prompt: str | Sequence[str], *, callback: StepCallback | None = None,
            **options: Any) -> Result:
    """Re-imagine `image`: encode it, noise it to the level set by `strength` and sample from there.

    The sampler runs the last int(strength * steps) steps of the schedule (CompVis), starting from the image's
    latent noised to the level of the first step it runs (as diffusers). Strength 1 runs every step from
    x_0 + σ_max ε, so the image keeps a small weight (1 / σ_max ≈ 0.07), as in CompVis, diffusers and A1111. The
    options are `Generation`'s fields; `vae_tiling` also encodes the init image in tiles."""
    return generate(sd, Generation(prompt, init_image=image, **options), callback)
