"""`ldm cache-latents`: encode a training set once with the VAE, so that training never runs the VAE again.

    ldm cache-latents configs/train/sd15-finetune.yaml --out data/latents [--text] [--device cuda]
    ldm train configs/train/sd15-finetune.yaml data.path=null data.cache=data/latents

The cache's layout, and the dataset that reads it in training, are in `ldm.data.cache`.

Images are centre- or randomly cropped once (with the run's seed), as the config says; flips are stored as a
second latent because a flipped latent is not the latent of the flipped image. `--text` stores the frozen text
encoder's output for each caption; the training run then skips the text encoder (unless it trains it, in which
case the captions in index.jsonl are used).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from torch import Tensor

from ldm.data.cache import CACHE_FORMAT, CACHE_VERSION, CachedLatents, module_fingerprint  # noqa: F401 (API)
from ldm.data.folder import ImageFolder, ShardSamples, collate, expand_shards

def _batches(cfg, batch_size: int):
    """Collated batches of the data set in a fixed order (epoch 0), with unreadable images counted."""
    data = dataclasses.replace(cfg.data, random_flip=False, shuffle_buffer=0)
    if data.shards:
        yield from ShardSamples(expand_shards(data.shards), data, cfg.seed, 0, 0, 1, batch_size, None)
        return
    ds = ImageFolder(data.path, data, cfg.seed)
    if ds.unreadable:
        yield {"skipped": [None] * ds.unreadable, "captions": []}
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(ds.sizes):
        by_size.setdefault(size, []).append(i)
    for size, idx in sorted(by_size.items()):
        for k in range(0, len(idx), batch_size):
            items = [ds[(0, i, size)] for i in idx[k:k + batch_size]]
            real = [it for it in items if "skipped" not in it]
            batch = collate(real) if real else {"captions": []}
            batch["skipped"] = [it["skipped"] for it in items if "skipped" in it]
            yield batch


@torch.no_grad()
def cache_latents(cfg, out: str | Path, *, text: bool = False, batch_size: int = 8, device: str = "cpu",
                  dtype: torch.dtype = torch.float32, shard_size: int = 1024, overwrite: bool = False) -> Path:
    """Encode the data set of training config `cfg` into the cache directory `out` (written atomically)."""
    from ldm.models.checkpoint import write_safetensors

    from ldm.training.train import build_model

    out = Path(out)
    if cfg.data.cache:
        raise ValueError("the config's data source is already a cache (data.cache); give data.path or data.shards")
    cfg.data.check()
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    torch.manual_seed(cfg.seed)  # a model built from a preset gets the same random VAE as `ldm train` builds
    sd = build_model(dataclasses.replace(cfg.model, reinit_unet=False))
    vae, te = sd.first_stage_model.to(device).eval(), sd.cond_stage_model.to(device).eval()
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows: dict[str, Tensor] = {}
    index, skipped, text_shape, shard, row = [], 0, None, 0, 0

    def flush() -> None:
        nonlocal rows, shard, row
        if rows:
            write_safetensors(rows, tmp / f"latents-{shard:05d}.safetensors")
            rows, shard, row = {}, shard + 1, 0

    for batch in _batches(cfg, batch_size):
        skipped += len(batch["skipped"])
        if not batch["captions"] or not (batch["weights"] > 0).any():
            continue
        pixels = batch["pixels"].to(device)
        variants = {"": vae.encode(pixels)}
        if cfg.data.random_flip:
            variants["_flip"] = vae.encode(pixels.flip(-1))
        emb = te(sd.tokenize(batch["captions"]).to(device), clip_skip=cfg.model.clip_skip) if text else None
        for j, caption in enumerate(batch["captions"]):
            for suffix, post in variants.items():
                rows[f"{row}.mean{suffix}"] = post.mean[j].to("cpu", dtype).contiguous()
                rows[f"{row}.std{suffix}"] = post.std[j].to("cpu", dtype).contiguous()
            if emb is not None:
                rows[f"{row}.text"] = emb[j].to("cpu", dtype).contiguous()
                text_shape = list(emb.shape[1:])
            h, w = variants[""].mean.shape[-2:]
            index.append({"shard": f"latents-{shard:05d}.safetensors", "row": row, "caption": caption,
                          "size": [int(w), int(h)], "id": str(batch["ids"][j])})
            row += 1
            if row == shard_size:
                flush()
    flush()
    if not index:
        shutil.rmtree(tmp)
        raise ValueError("no readable image in the data set: nothing to cache")
    (tmp / "index.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in index))
    meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "count": len(index), "skipped": skipped,
            "model": sd.config.name, "scale_factor": sd.scale_factor, "latent_channels": sd.config.vae.embed_dim,
            "vae_fingerprint": module_fingerprint(sd.first_stage_model), "resolution": cfg.data.resolution,
            "bucketing": cfg.data.bucketing, "center_crop": cfg.data.center_crop, "flip": cfg.data.random_flip,
            "text": text, "text_shape": text_shape, "clip_skip": cfg.model.clip_skip,
            "text_fingerprint": module_fingerprint(sd.cond_stage_model) if text else None, "dtype": str(dtype)}
    (tmp / "cache.json").write_text(json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def cmd_cache_latents(args: argparse.Namespace) -> int:
    from ldm.training.config import load_train_config

    cfg = load_train_config(args.config, list(args.overrides))
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    out = cache_latents(cfg, args.out, text=args.text, batch_size=args.batch_size, device=device, dtype=dtype,
                        shard_size=args.shard_size, overwrite=args.overwrite)
    meta = json.loads((out / "cache.json").read_text())
    print(f"cached {meta['count']} samples ({meta['skipped']} unreadable skipped) in {out}")
    return 0


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    from ldm.cli import MODULE_COMMANDS

    p = subparsers.add_parser("cache-latents", help=MODULE_COMMANDS["cache-latents"][1],
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="training YAML: its model and data sections say what to encode")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")
    p.add_argument("--out", required=True, help="cache directory to write")
    p.add_argument("--text", action="store_true", help="also store the frozen text encoder's caption embeddings")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="storage dtype")
    p.add_argument("--shard-size", type=int, default=1024, help="samples per safetensors shard")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_cache_latents)
    return p


def main(argv: list[str] | None = None) -> int:
    from ldm.cli import run_standalone

    return run_standalone("cache-latents", add_subcommand, argv)


if __name__ == "__main__":
    sys.exit(main())
