"""The `ldm` command line: txt2img, img2img, info (and train, cache-latents, export when available).

Every user mistake (a bad size, a missing file, an unknown sampler, ...) is caught before any work is done and
reported as one line on stderr with exit code 2; no output file is written. Flags follow the CompVis scripts
and AUTOMATIC1111 (`--W/--H`, `--n-samples`, `--n-iter`, `--scale`/`--cfg`, `--ckpt`, ...).
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from ldm import __version__
from ldm.demo import DEMO_CHECKPOINT
from ldm.sampling.names import ETA_SAMPLERS, NAMES, infotext_name, resolve_sampler

# Commands defined in modules of their own, imported only when one of them is asked for (they import torch and the
# training code): name -> (module, the line `ldm --help` shows).
MODULE_COMMANDS = {
    "train": ("ldm.training.train", "train or fine-tune a model (accelerate launch -m ldm.training.train for many GPUs)"),
    "cache-latents": ("ldm.training.latents_cache", "encode a training set once with the VAE (latents cache)"),
    "export": ("ldm.training.export", "write a training run's checkpoint as a single-file model"),
}

# Defaults of the generation flags. They are applied last, after the values stored in a --from-png image, so
# that flags given on the command line override the stored ones, and the stored ones override these.
GEN_DEFAULTS: dict[str, Any] = {
    "negative_prompt": "", "steps": 30, "sampler": "dpmpp_2m", "schedule": "karras", "scale": 7.5, "seed": None,
    "width": None, "height": None, "n_samples": 1, "n_iter": 1, "precision": "auto", "device": "auto",
    "attention": "sdpa", "clip_skip": 1, "eta": None, "strength": 0.75, "upcast_attention": False, "quiet": False,
    "grid": False, "compile": False, "vae_tiling": False, "vae_tile_size": None, "vae_slicing": None, "attention_slicing": None,
    "guidance_interval": None,  # None: the model's own (ldm.config.ModelConfig.guidance_interval)
}


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
    p.add_argument("--steps", type=int, default=S, help=f"sampling steps (default {GEN_DEFAULTS['steps']})")
    p.add_argument("--sampler", default=S, help=f"{', '.join(NAMES)}, or an A1111 name such as "
                   f"'{infotext_name('dpmpp_2m', 'karras')}' (default {GEN_DEFAULTS['sampler']})")
    p.add_argument("--schedule", choices=["discrete", "karras", "exponential"], default=S,
                   help="sigma schedule (default karras; ddim/plms/ddpm use discrete)")
    p.add_argument("--scale", "--cfg", dest="scale", type=float, default=S,
                   help=f"classifier-free guidance scale (default {GEN_DEFAULTS['scale']})")
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
                   help="VAE tile side in pixels, a multiple of 8 (default 512); implies --vae-tiling")
    p.add_argument("--vae-slicing", dest="vae_slicing", action="store_true", default=S,
                   help="decode the images of a batch one at a time (always done on CPU)")
    p.add_argument("--attention-slicing", dest="attention_slicing", nargs="?", const="auto", default=S,
                   metavar="N|auto", help="compute attention N query rows at a time; auto (the default when "
                   "given without a value) bounds each slice to 2**26 scores")
    if img2img:
        p.add_argument("--init-img", dest="init_img", default=S, help="the image to start from")
        p.add_argument("--strength", type=float, default=S,
                       help="how much to change the image, in (0, 1]; 1 ignores it (default 0.75)")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `ldm` parser. Of the commands in MODULE_COMMANDS only `command`'s module is imported and adds its own
    arguments; the others appear in the help by name."""
    parser = argparse.ArgumentParser(
        prog="ldm", description="ldm: Stable Diffusion 1.x/2.x from scratch.",
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
    """Command line > values stored in --from-png > defaults. Validates everything a user can get wrong."""
    given = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    stored: dict[str, Any] = {}
    if "from_png" in given:
        from ldm.generation.images import read_png_params

        png = read_png_params(given["from_png"])
        made_by = png.get("mode", "txt2img")
        if made_by != args.command:
            raise UsageError(f"{given['from_png']} was made by {made_by}; replay it with `ldm {made_by} --from-png`")
        stored = png_to_options(png)
    opts = {**GEN_DEFAULTS, **stored, **given}
    opts["img2img"] = args.command == "img2img"
    if "prompt_pos" in given and "prompt" in given:
        raise UsageError("give the prompt either as an argument or with --prompt, not both")
    prompt = given.get("prompt_pos", given.get("prompt", stored.get("prompt")))
    if "from_file" in given:
        if prompt is not None and ("prompt_pos" in given or "prompt" in given):
            raise UsageError("give either a prompt or --from-file, not both")
        path = Path(given["from_file"])
        if not path.is_file():
            raise UsageError(f"prompt file not found: {path}")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise UsageError(f"prompt file {path} is empty: write one prompt per line")
    elif prompt is None:
        raise UsageError("no prompt: give one as an argument, with --prompt, --from-file or --from-png")
    else:
        prompts = [prompt]
    opts["prompts"] = prompts
    check_numbers(opts)
    try:
        resolve_sampler(opts["sampler"])
    except ValueError as e:
        raise UsageError(str(e)) from None
    ckpt = Path(opts.get("ckpt") or DEMO_CHECKPOINT)
    if not ckpt.is_file():
        hint = " (the bundled demo model is built by `make demo-model`)" if ckpt == DEMO_CHECKPOINT else ""
        raise UsageError(f"checkpoint not found: {ckpt}{hint}")
    opts["ckpt"] = str(ckpt)
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
            opts["init_image"] = load_image(opts["init_img"])
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(str(e)) from None
    from ldm.generation.images import check_outdir

    try:
        opts["outdir"] = check_outdir(opts.get("outdir") or Path("outputs") / args.command)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return opts


def check_numbers(o: dict[str, Any]) -> None:
    for key in ("width", "height"):
        v = o.get(key)
        if v is not None and (v < 8 or v % 8):
            lo = max(8, v // 8 * 8)
            raise UsageError(f"--{key} {v} is not a multiple of 8; use {lo} or {lo + 8}")
    for key, low in (("steps", 1), ("n_samples", 1), ("n_iter", 1), ("clip_skip", 1)):
        if o[key] < low:
            raise UsageError(f"--{key.replace('_', '-')} must be at least {low}, got {o[key]}")
    for key in ("scale", "eta", "strength"):
        if o[key] is not None and not math.isfinite(o[key]):
            raise UsageError(f"--{key} must be a finite number, got {o[key]}")
    if o["scale"] < 0:
        raise UsageError(f"--scale must be >= 0, got {o['scale']}")
    if o["seed"] is not None and not 0 <= o["seed"] < 2 ** 32:
        raise UsageError(f"--seed must be in [0, 2**32), got {o['seed']}")
    if not 0.0 < o["strength"] <= 1.0:
        raise UsageError(f"--strength must be in (0, 1], got {o['strength']}")
    if o["eta"] is not None and o["eta"] < 0:
        raise UsageError(f"--eta must be >= 0, got {o['eta']}")
    tile = o["vae_tile_size"]
    if tile is not None and (tile < 8 or tile % 8):
        raise UsageError(f"--vae-tile-size must be a positive multiple of 8, got {tile}")
    o["attention_slicing"] = parse_attention_slicing(o["attention_slicing"])
    if o["guidance_interval"] is not None:
        from ldm.config import check_interval

        try:
            o["guidance_interval"] = check_interval(o["guidance_interval"])
        except ValueError as e:
            raise UsageError(f"--guidance-interval: {e}; e.g. --guidance-interval 1 inf") from None


def parse_attention_slicing(value: str | None) -> int | str | None:
    """--attention-slicing: None (not given), "auto" or a positive number of query rows."""
    if value is None or value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"--attention-slicing takes a positive number of query rows or 'auto', got {value!r}")
    return int(value)


def png_to_options(p: dict[str, Any]) -> dict[str, Any]:
    """Map the `ldm` PNG chunk back onto command-line options (one image: batch of 1, its own seed). The memory
    options (vae_tiling, vae_slicing, attention_slicing) are not replayed: they fit the run to the machine that
    made it and do not change the image beyond float rounding."""
    out = {"prompt": p.get("prompt"), "negative_prompt": p.get("negative_prompt", ""), "steps": p.get("steps"),
           "sampler": p.get("sampler"), "schedule": p.get("schedule"), "scale": p.get("guidance"),
           "guidance_interval": p.get("guidance_interval"),
           "seed": p.get("seed"), "width": p.get("width"), "height": p.get("height"), "eta": p.get("eta"),
           "clip_skip": p.get("clip_skip", 1), "precision": p.get("precision"), "device": p.get("device_type"),
           "attention": p.get("attention"), "upcast_attention": p.get("upcast_attention"),
           "ckpt": p.get("ckpt"), "vae": p.get("vae"), "config": p.get("config"),
           "strength": p.get("strength"), "init_img": p.get("init_img"), "n_samples": 1, "n_iter": 1,
           "model_sha256_stored": p.get("model_sha256")}
    if p.get("mode") == "img2img":  # the size the user asked for, not the init image's own (cropped) size
        out["width"], out["height"] = p.get("requested_width"), p.get("requested_height")
    return {k: v for k, v in out.items() if v is not None}


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

    from ldm.models import attention
    from ldm.models.checkpoint import load
    from ldm.generation.images import file_sha256, save_png
    from ldm.generation.pipeline import NaNError, img2img, random_seed, txt2img

    device = choose_device(opts["device"])
    precision, dtype = choose_dtype(opts["precision"], device)
    from ldm.accel.cpu import emulated_bf16_reason

    reason = emulated_bf16_reason(dtype, device)
    if reason is not None:
        raise UsageError(f"--precision {precision}: {reason}; use --precision fp32")
    try:
        attention.set_backend(opts["attention"], upcast=opts["upcast_attention"])
    except ValueError as e:
        raise UsageError(str(e)) from None
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
    seed = opts["seed"] if opts["seed"] is not None else random_seed()
    written: list[Path] = []
    all_images = []
    n = opts["n_samples"]
    common = dict(negative_prompt=opts["negative_prompt"], steps=opts["steps"], guidance=opts["scale"],
                  sampler=opts["sampler"], schedule=opts["schedule"], width=opts["width"], height=opts["height"],
                  batch_size=n, clip_skip=opts["clip_skip"], eta=opts["eta"],
                  guidance_interval=opts["guidance_interval"],
                  vae_tiling=opts["vae_tiling"] or opts["vae_tile_size"] is not None,
                  vae_slicing=opts["vae_slicing"], attention_slicing=opts["attention_slicing"])
    if opts["vae_tile_size"] is not None:
        common["vae_tile_size"] = opts["vae_tile_size"]
    extra = {"ckpt": opts["ckpt"], "precision": precision, "device_type": device, "attention": opts["attention"],
             "upcast_attention": opts["upcast_attention"], "vae": opts.get("vae"), "config": opts.get("config"),
             "requested_width": opts["width"], "requested_height": opts["height"]}
    total_batches = len(opts["prompts"]) * opts["n_iter"]
    batch = 0
    # the model is loaded frozen, so its CPU weights are packed by the first batch and kept for the next ones
    # (`ldm.accel.optimize.for_inference`)
    for prompt in opts["prompts"]:
        for _ in range(opts["n_iter"]):
            # made at the first step, so that a request refused before sampling leaves no bar behind its error
            bars: list = []

            def progress(step: int, total: int, latents, desc=f"batch {batch + 1}/{total_batches}") -> None:
                if not bars:
                    bars.append(tqdm(total=total, desc=desc, unit="it", disable=quiet, file=sys.stderr, leave=False))
                bars[0].update(step - bars[0].n)

            try:
                if opts["img2img"]:
                    result = img2img(sd, opts["init_image"], prompt, strength=opts["strength"], seed=seed,
                                     callback=progress, **common)
                    extra_img = {"init_img": str(Path(opts["init_img"]).resolve()),
                                 "init_img_sha256": file_sha256(opts["init_img"])}
                else:
                    result = txt2img(sd, prompt, seed=seed, callback=progress, **common)
                    extra_img = {}
            except NaNError as e:
                print(f"ldm {args.command}: error: {e}", file=sys.stderr)
                return 1
            finally:
                for bar in bars:
                    bar.close()
            for i, image in enumerate(result.images):
                params = {**result.image_params(i), **extra, **extra_img}
                path = save_png(image, opts["outdir"], str(result.seeds[i]), params)
                written.append(path)
                all_images.append(image)
                print(path)
            seed = (seed + n) % 2 ** 32
            batch += 1
    if opts["grid"] and all_images:
        from ldm.generation.images import make_grid

        path = save_png(make_grid(all_images), opts["outdir"], "grid", {**result.image_params(0), **extra,
                                                                        "grid": [str(p) for p in written]})
        print(path)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ldm.models.checkpoint import load

    sd = load(args.ckpt, config=args.config, prediction=args.prediction)
    cfg = sd.config
    print(f"architecture: {cfg.name}")
    print(f"prediction:   {cfg.prediction}")
    print(f"native size:  {cfg.image_size}x{cfg.image_size}")
    print(f"text encoder: {cfg.text.kind}, {cfg.text.layers} layers, width {cfg.text.width}, layer {cfg.text.layer}")
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
