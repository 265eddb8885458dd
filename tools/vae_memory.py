"""Peak memory and time of a VAE decode, untiled vs tiled (`ldm.models.tiling`), with the full-size SD VAE.

    python tools/vae_memory.py                                  # 512 and 1024, untiled and tiled
    python tools/vae_memory.py --cases 2048:tiled --tile-size 512

Each case runs in a fresh subprocess (peak RSS is a per-process high-water mark): the SD 1.x VAE architecture
(`preset("sd-v1").vae`) with random weights, fp32 on the CPU, one image of random latents. Peak RSS is the
process's `ru_maxrss` after the decode, so it includes the interpreter, torch and the weights (`base`).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

DEFAULT_CASES = ["512:untiled", "512:tiled", "1024:untiled", "1024:tiled"]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kB on Linux


def run_case(size: int, mode: str, tile_size: int, threads: int) -> dict:
    import torch

    import ldm
    from ldm.models.vae import AutoencoderKL

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    vae = AutoencoderKL(ldm.preset("sd-v1").vae).eval()
    latents = torch.randn(1, 4, size // 8, size // 8)
    base = peak_rss_gb()
    start = time.perf_counter()
    with torch.no_grad():
        images = vae.decode(latents, tiled=mode == "tiled", tile_size=tile_size)
    seconds = time.perf_counter() - start
    assert images.shape == (1, 3, size, size) and torch.isfinite(images).all()
    return {"size": size, "mode": mode, "tile_size": tile_size if mode == "tiled" else None, "threads": threads,
            "seconds": round(seconds, 1), "peak_rss_gb": round(peak_rss_gb(), 2), "base_rss_gb": round(base, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="SIZE:MODE, MODE untiled or tiled")
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one case, in this process
    args = parser.parse_args()
    if args.child:
        size, mode = args.child.split(":")
        print(json.dumps(run_case(int(size), mode, args.tile_size, args.threads)))
        return
    print(f"{'size':>6} {'mode':>8} {'seconds':>8} {'peak RSS GB':>12} {'(base GB)':>10}")
    for case in args.cases:
        out = subprocess.run([sys.executable, __file__, "--child", case, "--tile-size", str(args.tile_size),
                              "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['size']:>6} {r['mode']:>8} {r['seconds']:>8} {r['peak_rss_gb']:>12} {r['base_rss_gb']:>10}",
              flush=True)


if __name__ == "__main__":
    main()
