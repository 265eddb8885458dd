"""Train the bundled demo model from scratch: `make demo-model` (= `python tools/train_demo.py`).

    python tools/train_demo.py                                    # the shipped checkpoint, ~55 min on 2 CPU cores
    python tools/train_demo.py --vae-steps 100 --out /tmp/demo.safetensors train.max_steps=50   # a smoke run
    python tools/train_demo.py --device cuda --run-dir /tmp/demo --out /tmp/demo.safetensors  # experiments on a GPU

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
differs from the CPU's in its bits. Progress goes to stdout, the UNet's loss to --run-dir/unet/metrics.jsonl.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from ldm.models.checkpoint import save
from ldm.config import preset
from ldm.data.shapes import ShapesDataset, all_specs, write_folder
from ldm.demo import DEMO_CHECKPOINT
from ldm.models.stable_diffusion import StableDiffusion
from ldm.training.vae import finetune_decoder, latent_scale, train_vae

ROOT = Path(__file__).resolve().parents[1]
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
    cfg = preset(PRESET)
    cfg = cfg.replace(vae=dataclasses.replace(cfg.vae, scale_factor=scale_factor))
    torch.manual_seed(seed)
    sd = StableDiffusion(cfg)
    sd.first_stage_model.load_state_dict(vae_state)
    return sd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override keys of the UNet training config")
    p.add_argument("--config", default=str(CONFIG), help="UNet training config (default: %(default)s)")
    p.add_argument("--run-dir", default="runs/demo-shapes", help="working directory (default: %(default)s)")
    p.add_argument("--out", default=str(OUT), help="the checkpoint to write (default: %(default)s)")
    p.add_argument("--vae-steps", type=int, default=VAE_STEPS)
    p.add_argument("--decoder-steps", type=int, default=DECODER_STEPS)
    p.add_argument("--images-per-caption", type=int, default=IMAGES_PER_CAPTION)
    p.add_argument("--device", default="cpu", help="cpu (the shipped file) or cuda (for experiments: same recipe, "
                   "not the same bits) (default: %(default)s)")
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # `ldm train` would take a GPU if there is one

    from ldm.training.export import export
    from ldm.training.latents_cache import cache_latents
    from ldm.training.train import load_train_config, train

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


if __name__ == "__main__":
    sys.exit(main())
