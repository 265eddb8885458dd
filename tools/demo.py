"""The demo model and its data set (not tests): render the shapes data, train the bundled model, measure a model.

    python tools/demo.py make-shapes --out data/shapes --n 20000   # the procedural shapes data set as an image folder
    python tools/demo.py train                                     # retrain ldm/demo/ldm-demo-shapes.safetensors
    python tools/demo.py eval                                      # generate, classify each image, report accuracy

`make demo-model` runs `tools/demo.py train`. `--help` after a subcommand gives its options and examples.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from ldm.demo import DEMO_CHECKPOINT  # the model `make run` uses and `train` writes

if TYPE_CHECKING:
    from ldm.demo.eval import Generate
    from ldm.models.stable_diffusion import StableDiffusion

ROOT = Path(__file__).resolve().parents[1]

# --- make-shapes -------------------------------------------------------------------------------------------------

MAKE_SHAPES_DOC = """\
Write the procedural shapes data set as an image folder: 000000.png + 000000.txt pairs and metadata.jsonl.

    python tools/demo.py make-shapes --out data/shapes --n 20000                  # the train split
    python tools/demo.py make-shapes --out data/shapes-heldout --split heldout    # each held-out caption once

The images are deterministic from --seed (see ldm/data/shapes.py). A folder that holds anything is refused
unless --force, which replaces the files this tool writes and keeps any others."""


def cmd_make_shapes(args: argparse.Namespace) -> int:
    from ldm.data.shapes import ShapesDataset, all_specs, split, write_folder

    if args.n is not None and args.n < 1:
        args.parser.error(f"--n must be >= 1, got {args.n}")
    try:
        n = write_folder(args.out, args.split, args.n, args.seed, jitter=args.jitter, overwrite=args.force)
    except FileExistsError as e:
        print(f"demo.py make-shapes: error: {e} (--force replaces it)", file=sys.stderr)
        return 2

    data = ShapesDataset(args.split, args.n, args.seed, jitter=False)
    specs = [data.specs[i % len(data.specs)] for i in range(n)]
    splits = Counter(split(s) for s in specs)
    print(f"wrote {n} images to {args.out} (split {args.split}, seed {args.seed}, "
          f"jitter {'on' if args.jitter else 'off'})")
    print(f"  {len(set(specs))} distinct captions of the {len(all_specs(args.split))} in the split; "
          + ", ".join(f"{k} {v}" for k, v in sorted(splits.items())))
    return 0


# --- train -------------------------------------------------------------------------------------------------------

TRAIN_DOC = """\
Train the bundled demo model from scratch: `make demo-model` (= `python tools/demo.py train`).

    python tools/demo.py train                                    # the shipped checkpoint, ~55 min on 2 CPU cores
    python tools/demo.py train --vae-steps 100 --out /tmp/demo.safetensors train.max_steps=50   # a smoke run
    python tools/demo.py train --device cuda --run-dir /tmp/demo --out /tmp/demo.safetensors  # experiments on a GPU

The recipe, every stage seeded, each one's output in --run-dir (default runs/demo-shapes):

1. images/   the train split of `ldm.data.shapes` (held-out triples excluded), IMAGES_PER_CAPTION jittered
             renders of each of its 912 captions, as a folder that `ldm train` and `ldm cache-latents` read.
2. VAE       `ldm.training.vae` (L1 + MSE + KL) on freshly rendered train-split images, then its latent scale
             factor, 1 / std of the latents, as SD measured 0.18215; then `finetune_decoder` (encoder frozen,
             edge-weighted L1), which sharpens small triangles' apexes without moving the latent space.
3. base.safetensors   the `demo-shapes` preset with that scale factor: the trained VAE, the text encoder at
             its seeded random init (kept frozen: see below) and a seeded fresh UNet, in the single-file layout.
4. latents/  `ldm cache-latents --text`: VAE posteriors and the frozen text embeddings of every image, so the
             UNet stage runs the UNet alone.
5. unet/     `ldm train configs/train/demo-shapes.yaml`, the same loop as any fine-tune.
6. --out     `ldm export --ema`, written atomically (default ldm/demo/ldm-demo-shapes.safetensors).

The text encoder stays frozen at its seeded init. The captions are a closed 27-word grammar; a random CLIP
transformer still gives each (word, position) a distinct embedding, and the UNet's cross-attention learns to read
them. Training the encoder too would cost its backward pass (77 tokens x 2 layers per sample) and rule out
caching the embeddings, for no vocabulary that needs learning.

Reproducible: the same command on the same machine and software gives the same file (fixed seeds, fixed thread
count, single process, CPU). `--device cuda` runs the same recipe on a GPU, for experiments; that file
differs from the CPU's in its bits. Progress goes to stdout, the UNet's loss to --run-dir/unet/metrics.jsonl."""

CONFIG = ROOT / "configs" / "train" / "demo-shapes.yaml"
OUT = DEMO_CHECKPOINT
PRESET = "demo-shapes"
SEED = 0
THREADS = 2                 # fixed, so that float reductions (and the file) are the same on every run
IMAGES_PER_CAPTION = 5      # 912 train captions x 5 jittered renders = 4560 cached latents
VAE_STEPS = 3000
VAE_BATCH = 16
VAE_LR = 2e-3
VAE_DATA_SEED = 1           # its renders differ from the cached ones (seed 0): the VAE is not fitted to them
DECODER_STEPS = 2400        # decoder fine-tuning: with the encoder frozen, so the latents are those of the VAE
DECODER_LR = 5e-4
DECODER_DATA_SEED = 2
SCALE_IMAGES = 512          # images the latent scale is measured on


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_base(scale_factor: float, vae_state: dict, seed: int) -> StableDiffusion:
    """The preset with the measured scale factor; seeded UNet and text encoder, the trained VAE."""
    import torch

    from ldm.config import preset
    from ldm.models.stable_diffusion import StableDiffusion

    cfg = preset(PRESET)
    cfg = cfg.replace(vae=dataclasses.replace(cfg.vae, scale_factor=scale_factor))
    torch.manual_seed(seed)
    sd = StableDiffusion(cfg)
    sd.first_stage_model.load_state_dict(vae_state)
    return sd


def cmd_train(args: argparse.Namespace) -> int:
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # `ldm train` would take a GPU if there is one

    import torch

    from ldm.config import preset
    from ldm.data.shapes import ShapesDataset, all_specs, write_folder
    from ldm.models.checkpoint import save
    from ldm.training.export import export
    from ldm.training.latents_cache import cache_latents
    from ldm.training.train import load_train_config, train
    from ldm.training.vae import finetune_decoder, latent_scale, train_vae

    torch.set_num_threads(THREADS)
    torch.set_flush_denormal(True)  # tiny Adam moments turn denormal and make every op several times slower
    run = Path(args.run_dir)
    base, images, latents, unet_dir = run / "base.safetensors", run / "images", run / "latents", run / "unet"
    overrides = [f"run_dir={unet_dir}", f"model.checkpoint={base}", f"data.cache={latents}", *args.overrides]
    cfg = load_train_config(args.config, overrides)
    times: dict[str, float] = {}
    start = t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        times[name] = round(now - t, 1)
        t = now
        log(f"{name}: {times[name]:.0f} s")

    n_images = args.images_per_caption * len(all_specs("train"))
    log(f"1/6 rendering {n_images} training images into {images}")
    write_folder(images, "train", n=n_images, seed=cfg.seed, overwrite=True)
    lap("images")

    log(f"2/6 training the VAE: {args.vae_steps} steps of {VAE_BATCH}")
    vae_data = ShapesDataset("train", n=max(args.vae_steps * VAE_BATCH, SCALE_IMAGES), seed=VAE_DATA_SEED)

    def vae_images(indices) -> torch.Tensor:
        return torch.stack([vae_data[i]["image"] for i in indices])

    def vae_log(m: dict) -> None:
        if m["step"] % 250 == 0 or m["step"] == args.vae_steps - 1:
            log(f"   vae step {m['step']}: reconstruction loss {m['rec']:.4f} ({m['elapsed_s']:.0f} s)")

    vae = train_vae(preset(PRESET).vae, vae_images, steps=args.vae_steps, batch_size=VAE_BATCH, lr=VAE_LR,
                    seed=cfg.seed, log=vae_log, progress=False, device=args.device)
    scale = float(f"{latent_scale(vae, vae_images(range(SCALE_IMAGES))):.5g}")
    if args.decoder_steps:
        log(f"   fine-tuning the decoder: {args.decoder_steps} steps of {VAE_BATCH}")
        decoder_data = ShapesDataset("train", n=args.decoder_steps * VAE_BATCH, seed=DECODER_DATA_SEED)

        def decoder_log(m: dict) -> None:
            if m["step"] % 400 == 0 or m["step"] == args.decoder_steps - 1:
                log(f"   decoder step {m['step']}: L1 {m['l1']:.4f} ({m['elapsed_s']:.0f} s)")

        vae = finetune_decoder(vae, lambda idx: torch.stack([decoder_data[i]["image"] for i in idx]),
                               steps=args.decoder_steps, batch_size=VAE_BATCH, lr=DECODER_LR, seed=cfg.seed,
                               log=decoder_log)
    lap("vae")

    log(f"3/6 base checkpoint {base} (latent scale factor {scale})")
    save(build_base(scale, vae.cpu().state_dict(), cfg.seed), base, overwrite=True,
         metadata={"ldm_demo_stage": "base: trained VAE, seeded text encoder and UNet"})
    lap("base")

    log(f"4/6 caching latents and text embeddings in {latents}")
    cache_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(images), cache=None))
    cache_latents(cache_cfg, latents, text=True, batch_size=64, device=args.device, overwrite=True)
    lap("cache")

    log(f"5/6 training the UNet: {cfg.train.max_steps} steps of {cfg.train.batch_size} (loss: {unet_dir}/metrics.jsonl)")
    shutil.rmtree(unet_dir, ignore_errors=True)  # a fresh run, never a resumed one
    train(cfg)
    lap("unet")

    log(f"6/6 exporting the EMA weights to {args.out}")
    out = export(unet_dir, args.out, ema=True, overwrite=True)
    lap("export")
    total = time.perf_counter() - start
    (run / "timing.json").write_text(json.dumps({**times, "total": round(total, 1)}, indent=1) + "\n")
    log(f"done in {total / 60:.1f} min: {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


# --- eval --------------------------------------------------------------------------------------------------------

EVAL_DOC = """\
Measure a shapes model (not a test): generate, classify each image from its pixels, report accuracy.

    python tools/demo.py eval                                   # the demo model, at the defaults of `make run`
    python tools/demo.py eval --ckpt run/last.safetensors --n-seen 192 --grid outputs/shapes-eval.png
    python tools/demo.py eval --dataset                         # sanity check on rendered images: ~100%
    python tools/demo.py eval --roundtrip                       # the same images through the model's VAE

Prompts: every held-out caption of `ldm.data.shapes` (96) and a seeded sample of `--n-seen` train captions.
Image k (held-out first, then seen) uses seed `--seed + k`, so a run is reproducible and a prompt keeps its seed
whatever `--batch-size` is. Steps, sampler, guidance and its interval are passed only when given, so that the
pipeline's defaults and the model's guidance interval (the ones `make run` uses) apply otherwise. `--dataset` classifies rendered, jittered images of the same
prompts instead of model outputs, which checks the classifier rather than the model; `--roundtrip` classifies
those images encoded and decoded by the checkpoint's VAE (posterior mean): the best the UNet could do.

The goals of the issue: colour and background >= 95%, shape, size and position >= 90%, seen and held-out."""


def dataset_generator(image_size: int) -> Generate:
    """Renders each prompt with the jitter of its seed: what a perfect model would draw."""
    import numpy as np

    from ldm.data.shapes import ShapeSpec, render, sample_jitter

    def generate(prompts: list[str], seeds: list[int]):
        return [render(ShapeSpec.parse(p), image_size, sample_jitter(np.random.default_rng(s)))
                for p, s in zip(prompts, seeds)]
    return generate


def roundtrip_generator(ckpt: str, device: str, image_size: int) -> Generate:
    """The rendered images of `dataset_generator`, encoded and decoded by the checkpoint's VAE (posterior mean)."""
    import numpy as np
    import torch
    from PIL import Image

    import ldm
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    vae = ldm.load(ckpt, device=device).first_stage_model
    render_images = dataset_generator(image_size)

    @torch.no_grad()
    def generate(prompts: list[str], seeds: list[int]):
        images = render_images(prompts, seeds)
        x = torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images])
        x = x.to(device, next(vae.parameters()).dtype) / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
        y = ((vae.decode(vae.encode(x).mean).float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return [Image.fromarray(im.permute(1, 2, 0).cpu().numpy()) for im in y]
    return generate


def model_generator(ckpt: str, device: str, image_size: int, **options) -> Generate:
    """`ldm.generation.pipeline.txt2img` on the checkpoint; `options` (steps, sampler, guidance) override its defaults."""
    import torch

    import ldm
    try:
        from ldm.generation.pipeline import txt2img
    except ImportError as e:
        raise SystemExit(f"demo.py eval: ldm.generation.pipeline is not available ({e}); --dataset still works")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    sd = ldm.load(ckpt, device=device)

    def generate(prompts: list[str], seeds: list[int]):
        if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
            raise ValueError("txt2img gives image i the seed `seed + i`: the seeds of a batch must be consecutive")
        return txt2img(sd, prompts, seed=seeds[0], width=image_size, height=image_size, **options).images
    return generate


def cmd_eval(args: argparse.Namespace) -> int:
    from ldm.demo.eval import eval_specs, evaluate, make_grid, report_table, score

    if args.dataset:
        generate = dataset_generator(args.size)
    elif not Path(args.ckpt).is_file():
        args.parser.error(f"no checkpoint at {args.ckpt} (train one, give --ckpt, or use --dataset)")
    elif args.roundtrip:
        generate = roundtrip_generator(args.ckpt, args.device, args.size)
    else:
        options = {k: v for k, v in (("steps", args.steps), ("sampler", args.sampler), ("guidance", args.scale),
                                     ("guidance_interval", args.guidance_interval)) if v is not None}
        generate = model_generator(args.ckpt, args.device, args.size, **options)
    seen, heldout = eval_specs(args.n_seen, args.seed)
    specs = heldout + seen
    records = evaluate(generate, specs, [args.seed + k for k in range(len(specs))], args.batch_size)
    scores = {"seen": score(records[len(heldout):]), "heldout": score(records[:len(heldout)])}

    source = ("rendered dataset images" if args.dataset else
              f"rendered dataset images through the VAE of {args.ckpt}" if args.roundtrip else args.ckpt)
    print(f"shapes evaluation of {source}: {len(heldout)} held-out and {len(seen)} seen prompts, seed {args.seed}\n")
    print(report_table(scores["seen"], scores["heldout"]))
    if args.grid:
        make_grid(records).save(args.grid)
        print(f"\ngrid: {args.grid}")
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("command", "func", "parser")}
        Path(args.json).write_text(json.dumps({"source": source, "args": settings, **scores}, indent=2) + "\n")
    return 0


# --- command line ------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/demo.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("make-shapes", help="write the shapes data set as an image folder",
                       description=MAKE_SHAPES_DOC, formatter_class=raw)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=None, help="number of images (default: each caption of the split once)")
    p.add_argument("--seed", type=int, default=0, help="seed of the caption order and the per-image jitter")
    p.add_argument("--split", choices=["train", "heldout", "all"], default="train")
    p.add_argument("--no-jitter", dest="jitter", action="store_false", help="exact positions and sizes")
    p.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    p.set_defaults(func=cmd_make_shapes, parser=p)

    p = sub.add_parser("train", help="train the bundled demo model from scratch (make demo-model)",
                       description=TRAIN_DOC, formatter_class=raw)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override keys of the UNet training config")
    p.add_argument("--config", default=str(CONFIG), help="UNet training config (default: %(default)s)")
    p.add_argument("--run-dir", default="runs/demo-shapes", help="working directory (default: %(default)s)")
    p.add_argument("--out", default=str(OUT), help="the checkpoint to write (default: %(default)s)")
    p.add_argument("--vae-steps", type=int, default=VAE_STEPS)
    p.add_argument("--decoder-steps", type=int, default=DECODER_STEPS)
    p.add_argument("--images-per-caption", type=int, default=IMAGES_PER_CAPTION)
    p.add_argument("--device", default="cpu", help="cpu (the shipped file) or cuda (for experiments: same recipe, "
                   "not the same bits) (default: %(default)s)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="generate, classify each image from its pixels, report accuracy",
                       description=EVAL_DOC, formatter_class=raw)
    p.add_argument("--ckpt", default=str(DEMO_CHECKPOINT), help="checkpoint to evaluate (default: the demo model)")
    p.add_argument("--dataset", action="store_true", help="classify rendered images instead of a model's")
    p.add_argument("--roundtrip", action="store_true",
                   help="classify rendered images encoded and decoded by the checkpoint's VAE")
    p.add_argument("--n-seen", type=int, default=96, help="train captions to sample (default 96)")
    p.add_argument("--seed", type=int, default=0, help="picks the seen captions; image k uses seed + k")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the pipeline's)")
    p.add_argument("--sampler", default=None, help="sampler name (default: the pipeline's)")
    p.add_argument("--scale", type=float, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument("--guidance-interval", nargs=2, type=float, default=None, metavar=("LO", "HI"),
                   help="guide only at LO < sigma <= HI; '0 inf' every step (default: the model's own)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    p.add_argument("--grid", default=None, help="save a labelled grid of every image to this PNG")
    p.add_argument("--json", default=None, help="save the scores to this JSON file")
    p.set_defaults(func=cmd_eval, parser=p)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
