"""`tools/bench.py train`: images/s and peak memory of training steps of the full SD 1.5 UNet (not a test).

One step is what `ldm train` does per micro-batch when training from a latents cache: per-sample noise and
timesteps, the UNet forward and backward through `ldm.training.train.diffusion_loss` (eps objective), gradient clipping and
an AdamW step (`ldm.training.train.make_optimizer`: fused on CUDA), on random weights (preset sd-v1, 860 M parameters)
with random latents and a random text context. The VAE and the text encoder do not run. Each configuration runs
in a fresh process (so that its peak RSS is its own): `--warmup` steps, then `--steps` timed steps. Peak memory
is the process's peak RSS (ru_maxrss) and, on CUDA, `torch.cuda.max_memory_allocated`.

    python tools/bench.py train                                     # CPU, and CUDA when available
    python tools/bench.py train --devices cuda --precisions fp32 bf16 --batch-sizes 1 8 --write
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench_report import GB, ROOT, hardware, publish  # the report helpers shared with tools/bench.py


def child_train(device: str, batch: int, resolution: int, precision: str, checkpointing: bool, steps: int,
                warmup: int) -> dict:
    import torch

    from ldm.config import preset
    from ldm.models.stable_diffusion import schedule_buffers
    from ldm.training.train import OptimConfig, diffusion_loss, draw_sample_noise, make_optimizer
    from ldm.models.unet import UNetModel

    dev = torch.device(device)
    cfg = preset("sd-v1")
    torch.manual_seed(0)
    unet = UNetModel(cfg.unet).to(dev).train()
    unet.gradient_checkpointing = checkpointing
    s = cfg.schedule
    buffers = {k: v.to(dev) for k, v in schedule_buffers(s.num_timesteps, s.beta_start, s.beta_end,
                                                         s.beta_schedule).items()}
    optimizer = make_optimizer([{"params": list(unet.parameters()), "lr": 1e-5}], OptimConfig(optimizer="adamw"), dev)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=precision == "fp16")
    h = resolution // 8
    x0 = torch.randn(batch, 4, h, h, device=dev)
    context = torch.randn(batch, 77, cfg.unet.context_dim, device=dev)

    def step(i: int) -> float:
        _, t, noise, _ = draw_sample_noise(torch.arange(batch) + i * batch, (4, h, h), s.num_timesteps, 0.0, 0.0)
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = diffusion_loss(unet, x0, noise.to(dev), t.to(dev), context, buffers["sqrt_alphas_cumprod"],
                                  buffers["sqrt_one_minus_alphas_cumprod"], "eps", None).mean()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # synchronises

    for i in range(warmup):
        step(i)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(warmup + i)
        times.append(time.perf_counter() - t0)
    out = {"step_s": sum(times) / len(times), "images_s": batch * len(times) / sum(times),
           "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "params": sum(p.numel() for p in unet.parameters()), "threads": torch.get_num_threads()}
    if dev.type == "cuda":
        out["peak_cuda"] = torch.cuda.max_memory_allocated(dev)
        out["gpu"] = torch.cuda.get_device_name(dev)
    return out


def measure(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[tuple[dict, dict]]) -> str:
    lines = ["| device | precision | grad. checkpointing | batch | s / step | images/s | peak RSS GB | peak CUDA GB |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for spec, r in rows:
        name = r.get("gpu", spec["device"]) if spec["device"] != "cpu" else f"cpu ({r.get('threads', '?')} threads)"
        if "error" in r:
            lines.append(f"| {name} | {spec['precision']} | {spec['checkpointing']} | {spec['batch']} | "
                         f"failed: {r['error'][:80]} | | | |")
            continue
        cuda = f"{r['peak_cuda'] / GB:.2f}" if "peak_cuda" in r else "-"
        lines.append(f"| {name} | {spec['precision']} | {'on' if spec['checkpointing'] else 'off'} | {spec['batch']} "
                     f"| {r['step_s']:.3f} | {r['images_s']:.2f} | {r['peak_rss'] / GB:.2f} | {cuda} |")
    return "\n".join(lines)


def bench_train(args: argparse.Namespace) -> int:
    import torch

    devices = [d for d in args.devices if d == "cpu" or torch.cuda.is_available()]
    rows = []
    for device in devices:
        precisions = [p for p in args.precisions if device != "cpu" or p != "fp16"]  # fp16 AMP is a GPU feature
        for precision in precisions:
            for checkpointing in args.checkpointing:
                for batch in args.batch_sizes:
                    spec = {"device": device, "batch": batch, "resolution": args.resolution, "precision": precision,
                            "checkpointing": checkpointing, "steps": args.steps, "warmup": args.warmup}
                    print(f"measuring {spec} ...", file=sys.stderr, flush=True)
                    rows.append((spec, measure(spec)))
    import torch as _torch

    report = (f"## Training step of the SD 1.5 UNet (`train`)\n\n"
              f"- hardware: {hardware()}\n- versions: torch {_torch.__version__}, Python {platform.python_version()}\n"
              f"- command: `python tools/bench.py train {' '.join(sys.argv[2:])}`\n"
              f"- one step: UNet forward + backward at {args.resolution} px ({args.resolution // 8}x"
              f"{args.resolution // 8} latents), eps loss, gradient clipping, AdamW (fp32 master weights and "
              f"states); random weights, latents and text context; no VAE or text encoder (as when training from a "
              f"latents cache); {args.warmup} warm-up step(s), then the mean of {args.steps}\n\n{table(rows)}\n")
    publish("train", report, args.write)
    return 0


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="images/s and peak memory of SD 1.5 UNet training steps")
    p.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="cpu and/or cuda (skipped without a GPU)")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "fp16"], default=["fp32", "bf16"])
    p.add_argument("--checkpointing", nargs="+", type=lambda s: s in ("1", "on", "true"), default=[False],
                   metavar="on|off", help="gradient checkpointing settings to measure")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    p.set_defaults(func=bench_train)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:  # internal: one measurement in a fresh process, result as JSON on stdout
        print(json.dumps(child_train(**json.loads(argv[1]))))
        return 0
    parser = argparse.ArgumentParser(prog="tools/bench_train.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_subcommand(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
