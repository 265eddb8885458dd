"""The `ldm` command line: txt2img, img2img, info (and train, cache-latents, export when available).

Every user mistake (a bad size, a missing file, an unknown sampler, ...) is caught before any work is done and
reported as one line on stderr with exit code 2; no output file is written. Flags follow the CompVis scripts
and AUTOMATIC1111 (`--W/--H`, `--n-samples`, `--n-iter`, `--scale`/`--cfg`, `--ckpt`, ...).
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from ldm import __version__
from ldm.demo import DEMO_CHECKPOINT
from ldm.generation.request import HIRES_UPSCALERS, MASKED_CONTENT, Generation, RequestError, lora_file
from ldm.sampling.names import ETA_SAMPLERS, NAMES, infotext_name

# Commands defined in modules of their own, imported only when one of them is asked for (they import torch and the
# training code): name -> (module, the line `ldm --help` shows).
MODULE_COMMANDS = {
    "train": ("ldm.training.train", "train or fine-tune a model (accelerate launch -m ldm.training.train for many GPUs)"),
    "cache-latents": ("ldm.training.latents_cache", "encode a training set once with the VAE (latents cache)"),
    "export": ("ldm.training.export", "write a training run's checkpoint as a single-file model"),
    "serve": ("ldm.server.app", "serve the AUTOMATIC1111 web API (/sdapi/v1/) on this machine"),
}

# The generation flags that set a field of the request (`ldm.generation.request.Generation`, whose field defaults
# are the flags' defaults): flag destination -> field. A value stored in a --from-png image overrides the default,
# and a flag given on the command line overrides both.
REQUEST_FIELDS = {
    "negative_prompt": "negative_prompt", "steps": "steps", "sampler": "sampler", "schedule": "schedule",
    "scale": "guidance", "guidance_interval": "guidance_interval", "eta": "eta", "seed": "seed", "width": "width",
    "height": "height", "n_samples": "batch_size", "clip_skip": "clip_skip", "strength": "strength",
    "attention": "attention", "upcast_attention": "upcast_attention", "vae_tiling": "vae_tiling",
    "vae_tile_size": "vae_tile_size", "vae_slicing": "vae_slicing", "attention_slicing": "attention_slicing",
    "loras": "loras", "lora_dir": "lora_dir", "embeddings_dir": "embeddings_dir", "hires_scale": "hires_scale",
    "hires_steps": "hires_steps", "hires_denoise": "hires_denoise", "hires_upscaler": "hires_upscaler",
    "mask_blur": "mask_blur", "masked_content": "masked_content", "mask_invert": "mask_invert",
    "outpaint": "outpaint", "inpaint_area": "inpaint_area", "inpaint_padding": "inpaint_padding",
    "refiner": "refiner", "refiner_switch": "refiner_switch",
}
FLAGS = {"guidance": "--scale", "batch_size": "--n-samples", "init_image": "--init-img", "loras": "--lora"}
# The other flags' defaults.
CLI_DEFAULTS: dict[str, Any] = {"n_iter": 1, "precision": "auto", "device": "auto", "quiet": False, "grid": False,
                                "compile": False}
DEFAULT = Generation()


# UNets below this size (the demo and test models) run single-threaded on CPU; set OMP_NUM_THREADS to override.
SMALL_MODEL_PARAMS = 20_000_000


class UsageError(Exception):
    """A user mistake: printed as one line, exit code 2."""


# --- argument parsing -------------------------------------------------------------------------------------------

TXT2IMG_EXAMPLES = """examples:
  ldm txt2img "large red circle on the left, blue background"
  ldm txt2img --ckpt v1-5-pruned-emaonly.safetensors "a photo of a cat" --steps 25 --sampler "DPM++ 2M Karras"
  ldm txt2img --ckpt v2-1_768-ema-pruned.safetensors "a castle" --W 768 --H 768 --n-samples 4 --seed 42
  ldm txt2img --from-png outputs/00003-42.png            # regenerate an image exactly
  ldm txt2img --from-png outputs/00003-42.png --steps 50 # replay with one change
  ldm txt2img --ckpt v1-5-pruned-emaonly.safetensors "a city" --W 2048 --H 1024 --vae-tiling --attention-slicing

Memory: --vae-tiling, --vae-slicing and --attention-slicing lower the memory peak without changing the image
(beyond float rounding). A PNG records them, but --from-png does not replay them: give them again if needed.
"""

IMG2IMG_EXAMPLES = """examples:
  ldm img2img --init-img shape.png "large green circle on the left, blue background" --strength 0.6
  ldm img2img --ckpt v1-5-pruned-emaonly.safetensors --init-img photo.jpg "an oil painting" --W 512 --H 512

The init image is used at its own size rounded down to a multiple of 8 (cropping at most 7 px at the right and
bottom), unless --W/--H ask for another size, in which case it is resized with Lanczos.
"""


def add_generation_args(p: argparse.ArgumentParser, img2img: bool) -> None:
    S = argparse.SUPPRESS  # "not given": lets --from-png values show through
    p.add_argument("prompt_pos", nargs="?", metavar="PROMPT", default=S, help="the prompt (or use --prompt)")
    p.add_argument("--prompt", default=S, help="the prompt")
    p.add_argument("--negative-prompt", dest="negative_prompt", default=S, help="what to steer away from")
    p.add_argument("--from-file", dest="from_file", default=S, help="a text file with one prompt per line")
    p.add_argument("--ckpt", default=S, help=f"checkpoint (.safetensors or .ckpt); default: the bundled demo model "
                                             f"{DEMO_CHECKPOINT.name}")
    p.add_argument("--config", default=S, help="preset name or inference YAML (default: detected)")
    p.add_argument("--vae", default=S, help="a separate VAE file to use instead of the checkpoint's")
    p.add_argument("--steps", type=int, default=S, help=f"sampling steps (default {DEFAULT.steps})")
    p.add_argument("--sampler", default=S, help=f"{', '.join(NAMES)}, or an A1111 name such as "
                   f"'{infotext_name('dpmpp_2m', 'karras')}' (default {DEFAULT.sampler})")
    p.add_argument("--schedule", choices=["discrete", "karras", "exponential"], default=S,
                   help=f"sigma schedule (default {DEFAULT.schedule}; ddim/plms/ddpm use discrete)")
    p.add_argument("--scale", "--cfg", dest="scale", type=float, default=S,
                   help=f"classifier-free guidance scale (default {DEFAULT.guidance})")
    p.add_argument("--guidance-interval", dest="guidance_interval", nargs=2, metavar=("LO", "HI"), default=S,
                   help="guide only at noise levels LO < sigma <= HI (HI may be inf); '0 inf' guides every step. "
                        "Default: the model's own (the demo model: 1 inf; SD: every step)")
    p.add_argument("--eta", type=float, default=S,
                   help=f"noise scale of {', '.join(n for n in NAMES if n in ETA_SAMPLERS)}")
    p.add_argument("--seed", type=int, default=S, help="seed of the first image; image i uses seed + i (default random)")
    p.add_argument("--W", "--width", dest="width", type=int, default=S, help="width in pixels, a multiple of 8")
    p.add_argument("--H", "--height", dest="height", type=int, default=S, help="height in pixels, a multiple of 8")
    p.add_argument("--n-samples", "--n_samples", dest="n_samples", type=int, default=S, help="images per batch")
    p.add_argument("--n-iter", "--n_iter", dest="n_iter", type=int, default=S, help="number of batches")
    p.add_argument("--outdir", default=S, help=f"output folder (default outputs/{'img2img' if img2img else 'txt2img'})")
    p.add_argument("--grid", action="store_true", default=S, help="also save a grid of all images")
    p.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default=S,
                   help="auto: fp16 on CUDA, fp32 elsewhere; bf16 on CPU needs AVX-512 BF16 or AMX")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default=S, help="auto: cuda, mps or cpu")
    p.add_argument("--attention", choices=["sdpa", "xformers", "math"], default=S, help="attention backend")
    p.add_argument("--compile", action="store_true", default=S,
                   help="torch.compile the UNet (faster steps; the first step compiles, minutes on CPU)")
    p.add_argument("--upcast-attention", dest="upcast_attention", action="store_true", default=S,
                   help="compute attention in fp32 under fp16/bf16 (fixes black/NaN images of some SD2 models)")
    p.add_argument("--clip-skip", dest="clip_skip", type=int, default=S, help="use the CLIP layer this far from the end")
    p.add_argument("--from-png", dest="from_png", default=S, help="replay the parameters stored in a PNG written by ldm")
    p.add_argument("--quiet", action="store_true", default=S, help="no progress bar")
    p.add_argument("--vae-tiling", dest="vae_tiling", action="store_true", default=S,
                   help="run the VAE in tiles: large images in little memory, exact and without seams")
    p.add_argument("--vae-tile-size", dest="vae_tile_size", type=int, default=S, metavar="PX",
                   help=f"VAE tile side in pixels, a multiple of 8 (default {DEFAULT.vae_tile_size}); implies "
                        "--vae-tiling")
    p.add_argument("--vae-slicing", dest="vae_slicing", action="store_true", default=S,
                   help="decode the images of a batch one at a time (always done on CPU)")
    p.add_argument("--attention-slicing", dest="attention_slicing", nargs="?", const="auto", default=S,
                   metavar="N|auto", help="compute attention N query rows at a time; auto (the default when "
                   "given without a value) bounds each slice to 2**26 scores")
    p.add_argument("--lora", dest="loras", action="append", default=S, metavar="FILE[:WEIGHT]",
                   help="merge a LoRA for this run (kohya/A1111, LyCORIS LoHa or LoKr, or PEFT .safetensors), weight 1 "
                        "unless given; repeatable. The prompt's <lora:NAME:WEIGHT> tags name files in --lora-dir")
    p.add_argument("--lora-dir", dest="lora_dir", default=S, metavar="DIR",
                   help="the folder of LoRA files that <lora:NAME:WEIGHT> tags in the prompt name")
    p.add_argument("--embeddings-dir", dest="embeddings_dir", default=S, metavar="DIR",
                   help="a folder of textual inversion embeddings (.pt, .safetensors): a word of the prompt that "
                        "names one of its files stands for its vectors")
    p.add_argument("--refiner", default=S, metavar="FILE",
                   help="a refiner checkpoint (sd_xl_refiner_1.0.safetensors) that takes over for the last steps")
    p.add_argument("--refiner-switch", dest="refiner_switch", type=float, default=S, metavar="X",
                   help=f"the fraction of the schedule after which the refiner takes over, in (0, 1) (default "
                        f"{DEFAULT.refiner_switch})")
    if not img2img:
        p.add_argument("--hires-scale", dest="hires_scale", type=float, default=S, metavar="X",
                       help="hires fix: upscale the images by X and sample them again at that size (A1111)")
        p.add_argument("--hires-steps", dest="hires_steps", type=int, default=S,
                       help="steps of the hires pass's schedule (default: --steps)")
        p.add_argument("--hires-denoise", dest="hires_denoise", type=float, default=S,
                       help=f"strength of the hires pass, in (0, 1] (default {DEFAULT.hires_denoise})")
        p.add_argument("--hires-upscaler", dest="hires_upscaler", default=S,
                       help=f"how to upscale: {', '.join(repr(n) for n in HIRES_UPSCALERS)} "
                            f"(default {DEFAULT.hires_upscaler!r})")
    if img2img:
        p.add_argument("--mask", default=S, metavar="IMAGE",
                       help="inpaint: white repaints, black keeps (resized to the init image if needed)")
        p.add_argument("--mask-blur", dest="mask_blur", type=int, default=S, metavar="PX",
                       help=f"feather of the mask's edge in pixels (default {DEFAULT.mask_blur})")
        p.add_argument("--masked-content", dest="masked_content", choices=MASKED_CONTENT, default=S,
                       help=f"what the repainted area starts from (default {DEFAULT.masked_content})")
        p.add_argument("--mask-invert", dest="mask_invert", action="store_true", default=S,
                       help="repaint the black area instead")
        p.add_argument("--inpaint-area", dest="inpaint_area", choices=["whole", "masked"], default=S,
                       help="whole: the whole image; masked: only the mask's box, at the working size, pasted back")
        p.add_argument("--inpaint-padding", dest="inpaint_padding", type=int, default=S, metavar="PX",
                       help=f"pixels around the mask's box with --inpaint-area masked (default {DEFAULT.inpaint_padding})")
        p.add_argument("--outpaint", default=S, metavar="SIDE=PX,...",
                       help="extend the canvas and paint the new border, e.g. left=128,bottom=64 (multiples of 8)")
        p.add_argument("--init-img", dest="init_img", default=S, help="the image to start from")
        p.add_argument("--strength", type=float, default=S,
                       help=f"how much to change the image, in (0, 1]; 1 ignores it (default {DEFAULT.strength})")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `ldm` parser. Of the commands in MODULE_COMMANDS only `command`'s module is imported and adds its own
    arguments; the others appear in the help by name."""
    parser = argparse.ArgumentParser(
        prog="ldm", description="ldm: Stable Diffusion 1.x/2.x and SDXL from scratch.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n  txt2img, img2img   generate images (see `ldm txt2img --help`)\n"
               "  info               show what ldm detects in a checkpoint\n\n" + TXT2IMG_EXAMPLES)
    parser.add_argument("--version", action="version", version=f"ldm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, examples, img2img in (("txt2img", TXT2IMG_EXAMPLES, False), ("img2img", IMG2IMG_EXAMPLES, True)):
        p = sub.add_parser(name, help=f"generate images from {'an image and ' if img2img else ''}text",
                           epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter)
        add_generation_args(p, img2img)
        p.set_defaults(func=cmd_generate)
    info = sub.add_parser("info", help="show the architecture ldm detects in a checkpoint")
    info.add_argument("ckpt", help="a single-file .safetensors or .ckpt checkpoint")
    info.add_argument("--config", default=None, help="preset name or inference YAML (default: detect)")
    info.add_argument("--prediction", choices=["eps", "v"], default=None, help="override eps/v detection")
    info.set_defaults(func=cmd_info)
    for name, (module, summary) in MODULE_COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=summary)
            continue
        try:
            importlib.import_module(module).add_subcommand(sub)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    return parser


def command_of(argv: list[str]) -> str | None:
    """The command a command line asks for: its first word that is not an option (ldm's own options take no
    value)."""
    return next((a for a in argv if not a.startswith("-")), None)


# --- txt2img / img2img ---------------------------------------------------------------------------------------

def resolve_options(args: argparse.Namespace) -> dict[str, Any]:
    """The run a command line asks for: `request` (a Generation, without its prompt, which `prompts` hold) and the
    command line's own options. Command line > values stored in --from-png > defaults. Every user mistake is a
    UsageError here, before any work is done."""
    given = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    stored: dict[str, Any] = {}
    base = DEFAULT
    if "from_png" in given:
        from ldm.generation.images import read_png_params

        png = read_png_params(given["from_png"])
        made_by = png.get("mode", "txt2img")
        if made_by != args.command:
            raise UsageError(f"{given['from_png']} was made by {made_by}; replay it with `ldm {made_by} --from-png`")
        try:
            base = Generation.from_params(png)
        except RequestError as e:
            raise UsageError(f"{given['from_png']}: {e}") from None
        stored = {"ckpt": png.get("ckpt"), "vae": png.get("vae"), "config": png.get("config"),
                  "precision": png.get("precision"), "device": png.get("device_type"), "init_img": png.get("init_img"),
                  "mask": png.get("mask_img"),
                  "model_sha256_stored": png.get("model_sha256")}
    opts = {**CLI_DEFAULTS, **{k: v for k, v in stored.items() if v is not None}, **given}
    opts["img2img"] = args.command == "img2img"
    opts["prompts"] = _prompts(given, base.prompt if "from_png" in given else None)
    # the fields that need the init image are set with it, below
    opts["request"] = _request(base, {k: v for k, v in given.items() if k != "outpaint"})
    opts["ckpt"] = str(_checkpoint(opts.get("ckpt")))
    for key in ("vae", "config"):
        value = opts.get(key)
        if value and (str(value).endswith((".yaml", ".yml", ".safetensors", ".ckpt", ".pt")) or os.sep in str(value)) \
                and not Path(value).is_file():
            raise UsageError(f"--{key} file not found: {value}")
    if opts["img2img"]:
        if not opts.get("init_img"):
            raise UsageError("img2img needs --init-img IMAGE")
        from ldm.generation.images import load_image

        try:
            image = load_image(opts["init_img"])
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(str(e)) from None
        changes = {"init_image": image}
        if "outpaint" in given:
            changes["outpaint"] = parse_outpaint(given["outpaint"])
        if opts.get("mask"):
            try:
                changes["mask"] = load_image(opts["mask"])
            except (FileNotFoundError, ValueError) as e:
                raise UsageError(f"--mask: {e}") from None
        opts["request"] = _checked(lambda: opts["request"].replace(**changes))
    from ldm.generation.images import check_outdir

    try:
        opts["outdir"] = check_outdir(opts.get("outdir") or Path("outputs") / args.command)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return opts


def _prompts(given: dict[str, Any], stored: str | None) -> list[str]:
    """The prompts of the run: one per batch."""
    if "prompt_pos" in given and "prompt" in given:
        raise UsageError("give the prompt either as an argument or with --prompt, not both")
    prompt = given.get("prompt_pos", given.get("prompt", stored))
    if "from_file" not in given:
        if prompt is None:
            raise UsageError("no prompt: give one as an argument, with --prompt, --from-file or --from-png")
        return [prompt]
    if "prompt_pos" in given or "prompt" in given:
        raise UsageError("give either a prompt or --from-file, not both")
    path = Path(given["from_file"])
    if not path.is_file():
        raise UsageError(f"prompt file not found: {path}")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"prompt file {path} is empty: write one prompt per line")
    return prompts


def _request(base: Generation, given: dict[str, Any]) -> Generation:
    """`base` with the request fields given on the command line."""
    changes = {field: given[flag] for flag, field in REQUEST_FIELDS.items() if flag in given}
    if "attention_slicing" in changes:
        changes["attention_slicing"] = parse_attention_slicing(changes["attention_slicing"])
    if changes.get("vae_tile_size") is not None:
        changes["vae_tiling"] = True
    if "loras" in changes:
        changes["loras"] = tuple(parse_lora(text) for text in changes["loras"])
    if "guidance_interval" in changes:
        from ldm.config import check_interval

        try:
            changes["guidance_interval"] = check_interval(changes["guidance_interval"])
        except ValueError as e:
            raise UsageError(f"--guidance-interval: {e}; e.g. --guidance-interval 1 inf") from None
    request = _checked(lambda: base.replace(**changes))
    for name, _ in [*request.loras, *request.lora_tags]:  # the files exist, before the model is read
        _checked(lambda: lora_file(name, request.lora_dir, request.lora_hashes))  # noqa: B023 (called at once)
    return request


def parse_outpaint(text: str) -> tuple[int, int, int, int]:
    """--outpaint left=128,bottom=64 -> (left, top, right, bottom)."""
    sides = dict.fromkeys(("left", "top", "right", "bottom"), 0)
    for part in filter(None, text.split(",")):
        side, _, value = part.partition("=")
        if side.strip() not in sides or not value.strip().isdigit():
            raise UsageError(f"--outpaint {text}: write SIDE=PIXELS pairs, SIDE one of left, top, right, bottom, "
                             "e.g. --outpaint left=128,bottom=64")
        sides[side.strip()] = int(value)
    return tuple(sides.values())


def parse_lora(text: str) -> tuple[str, float]:
    """--lora FILE[:WEIGHT]."""
    path, _, weight = text.rpartition(":")
    if not path:
        return text, 1.0
    try:
        return path, float(weight)
    except ValueError:
        raise UsageError(f"--lora {text}: the weight after ':' must be a number, e.g. --lora {path}:0.8") from None


def _checked(make):
    """make(), a RequestError turned into a UsageError that names the flag instead of the field."""
    try:
        return make()
    except RequestError as e:
        raise UsageError(flag_message(e)) from None


def flag_message(e: RequestError) -> str:
    """A request error as the command line says it: the flag in place of the field that starts the message."""
    text = str(e)
    if text.startswith(e.field):
        text = FLAGS.get(e.field, "--" + e.field.replace("_", "-")) + text[len(e.field):]
    return text


def _checkpoint(ckpt: str | None) -> Path:
    path = Path(ckpt or DEMO_CHECKPOINT)
    if not path.is_file():
        hint = " (the bundled demo model is built by `make demo-model`)" if path == DEMO_CHECKPOINT else ""
        raise UsageError(f"checkpoint not found: {path}{hint}")
    return path


def parse_attention_slicing(value: str | None) -> int | str | None:
    """--attention-slicing: None (not given), "auto" or a positive number of query rows."""
    if value is None or value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"--attention-slicing takes a positive number of query rows or 'auto', got {value!r}")
    return int(value)


def choose_device(name: str) -> str:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available; use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("--device mps: MPS is not available on this machine; use --device cpu")
    return name


def choose_dtype(precision: str, device: str):
    import torch

    if precision == "auto":
        precision = "fp16" if device == "cuda" else "fp32"
    return precision, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def cmd_generate(args: argparse.Namespace) -> int:
    opts = resolve_options(args)
    import torch
    from tqdm import tqdm

    from ldm.generation.images import file_sha256, save_png
    from ldm.generation.pipeline import Denoising, NaNError, fuse_loras, random_seed
    from ldm.models.checkpoint import load

    device = choose_device(opts["device"])
    precision, dtype = choose_dtype(opts["precision"], device)
    from ldm.accel.cpu import emulated_bf16_reason

    reason = emulated_bf16_reason(dtype, device)
    if reason is not None:
        raise UsageError(f"--precision {precision}: {reason}; use --precision fp32")
    if opts["compile"] and device == "cpu" and not any(map(shutil.which, ("g++", "c++", "clang++"))):
        raise UsageError("--compile on CPU needs a C++ compiler (g++ or clang++) on PATH; install one or drop --compile")
    quiet = opts["quiet"]
    t0 = time.perf_counter()
    sd = load(opts["ckpt"], config=opts.get("config"), vae=opts.get("vae"), device=device, dtype=dtype)
    sd.source_sha256 = file_sha256(opts["ckpt"])
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ and \
            sum(p.numel() for p in sd.unet.parameters()) < SMALL_MODEL_PARAMS:
        # A small model's operations are too short to share between threads: on a busy machine OpenMP's
        # threads then wait on each other (measured: 0.36 s on one thread, 59 s on two beside another job).
        torch.set_num_threads(1)
    if opts["compile"]:
        from ldm.accel.optimize import compile_model

        compile_model(sd)
        if not quiet:
            print("compiling the UNet on its first step (once per image size)", file=sys.stderr)
    if "from_png" in opts and opts.get("model_sha256_stored") not in (None, sd.source_sha256):
        print("warning: the checkpoint differs from the one that made the PNG; the image will differ", file=sys.stderr)
    if not quiet:
        print(f"loaded {Path(opts['ckpt']).name} ({sd.config.name}, {sd.prediction}) on {device} {precision} "
              f"in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    request = opts["request"]
    seed = request.seed if request.seed is not None else random_seed()
    t0 = time.perf_counter()
    # this process ends with its batches: LoRAs they all name go into the weights in place, for good
    fused = _checked(lambda: fuse_loras(sd, [request.replace(prompt=prompt) for prompt in opts["prompts"]]))
    if fused and not quiet:
        print(f"merged {', '.join(f'{lora.name}:{weight:g}' for lora, weight in fused)} into the weights in "
              f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
    written: list[Path] = []
    all_images = []
    extra = {"ckpt": opts["ckpt"], "precision": precision, "device_type": device, "vae": opts.get("vae"),
             "config": opts.get("config")}
    if opts["img2img"]:
        extra.update(init_img=str(Path(opts["init_img"]).resolve()), init_img_sha256=file_sha256(opts["init_img"]))
        if opts.get("mask"):
            extra.update(mask_img=str(Path(opts["mask"]).resolve()), mask_img_sha256=file_sha256(opts["mask"]))
    total_batches = len(opts["prompts"]) * opts["n_iter"]
    batch = 0
    # an accelerated model packs its CPU weights in the first batch and keeps them for the next ones (`ldm.accel`)
    for prompt in opts["prompts"]:
        for _ in range(opts["n_iter"]):
            run = Denoising(sd, _checked(lambda: request.replace(prompt=prompt, seed=seed)))
            bar = None  # made at the first step, so that a request refused before sampling leaves no bar behind
            try:
                for step in run:
                    if bar is None:
                        bar = tqdm(total=step.total, desc=f"batch {batch + 1}/{total_batches}", unit="it",
                                   disable=quiet, file=sys.stderr, leave=False)
                    bar.update(step.i + 1 - bar.n)
            except NaNError as e:
                print(f"ldm {args.command}: error: {e}", file=sys.stderr)
                return 1
            except RequestError as e:
                raise UsageError(flag_message(e)) from None
            finally:
                if bar is not None:
                    bar.close()
            result = run.result
            for i, image in enumerate(result.images):
                path = save_png(image, opts["outdir"], str(result.seeds[i]), {**result.image_params(i), **extra})
                written.append(path)
                all_images.append(image)
                print(path)
            seed = (seed + request.batch_size) % 2 ** 32
            batch += 1
    if opts["grid"] and all_images:
        from ldm.generation.images import make_grid

        path = save_png(make_grid(all_images), opts["outdir"], "grid", {**result.image_params(0), **extra,
                                                                        "grid": [str(p) for p in written]})
        print(path)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ldm.models.checkpoint import load, stored_dtype

    # in the file's own dtype: its tensors stay mapped from the file, nothing is copied or converted
    sd = load(args.ckpt, config=args.config, prediction=args.prediction, dtype=stored_dtype(args.ckpt),
              accelerate=False, allow_emulated_bf16=True)
    cfg = sd.config
    kind = f" (SDXL {'refiner' if cfg.text_2 is None else 'base'})" if cfg.sdxl else ""
    print(f"architecture: {cfg.name}{kind}")
    print(f"prediction:   {cfg.prediction}")
    print(f"native size:  {cfg.image_size}x{cfg.image_size}")
    print(f"weights:      {str(sd.dtype).removeprefix('torch.')}")
    for text in cfg.text_encoders:
        print(f"text encoder: {text.kind}, {text.layers} layers, width {text.width}, layer {text.layer}")
    for name, m in (("unet", sd.unet), ("vae", sd.vae), ("text_encoder", sd.text_encoder)):
        print(f"{name + ':':13} {sum(p.numel() for p in m.parameters()) / 1e6:.1f} M parameters")
    return 0


def run_standalone(command: str, add_subcommand, argv: list[str] | None = None) -> int:
    """`python -m ldm.MODULE ARGS` for a subcommand module: the same parser and error handling as `ldm COMMAND`."""
    parser = argparse.ArgumentParser(prog=f"python -m ldm.{command.replace('-', '_')}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_subcommand(sub)
    args = parser.parse_args([command, *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (UsageError, ValueError, OSError) as e:
        print(f"ldm {command}: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(command_of(argv)).parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    try:
        with warnings.catch_warnings():
            # one line per warning (e.g. the fp16 VAE fallback), without the file, line and source of ldm's code
            warnings.showwarning = lambda message, *_, **__: print(f"ldm {args.command}: warning: {message}",
                                                                   file=sys.stderr)
            return args.func(args)
    except (UsageError, OSError, ValueError) as e:  # OSError: e.g. an unreadable file; CheckpointError is a ValueError
        print(f"ldm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ldm {args.command}: interrupted; files written so far are complete", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
