"""`python tools/bench.py sdxl`: SDXL base against diffusers on the CPU, for docs/benchmarks.md (section SDXL), in
two parts (`--parts load unet`):

load    Time and peak RSS of loading a random-weight SDXL base single file (6.9 GB fp16, written once to
        `.bench_cache/` in the layout of the real `sd_xl_base_1.0.safetensors`, without ldm metadata, so that ldm
        detects the architecture from the keys): `ldm.load(file, dtype=...)` against diffusers'
        `StableDiffusionXLPipeline.from_single_file(file, config=<local folder>, local_files_only=True,
        torch_dtype=...)`, in fp16 (the file's tensors kept as mapped views) and fp32 (cast while loading). The child
        then pages in every weight and checks a few of them against the file.

unet    One fresh process per (implementation, precision) loads the whole model from that file, then times one UNet
        call at `--size` px as a guided sampling step runs it (latents (2, 4, size/8, size/8), context (2, 77, 2048),
        the vector y (2, 2816); diffusers: `encoder_hidden_states` and `added_cond_kwargs` text_embeds and time_ids),
        the median of `--steps-timed` calls after `--warmup`, and reports the process's peak RSS. Both get the same
        seeded inputs and threads; the parent compares their outputs. bf16 runs only where the CPU has native bf16
        arithmetic (`ldm.accel.cpu.emulated_bf16_reason`), else it is reported as skipped with the reason.

    python tools/bench.py sdxl --write                          # 1024 px, fp32 and bf16 (where native)
    python tools/bench.py sdxl --size 256 --steps-timed 1 --load-runs 1     # a smoke run

Child processes run this file (`python tools/bench_sdxl.py _child {load,unet} <json>`), so that their peak RSS
(VmHWM) belongs to one loader alone; the helpers they share with `bench.py load` and `txt2img` come from there.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import CACHE  # tools/
from bench_process import cpu_s, median_of, median_time, peak_rss, positive, reset_peak_rss, rss_now, touch
from bench_report import GB, PARITY_TOLERANCE, ROOT, hardware, load_average, load_table, publish, versions

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
IMPLS = ("ldm", "diffusers")
SEED = 0
TIMESTEP = 500  # of the timed UNet call
LATENT_FACTOR, LATENT_CHANNELS, CONTEXT, POOLED = 8, 4, (77, 2048), 1280  # SDXL: CLIP-L + bigG context, bigG pooled


# --- fixtures ----------------------------------------------------------------------------------------------------

def sdxl_checkpoint(cache: Path = CACHE) -> Path:
    """A random-weight SDXL base single file, built once: the keys, shapes and dtypes of `sd_xl_base_1.0.safetensors`
    (fp16 weights, CLIP-L's position ids in int64; 6.9 GB) and no ldm metadata. The model is built on the meta device
    and each tensor is drawn, cast to fp16 and written on its own, so writing takes one tensor's memory, not 14 GB."""
    path = cache / "sdxl-base-random-fp16.safetensors"
    if path.exists():
        return path
    import torch

    import ldm
    from ldm.testing.reference import seeded_weight  # seeded weights whose activations keep their size through 70 blocks

    print(f"writing {path} (once, about 6.9 GB) ...", file=sys.stderr)
    with torch.device("meta"):
        skeleton = ldm.StableDiffusion(ldm.preset("sdxl"))
    modules = dict(skeleton.named_modules())
    shapes = {key: t for key, t in skeleton.state_dict(keep_vars=True).items()}
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, t in shapes.items():
        if not t.is_floating_point() and not key.endswith(".position_ids"):
            raise ValueError(f"{key}: no rule to write a {t.dtype} tensor")
        size = t.numel() * (2 if t.is_floating_point() else 8)
        header[key] = {"dtype": "F16" if t.is_floating_point() else "I64", "shape": list(t.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes
    g = torch.Generator().manual_seed(SEED)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for key, t in shapes.items():
            module_name, _, name = key.rpartition(".")
            if t.is_floating_point():
                value = seeded_weight(modules[module_name], name, t.shape, g).half()
            else:  # transformers' CLIP position ids: 0..76
                value = torch.arange(t.shape[-1]).expand(t.shape).contiguous()
            f.write(value.numpy().tobytes())
    tmp.replace(path)
    return path


# The diffusers-format configs of the SDXL base repository (stabilityai/stable-diffusion-xl-base-1.0), written
# locally so that diffusers needs no hub access. CLIP-L's tokenizer pads with <|endoftext|>, the bigG's with "!".
SDXL_DIFFUSERS_CONFIGS = {
    "model_index.json": {
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0",
        "force_zeros_for_empty_prompt": True, "add_watermarker": None,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    },
    "scheduler/scheduler_config.json": {
        "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "clip_sample": False, "interpolation_type": "linear",
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
        "use_karras_sigmas": False,
    },
    "unet/config.json": {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280], "center_input_sample": False, "class_embed_type": None,
        "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048,
        "cross_attention_norm": None,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
        "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
        "only_cross_attention": False, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
        "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
        "sample_size": 128, "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
        "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
        "use_linear_projection": True,
    },
    "vae/config.json": {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3, "latent_channels": 4,
        "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024,
        "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
    "text_encoder/config.json": {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "quick_gelu",
        "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
        "max_position_embeddings": 77, "projection_dim": 768, "vocab_size": 49408, "layer_norm_eps": 1e-05,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    },
    "text_encoder_2/config.json": {
        "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model", "hidden_act": "gelu",
        "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
        "max_position_embeddings": 77, "projection_dim": 1280, "vocab_size": 49408, "layer_norm_eps": 1e-05,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    },
}
TOKENIZER_PADS = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}


def sdxl_diffusers_config_dir(cache: Path = CACHE) -> Path:
    """SDXL base's diffusers-format folder without weights, for `from_single_file(config=...)`: the configs above and
    the two CLIP tokenizers (`ldm.testing.reference.write_clip_tokenizer_files`, as the hub is out of reach)."""
    from ldm.testing.reference import write_clip_tokenizer_files

    root = cache / "sdxl-diffusers-config"
    for name, content in SDXL_DIFFUSERS_CONFIGS.items():
        f = root / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(content, indent=1))
    for name, pad in TOKENIZER_PADS.items():
        if not (root / name / "merges.txt").exists():
            write_clip_tokenizer_files(root / name)
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "pad_token": pad}
        (root / name / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
        (root / name / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}, indent=1))
    return root


# --- one measurement, in a child process ---------------------------------------------------------------------------

# (file key -> the same weight in diffusers' pipeline): a check that both loaded the file. ldm's module tree is the
# file's layout, so its side is `get_parameter(key)`.
CHECKED_WEIGHTS = {
    "model.diffusion_model.input_blocks.0.0.weight": lambda pipe: pipe.unet.conv_in.weight,
    "model.diffusion_model.out.2.weight": lambda pipe: pipe.unet.conv_out.weight,
    "first_stage_model.decoder.conv_out.weight": lambda pipe: pipe.vae.decoder.conv_out.weight,
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight":
        lambda pipe: pipe.text_encoder.get_input_embeddings().weight,
    "conditioner.embedders.1.model.token_embedding.weight":
        lambda pipe: pipe.text_encoder_2.get_input_embeddings().weight,
}


def _loader(impl: str, spec: dict, dtype):
    """The timed part of loading, with its imports done outside the measurement."""
    if impl == "ldm":
        import ldm

        load = ldm.load  # ldm imports its models (and transformers) lazily, on first access: not timed, as diffusers'
        return lambda: load(spec["path"], dtype=dtype)
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    dlogging.disable_progress_bar()
    return lambda: StableDiffusionXLPipeline.from_single_file(
        spec["path"], config=spec["config_dir"], local_files_only=True, torch_dtype=dtype, add_watermarker=False)


def _networks(impl: str, model) -> list:
    return [model] if impl == "ldm" else [model.unet, model.vae, model.text_encoder, model.text_encoder_2]


def _check_weights(impl: str, model, path: str, dtype) -> None:
    import torch
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        for key, diffusers_weight in CHECKED_WEIGHTS.items():
            got = model.get_parameter(key) if impl == "ldm" else diffusers_weight(model)
            if got.dtype != dtype or not torch.equal(got, f.get_tensor(key).to(dtype)):
                raise RuntimeError(f"{impl} did not load {key} as {dtype}")


def child_load(spec: dict) -> dict:
    """Load the file once: time, CPU time, time until every weight is paged in, peak RSS."""
    import torch

    dtype = getattr(torch, DTYPES[spec["dtype"]])
    load = _loader(spec["impl"], spec, dtype)
    before, c0 = rss_now(), cpu_s()
    t0 = time.perf_counter()
    model = load()
    t1, c1 = time.perf_counter(), cpu_s()
    modules = _networks(spec["impl"], model)
    touch(modules)
    t2 = time.perf_counter()
    peak_touch = peak_rss()
    _check_weights(spec["impl"], model, spec["path"], dtype)  # after the measurement
    weights = sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())
    return {"load_s": t1 - t0, "cpu_s": c1 - c0, "load_touch_s": t2 - t0, "rss_before": before,
            "peak_touch": peak_touch, "weights": weights}


def child_unet(spec: dict) -> dict:
    """Load, then time one UNet call at spec["size"] px with batch 2; save its output for the parent."""
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    impl, size = spec["impl"], spec["size"]
    dtype = getattr(torch, DTYPES[spec["dtype"]])
    load = _loader(impl, spec, dtype)
    t0 = time.perf_counter()
    model = load()
    load_s = time.perf_counter() - t0
    peak_load = peak_rss()
    reset_peak_rss()

    g = torch.Generator().manual_seed(SEED)  # the same inputs in every child
    h = size // LATENT_FACTOR
    x = torch.randn(2, LATENT_CHANNELS, h, h, generator=g).to(dtype)  # batch 2: conditional and unconditional rows
    context = torch.randn(2, *CONTEXT, generator=g).to(dtype)
    pooled = torch.randn(2, POOLED, generator=g).to(dtype)
    t = torch.full((2,), TIMESTEP)
    if impl == "ldm":
        from ldm import accel

        conditions = {"original_size": (size, size), "crop_coords_top_left": (0, 0), "target_size": (size, size)}
        stepping = accel.sampling(model.unet, 2, h, h)  # as ldm's sampling loop runs the UNet

        def call():  # y (2, 2816): the pooled embedding and the size conditions' Fourier features
            return model.unet(x, t, context, model.text_encoder.vector(pooled, conditions))
    else:
        from contextlib import nullcontext

        stepping = nullcontext()
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=dtype)  # the same conditions

        def call():
            return model.unet(x, t, encoder_hidden_states=context,
                              added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False)[0]

    first: list[float] = []
    with torch.no_grad(), stepping:
        unet_s, out = median_time(call, spec["warmup"], spec["runs"], lambda: None, first)
    peak_step = peak_rss()
    np.save(Path(spec["out_dir"]) / f"{impl}-{spec['dtype']}.npy", out.float().numpy())
    return {"load_s": load_s, "unet_s": unet_s, "first_unet_s": first[0], "peak_load": peak_load,
            "peak_step": peak_step, "peak_rss": max(peak_load, peak_step), "threads": torch.get_num_threads()}


CHILDREN = {"load": child_load, "unet": child_unet}


def measure(kind: str, spec: dict) -> dict:
    """Run CHILDREN[kind](spec) in a fresh process limited to spec["threads"] threads; RuntimeError if it fails."""
    threads = str(spec["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", kind, json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode != 0:
        why = f"killed by signal {-out.returncode}" if out.returncode < 0 else f"exit code {out.returncode}"
        raise RuntimeError(f"{spec['impl']} {spec['dtype']} {kind} failed ({why}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mem_available() -> int:
    """MemAvailable of the machine in bytes (Linux; 0 elsewhere): on a shared machine, less than a child's peak RSS
    means it pages, and its times mean little."""
    meminfo = Path("/proc/meminfo")
    for line in meminfo.read_text().splitlines() if meminfo.exists() else []:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _last_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{lines[0]} {lines[-1]}" if len(lines) > 1 else lines[0]


# --- the subcommand ----------------------------------------------------------------------------------------------

def unet_tables(results: dict[tuple[str, str], dict], errors: dict[str, float], size: int) -> tuple[str, list[str]]:
    """The UNet table, the ldm / diffusers ratios, and the issue's goal per precision."""
    lines = [("| implementation | dtype | load s | first UNet call s | UNet step s | peak RSS GB "
              "| peak RSS after load GB |"),
             "|---|---|---:|---:|---:|---:|---:|"]
    for (impl, precision), r in results.items():
        lines.append(f"| {impl} | {precision} | {r['load_s']:.1f} | {r['first_unet_s']:.2f} | {r['unet_s']:.2f} "
                     f"| {r['peak_rss'] / GB:.2f} | {r['peak_step'] / GB:.2f} |")
    ratios, goals = [], []
    for precision in dict.fromkeys(p for _, p in results):
        a, b = results.get(("ldm", precision)), results.get(("diffusers", precision))
        if not (a and b):
            continue
        step, peak = a["unet_s"] / b["unet_s"], a["peak_rss"] / b["peak_rss"]
        peak_step = a["peak_step"] / b["peak_step"]
        err = errors.get(precision, float("nan"))
        ratios.append(f"| {precision} | {step:.2f} | {peak:.2f} | {peak_step:.2f} | {err:.1e} |")
        met = "met" if step <= 1.0 and peak <= 1.0 else "**not met**"
        goals.append(f"- {size} px, {precision}: UNet step {step:.2f}x diffusers' time, peak RSS {peak:.2f}x "
                     f"diffusers' (goal <= 1.0x each): {met}")
    if ratios:
        lines += ["", ("| dtype | UNet step ldm / diffusers | peak RSS ldm / diffusers "
                       "| peak after load ldm / diffusers | UNet output max abs diff / max abs |"),
                  "|---|---:|---:|---:|---:|", *ratios]
    return "\n".join(lines), goals


def load_section(args: argparse.Namespace, base: dict, notes: list[str], available: list[int]) -> str | None:
    """Each (implementation, dtype) loaded in `args.load_runs` fresh processes: the load table, or None."""
    cases = [(impl, dtype) for impl in args.impls for dtype in ("fp16", "fp32")]
    runs: dict[tuple[str, str], list[dict]] = {case: [] for case in cases}
    for run in range(args.load_runs):  # interleaved, so that a busy spell on the machine hits every case alike
        for impl, dtype in cases:
            available.append(mem_available())
            try:
                r = measure("load", {**base, "impl": impl, "dtype": dtype})
            except RuntimeError as e:
                print(e, file=sys.stderr)
                notes.append(f"load, {_last_line(e)}")
                continue
            runs[impl, dtype].append(r)
            print(f"load run {run + 1}/{args.load_runs} {impl:9} {dtype}: {r['load_s']:.1f} s, "
                  f"peak RSS {r['peak_touch'] / GB:.2f} GB", file=sys.stderr)
    rows = [(impl, dtype, median_of(runs[impl, dtype])) for impl, dtype in cases if runs[impl, dtype]]
    if not rows:
        return None
    return (f"Load (median of {args.load_runs} fresh processes per row, run interleaved; each reads the file as the "
            f"previous one left it in the page cache):\n\n{load_table(rows)}")


def unet_section(args: argparse.Namespace, base: dict, notes: list[str], available: list[int]) -> str | None:
    """One UNet-step process per (precision, implementation), their outputs compared: the tables, or None."""
    import numpy as np
    import torch

    from ldm.accel.cpu import cpu_features, emulated_bf16_reason

    results: dict[tuple[str, str], dict] = {}
    errors: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="ldm-bench-sdxl-") as out_dir:
        for precision in args.precisions:
            reason = emulated_bf16_reason(getattr(torch, DTYPES[precision]), "cpu")
            if reason is not None:  # ldm refuses it (`ldm.accel.cpu.check_precision`): nothing a user would run
                notes.append(f"{precision}: skipped, {reason} (LDM_ALLOW_EMULATED_BF16=1 times it anyway)")
                print(notes[-1], file=sys.stderr)
                continue
            if precision == "bf16" and not cpu_features().native_bf16:
                notes.append(f"bf16: emulated on this CPU ({cpu_features().describe()}), timed because "
                             "LDM_ALLOW_EMULATED_BF16=1")
            for impl in args.impls:
                start = time.perf_counter()
                available.append(mem_available())
                spec = {**base, "impl": impl, "dtype": precision, "size": args.size, "warmup": args.warmup,
                        "runs": args.steps_timed, "out_dir": out_dir}
                try:
                    r = results[impl, precision] = measure("unet", spec)
                except RuntimeError as e:  # report the others; a failed process becomes a note
                    print(e, file=sys.stderr)
                    notes.append(f"UNet step, {_last_line(e)}")
                    continue
                print(f"{args.size} px {impl:9} {precision}: UNet step {r['unet_s']:.2f} s (first "
                      f"{r['first_unet_s']:.2f} s), peak RSS {r['peak_rss'] / GB:.2f} GB "
                      f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
            if all((impl, precision) in results for impl in IMPLS):
                a, b = (np.load(Path(out_dir) / f"{impl}-{precision}.npy").astype(np.float64) for impl in IMPLS)
                errors[precision] = float(np.abs(a - b).max() / np.abs(b).max())
    if not results:
        return None
    table, goals = unet_tables(results, errors, args.size)
    h = args.size // LATENT_FACTOR
    return (f"UNet step at {args.size}x{args.size} px (latents (2, 4, {h}, {h}), context (2, 77, 2048), y (2, 2816), "
            f"timestep {TIMESTEP}; ldm: `sd.unet(x, t, context, y)` with y from `sd.text_encoder.vector`, diffusers: "
            f"`pipe.unet(x, t, encoder_hidden_states, added_cond_kwargs)`): median of {args.steps_timed} call(s) after "
            f"{args.warmup} warm-up call(s), one fresh process per row that loads the whole model first; the output "
            f"difference is against diffusers in the same dtype (fp32 parity limit {PARITY_TOLERANCE:.0e})\n\n"
            f"{table}" + ("\n\n" + "\n".join(goals) if goals else ""))


def cmd_sdxl(args: argparse.Namespace) -> int:
    path, config_dir = sdxl_checkpoint(), sdxl_diffusers_config_dir()
    file_size = path.stat().st_size
    base = {"path": str(path), "config_dir": str(config_dir), "threads": args.threads}
    notes: list[str] = []
    load_before, available = load_average(), [mem_available()]
    parts = {"load": load_section, "unet": unet_section}
    sections = [text for name in args.parts if (text := parts[name](args, base, notes, available))]
    command = "python tools/bench.py sdxl " + " ".join(sys.argv[2:])
    report = (f"### Results\n\n- hardware: {hardware()}\n- versions: {versions()}\n- command: `{command.strip()}`\n"
              f"- checkpoint: random-weight SDXL base, {file_size / GB:.2f} GB ({file_size} bytes) fp16 safetensors in "
              f"the layout of `sd_xl_base_1.0.safetensors`, no ldm metadata\n- {args.threads} threads per process; "
              f"load average (1/5/15 min) {load_before} before and {load_average()} after; memory available before "
              f"each process at least {min(available) / GB:.1f} GB\n"
              + "".join(f"- {note}\n" for note in notes) + "".join(f"\n{s}\n" for s in sections))
    publish("sdxl", report, args.write)
    return 0 if sections else 1


def add_parser(sub) -> None:
    """The `sdxl` subcommand of tools/bench.py."""
    p = sub.add_parser("sdxl", help="SDXL base: load time, UNet step time and peak RSS, ldm vs diffusers",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=positive, default=1024, help="image side in pixels of the timed UNet call")
    p.add_argument("--steps-timed", type=positive, default=3, help="timed UNet calls per process (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed UNet calls first (ldm packs its weights in them)")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                   help="of the UNet step; bf16 only where the CPU has it natively")
    p.add_argument("--load-runs", type=positive, default=3, help="fresh processes per load measurement (median)")
    p.add_argument("--parts", nargs="+", choices=["load", "unet"], default=["load", "unet"])
    p.add_argument("--impls", nargs="+", choices=list(IMPLS), default=list(IMPLS))
    p.add_argument("--threads", type=positive, default=2, help="torch threads in every process")
    p.add_argument("--write", action="store_true", help="update docs/benchmarks.md (section SDXL)")
    p.set_defaults(func=cmd_sdxl)


if __name__ == "__main__":
    if sys.argv[1:2] != ["_child"]:
        sys.exit("run `python tools/bench.py sdxl ...`; this file's own entry point runs its child processes")
    print(json.dumps(CHILDREN[sys.argv[2]](json.loads(sys.argv[3]))))
