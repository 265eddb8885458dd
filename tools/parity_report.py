"""Parity report (not a test): `python tools/parity_report.py --presets tiny tiny-v2 sd-v1 sd-v2`.

For each preset, builds ldm's StableDiffusion with seeded weights, hands the same weights to diffusers'
UNet2DConditionModel and AutoencoderKL and transformers' CLIPTextModel through diffusers' own conversion
functions (strict loads), and prints a markdown table of the errors per component. It reuses ldm.testing.reference,
so the numbers are those the parity tests assert on (rel = max|ours - ref| / max|ref|, limit 1e-4 in fp32).
The full sizes need about 7 GB of memory and a minute or two each on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import gc
import platform
import sys
import time

import diffusers
import torch
import transformers

import ldm
from ldm.testing.reference import TOLERANCE, compare_all, probe_sizes, random_model


def report(presets: list[str], seed: int) -> tuple[str, bool]:
    rows = ["| preset | component | rel error | abs error | max abs ref | ok |", "|---|---|---|---|---|---|"]
    all_ok = True
    for name in presets:
        start = time.perf_counter()
        sd, checkpoint = random_model(ldm.preset(name), seed=seed)
        errors = compare_all(sd, checkpoint)
        del sd, checkpoint
        gc.collect()
        for e in errors:
            rows.append(f"| {name} | {e.component} | {e.rel:.2e} | {e.abs:.2e} | {e.scale:.2f} | "
                        f"{'yes' if e.ok else '**NO**'} |")
            all_ok &= e.ok
        latent, image = probe_sizes(ldm.preset(name))
        print(f"{name}: {time.perf_counter() - start:.0f} s (UNet latents 2x4x{latent}x{latent}, "
              f"VAE images 2x3x{image}x{image})", file=sys.stderr)
    return "\n".join(rows), all_ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "tiny-v2"], help="ldm preset names")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args()
    unknown = [p for p in args.presets if p not in ldm.PRESETS]
    if unknown:
        parser.error(f"unknown preset(s) {unknown}; choose from {sorted(ldm.PRESETS)}")
    table, ok = report(args.presets, args.seed)
    print(f"Parity, fp32 on CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}). "
          f"Tolerance: rel <= {TOLERANCE:.0e}.\n")
    print(table)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
