"""Where the time of a whole CPU txt2img call goes: packing the weights, the first step, the later steps, the VAE
decode and restoring the weights, for several calls of one process (the bench's random-weight SD 1.5 file).

    python tools/call_phases.py --size 256 --calls 3            # a loaded (frozen) model: only call 0 packs
    python tools/call_phases.py --size 256 --calls 3 --trainable # weights packed and restored in every call

A measurement tool, not a test: it wraps ldm.accel.optimize's packing and restoring and ldm.generation.pipeline.decode with timers.
Run `python tools/bench.py load` once first: it writes the checkpoint to .bench_cache/.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / ".bench_cache" / "sd15-random-fp16.safetensors"
PROMPT = "a photograph of an astronaut riding a horse on the moon"


def timed(owner, name: str, totals: dict, key: str) -> None:
    """Replace owner.name by a wrapper that adds its wall time to totals[key]."""
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - t0
    setattr(owner, name, wrapper)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--trainable", action="store_true", help="parameters require grad: no packed weights kept")
    args = p.parse_args()
    if not CHECKPOINT.exists():
        p.error(f"{CHECKPOINT} is missing; run `python tools/bench.py load` once to write it")

    import torch

    import ldm
    from ldm.accel import optimize
    from ldm.generation import pipeline

    torch.set_num_threads(args.threads)
    sd = ldm.load(CHECKPOINT, dtype=torch.float32)
    if args.trainable:
        sd.requires_grad_(True)
    totals = dict.fromkeys(("pack", "restore", "decode"), 0.0)
    timed(optimize, "_packed", totals, "pack")  # the reorders into oneDNN's layout
    timed(optimize, "_unpack", totals, "restore")
    timed(pipeline, "decode", totals, "decode")
    noise = torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
    for call in range(args.calls):
        totals.update(dict.fromkeys(totals, 0.0))
        stamps = []
        t0 = time.perf_counter()
        pipeline.txt2img(sd, PROMPT, negative_prompt="", sampler="ddim", steps=args.steps, guidance=7.5,
                         width=args.size, height=args.size, latents=noise,
                         callback=lambda i, n, x: stamps.append(time.perf_counter()))
        total = time.perf_counter() - t0
        later = statistics.median(b - a for a, b in zip(stamps, stamps[1:])) if len(stamps) > 1 else float("nan")
        print(f"call {call}: {total:.2f} s; first step {stamps[0] - t0:.2f} s (packing in it {totals['pack']:.2f} s), "
              f"later steps {later:.3f} s (median), decode {totals['decode']:.2f} s, "
              f"restoring {totals['restore']:.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
