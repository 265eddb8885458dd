"""Benchmarks for ldm (not tests): `python tools/bench.py {load,txt2img,train,sdxl} ... [--write]`.

load    Time and peak memory of loading a full-size SD 1.5 single-file checkpoint with `ldm.load`, against
        diffusers' `StableDiffusionPipeline.from_single_file`. The checkpoint is random-weight, written once
        to `.bench_cache/` (git-ignored) in the layout of a real `v1-5-pruned-emaonly.safetensors`: fp16
        weights, fp32 schedule buffers, int64 position ids, no ldm metadata (so ldm detects the architecture).

txt2img ldm and diffusers side by side on that checkpoint: the same resolution, DDIM, step count, thread count,
        prompt and starting noise. One fresh process per (variant, size) loads the model, then times (median of
        `--runs` after `--warmup`) a text encode, one UNet step (batch 2, as with guidance), a VAE decode and a
        whole txt2img, and reports its peak RSS (CUDA: peak allocated memory). The parent compares the outputs:
        ldm against diffusers (parity) and each precision against fp32 (PSNR).

    python tools/bench.py txt2img --sizes 256 512 --steps 10 --runs 3 --warmup 1 --threads 2 --write
    python tools/bench.py txt2img --device cuda --sizes 512 --write

train   Images/s and peak memory of training steps of the full SD 1.5 UNet. One step is what `ldm train` does per
        micro-batch when training from a latents cache: per-sample noise and timesteps, the UNet forward and
        backward through `ldm.training.train.diffusion_loss` (eps objective), gradient clipping and an AdamW step
        (`ldm.training.train.make_optimizer`: fused on CUDA), on random weights (preset sd-v1, 860 M parameters)
        with random latents and a random text context. The VAE and the text encoder do not run. `--warmup` steps,
        then `--steps` timed steps. Peak memory is the process's peak RSS (ru_maxrss) and, on CUDA,
        `torch.cuda.max_memory_allocated`.

    python tools/bench.py train                                     # CPU, and CUDA when available
    python tools/bench.py train --devices cuda --precisions fp32 bf16 --batch-sizes 1 8 --write

sdxl    SDXL base against diffusers: load time of a 6.9 GB fp16 file, UNet step time and peak RSS at 1024 px, fp32
        and bf16 where the CPU has it (tools/bench_sdxl.py).

Every measurement runs in a fresh subprocess, so that its peak RSS (VmHWM) belongs to one loader alone.
With `--write` the results replace the matching section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from bench_report import (ERRORS, GB, PARITY_TOLERANCE, ROOT, TXT2IMG_TIMES, Pair, compare, hardware, load_average,
                          load_table, num, peak_memory, publish, versions)  # tools/bench_report.py
from bench_process import (cpu_s, median_of, median_time, peak_rss, positive, reset_peak_rss, rss_now,  # tools/
                           touch)

CACHE = ROOT / ".bench_cache"

# --- fixtures ----------------------------------------------------------------------------------------------------

def sd15_checkpoint(cache: Path = CACHE) -> Path:
    """A random-weight SD 1.5 single file (about 2.1 GB), built once."""
    path = cache / "sd15-random-fp16.safetensors"
    if path.exists():
        return path
    import torch
    from safetensors.torch import save_file

    import ldm
    from ldm.models.stable_diffusion import SCHEDULE_BUFFERS

    print(f"writing {path} (once) ...", file=sys.stderr)
    torch.manual_seed(0)
    model = ldm.StableDiffusion(ldm.preset("sd-v1"))
    state = {k: (v if k in SCHEDULE_BUFFERS or not v.is_floating_point() else v.half()).contiguous()
             for k, v in model.state_dict().items()}
    del model
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)
    return path


def diffusers_config_dir(cache: Path = CACHE) -> Path:
    """SD 1.5's diffusers-format configs as files, for `from_single_file`. ldm.testing.reference imports torch:
    imported here, not at the top, as the child processes load this file and measure the memory before loading."""
    from ldm.testing.reference import SD15_DIFFUSERS_CONFIGS

    root = cache / "sd15-diffusers-config"
    for name, content in SD15_DIFFUSERS_CONFIGS.items():
        f = root / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(content, indent=1))
    return root


def clip_tokenizer_dir(cache: Path = CACHE) -> Path:
    """vocab.json and merges.txt for transformers' CLIPTokenizer, made once from the BPE vocabulary that open_clip
    ships (`ldm.testing.reference.write_clip_tokenizer_files`): diffusers' pipeline needs a tokenizer, and the hub
    is out of reach."""
    root = cache / "clip-tokenizer"
    if (root / "merges.txt").exists():
        return root
    from ldm.testing.reference import write_clip_tokenizer_files

    return write_clip_tokenizer_files(root)


# --- one measurement, in a child process ---------------------------------------------------------------------------

# (file key -> the same weight in ldm's model and in diffusers' pipeline): a check that both loaded the file.
CHECKED_WEIGHTS = {
    "model.diffusion_model.input_blocks.0.0.weight": (
        lambda sd: sd.unet.input_blocks[0][0].weight, lambda pipe: pipe.unet.conv_in.weight),
    "first_stage_model.decoder.conv_out.weight": (
        lambda sd: sd.vae.decoder.conv_out.weight, lambda pipe: pipe.vae.decoder.conv_out.weight),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (
        lambda sd: sd.text_encoder.transformer.text_model.embeddings.token_embedding.weight,
        lambda pipe: pipe.text_encoder.get_input_embeddings().weight),
}


def child_load(loader: str, path: str, dtype_name: str, config_dir: str) -> dict:
    import torch
    from safetensors import safe_open

    dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    if loader == "ldm":
        import ldm
        import ldm.models.checkpoint  # noqa: F401 - its imports (transformers' CLIP) before the clock, as diffusers'

        before, c0 = rss_now(), cpu_s()
        t0 = time.perf_counter()
        sd = ldm.load(path, dtype=dtype)
        t1, c1 = time.perf_counter(), cpu_s()
        root, modules = sd, [sd]
    elif loader == "diffusers":
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import logging as dlogging

        dlogging.set_verbosity_error()
        dlogging.disable_progress_bar()
        before, c0 = rss_now(), cpu_s()
        t0 = time.perf_counter()
        pipe = StableDiffusionPipeline.from_single_file(
            path, config=config_dir, local_files_only=True, torch_dtype=dtype,
            tokenizer=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        t1, c1 = time.perf_counter(), cpu_s()
        root, modules = pipe, [pipe.unet, pipe.vae, pipe.text_encoder]
    else:
        raise ValueError(f"unknown loader {loader!r}")
    touch(modules)
    t2 = time.perf_counter()
    peak_touch = peak_rss()
    with safe_open(path, framework="pt") as f:  # after the measurement
        for key, getters in CHECKED_WEIGHTS.items():
            got = getters[loader == "diffusers"](root)
            if got.dtype != dtype or not torch.equal(got, f.get_tensor(key).to(dtype)):
                raise RuntimeError(f"{loader} did not load {key} as {dtype_name}")
    weights = sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())
    return {"load_s": t1 - t0, "cpu_s": c1 - c0, "load_touch_s": t2 - t0, "rss_before": before,
            "peak_touch": peak_touch, "weights": weights}


def measure_once(loader: str, path: Path, dtype: str, config_dir: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", loader, str(path), dtype, str(config_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{loader} {dtype} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- txt2img: one (variant, size) in a child process ---------------------------------------------------------------

PROMPT = "a photograph of an astronaut riding a horse on the moon"
GUIDANCE = 7.5
SEED = 0
TIMESTEP = 500  # of the timed UNet step
LATENT_FACTOR, LATENT_CHANNELS, CONTEXT = 8, 4, (77, 768)  # SD 1.5: f=8 VAE, 4 latent channels, CLIP ViT-L/14
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
OUTPUTS = ("text", "unet", "vae", "image")  # what each child saves, for the parent to compare


@dataclass(frozen=True)
class Variant:
    """One implementation in one precision. `optimize` names a function of `ldm.accel.optimize`, called on the loaded
    model as `fn(sd)` (a returned model, if any, replaces it); where ldm has no such function the variant is skipped
    with a note."""
    impl: str  # "ldm" or "diffusers"
    dtype: str  # a key of DTYPES
    optimize: str | None = None
    devices: tuple[str, ...] = ("cpu", "cuda")


VARIANTS = {
    "ldm": Variant("ldm", "fp32"),
    "ldm-bf16": Variant("ldm", "bf16"),
    "ldm-fp16": Variant("ldm", "fp16", devices=("cuda",)),
    "ldm-compile": Variant("ldm", "fp32", optimize="compile_model"),
    "diffusers": Variant("diffusers", "fp32"),
    "diffusers-bf16": Variant("diffusers", "bf16"),
    "diffusers-fp16": Variant("diffusers", "fp16", devices=("cuda",)),
}
BASELINES = {"ldm": "ldm", "diffusers": "diffusers"}  # each implementation's fp32 variant: the speed-up reference
DEFAULT_VARIANTS = {"cpu": ["ldm", "ldm-bf16", "ldm-compile", "diffusers", "diffusers-bf16"],
                    "cuda": ["ldm", "ldm-fp16", "ldm-bf16", "diffusers", "diffusers-fp16", "diffusers-bf16"]}


def skip_reason(name: str, device: str) -> str | None:
    """Why variant `name` cannot run here, or None."""
    v = VARIANTS[name]
    if device not in v.devices:
        return f"{name}: skipped, it runs on {' and '.join(v.devices)} only"
    if device == "cpu" and v.dtype == "bf16":
        import torch

        from ldm.accel.cpu import emulated_bf16_reason

        reason = emulated_bf16_reason(torch.bfloat16, "cpu")
        if reason is not None:  # ldm refuses it (`ldm.accel.cpu.check_precision`): nothing a user would run
            return f"{name}: skipped, {reason} (LDM_ALLOW_EMULATED_BF16=1 times it anyway)"
    if v.optimize is not None:
        try:
            module = importlib.import_module("ldm.accel.optimize")
        except ImportError:
            return f"{name}: skipped, ldm has no module ldm.accel.optimize"
        if not callable(getattr(module, v.optimize, None)):
            return f"{name}: skipped, ldm.accel.optimize has no function {v.optimize}()"
    return None


@dataclass
class Case:
    """What a child times, for one implementation. Inputs are in the model's dtype and on its device."""
    text: Callable[[], object]  # PROMPT -> (1, 77, 768): tokenizer and text encoder
    unet: Callable[[object, object, object], object]  # (x, t, context) -> ε, batch 2
    vae: Callable[[object], object]  # latents (unscaled) -> (1, 3, H, W) in [-1, 1]
    txt2img: Callable[[object], object]  # starting noise (1, 4, h, w) fp32 -> the pipeline's output
    image: Callable[[object], object]  # that output -> (H, W, 3) float in [0, 1], before rounding to 8 bits
    stepping: Callable[[object], AbstractContextManager] = lambda x: nullcontext()  # what the UNet step runs in


def _loader(variant: Variant, spec: dict, device, dtype) -> Callable[[], object]:
    """The timed part of loading, with what it needs prepared outside the measurement."""
    if variant.impl == "ldm":
        import ldm

        return lambda: ldm.load(spec["path"], dtype=dtype, device=device)
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as dlogging
    from transformers import CLIPTokenizer

    dlogging.set_verbosity_error()
    # The hub's SD 1.5 tokenizer, rebuilt offline (ldm builds its own lazily, on the first prompt).
    tokenizer = CLIPTokenizer.from_pretrained(spec["tokenizer_dir"], model_max_length=CONTEXT[0])
    # DDIM as the SD scripts configure it: scaled-linear betas, "leading" grid with offset 1, last step to ᾱ_0.
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, prediction_type="epsilon")

    def load():
        pipe = StableDiffusionPipeline.from_single_file(
            spec["path"], config=spec["config_dir"], local_files_only=True, torch_dtype=dtype, tokenizer=tokenizer,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)
    return load


def _ldm_case(sd, size: int, steps: int) -> Case:
    from ldm import accel
    from ldm.generation.pipeline import decode, txt2img

    def whole(noise):
        return txt2img(sd, PROMPT, negative_prompt="", sampler="ddim", steps=steps, guidance=GUIDANCE, width=size,
                       height=size, seed=SEED, latents=noise)

    def image(result):  # txt2img returns 8-bit images: decode its final latents again, as it did, in float
        return ((decode(sd, result.latents) + 1) / 2)[0].permute(1, 2, 0)

    def stepping(x):  # as ldm's sampling loop runs (ldm.generation.pipeline._denoise)
        return accel.sampling(sd.unet, x.shape[0], *x.shape[2:])

    def vae(z):  # as ldm.generation.pipeline.decode: the decoder's derived weights are made and released in each call
        images = sd.vae.decode(z)
        accel.release(sd.vae)
        return images

    return Case(text=lambda: sd.encode_prompt([PROMPT]), unet=lambda x, t, c: sd.unet(x, t, c),
                vae=vae, txt2img=whole, image=image, stepping=stepping)


def _diffusers_case(pipe, size: int, steps: int) -> Case:
    import torch

    def whole(noise):  # diffusers takes `latents` as given (no cast): hand them over in the pipeline's dtype
        return pipe(PROMPT, negative_prompt="", num_inference_steps=steps, guidance_scale=GUIDANCE, height=size,
                    width=size, latents=noise.to(pipe.device, pipe.unet.dtype), output_type="np").images

    return Case(text=lambda: pipe.encode_prompt(PROMPT, pipe.device, 1, False)[0],
                unet=lambda x, t, c: pipe.unet(x, t, encoder_hidden_states=c, return_dict=False)[0],
                vae=lambda z: pipe.vae.decode(z, return_dict=False)[0], txt2img=whole,
                image=lambda images: torch.from_numpy(images[0]))


def child_txt2img(spec: dict) -> dict:
    """Load one variant, time its parts and a whole txt2img, save their outputs to spec["out_dir"]."""
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    variant = VARIANTS[spec["variant"]]
    device, dtype = torch.device(spec["device"]), getattr(torch, DTYPES[variant.dtype])
    size, steps, warmup, runs = spec["size"], spec["steps"], spec["warmup"], spec["runs"]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    load = _loader(variant, spec, device, dtype)
    t0 = time.perf_counter()
    model = load()
    sync()
    t1 = time.perf_counter()
    if variant.optimize is not None:
        model = getattr(importlib.import_module("ldm.accel.optimize"), variant.optimize)(model) or model
    sync()
    t2 = time.perf_counter()
    peak_load = peak_rss()
    reset_peak_rss()
    case = (_ldm_case if variant.impl == "ldm" else _diffusers_case)(model, size, steps)

    # the same seeded inputs in every child
    g = torch.Generator().manual_seed(SEED)
    h = size // LATENT_FACTOR
    noise = torch.randn(1, LATENT_CHANNELS, h, h, generator=g)  # txt2img's starting noise (unit variance, fp32)
    x = torch.randn(2, LATENT_CHANNELS, h, h, generator=g).to(device, dtype)  # the UNet step: batch 2, as with CFG
    context = torch.randn(2, *CONTEXT, generator=g).to(device, dtype)
    t = torch.full((2,), TIMESTEP, device=device)
    z = torch.randn(1, LATENT_CHANNELS, h, h, generator=g).to(device, dtype)  # the VAE decode's latents
    timings, outputs, first_call = {}, {}, []
    # ldm's parts run on the model as `ldm.load` returns it: accelerated (`ldm.accel`), its weights packed by the
    # first txt2img on CPU
    def inference():
        return nullcontext()

    phase_peaks = {}  # the peak RSS of each phase (VmHWM, reset between them), to tell where the peak comes from

    def phase_end(name: str) -> None:
        phase_peaks[name] = peak_rss()
        reset_peak_rss()

    # each txt2img on its own, as a user's calls run, the first one of the process first: ldm packs the weights in
    # it (a loaded model keeps them packed for the next calls), and torch.compile compiles
    with torch.no_grad():
        timings["txt2img_s"], result = median_time(lambda: case.txt2img(noise), warmup, runs, sync, first_call)
    phase_end("txt2img")
    with torch.no_grad(), inference():
        outputs["image"] = case.image(result)  # decoded again as the call decoded it
        phase_end("image")
        timings["text_s"], outputs["text"] = median_time(case.text, warmup, runs, sync)
        phase_end("text")
        with case.stepping(x):  # ldm: as its sampling loop runs the UNet (ldm.accel.optimize.keep_freed_memory)
            timings["unet_s"], outputs["unet"] = median_time(lambda: case.unet(x, t, context), warmup, runs, sync)
        phase_end("unet")
        timings["vae_s"], outputs["vae"] = median_time(lambda: case.vae(z), warmup, runs, sync)
    phase_end("vae")
    for name in OUTPUTS:
        np.save(Path(spec["out_dir"]) / f"{spec['tag']}-{name}.npy", outputs[name].float().cpu().numpy())
    peak_run = max(phase_peaks.values())
    out = {"load_s": t1 - t0, "setup_s": t2 - t1, "first_txt2img_s": first_call[0], **timings,
           "peak_rss": max(peak_load, peak_run), "peak_rss_run": peak_run,
           "peak_phases": {"load": peak_load, **phase_peaks}, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["peak_cuda"] = torch.cuda.max_memory_allocated(device)
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def measure_txt2img(spec: dict) -> dict:
    """Run `child_txt2img(spec)` in a fresh process limited to spec["threads"] threads."""
    threads = str(spec["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child_txt2img", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{spec['variant']} at {spec['size']} px failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- train: UNet training steps, one configuration in a child process -----------------------------------------------

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
    buffers = {k: v.to(dev) for k, v in schedule_buffers(cfg.schedule).items()}
    optimizer = make_optimizer([{"params": list(unet.parameters()), "lr": 1e-5}], OptimConfig(optimizer="adamw"), dev)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=precision == "fp16")
    h = resolution // 8
    x0 = torch.randn(batch, 4, h, h, device=dev)
    context = torch.randn(batch, 77, cfg.unet.context_dim, device=dev)

    def step(i: int) -> float:
        _, t, noise, _ = draw_sample_noise(torch.arange(batch) + i * batch, (4, h, h), cfg.schedule.num_timesteps, 0.0, 0.0)
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


def measure_train(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child_train", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_table(rows: list[tuple[dict, dict]]) -> str:
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


def cmd_train(args: argparse.Namespace) -> int:
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
                    rows.append((spec, measure_train(spec)))
    import torch as _torch

    report = (f"## Training step of the SD 1.5 UNet (`train`)\n\n"
              f"- hardware: {hardware()}\n- versions: torch {_torch.__version__}, Python {platform.python_version()}\n"
              f"- command: `python tools/bench.py train {' '.join(sys.argv[2:])}`\n"
              f"- one step: UNet forward + backward at {args.resolution} px ({args.resolution // 8}x"
              f"{args.resolution // 8} latents), eps loss, gradient clipping, AdamW (fp32 master weights and "
              f"states); random weights, latents and text context; no VAE or text encoder (as when training from a "
              f"latents cache); {args.warmup} warm-up step(s), then the mean of {args.steps}\n\n{train_table(rows)}\n")
    publish("train", report, args.write)
    return 0


# --- reporting ---------------------------------------------------------------------------------------------------

def comparisons(names: list[str]) -> list[tuple[str, str]]:
    """Pairs to compare: each ldm variant with plain diffusers of the same dtype (parity and speed), then each
    variant with its implementation's fp32 baseline (what a precision or an optimization gains and costs)."""
    pairs = []
    for a in names:
        va = VARIANTS[a]
        match = [b for b in names if VARIANTS[b].impl == "diffusers" and VARIANTS[b].dtype == va.dtype
                 and VARIANTS[b].optimize is None]
        if va.impl == "ldm" and match:
            pairs.append((a, match[0]))
    pairs += [(a, BASELINES[VARIANTS[a].impl]) for a in names
              if a != BASELINES[VARIANTS[a].impl] and BASELINES[VARIANTS[a].impl] in names]
    return pairs


def txt2img_tables(results: dict[tuple[int, str], dict], pairs: list[Pair], cuda: bool) -> str:
    setup = any(VARIANTS[name].optimize for _, name in results)
    head = ["size", "variant", "dtype", "load s", *(["setup s"] if setup else []),
            *(f"{c} s" for c, _ in TXT2IMG_TIMES[1:]),
            *(["UNet it/s", "peak CUDA GB"] if cuda else []),
            "peak RSS GB", "after load GB"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    for (size, name), r in results.items():
        cells = [str(size), name, VARIANTS[name].dtype, num(r["load_s"]), *([num(r["setup_s"])] if setup else []),
                 *(num(r[key]) for _, key in TXT2IMG_TIMES[1:])]
        cells += [f"{1 / r['unet_s']:.2f}", f"{r['peak_cuda'] / GB:.2f}"] if cuda else []
        cells += [f"{r['peak_rss'] / GB:.2f}", f"{r['peak_rss_run'] / GB:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if not pairs:
        return "\n".join(lines)
    memory = "peak CUDA memory" if cuda else "peak RSS"
    lines += ["", "| size | a / b | " + " | ".join(c for c, _ in TXT2IMG_TIMES) + f" | {memory} |",
              "|---|---|" + "---:|" * (len(TXT2IMG_TIMES) + 1)]
    for p in pairs:
        cells = [f"{p.ratios[key]:.2f}" for _, key in TXT2IMG_TIMES] + [f"{p.ratios['memory']:.2f}"]
        lines.append(f"| {p.size} | {p.a} / {p.b} | " + " | ".join(cells) + " |")
    lines += ["", "| size | a vs b | " + " | ".join(c for _, c in ERRORS) + " | image max abs diff | image PSNR dB |",
              "|---|---|" + "---:|" * (len(ERRORS) + 2)]
    for p in pairs:
        cells = [f"{p.errors[key]:.1e}" for key, _ in ERRORS] + [f"{p.errors['pixel']:.1e}", f"{p.errors['psnr']:.1f}"]
        lines.append(f"| {p.size} | {p.a} vs {p.b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def txt2img_goals(pairs: list[Pair]) -> list[str]:
    """The issue's CPU goals, read off the comparisons."""
    def met(ok: bool) -> str:
        return "met" if ok else "**not met**"

    lines = []
    for p in pairs:
        va = VARIANTS[p.a]
        if va.dtype == "fp32" and p.b == "diffusers":
            t, m = p.ratios["txt2img_s"], p.ratios["memory"]
            worst, pixel = max(p.errors[key] for key, _ in ERRORS), p.errors["pixel"]
            lines.append(f"- {p.size} px, {p.a} fp32: txt2img in {t:.2f}x diffusers' time (goal <= 0.8x; the "
                         f"process's first call {p.ratios['first_txt2img_s']:.2f}x), peak RSS "
                         f"{m:.2f}x diffusers' (goal <= 1x): {met(t <= 0.8 and m <= 1.0)}; against diffusers, largest "
                         f"relative error of the text encoder, UNet and VAE {worst:.1e}, image max abs difference "
                         f"{pixel:.1e} (goal <= {PARITY_TOLERANCE:.0e}): "
                         f"{met(max(worst, pixel) <= PARITY_TOLERANCE)}")
        if va.impl == "ldm" and va.dtype == "bf16" and p.b == BASELINES["ldm"]:
            speedup, psnr = 1 / p.ratios["txt2img_s"], p.errors["psnr"]
            lines.append(f"- {p.size} px, {p.a}: txt2img {speedup:.2f}x as fast as ldm fp32 (goal >= 1.5x), image "
                         f"PSNR {psnr:.1f} dB against fp32 (goal >= 30 dB): {met(speedup >= 1.5 and psnr >= 30)}")
    return lines


# --- subcommands -------------------------------------------------------------------------------------------------

def cmd_load(args: argparse.Namespace) -> int:
    path = sd15_checkpoint()
    config_dir = diffusers_config_dir()
    size = path.stat().st_size
    load_before = load_average()
    cases = [(loader, dtype) for loader in args.loaders for dtype in args.dtypes]
    results: dict[tuple[str, str], list[dict]] = {case: [] for case in cases}
    for run in range(args.runs):  # interleaved, so that a busy spell on the machine hits every case alike
        for loader, dtype in cases:
            results[loader, dtype].append(measure_once(loader, path, dtype, config_dir))
            r = results[loader, dtype][-1]
            print(f"run {run + 1}/{args.runs} {loader:9} {dtype}: load {r['load_s']:.2f} s, "
                  f"peak RSS {r['peak_touch'] / GB:.2f} GB", file=sys.stderr)
    rows = [(loader, dtype, median_of(results[loader, dtype])) for loader, dtype in cases]
    table = load_table(rows)
    command = "python tools/bench.py load " + " ".join(sys.argv[2:])
    report = (f"### Results\n\n"
              f"- hardware: {hardware()}\n- versions: {versions()}\n- command: `{command.strip()}`\n"
              f"- checkpoint: random-weight SD 1.5, {size / GB:.2f} GB ({size} bytes) fp16 safetensors, no ldm "
              f"metadata; page cache warm\n- median of {args.runs} fresh processes per row, run interleaved; "
              f"load average (1/5/15 min) {load_before} before and {load_average()} after\n\n{table}\n")
    publish("load", report, args.write)
    return 0


def cmd_txt2img(args: argparse.Namespace) -> int:
    # A CUDA UNet step at 512 px takes tens of milliseconds, bound by kernel launches and noisy: more runs.
    cuda = args.device == "cuda"
    args.runs = args.runs or (10 if cuda else 3)
    args.warmup = (3 if cuda else 1) if args.warmup is None else args.warmup
    names = args.variants or DEFAULT_VARIANTS[args.device]
    skipped = {name: reason for name in names if (reason := skip_reason(name, args.device))}
    notes = list(skipped.values())
    names = [name for name in names if name not in skipped]
    for note in notes:
        print(note, file=sys.stderr)
    spec = {"path": str(sd15_checkpoint()), "config_dir": str(diffusers_config_dir()),
            "tokenizer_dir": str(clip_tokenizer_dir()), "device": args.device, "steps": args.steps,
            "warmup": args.warmup, "runs": args.runs, "threads": args.threads}
    load_before = load_average()
    rounds: dict[tuple[int, str], list[dict]] = {}
    failed: set[tuple[int, str]] = set()
    with tempfile.TemporaryDirectory(prefix="ldm-bench-txt2img-") as out_dir:
        # one variant at a time (each process holds the whole model); with --rounds, the variants in turn, so that
        # a machine whose speed drifts over minutes slows them alike
        for size in args.sizes:
            for _ in range(args.rounds):
                for name in names:
                    if (size, name) in failed:
                        continue
                    start = time.perf_counter()
                    try:
                        r = measure_txt2img({**spec, "variant": name, "size": size, "tag": f"{size}-{name}",
                                             "out_dir": out_dir})
                    except RuntimeError as e:  # report the others; a failed variant becomes a note
                        print(e, file=sys.stderr)
                        notes.append(f"{name} at {size} px failed: {str(e).strip().splitlines()[-1]}")
                        failed.add((size, name))
                        continue
                    rounds.setdefault((size, name), []).append(r)
                    print(f"{size} px {name:15} txt2img {r['txt2img_s']:.2f} s, UNet step {r['unet_s']:.3f} s, "
                          f"peak {peak_memory(r) / GB:.2f} GB ({time.perf_counter() - start:.0f} s); peaks by phase "
                          + ", ".join(f"{k} {v / GB:.2f}" for k, v in r.get("peak_phases", {}).items()),
                          file=sys.stderr)
        results = {key: _across_rounds(rs) for key, rs in rounds.items() if key not in failed}
        pairs = [compare(size, a, b, results, Path(out_dir)) for size in args.sizes
                 for a, b in comparisons(names) if (size, a) in results and (size, b) in results]
    if not results:
        print("no variant ran", file=sys.stderr)
        return 1
    gpu = next(iter(results.values())).get("gpu")
    command = "python tools/bench.py txt2img " + " ".join(sys.argv[2:])
    goals = [] if cuda else txt2img_goals(pairs)
    rounds_note = (f"; {args.rounds} rounds of fresh processes, the variants in turn: medians across rounds, peak "
                   "memory the largest" if args.rounds > 1 else "")
    report = (f"### Results ({'CUDA' if cuda else 'CPU'})\n\n"
              f"- hardware: {hardware()}{f', {gpu}' if gpu else ''}\n- versions: {versions()}\n"
              f"- command: `{command.strip()}`\n"
              f"- {args.device}, {args.threads} threads per process, DDIM {args.steps} steps, guidance {GUIDANCE}, "
              f"prompt \"{PROMPT}\", empty negative prompt, batch 1; times are medians of {args.runs} runs after "
              f"{args.warmup} warm-up runs (load: one per process){rounds_note}; load average (1/5/15 min) "
              f"{load_before} before and {load_average()} after\n"
              + "".join(f"- {note}\n" for note in notes)
              + f"\n{txt2img_tables(results, pairs, cuda)}\n" + ("\n" + "\n".join(goals) + "\n" if goals else ""))
    # one section per kind of CPU (PyTorch's capability: AVX2, AVX512, ...), so that machines do not overwrite each other
    from ldm.accel.cpu import cpu_features

    section = "txt2img-cuda" if cuda else f"txt2img-cpu-{cpu_features().capability.lower()}"
    publish(section, report, args.write)
    return 0


def _across_rounds(runs: list[dict]) -> dict:
    """One variant's figures over rounds: the median of each number, the largest peak memory."""
    out = dict(runs[0])
    for key, value in out.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in runs]
            out[key] = max(values) if key.startswith("peak") else statistics.median(values)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:  # internal: one measurement in a fresh process, result as JSON on stdout
        _, loader, path, dtype, config_dir = argv
        print(json.dumps(child_load(loader, path, dtype, config_dir)))
        return 0
    if argv[:1] == ["_child_txt2img"]:
        print(json.dumps(child_txt2img(json.loads(argv[1]))))
        return 0
    if argv[:1] == ["_child_train"]:
        print(json.dumps(child_train(**json.loads(argv[1]))))
        return 0
    parser = argparse.ArgumentParser(prog="tools/bench.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load", help="load time and peak RSS: ldm.load vs diffusers from_single_file")
    load.add_argument("--runs", type=int, default=3, help="fresh processes per measurement (median)")
    load.add_argument("--loaders", nargs="+", choices=["ldm", "diffusers"], default=["ldm", "diffusers"])
    load.add_argument("--dtypes", nargs="+", choices=["fp16", "fp32"], default=["fp16", "fp32"])
    load.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    load.set_defaults(func=cmd_load)
    t2i = sub.add_parser("txt2img", help="txt2img speed, peak memory and parity: ldm vs diffusers",
                         description="Variants: " + ", ".join(f"{k} ({v.impl} {v.dtype}"
                                                              f"{f', ldm.accel.optimize.{v.optimize}' if v.optimize else ''})"
                                                              for k, v in VARIANTS.items()))
    t2i.add_argument("--sizes", nargs="+", type=positive, default=[256, 512], help="image sides in pixels")
    t2i.add_argument("--steps", type=positive, default=10, help="DDIM steps of the whole txt2img")
    t2i.add_argument("--runs", type=positive, help="timed runs of each part (median); default 3, CUDA 10")
    t2i.add_argument("--warmup", type=int, help="untimed runs of each part first; default 1, CUDA 3")
    t2i.add_argument("--threads", type=positive, default=2, help="torch threads in every process")
    t2i.add_argument("--rounds", type=positive, default=1,
                     help="fresh processes per variant, the variants in turn (medians across rounds)")
    t2i.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    t2i.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                     help=f"default: {' '.join(DEFAULT_VARIANTS['cpu'])} (CPU), {' '.join(DEFAULT_VARIANTS['cuda'])} "
                          "(CUDA)")
    t2i.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    t2i.set_defaults(func=cmd_txt2img)
    p = sub.add_parser("train", help="images/s and peak memory of SD 1.5 UNet training steps")
    p.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="cpu and/or cuda (skipped without a GPU)")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "fp16"], default=["fp32", "bf16"])
    p.add_argument("--checkpointing", nargs="+", type=lambda s: s in ("1", "on", "true"), default=[False],
                   metavar="on|off", help="gradient checkpointing settings to measure")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    p.set_defaults(func=cmd_train)
    from bench_sdxl import add_parser as add_sdxl  # tools/bench_sdxl.py; imported here, as it imports this file

    add_sdxl(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
