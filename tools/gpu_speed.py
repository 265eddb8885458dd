"""UNet it/s on CUDA, ldm against diffusers (not a test): `python tools/gpu_speed.py [--dtype fp16] [--compile]`.

SD 1.5-architecture UNets with random weights (speed does not depend on the values), 512x512 (64x64 latents),
batch 2 as with classifier-free guidance, t = 500. Each round times diffusers and ldm back to back, so a busy host
(these steps are bound by kernel launches, i.e. by the CPU) shows in both. `--channels-last` adds both UNets
with channels-last weights; `--compile` then compiles ldm's with `ldm.accel.optimize.compile_unet` (CUDA graphs) and
reports its warm-up and its error against eager.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from bench import SD15_DIFFUSERS_CONFIGS  # noqa: E402

from ldm.config import preset  # noqa: E402
from ldm.accel.optimize import compile_unet  # noqa: E402
from ldm.models.unet import UNetModel  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def its(fn, n: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40, help="steps per timing")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    from diffusers import UNet2DConditionModel

    dev, dtype = torch.device("cuda"), DTYPES[args.dtype]
    cfg = {k: v for k, v in SD15_DIFFUSERS_CONFIGS["unet/config.json"].items() if not k.startswith("_")}
    ref = UNet2DConditionModel(**cfg).to(dev, dtype).eval()
    unet = UNetModel(preset("sd-v1").unet).to(dev, dtype).eval()
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(2, 4, 64, 64, device=dev, dtype=dtype, generator=g)
    t = torch.tensor([500, 500], device=dev)
    c = torch.randn(2, 77, 768, device=dev, dtype=dtype, generator=g)
    runs = {"diffusers": lambda: ref(x, t, encoder_hidden_states=c, return_dict=False), "ldm": lambda: unet(x, t, c)}
    with torch.no_grad():
        eager = unet(x, t, c).float()
        if args.compile:
            compile_unet(unet)
            t0 = time.perf_counter()
            out = unet(x, t, c).float()
            torch.cuda.synchronize()
            err = ((out - eager).abs().max() / eager.abs().max()).item()
            print(f"ldm compiled: warm-up {time.perf_counter() - t0:.1f} s, rel err vs eager {err:.2e}")
        for r in range(args.rounds):
            line = {}
            for name, fn in runs.items():
                line[name] = its(fn, args.steps)
                if args.channels_last:
                    model = ref if name == "diffusers" else unet
                    model.to(memory_format=torch.channels_last)
                    line[f"{name} CL"] = its(fn, args.steps)
                    model.to(memory_format=torch.contiguous_format)
            cells = ", ".join(f"{k} {v:.1f}" for k, v in line.items())
            print(f"round {r} ({args.dtype}, it/s): {cells}; ldm / diffusers {line['ldm'] / line['diffusers']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
