"""`Generation`: one request for images, the single type that the Python API, the command line and the PNG
parameters all speak.

    request = Generation("a red circle", steps=20, seed=42)
    result = ldm.generation.generate(sd, request)                    # or, step by step:
    for step in (run := Denoising(sd, request)):
        print(step.i, step.total)
    result = run.result

A request holds what decides the images (prompt, seed, sampler, guidance, size, init image and strength) and how
to run it (memory and attention options, which change the images at most by float rounding). It is frozen:
`request.replace(steps=50)` makes another. Every check a user mistake can fail lives here: the ones that need no
model when it is made (`RequestError` naming the field), the ones that need the model in `check(sd)`. Defaults
are the field defaults; the command line shows them in its help.

This module imports no torch, so that `ldm --help` stays fast.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldm.config import Interval, SliceSize, check_interval, is_slice_size
from ldm.sampling.names import DISCRETE_SAMPLERS, ETA_SAMPLERS, infotext_name, resolve_sampler

if TYPE_CHECKING:
    from PIL import Image
    from torch import Tensor

MAX_SEED = 2 ** 32 - 1
DEFAULT_TILE_SIZE = 512  # VAE tile side in image pixels (`ldm.models.tiling`)
SCHEDULES = ("discrete", "karras", "exponential")
ATTENTION_BACKENDS = ("sdpa", "xformers", "math")
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")  # A1111's "Masked content" values
INPAINT_AREAS = {"whole": "Whole picture", "masked": "Only masked"}  # A1111's "Inpaint area" values
# hires fix upscalers, by A1111's names (what its infotext records): latent modes (torch interpolate mode,
# antialias) upscale the latents; pixel modes decode, resize the image with PIL and encode again
HIRES_UPSCALERS = {
    "Latent": ("latent", "bilinear", False), "Latent (antialiased)": ("latent", "bilinear", True),
    "Latent (bicubic)": ("latent", "bicubic", False), "Latent (bicubic antialiased)": ("latent", "bicubic", True),
    "Latent (nearest)": ("latent", "nearest", False), "Latent (nearest-exact)": ("latent", "nearest-exact", False),
    "Lanczos": ("pixel", "lanczos", False), "Nearest": ("pixel", "nearest", False),
}


LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")  # A1111's <lora:name:weight> in a prompt


class RequestError(ValueError):
    """A request that cannot run: `field` names what to change (a server answers 4xx naming it, the command line
    names its flag in its place where the message starts with it)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Generation:
    """One txt2img request, or img2img when `init_image` is given.

    prompt: one prompt, or a list (one image per prompt, times `batch_size`); image i gets seed `seed + i`
        (AUTOMATIC1111's convention), None: a random seed. Prompts are read as A1111 reads them: `(word:1.3)`
        emphasis, `BREAK`, no 77-token limit (`ldm.generation.prompts`), and `<lora:name:weight>` tags, which
        name a LoRA file in `lora_dir` and are taken out of the text.
    loras: LoRA files to merge for this request, as (path or name in `lora_dir`, weight) pairs (`ldm.adapters`).
    lora_hashes: (name, A1111 short hash) of LoRAs to find in `lora_dir` by hash when no file has their name (what
        a replayed image's "Lora hashes" give).
    embeddings_dir: a folder of textual inversion embeddings; a word of a prompt that names one of its files
        stands for that embedding's vectors (`ldm.adapters.embeddings`); ti_hashes: (word, A1111 hash) of
        embeddings to find by hash when no file has the word's name (a replayed image's "TI hashes").
    sampler: a name of `ldm.sampling.names` or an A1111 name ("DPM++ 2M Karras", whose schedule wins);
        schedule: the σ schedule of the k-samplers (ddim, plms and ddpm keep their discrete grid).
    guidance: the classifier-free guidance scale (A1111's "CFG scale"); 1 runs no unconditional pass.
        guidance_interval (lo, hi): guide only at noise levels lo < σ <= hi; None: the model's own.
    width, height: pixels, multiples of 8; None: the model's native size (txt2img) or the init image's own size
        rounded down to a multiple of 8 (img2img; other sizes resize it with Lanczos).
    init_image (img2img): a PIL image, or a tensor (3, H, W) / (1, 3, H, W) in [-1, 1]; `strength` in (0, 1]
        is how much of the schedule runs from it. latents (txt2img): (B, 4, h, w) replacing the initial noise.
    hires_scale (txt2img; A1111's "hires fix"): above 1, the images made at width x height are upscaled by it
        (`hires_upscaler`, one of HIRES_UPSCALERS: latent interpolation, or Lanczos on the decoded pixels) and
        sampled again at the larger size as img2img with strength `hires_denoise`, over `hires_steps` steps (0: as
        many as `steps`).
    mask (img2img: inpainting with an ordinary checkpoint, as A1111 does): white repaints, black keeps; the
        model's x_0 prediction is held to the init image's latents where the mask keeps them, and the pixels the
        blurred mask (`mask_blur` pixels) keeps come back exactly as they were. `masked_content` is what the
        repainted area starts from: "original", "fill" (the image's mean colour), "latent noise" or "latent
        nothing". `mask_invert` swaps the two. inpaint_area "masked" (A1111's "only masked") works on the mask's
        bounding box plus `inpaint_padding` pixels, scaled to width x height (default: the model's size), and
        pastes the result back into the whole image. outpaint (left, top, right, bottom): pixels to add around the init
        image (multiples of 8), its edge pixels stretched into them, and inpainted (with `mask`, if any).
    refiner (A1111's refiner, SDXL's base -> refiner hand-off): a checkpoint file (or a loaded model) that takes
        over from the model at the step whose timestep is `refiner_switch` of the way through the schedule (0.8:
        the steps at t < 200), conditioned by its own text encoders; a model of the same latent space.
    batch_invariant: run the networks image by image, so that a batch equals its images made alone, bit for bit
        (None: on CPU). vae_tiling / vae_tile_size / vae_slicing / attention_slicing: less memory, the same image up
        to float rounding (`ldm.generation.pipeline`). attention / upcast_attention: the attention backend, and
        fp32 attention under fp16/bf16 (None: the settings in force, `ldm.models.attention.options`).
    """
    prompt: str | tuple[str, ...] = ""
    negative_prompt: str | tuple[str, ...] = ""
    seed: int | None = None
    steps: int = 30
    sampler: str = "dpmpp_2m"
    schedule: str | None = "karras"
    guidance: float = 7.5
    guidance_rescale: float = 0.0
    guidance_interval: Interval | None = None
    eta: float | None = None
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    clip_skip: int = 1
    init_image: Image.Image | Tensor | None = dataclasses.field(default=None, compare=False, repr=False)
    strength: float = 0.75
    latents: Tensor | None = dataclasses.field(default=None, compare=False, repr=False)
    batch_invariant: bool | None = None
    vae_tiling: bool = False
    vae_tile_size: int = DEFAULT_TILE_SIZE
    vae_slicing: bool | None = None
    attention: str | None = None
    upcast_attention: bool | None = None
    attention_slicing: SliceSize = None
    loras: tuple[tuple[str, float], ...] = ()
    lora_dir: str | None = None
    lora_hashes: tuple[tuple[str, str], ...] = ()
    embeddings_dir: str | None = None
    ti_hashes: tuple[tuple[str, str], ...] = ()
    hires_scale: float = 1.0
    hires_steps: int = 0
    hires_denoise: float = 0.7
    hires_upscaler: str = "Latent"
    mask: Image.Image | Tensor | None = dataclasses.field(default=None, compare=False, repr=False)
    mask_blur: int = 4
    masked_content: str = "original"
    mask_invert: bool = False
    outpaint: tuple[int, int, int, int] = (0, 0, 0, 0)
    inpaint_area: str = "whole"
    inpaint_padding: int = 32
    refiner: str | Any = None
    refiner_switch: float = 0.8

    def __post_init__(self) -> None:
        for name in ("prompt", "negative_prompt"):
            value = getattr(self, name)
            if not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))
        if not isinstance(self.prompt, str):
            if not self.prompt or not all(isinstance(p, str) for p in self.prompt):
                raise RequestError("prompt", "prompt must be a text or a non-empty list of texts")
        if not isinstance(self.negative_prompt, str) and len(self.negative_prompt) != len(self.prompts_given):
            raise RequestError("negative_prompt", f"negative_prompt has {len(self.negative_prompt)} entries for "
                                                  f"{len(self.prompts_given)} prompts; give one per prompt or one text")
        if self.guidance_interval is not None:
            try:
                object.__setattr__(self, "guidance_interval", check_interval(self.guidance_interval))
            except ValueError as e:
                raise RequestError("guidance_interval", f"guidance_interval: {e}; e.g. 1 inf (guide only below "
                                                        "σ = 1)") from None
        self._check_numbers()
        try:
            resolve_sampler(self.sampler)
        except ValueError as e:
            raise RequestError("sampler", str(e)) from None
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise RequestError("schedule", f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.eta is not None and self.sampler_name not in ETA_SAMPLERS:
            raise RequestError("eta", f"sampler {self.sampler_name!r} takes no eta; these do: "
                                      f"{', '.join(sorted(ETA_SAMPLERS))}")
        if self.attention is not None and self.attention not in ATTENTION_BACKENDS:
            raise RequestError("attention", f"attention must be one of {', '.join(ATTENTION_BACKENDS)}, got "
                                            f"{self.attention!r}")
        check_slice_size(self.attention_slicing)
        upscaler = {name.lower(): name for name in HIRES_UPSCALERS}.get(str(self.hires_upscaler).lower())
        if upscaler is None:
            raise RequestError("hires_upscaler", f"hires_upscaler must be one of {', '.join(HIRES_UPSCALERS)}, got "
                                                 f"{self.hires_upscaler!r}")
        object.__setattr__(self, "hires_upscaler", upscaler)
        object.__setattr__(self, "outpaint", tuple(self.outpaint))
        if len(self.outpaint) != 4 or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 or v % 8
                                          for v in self.outpaint):
            raise RequestError("outpaint", f"outpaint takes 4 multiples of 8 >= 0 (left, top, right, bottom), got "
                                           f"{self.outpaint!r}")
        if self.inpaint_area not in INPAINT_AREAS:
            raise RequestError("inpaint_area", f"inpaint_area must be 'whole' or 'masked', got {self.inpaint_area!r}")
        if self.inpaint_area == "masked" and self.mask is None and self.img2img:
            raise RequestError("inpaint_area", "inpaint_area 'masked' needs a mask")
        if self.mask is not None and not self.img2img:
            raise RequestError("mask", "mask needs an init image (img2img)")
        if self.masked_content not in MASKED_CONTENT:
            raise RequestError("masked_content", f"masked_content must be one of {', '.join(MASKED_CONTENT)}, got "
                                                 f"{self.masked_content!r}")
        if self.hires and self.img2img:
            raise RequestError("hires_scale", "hires_scale is for txt2img; an img2img request sets its size with "
                                              "width and height")
        object.__setattr__(self, "loras", tuple((str(name), weight) for name, weight in self.loras))
        for name in ("lora_hashes", "ti_hashes"):
            object.__setattr__(self, name, tuple((str(key), str(h)) for key, h in getattr(self, name)))
        for name, weight in self.loras:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise RequestError("loras", f"loras: the weight of {name} must be a finite number, got {weight!r}")
        self.lora_tags  # checks the tags' weights
        if self.refiner is not None:
            if isinstance(self.refiner, (str, Path)) and not Path(self.refiner).is_file():
                raise RequestError("refiner", f"refiner checkpoint not found: {self.refiner}")
            if self.hires:
                raise RequestError("refiner", "refiner and hires_scale do not combine; run the hires fix without a "
                                              "refiner")

    def _check_numbers(self) -> None:
        def integer(name: str, low: int, high: int | None = None, bound: str | None = None) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise RequestError(name, f"{name} must be an integer, got {v!r}")
            if v < low or (high is not None and v > high):
                raise RequestError(name, f"{name} must be {bound or f'at least {low}'}, got {v}")

        def number(name: str, low: float, high: float | None = None, low_open: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise RequestError(name, f"{name} must be a finite number, got {v!r}")
            if (v <= low if low_open else v < low) or (high is not None and v > high):
                bound = f">= {low:g}" if high is None else f"in {'(' if low_open else '['}{low:g}, {high:g}]"
                raise RequestError(name, f"{name} must be {bound}, got {v}")

        integer("steps", 1)
        integer("batch_size", 1)
        integer("clip_skip", 1)
        if self.seed is not None:
            integer("seed", 0, MAX_SEED, "in [0, 2**32)")
        number("guidance", 0.0)
        number("guidance_rescale", 0.0, 1.0)
        number("strength", 0.0, 1.0, low_open=True)
        number("hires_scale", 1.0, 8.0)
        number("hires_denoise", 0.0, 1.0, low_open=True)
        number("refiner_switch", 0.0, 1.0, low_open=True)
        if self.refiner_switch == 1.0:
            raise RequestError("refiner_switch", "refiner_switch must be below 1 (1 would never switch)")
        integer("hires_steps", 0)
        integer("mask_blur", 0, 64, "in [0, 64]")
        integer("inpaint_padding", 0, 1024, "in [0, 1024]")
        if self.eta is not None:
            number("eta", 0.0)
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None:
                integer(name, 1)
                check_size_multiple(name, v, 8)
        integer("vae_tile_size", 8, bound="a positive multiple of 8")
        check_size_multiple("vae_tile_size", self.vae_tile_size, 8)
        if self.init_image is not None and int(self.strength * self.steps) < 1:
            raise RequestError("strength", f"strength {self.strength} with {self.steps} steps runs no step (int(strength * "
                                           "steps) = 0); raise the strength or the number of steps")

    # --- derived values ---------------------------------------------------------------------------------------

    @property
    def img2img(self) -> bool:
        return self.init_image is not None

    @property
    def mode(self) -> str:
        return "img2img" if self.img2img else "txt2img"

    @property
    def prompts_given(self) -> tuple[str, ...]:
        return (self.prompt,) if isinstance(self.prompt, str) else self.prompt

    @property
    def prompts(self) -> list[str]:
        """One prompt per image: each given prompt `batch_size` times, its <lora:...> tags taken out."""
        return [LORA_TAG.sub("", p) for p in self.prompts_given for _ in range(self.batch_size)]

    @property
    def texts(self) -> list[str]:
        """One prompt per image as given, <lora:...> tags included (what an image's parameters record)."""
        return [p for p in self.prompts_given for _ in range(self.batch_size)]

    @property
    def lora_tags(self) -> tuple[tuple[str, float], ...]:
        """The (name, weight) of every <lora:name:weight> tag of the prompts (weight 1 when not given)."""
        found = {}
        for prompt in self.prompts_given:
            for match in LORA_TAG.finditer(prompt):
                name, weight = match.group(1).strip(), (match.group(2) or "1").strip()
                try:
                    found[name] = float(weight)
                except ValueError:
                    raise RequestError("prompt", f"prompt: the weight {weight!r} of <lora:{name}:...> is not a "
                                                 "number") from None
        return tuple(found.items())

    @property
    def negative_prompts(self) -> list[str]:
        given = ((self.negative_prompt,) * len(self.prompts_given) if isinstance(self.negative_prompt, str)
                 else self.negative_prompt)
        return [p for p in given for _ in range(self.batch_size)]

    @property
    def sampler_name(self) -> str:
        return resolve_sampler(self.sampler)[0]

    @property
    def resolved_schedule(self) -> str:
        """The σ schedule the request runs on. ddim, plms and ddpm always run on their own discrete timestep grid
        (CompVis, diffusers and A1111 offer no "DDIM Karras"); an A1111 name that carries a schedule ("DPM++ 2M
        Exponential") wins over `schedule`; otherwise `schedule`, "discrete" when None."""
        name, alias_schedule = resolve_sampler(self.sampler)
        if name in DISCRETE_SAMPLERS:
            return "discrete"
        return alias_schedule or self.schedule or "discrete"

    @property
    def hires(self) -> bool:
        return self.hires_scale != 1.0

    def hires_size(self, width: int, height: int, multiple: int) -> tuple[int, int]:
        """The second pass's size: the first's times hires_scale, rounded down to a multiple of the VAE's factor."""
        return (int(width * self.hires_scale) // multiple * multiple,
                int(height * self.hires_scale) // multiple * multiple)

    @property
    def tile_size(self) -> int | None:
        return self.vae_tile_size if self.vae_tiling else None

    def seeds(self, first: int) -> list[int]:
        """Each image's seed, from the first image's."""
        return [(first + i) % (MAX_SEED + 1) for i in range(len(self.prompts))]

    def replace(self, **changes: Any) -> Generation:
        """A copy with `changes`, checked as a new request."""
        try:
            return dataclasses.replace(self, **changes)
        except TypeError as e:
            raise ValueError(f"not a field of Generation: {e}") from None

    # --- PNG parameters ---------------------------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        """What an image's PNG records of its request (the `ldm` chunk; `from_params` reads it back), and its A1111
        sampler name. The init image is recorded by the caller, as the file it read."""
        out = {name: getattr(self, name) for name in PNG_FIELDS}
        out.update(mode=self.mode, sampler=self.sampler_name, schedule=self.resolved_schedule,
                   sampler_display=infotext_name(self.sampler_name, self.resolved_schedule),
                   negative_prompt=self.negative_prompt if isinstance(self.negative_prompt, str)
                   else list(self.negative_prompt),
                   guidance_interval=None if self.guidance_interval is None else list(self.guidance_interval),
                   vae_tiling=self.tile_size, requested_width=self.width, requested_height=self.height)
        if not self.img2img:
            del out["strength"]
        if any(self.outpaint):
            out["outpaint"] = list(self.outpaint)
        if self.mask is not None or any(self.outpaint):
            out.update(mask_blur=self.mask_blur, masked_content=self.masked_content, mask_invert=self.mask_invert,
                       inpaint_area=self.inpaint_area)
            if self.inpaint_area == "masked":
                out["inpaint_padding"] = self.inpaint_padding
        if self.hires:
            out.update(hires_scale=self.hires_scale, hires_steps=self.hires_steps, hires_denoise=self.hires_denoise,
                       hires_upscaler=self.hires_upscaler)
        if self.loras:
            out["loras"] = [[name, weight] for name, weight in self.loras]
        if self.refiner is not None:
            out.update(refiner=self.refiner_path, refiner_switch=self.refiner_switch)
        return out

    @property
    def refiner_path(self) -> str | None:
        """The refiner's file as given (a loaded model: its source name)."""
        if self.refiner is None:
            return None
        if isinstance(self.refiner, (str, Path)):
            return str(self.refiner)
        return getattr(self.refiner, "source_name", None)

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> Generation:
        """The request that makes one image of a PNG again (`params` of that image: its prompt and seed, batch 1).
        The memory options (vae_tiling, vae_slicing, attention_slicing) are not replayed: they fit the run to the
        machine that made it and do not change the image beyond float rounding. An img2img request comes back
        without its init image, which the caller reads from the file the PNG names."""
        fields = {name: p[name] for name in REPLAYED_FIELDS if p.get(name) is not None}
        if p.get("mode") == "img2img":  # the size the user asked for, not the init image's own (cropped) size
            fields["width"], fields["height"] = p.get("requested_width"), p.get("requested_height")
        else:
            fields.pop("strength", None)
        if fields.get("guidance_interval") is not None:
            fields["guidance_interval"] = tuple(fields["guidance_interval"])
        if "outpaint" in fields:
            fields["outpaint"] = tuple(fields["outpaint"])
        if "loras" in fields:
            fields["loras"] = tuple((name, weight) for name, weight in fields["loras"])
        if p.get("lora_hashes"):
            fields["lora_hashes"] = tuple((name, h) for name, _, h in p["lora_hashes"])
        if p.get("ti_hashes"):
            fields["ti_hashes"] = tuple((name, h) for name, h in p["ti_hashes"])
        return cls(**fields)

    # --- checks that need the model ---------------------------------------------------------------------------

    def check(self, sd) -> Generation:
        """RequestError for what does not fit `sd` (size multiples, the model's guidance interval, an attention
        backend this machine lacks); returns the request."""
        if any(self.outpaint) and not self.img2img:
            raise RequestError("outpaint", "outpaint needs an init image (img2img)")
        if self.hires and sd.config.inpainting:
            raise RequestError("hires_scale", f"hires_scale is not available with an inpainting model "
                                              f"({sd.config.name}); run txt2img with an ordinary one")
        f = sd.config.vae.downsample_factor
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None:
                check_size_multiple(name, v, f)
        if self.vae_tile_size < f:
            raise RequestError("vae_tile_size", f"vae_tile_size must be at least {f} (the VAE's downsampling factor)")
        if self.attention == "xformers":
            from ldm.models.attention import xformers_available

            if not xformers_available():
                raise RequestError("attention", "attention 'xformers' needs the xformers package (pip install 'ldm[cuda]') "
                                                "and a CUDA device; use 'sdpa' instead")
        return self


# fields a PNG records as they are, and those a replay takes back (not the memory options, nor the batch)
PNG_FIELDS = ("negative_prompt", "steps", "guidance", "guidance_rescale", "guidance_interval", "eta", "clip_skip",
              "strength", "attention", "upcast_attention", "vae_slicing", "attention_slicing", "lora_dir",
              "embeddings_dir")
REPLAYED_FIELDS = ("prompt", "negative_prompt", "seed", "steps", "sampler", "schedule", "guidance",
                   "guidance_rescale", "guidance_interval", "eta", "width", "height", "clip_skip", "strength",
                   "attention", "upcast_attention", "loras", "lora_dir", "embeddings_dir", "hires_scale", "hires_steps",
                   "hires_denoise", "hires_upscaler", "mask_blur", "masked_content", "mask_invert", "outpaint",
                   "inpaint_area", "inpaint_padding", "refiner", "refiner_switch")


def check_size_multiple(name: str, value: int, multiple: int) -> None:
    if value < multiple or value % multiple:
        lo = max(multiple, value // multiple * multiple)
        raise RequestError(name, f"{name} {value} is not a multiple of {multiple}; use {lo} or {lo + multiple}")


def check_slice_size(slice_size: SliceSize) -> SliceSize:
    """A positive int, "auto" or None; anything else raises RequestError."""
    if not is_slice_size(slice_size):
        raise RequestError("attention_slicing", f"attention_slicing must be a positive integer (query rows), 'auto' or None, got "
                                                f"{slice_size!r}")
    return slice_size


def lora_file(name: str, lora_dir: str | None, hashes: tuple[tuple[str, str], ...] = ()) -> Path:
    """A LoRA given as a file, or as a name in `lora_dir` (with or without its extension), or, for a name that is
    not there but has a known hash (`hashes`: a replayed image's "Lora hashes"), the file of `lora_dir` with that
    hash."""
    if Path(name).is_file():
        return Path(name)
    if lora_dir is not None and Path(lora_dir).is_dir():
        from ldm.adapters.hashes import find_by_hash

        for ext in ("", ".safetensors", ".pt", ".ckpt"):
            path = Path(lora_dir) / f"{name}{ext}"
            if path.is_file():
                return path
        wanted = dict(hashes).get(name)
        found = find_by_hash(lora_dir, wanted) if wanted else None
        if found is not None:
            return found
    where = f" in {lora_dir}" if lora_dir is not None else " (give its file, or the folder of LoRAs: --lora-dir)"
    raise RequestError("loras", f"LoRA {name!r} not found{where}")
