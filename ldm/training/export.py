"""`ldm export RUN_DIR [--ema]`: a training run's checkpoint as one single-file model in the original SD layout.

    ldm export runs/tiny-shapes --ema                 # -> runs/tiny-shapes/export/step-N-ema.safetensors
    ldm txt2img runs/tiny-shapes/export/step-N-ema.safetensors "a red circle"

The file holds the trained UNet (the EMA average with --ema, else the raw weights), the trained or frozen text
encoder and the frozen VAE (from the run's frozen.safetensors), with the model config in its metadata, so
`ldm.load` reads it like any other checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ldm.config import ModelConfig
from ldm.training.train import UNET_PREFIX, find_checkpoint


def model_config_of(run_dir: Path) -> ModelConfig:
    """The model config that `ldm train` stored in the run's frozen.safetensors."""
    from safetensors import safe_open

    from ldm.models.checkpoint import METADATA_CONFIG_KEY

    with safe_open(str(run_dir / "frozen.safetensors"), "pt") as f:
        return ModelConfig.from_dict(json.loads(f.metadata()[METADATA_CONFIG_KEY]))


def export(run_dir: str | Path, out: str | Path | None = None, *, ema: bool = False, checkpoint: str = "latest",
           dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    from safetensors.torch import load_file

    from ldm.models.checkpoint import build_and_adopt, save

    run_dir = Path(run_dir)
    if not (run_dir / "frozen.safetensors").exists():
        raise FileNotFoundError(f"{run_dir} is not an ldm training run (it has no frozen.safetensors)")
    ckpt = find_checkpoint(run_dir, checkpoint)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint yet")
    tensors = load_file(str(run_dir / "frozen.safetensors"))
    tensors.update(load_file(str(ckpt / "weights.safetensors")))
    if ema:
        if not (ckpt / "ema.safetensors").exists():
            raise ValueError(f"{ckpt} has no EMA weights (the run had ema.enabled=false); export without --ema")
        averaged = load_file(str(ckpt / "ema.safetensors"))
        tensors.update({k: v for k, v in averaged.items() if k.startswith(UNET_PREFIX)})
    out = Path(out) if out else run_dir / "export" / f"{ckpt.name}{'-ema' if ema else ''}.safetensors"
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    sd = build_and_adopt(model_config_of(run_dir), tensors, source=str(ckpt))
    return save(sd, out, dtype=dtype, overwrite=True,
                metadata={"ldm_train_run": str(run_dir), "ldm_train_checkpoint": ckpt.name,
                          "ldm_unet_weights": "ema" if ema else "raw"})


def cmd_export(args: argparse.Namespace) -> int:
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, None: None}[args.dtype]
    path = export(args.run_dir, args.out, ema=args.ema, checkpoint=args.checkpoint, dtype=dtype,
                  overwrite=args.overwrite)
    print(path)
    return 0


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    from ldm.cli import MODULE_COMMANDS

    p = subparsers.add_parser("export", help=MODULE_COMMANDS["export"][1],
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the training run directory (run_dir of the training config)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights of the UNet (default: the raw weights)")
    p.add_argument("--checkpoint", default="latest", metavar="latest|step-N|DIR", help="which checkpoint")
    p.add_argument("--out", default=None, help="output .safetensors (default: RUN_DIR/export/step-N[-ema].safetensors)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="cast the weights (default: fp32)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    from ldm.cli import run_standalone

    return run_standalone("export", add_subcommand, argv)


if __name__ == "__main__":
    sys.exit(main())
