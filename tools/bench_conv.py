"""Where Winograd's 3x3 convolution (`ldm.accel.winograd`) pays on this CPU: one convolution at a time, oneDNN's direct
convolution from a prepacked weight (what `ldm.accel.optimize.packed_weights` runs otherwise) against
`winograd_conv3x3` from a cached transformed weight, fp32, channels-last input. Prints a markdown table (the one
behind `ldm.accel.optimize.WINOGRAD_*`, docs/benchmarks.md, "Winograd convolutions and split wide convolutions").

    python tools/bench_conv.py                      # SD 1.5's shapes at 256 and 512 px
    python tools/bench_conv.py --shapes 2x640x640x32 1x512x512x128 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ldm.accel.winograd import winograd_conv3x3, winograd_weight

# batch x in channels x out channels x size: the UNet's levels with guidance (batch 2) and the VAE decoder's (1)
SHAPES = ["2x320x320x64", "2x320x320x32", "2x960x320x32", "2x640x640x32", "2x1920x640x32", "2x640x640x48",
          "2x1280x1280x16", "2x2560x1280x16", "2x1280x1280x8", "1x512x512x32", "1x512x512x128", "1x128x128x512"]


def median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="NxINxOUTxSIZE")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    conv_args = [1, 1], [1, 1], [1, 1], 1  # padding, stride, dilation, groups
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.runs} calls after one\n")
    print("| conv (in -> out @ size) | n | direct ms | Winograd ms | ratio | max rel err direct / Winograd |")
    print("|---|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for shape in args.shapes:
        n, c, o, size = (int(v) for v in shape.split("x"))
        x = torch.randn(n, c, size, size, generator=g).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(o, c, 3, 3, generator=g) / (3 * c ** 0.5), torch.randn(o, generator=g)
        with torch.inference_mode():
            packed = torch.ops.mkldnn._reorder_convolution_weight(w, *conv_args, list(x.shape))
            u = winograd_weight(w)

            def direct():
                return torch.ops.mkldnn._convolution_pointwise(x, packed, b, *conv_args, "none", [], "")

            def winograd():
                return winograd_conv3x3(x, u, b)

            ref = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding=1)
            err = [((f().double() - ref).abs().max() / ref.abs().max()).item() for f in (direct, winograd)]
            td, tw = median_ms(direct, args.runs), median_ms(winograd, args.runs)
        print(f"| {c} -> {o} @ {size} | {n} | {td:.1f} | {tw:.1f} | {tw / td:.2f} | {err[0]:.1e} / {err[1]:.1e} |",
              flush=True)


if __name__ == "__main__":
    main()
