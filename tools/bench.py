"""Benchmarks for ldm (not tests): `python tools/bench.py load [--runs 3] [--write]`.

load    Time and peak memory of loading a full-size SD 1.5 single-file checkpoint with `ldm.load`, against
        diffusers' `StableDiffusionPipeline.from_single_file`. The checkpoint is random-weight, written once
        to `.bench_cache/` (git-ignored) in the layout of a real `v1-5-pruned-emaonly.safetensors`: fp16
        weights, fp32 schedule buffers, int64 position ids, no ldm metadata (so ldm detects the architecture).

Every measurement runs in a fresh subprocess, so that its peak RSS (`ru_maxrss`) belongs to one loader alone.
With `--write` the results replace the matching section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".bench_cache"
DOCS = ROOT / "docs" / "benchmarks.md"
GB = 1e9

# The diffusers-format configs of the SD 1.5 repository (runwayml / stable-diffusion-v1-5), written locally so
# that diffusers needs no hub access. The tokenizer, safety checker and feature extractor are not loaded (they
# hold no weights of the single file; ldm builds its tokenizer lazily), so both loaders build the same three
# networks from the same file.
SD15_DIFFUSERS_CONFIGS = {
    "model_index.json": {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
        "feature_extractor": [None, None], "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": [None, None], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "requires_safety_checker": False,
    },
    "scheduler/scheduler_config.json": {
        "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "clip_sample": False,
    },
    "unet/config.json": {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    },
    "vae/config.json": {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
        "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "scaling_factor": 0.18215,
    },
    "text_encoder/config.json": {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "quick_gelu",
        "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
        "max_position_embeddings": 77, "projection_dim": 768, "vocab_size": 49408, "layer_norm_eps": 1e-05,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    },
}


# --- fixtures ----------------------------------------------------------------------------------------------------

def sd15_checkpoint(cache: Path = CACHE) -> Path:
    """A random-weight SD 1.5 single file (about 2.1 GB), built once."""
    path = cache / "sd15-random-fp16.safetensors"
    if path.exists():
        return path
    import torch
    from safetensors.torch import save_file

    import ldm
    from ldm.model import SCHEDULE_BUFFERS

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
    root = cache / "sd15-diffusers-config"
    for name, content in SD15_DIFFUSERS_CONFIGS.items():
        f = root / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(content, indent=1))
    return root


# --- one measurement, in a child process ---------------------------------------------------------------------------

def _rss_now() -> int:
    """Resident set size of this process in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process: less sensitive than wall time to a busy machine."""
    return sum(os.times()[:2])


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _touch(modules) -> None:
    """Read one byte of every 4 KiB page of every weight, so that lazily mapped weights are paged in as a first
    forward pass would page them in (a full reduction would mostly time the arithmetic)."""
    import torch

    for module in modules:
        for t in module.state_dict().values():
            if t.numel():
                t.detach().contiguous().reshape(-1).view(torch.uint8)[::4096].sum()


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

        before, c0 = _rss_now(), _cpu_s()
        t0 = time.perf_counter()
        sd = ldm.load(path, dtype=dtype)
        t1, c1 = time.perf_counter(), _cpu_s()
        root, modules = sd, [sd]
    elif loader == "diffusers":
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import logging as dlogging

        dlogging.set_verbosity_error()
        dlogging.disable_progress_bar()
        before, c0 = _rss_now(), _cpu_s()
        t0 = time.perf_counter()
        pipe = StableDiffusionPipeline.from_single_file(
            path, config=config_dir, local_files_only=True, torch_dtype=dtype,
            tokenizer=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        t1, c1 = time.perf_counter(), _cpu_s()
        root, modules = pipe, [pipe.unet, pipe.vae, pipe.text_encoder]
    else:
        raise ValueError(f"unknown loader {loader!r}")
    _touch(modules)
    t2 = time.perf_counter()
    peak_touch = _peak_rss()
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


def median_of(results: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in results) for k in results[0]}


# --- reporting ---------------------------------------------------------------------------------------------------

def load_table(rows: list[tuple[str, str, dict]]) -> str:
    lines = ["| loader | dtype | load s | CPU s | load + page in all weights s | weights GB | RSS before load GB "
             "| peak RSS GB | peak / weights |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for loader, dtype, r in rows:
        lines.append(f"| {loader} | {dtype} | {r['load_s']:.2f} | {r['cpu_s']:.2f} | {r['load_touch_s']:.2f} "
                     f"| {r['weights'] / GB:.2f} | {r['rss_before'] / GB:.2f} | {r['peak_touch'] / GB:.2f} "
                     f"| {r['peak_touch'] / r['weights']:.2f}x |")
    by = {(loader, dtype): r for loader, dtype, r in rows}
    ratios = []
    for dtype in ("fp16", "fp32"):
        a, b = by.get(("ldm", dtype)), by.get(("diffusers", dtype))
        if a and b:
            ratios.append(f"| {dtype} | {a['load_s'] / b['load_s']:.2f} | {a['cpu_s'] / b['cpu_s']:.2f} "
                          f"| {a['load_touch_s'] / b['load_touch_s']:.2f} | {a['peak_touch'] / b['peak_touch']:.2f} |")
    if ratios:
        lines += ["", "| ldm / diffusers | load time | CPU time | load + page-in time | peak RSS |",
                  "|---|---:|---:|---:|---:|", *ratios]
    return "\n".join(lines)


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def hardware() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s*(.+)", lscpu).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or "unknown CPU"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def versions() -> str:
    import diffusers
    import safetensors
    import torch
    import transformers

    import ldm

    return (f"ldm {ldm.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"transformers {transformers.__version__}, safetensors {safetensors.__version__}, "
            f"Python {platform.python_version()}")


def publish(name: str, report: str, write: bool) -> None:
    """Print a benchmark's report and, with --write, put it in its section of docs/benchmarks.md."""
    print(report)
    if write:
        write_section(name, report)
        print(f"updated {DOCS}", file=sys.stderr)


def write_section(name: str, body: str, docs: Path = DOCS) -> None:
    """Replace (or append) the section between `<!-- bench:NAME -->` markers in docs/benchmarks.md."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    text = docs.read_text() if docs.exists() else "# Benchmarks\n\nMeasured with `tools/bench.py`.\n"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    docs.write_text(text)


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


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing ldm
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:  # internal: one measurement in a fresh process, result as JSON on stdout
        _, loader, path, dtype, config_dir = argv
        print(json.dumps(child_load(loader, path, dtype, config_dir)))
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
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_train  # noqa: E402  (tools/bench_train.py: the `train` subcommand)

    bench_train.add_subcommand(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
