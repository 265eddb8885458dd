"""GPU reports (not tests): ldm against diffusers on CUDA with the same random weights. Needs CUDA and diffusers.

    python tools/gpu.py check --presets sd-v1 sd-v2 --size 512             # parity (fp32/fp16/bf16) and UNet speed
    python tools/gpu.py speed [--dtype fp16] [--channels-last] [--compile] # SD 1.5 UNet it/s, back to back

`check` prints markdown tables for docs/benchmarks.md; `speed` prints one line per round.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

# --- check: parity and speed per preset ----------------------------------------------------------------------------

CHECK_DOC = """\
GPU report: ldm vs diffusers parity (fp32/fp16/bf16) and UNet speed on CUDA, same random weights
(ldm.testing.reference). Prints markdown tables for docs/benchmarks.md."""


def cuda_time(fn, warmup: int = 3, runs: int = 10) -> float:
    """Median seconds of `fn()` over `runs` after `warmup`, CUDA-synchronised."""
    import torch

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


def check_report(name: str, side: int, compile_: bool) -> None:
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    import ldm
    from ldm.testing import reference

    cfg = ldm.preset(name)
    sd, ckpt = reference.random_model(cfg)
    ref = reference.reference_unet(cfg, ckpt)
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


def cmd_check(args: argparse.Namespace) -> int:
    import torch

    import ldm
    from ldm.models import attention

    if not torch.cuda.is_available():
        sys.exit("gpu.py check needs a CUDA device")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"diffusers {__import__('diffusers').__version__}, ldm {ldm.__version__}")
    with torch.no_grad(), attention.options(backend="sdpa"):
        for name in args.presets:
            check_report(name, args.size, args.compile)
    return 0


# --- speed: SD 1.5 UNet it/s ---------------------------------------------------------------------------------------

SPEED_DOC = """\
UNet it/s on CUDA, ldm against diffusers. SD 1.5-architecture UNets with random weights (speed does not depend
on the values), 512x512 (64x64 latents), batch 2 as with classifier-free guidance, t = 500. Each round times
diffusers and ldm back to back, so a busy host (these steps are bound by kernel launches, i.e. by the CPU) shows
in both. `--channels-last` adds both UNets with channels-last weights; `--compile` then compiles ldm's with
`ldm.accel.optimize.compile_unet` (CUDA graphs) and reports its warm-up and its error against eager."""

DTYPES = ("fp16", "bf16", "fp32")


def its(fn, n: int) -> float:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def cmd_speed(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    from diffusers import UNet2DConditionModel

    from ldm.accel.optimize import compile_unet
    from ldm.config import preset
    from ldm.models.unet import UNetModel
    from ldm.testing.reference import SD15_DIFFUSERS_CONFIGS

    dev = torch.device("cuda")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
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


# --- command line ------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/gpu.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("check", help="parity (fp32/fp16/bf16) and UNet speed per preset, markdown",
                       description=CHECK_DOC, formatter_class=raw)
    p.add_argument("--presets", nargs="+", default=["sd-v1", "sd-v2"])
    p.add_argument("--size", type=int, default=512, help="image side in pixels for the speed table")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd ldm UNet")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("speed", help="SD 1.5 UNet it/s, ldm and diffusers back to back",
                       description=SPEED_DOC, formatter_class=raw)
    p.add_argument("--dtype", choices=DTYPES, default="fp16")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40, help="steps per timing")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.set_defaults(func=cmd_speed)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
