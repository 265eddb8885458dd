"""Measure a shapes model (not a test): generate, classify each image from its pixels, report accuracy.

    python tools/eval_shapes.py                                   # the demo model, at the defaults of `make run`
    python tools/eval_shapes.py --ckpt run/last.safetensors --n-seen 192 --grid outputs/shapes-eval.png
    python tools/eval_shapes.py --dataset                         # sanity check on rendered images: ~100%
    python tools/eval_shapes.py --roundtrip                       # the same images through the model's VAE

Prompts: every held-out caption of `ldm.data.shapes` (96) and a seeded sample of `--n-seen` train captions.
Image k (held-out first, then seen) uses seed `--seed + k`, so a run is reproducible and a prompt keeps its seed
whatever `--batch-size` is. Steps, sampler, guidance and its interval are passed only when given, so that the
pipeline's defaults and the model's guidance interval (the ones `make run` uses) apply otherwise. `--dataset` classifies rendered, jittered images of the same
prompts instead of model outputs, which checks the classifier rather than the model; `--roundtrip` classifies
those images encoded and decoded by the checkpoint's VAE (posterior mean): the best the UNet could do.

The goals of the issue: colour and background >= 95%, shape, size and position >= 90%, seen and held-out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ldm.data.shapes import ShapeSpec, render, sample_jitter
from ldm.demo import DEMO_CHECKPOINT  # the model `make run` uses
from ldm.demo.eval import Generate, eval_specs, evaluate, make_grid, report_table, score


def dataset_generator(image_size: int) -> Generate:
    """Renders each prompt with the jitter of its seed: what a perfect model would draw."""
    def generate(prompts: list[str], seeds: list[int]):
        return [render(ShapeSpec.parse(p), image_size, sample_jitter(np.random.default_rng(s)))
                for p, s in zip(prompts, seeds)]
    return generate


def roundtrip_generator(ckpt: str, device: str, image_size: int) -> Generate:
    """The rendered images of `dataset_generator`, encoded and decoded by the checkpoint's VAE (posterior mean)."""
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
        raise SystemExit(f"eval_shapes: ldm.generation.pipeline is not available ({e}); --dataset still works")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    sd = ldm.load(ckpt, device=device)

    def generate(prompts: list[str], seeds: list[int]):
        if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
            raise ValueError("txt2img gives image i the seed `seed + i`: the seeds of a batch must be consecutive")
        return txt2img(sd, prompts, seed=seeds[0], width=image_size, height=image_size, **options).images
    return generate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
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
    args = p.parse_args(argv)

    if args.dataset:
        generate = dataset_generator(args.size)
    elif not Path(args.ckpt).is_file():
        p.error(f"no checkpoint at {args.ckpt} (train one, give --ckpt, or use --dataset)")
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
        Path(args.json).write_text(json.dumps({"source": source, "args": vars(args), **scores}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
