"""GPU report: ldm vs diffusers parity (fp32/fp16/bf16) and UNet speed on CUDA, same random weights.

    python tools/gpu_check.py --presets sd-v1 sd-v2 --size 64 --steps 20

Prints markdown tables for docs/benchmarks.md. Needs CUDA and diffusers (the reference).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import ldm
from ldm.models import attention
from ldm.testing import reference


def cuda_time(fn, warmup: int = 3, runs: int = 10) -> float:
    """Median seconds of `fn()` over `runs` after `warmup`, CUDA-synchronised."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def report(name: str, side: int, compile_: bool) -> None:
    cfg = ldm.preset(name)
    sd, ckpt = reference.random_model(cfg)
    ref = reference.reference_unet(cfg, ckpt)
    from diffusers.models.attention_processor import AttnProcessor2_0

    ref.set_attn_processor(AttnProcessor2_0())  # diffusers' default SDPA path
    x, t, ctx = reference.unet_inputs(cfg)
    x, t, ctx = x.cuda(), t.cuda(), ctx.cuda()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    ref.cuda()
    truth = ref(x, t, encoder_hidden_states=ctx).sample.float()
    unet = sd.unet.cuda()
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        ref.to(dtype)
        unet.to(dtype)
        theirs = ref(x.to(dtype), t, encoder_hidden_states=ctx.to(dtype)).sample.float()
        ours = unet(x.to(dtype), t, ctx.to(dtype)).float()
        rows.append((str(dtype).replace("torch.", ""), reference.error("ldm", ours, truth).rel,
                     reference.error("diffusers", theirs, truth).rel, reference.error("ldm-vs-diffusers", ours, theirs).rel))
    print(f"\n### {name}: UNet output error against diffusers fp32 on CUDA (TF32 off), latent {x.shape[-1]}x{x.shape[-1]}\n")
    print("| dtype | ldm rel err | diffusers rel err | ldm vs diffusers |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.2e} | {r[2]:.2e} | {r[3]:.2e} |")

    # speed: batch 2 (guidance), latent side/8, the default TF32 setting of each library left as PyTorch's
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    lat = side // 8
    g = torch.Generator().manual_seed(0)
    xb = torch.randn(2, 4, lat, lat, generator=g).cuda()
    cb = torch.randn(2, 77, cfg.unet.context_dim, generator=g).cuda()
    tb = torch.tensor([500, 500]).cuda()
    print(f"\n### {name}: UNet step, batch 2, {side}x{side} px, CUDA\n")
    print("| dtype | ldm it/s | diffusers it/s | ldm / diffusers |\n|---|---|---|---|")
    for dtype in (torch.float16, torch.bfloat16):
        unet.to(dtype)
        ref.to(dtype)
        xd, cd = xb.to(dtype), cb.to(dtype)
        ours = cuda_time(lambda: unet(xd, tb, cd))
        theirs = cuda_time(lambda: ref(xd, tb, encoder_hidden_states=cd))
        print(f"| {str(dtype).replace('torch.', '')} | {1 / ours:.2f} | {1 / theirs:.2f} | {theirs / ours:.2f}x |")
        if compile_:
            cu = torch.compile(unet)
            t_c = cuda_time(lambda: cu(xd, tb, cd), warmup=3)
            print(f"| {str(dtype).replace('torch.', '')} compiled | {1 / t_c:.2f} | | {theirs / t_c:.2f}x |")
    unet.cpu()
    ref.cpu()
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["sd-v1", "sd-v2"])
    ap.add_argument("--size", type=int, default=512, help="image side in pixels for the speed table")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd ldm UNet")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA device")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"diffusers {__import__('diffusers').__version__}, ldm {ldm.__version__}")
    attention.set_backend("sdpa")
    for name in args.presets:
        report(name, args.size, args.compile)


if __name__ == "__main__":
    main()
