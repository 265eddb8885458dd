"""The `ldm` command line. Usage errors exit with code 2 and a one-line message, never a traceback."""
from __future__ import annotations

import argparse
import sys

from . import __version__


class UsageError(Exception):
    """A user mistake: printed as one line, exit code 2."""


def cmd_info(args: argparse.Namespace) -> int:
    from .checkpoint import load

    sd = load(args.ckpt, config=args.config, prediction=args.prediction)
    cfg = sd.config
    n_params = {name: sum(p.numel() for p in m.parameters()) for name, m in
                (("unet", sd.unet), ("vae", sd.vae), ("text_encoder", sd.text_encoder))}
    print(f"architecture: {cfg.name}")
    print(f"prediction:   {cfg.prediction}")
    print(f"native size:  {cfg.image_size}x{cfg.image_size}")
    print(f"text encoder: {cfg.text.kind}, {cfg.text.layers} layers, width {cfg.text.width}, layer {cfg.text.layer}")
    for name, n in n_params.items():
        print(f"{name + ':':13} {n / 1e6:.1f} M parameters")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm", description="ldm: Stable Diffusion 1.x/2.x from scratch.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="examples:\n  ldm info v1-5-pruned-emaonly.safetensors")
    parser.add_argument("--version", action="version", version=f"ldm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="show the architecture ldm detects in a checkpoint")
    info.add_argument("ckpt", help="a single-file .safetensors or .ckpt checkpoint")
    info.add_argument("--config", default=None, help="preset name or inference YAML (default: detect)")
    info.add_argument("--prediction", choices=["eps", "v"], default=None, help="override eps/v detection")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (UsageError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"ldm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
