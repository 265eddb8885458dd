"""Latent diffusion training with accelerate: one CPU to many GPUs, from scratch or fine-tuning.

    ldm train configs/train/tiny-shapes.yaml train.max_steps=2000          # one process
    accelerate launch --config_file configs/accelerate/ddp.yaml -m ldm.training.train CONFIG.yaml [key=value ...]
    ... --resume latest                                                     # continue a run bit for bit

Scale is accelerate's job (DDP, FSDP, DeepSpeed); this file is the loop (its configuration: ldm.training.config). Per
optimizer step, every rank takes `grad_accum` micro-batches of its share of the global batch (see
ldm/data/folder.py), and for each sample draws caption dropout, timestep and noise from a generator seeded by the
sample's own seed: the run is a pure function of (config, seed), whatever the number of ranks. The loss of
sample i at timestep t (Ho et al. 2020, eq. 14):

    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps              a_t = alphas_cumprod[t], x_0 = VAE latent x scale_factor
    target = eps                    (prediction "eps")
           = sqrt(a_t) eps - sqrt(1 - a_t) x_0   (prediction "v", Salimans & Ho 2022, sec. 4)
    loss_i = w_i |unet(x_t, t, c) - target|^2      w_i = min(SNR, gamma) / SNR (eps) or / (SNR + 1) (v),
                                                  SNR = a_t / (1 - a_t) (min-SNR-gamma, Hang et al. 2023)

The gradient is that of the mean loss over the real samples of the global batch; padding samples weigh 0.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
import typing
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from ldm.data.folder import Batch
from ldm.data.stream import open_stream
from ldm.training.ema import EMA
from ldm.models.stable_diffusion import StableDiffusion
from ldm.training.config import LogConfig, ModelSpec, OptimConfig, TrainConfig, load_train_config  # noqa: F401 (API)

UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model."
# Test-only: SIGKILL this process in the middle of this optimizer step (1-based), to test resuming after a crash.
DEBUG_KILL_ENV = "LDM_TRAIN_DEBUG_SIGKILL_AT_STEP"


# --- model, optimizer, objective ---------------------------------------------------------------------------------

def build_model(spec: ModelSpec) -> StableDiffusion:
    """The model to train: a fresh preset, or a checkpoint (with a fresh UNet if reinit_unet)."""
    from ldm.models.checkpoint import load, resolve_config
    from ldm.models.unet import UNetModel

    if spec.checkpoint:
        sd = load(spec.checkpoint, config=spec.config, prediction=spec.prediction, accelerate=False)
        _check_trainable(sd.config)
        if spec.reinit_unet:
            sd.model.diffusion_model = UNetModel(sd.config.unet)
        return sd
    if not spec.preset:
        raise ValueError("model: give model.preset (train from scratch) or model.checkpoint (fine-tune)")
    cfg = _check_trainable(resolve_config(spec.preset))
    return StableDiffusion(cfg.replace(prediction=spec.prediction) if spec.prediction else cfg)


def _check_trainable(cfg):
    if cfg.sdxl:
        raise ValueError(f"model: training {cfg.name} (SDXL) is not supported; ldm trains SD 1.x / 2.x-shaped "
                         "models (sd-v1, sd-v2, tiny, ...)")
    return cfg


def make_optimizer(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    import importlib.util

    have_bnb = importlib.util.find_spec("bitsandbytes") is not None and device.type == "cuda"
    if cfg.optimizer == "adamw8bit" and not have_bnb:
        raise ValueError("train.optimizer=adamw8bit needs bitsandbytes and a CUDA device; use adamw")
    kwargs = dict(betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit" or (cfg.optimizer == "auto" and have_bnb):
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, fused=device.type == "cuda", **kwargs)  # fused: one kernel for all tensors


class LRLambda:
    """Linear warm-up to 1, then cosine decay to 0 at max_steps (or constant). A class, so it is checkpointed."""

    def __init__(self, warmup: int, total: int, kind: str):
        self.warmup, self.total, self.kind = warmup, total, kind

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))))


def draw_sample_noise(seeds: Tensor, latent_shape: tuple[int, ...], num_timesteps: int, dropout: float,
                      noise_offset: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per sample, from its own generator: (dropped (B,) bool, t (B,), noise (B, C, h, w), vae_noise (B, C, h, w))."""
    dropped, ts, noises, vae_noises = [], [], [], []
    for seed in seeds.tolist():
        g = torch.Generator().manual_seed(seed)
        dropped.append(bool(torch.rand(1, generator=g) < dropout))
        ts.append(int(torch.randint(0, num_timesteps, (1,), generator=g)))
        noise = torch.randn(latent_shape, generator=g)
        offset = torch.randn(latent_shape[0], 1, 1, generator=g)
        noises.append(noise + noise_offset * offset if noise_offset else noise)
        vae_noises.append(torch.randn(latent_shape, generator=g))
    return torch.tensor(dropped), torch.tensor(ts), torch.stack(noises), torch.stack(vae_noises)


def diffusion_loss(unet: torch.nn.Module, x0: Tensor, noise: Tensor, t: Tensor, context: Tensor,
                   sqrt_ac: Tensor, sqrt_1m_ac: Tensor, prediction: str, min_snr_gamma: float | None) -> Tensor:
    """Per-sample loss (B,) of the eps or v objective, with min-SNR-gamma weights (see the module docstring)."""
    a, s = sqrt_ac[t].view(-1, 1, 1, 1), sqrt_1m_ac[t].view(-1, 1, 1, 1)  # the original's fp32 schedule buffers
    x_t = a * x0 + s * noise
    target = noise if prediction == "eps" else a * noise - s * x0
    loss = (unet(x_t, t, context).float() - target.float()).pow(2).mean(dim=(1, 2, 3))
    if min_snr_gamma:
        snr = (a / s).pow(2).flatten()
        loss = loss * snr.clamp(max=min_snr_gamma) / (snr if prediction == "eps" else snr + 1)
    return loss


class TrainingDiverged(RuntimeError):
    """A NaN or Inf loss: the run stops before the weights or any checkpoint are touched."""


# --- checkpoints -------------------------------------------------------------------------------------------------

def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (in-progress `.tmp-step-N` directories are not checkpoints)."""
    root = run_dir / "checkpoints"
    found = [p for p in root.glob("step-*") if p.name[5:].isdigit() and (p / "train_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def find_checkpoint(run_dir: Path, which: str) -> Path | None:
    if which == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(which) if Path(which).is_dir() else run_dir / "checkpoints" / which
    if not (path / "train_state.json").exists():
        raise FileNotFoundError(f"--resume {which}: no checkpoint at {path}")
    return path


def trainable_state(accelerator, models: dict[str, torch.nn.Module]) -> dict[str, Tensor]:
    """The trained modules' weights in the original key layout (a collective under FSDP/DeepSpeed)."""
    out = {}
    for prefix, model in models.items():
        for key, value in accelerator.get_state_dict(model).items():
            out[prefix + key] = value.detach().to("cpu").contiguous()
    return out


def save_checkpoint(accelerator, run_dir: Path, step: int, models: dict, ema: EMA | None, state: dict,
                    keep: int) -> Path:
    """Write checkpoints/step-N atomically: every rank fills .tmp-step-N, then rank 0 renames it and prunes."""
    from accelerate.utils import gather_object
    from ldm.models.checkpoint import write_safetensors

    root = run_dir / "checkpoints"
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    if accelerator.is_main_process:
        for stale in root.glob(".tmp-step-*"):  # this save's, or one a crash left behind
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # optimizer, LR scheduler, loss scaler, every rank's RNG states
    weights = trainable_state(accelerator, models)
    positions = gather_object([state.pop("position")])
    fingerprints = gather_object([ema.fingerprint() if ema else None])
    if accelerator.is_main_process:
        write_safetensors(weights, tmp / "weights.safetensors")
        if ema is not None:
            write_safetensors({UNET_PREFIX + k: v.cpu().contiguous() for k, v in ema.state_dict().items()},
                              tmp / "ema.safetensors")
        state.update(positions=positions, ema_fingerprints=fingerprints, ema_updates=ema.num_updates if ema else 0)
        (tmp / "train_state.json").write_text(json.dumps(state, indent=1))
        if final.exists():  # only when re-running past an older --resume point
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, models: dict, ema: EMA | None) -> dict:
    from accelerate.utils import DistributedType
    from safetensors.torch import load_file

    accelerator.load_state(str(path))  # optimizer, scheduler, scaler, this rank's RNG (+ FSDP/DeepSpeed weights)
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        weights = load_file(str(path / "weights.safetensors"))
        for prefix, model in models.items():
            own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
            accelerator.unwrap_model(model).load_state_dict(own, strict=True)
    state = json.loads((path / "train_state.json").read_text())
    if ema is not None:
        if not (path / "ema.safetensors").exists():
            raise ValueError(f"{path} has no EMA weights; resume with ema.enabled=false")
        shadow = {k[len(UNET_PREFIX):]: v for k, v in load_file(str(path / "ema.safetensors")).items()}
        ema.load_state_dict(shadow, state["ema_updates"])
    return state


def _skip_duplicate_weights(models, weights, output_dir):
    """accelerate save_state hook: the weights go to weights.safetensors in the SD layout instead of twice."""
    weights.clear()


def _skip_weight_loading(models, input_dir):
    models.clear()  # load_checkpoint loads weights.safetensors itself


# --- logging and validation --------------------------------------------------------------------------------------

class MetricsLog:
    """metrics.jsonl (one line per step, rank 0 only) plus accelerate's trackers. On resume, lines past the
    checkpoint's step (written before a crash) are dropped, so the file is the run's history."""

    def __init__(self, accelerator, run_dir: Path, resumed_step: int):
        self.accelerator, self.path = accelerator, run_dir / "metrics.jsonl"
        if accelerator.is_main_process and self.path.exists():
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            self.path.write_text("".join(ln + "\n" for ln in lines if json.loads(ln)["step"] <= resumed_step))

    def log(self, metrics: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps(metrics) + "\n")
        self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=metrics["step"])


def validate(sd: StableDiffusion, cfg: TrainConfig, step: int, ema: EMA | None) -> Path | None:
    """A grid of validation images (rows: seeds, columns: prompts) in run_dir/samples/step-N.png (rank 0)."""
    try:
        from ldm.generation.pipeline import txt2img
    except ImportError:
        warnings.warn("validation skipped: ldm.generation.pipeline is not available", stacklevel=2)  # shown once
        return None
    from PIL import Image

    v, size = cfg.validation, cfg.data.resolution
    unet = sd.model.diffusion_model
    swap = ema.swapped_into(unet) if (ema is not None and v.use_ema) else contextlib.nullcontext()
    was_training = unet.training
    with torch.random.fork_rng(devices=[]), torch.no_grad(), swap:
        unet.eval()
        rows = [txt2img(sd, list(v.prompts), steps=v.steps, guidance=v.guidance, sampler=v.sampler, width=size,
                        height=size, seed=seed, clip_skip=cfg.model.clip_skip).images for seed in v.seeds]
        unet.train(was_training)
    grid = Image.new("RGB", (size * len(v.prompts), size * len(rows)))
    for r, images in enumerate(rows):
        for c, img in enumerate(images):
            grid.paste(img.resize((size, size)), (c * size, r * size))
    out = Path(cfg.run_dir) / "samples" / f"step-{step}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


# --- the loop ----------------------------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> Path:
    """Run (or resume) training; returns the last checkpoint. Raises TrainingDiverged on a NaN/Inf loss."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    o, run_dir = cfg.train, Path(cfg.run_dir)
    _check(cfg)
    resume = find_checkpoint(run_dir, cfg.resume) if cfg.resume else None
    if cfg.resume is None and list_checkpoints(run_dir):
        raise ValueError(f"{run_dir} already has checkpoints (latest {list_checkpoints(run_dir)[-1].name}); pass "
                         "--resume latest to continue it, or choose another run_dir")
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # so that several CPU processes form a gloo group (MULTI_CPU)
        gradient_accumulation_steps=o.grad_accum, mixed_precision=o.mixed_precision, log_with=_trackers(cfg.log),
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        step_scheduler_with_optimizer=False)  # the schedule is per optimizer step, whatever the process count
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if world > 1:
        _KEPT_UNTIL_EXIT.append(accelerator)  # and the DDP models, in `_prepare`: see `_KEPT_UNTIL_EXIT`
    main = accelerator.is_main_process
    set_seed(cfg.seed)  # the same initial weights on every rank; all later randomness is per sample

    sd = build_model(cfg.model)
    stream = open_stream(cfg.data, cfg.seed, rank, world, o.batch_size, o.grad_accum)
    cached = cfg.data.cache is not None
    if cached:
        stream.dataset.check_model(sd, cfg.model.clip_skip)
    if main and resume is None:
        _write_run_files(sd, cfg, run_dir)
    trained, optimizer, scheduler, ema = _prepare(sd, cfg, accelerator)
    unet, text_encoder = trained[UNET_PREFIX], trained.get(TEXT_PREFIX, sd.cond_stage_model)

    step, epoch, position, skipped_total = 0, 0, None, 0
    if resume is not None:
        state = load_checkpoint(accelerator, resume, trained, ema)
        if state["global_batch"] != o.batch_size * o.grad_accum * world:
            raise ValueError(f"{resume} was trained with a global batch of {state['global_batch']}; resume with "
                             f"train.batch_size x train.grad_accum x processes equal to it")
        step, epoch, skipped_total = state["step"], state["epoch"], state["skipped_total"]
        if len(state["positions"]) != world and cfg.data.shards:
            raise ValueError(f"{resume} streamed shards on {len(state['positions'])} processes; resume on as many")
        position = state["positions"][rank % len(state["positions"])]  # map-style: the same on every rank
    elif main and cfg.resume:
        print(f"no checkpoint in {run_dir}; starting a new run", file=sys.stderr)
    if main:
        accelerator.init_trackers("ldm-train", config=_flat(cfg.to_dict()))
    metrics, empty_ids = MetricsLog(accelerator, run_dir, step), sd.tokenize([""])
    empty_context = sd.encode_tokens(empty_ids, clip_skip=cfg.model.clip_skip).float()
    kill_at = int(os.environ.get(DEBUG_KILL_ENV, 0))  # test-only
    progress = tqdm(total=o.max_steps, initial=step, desc="train", disable=not (main and cfg.log.progress_bar))
    steps, last = stream.steps(epoch, position), list_checkpoints(run_dir)[-1:] or [None]
    while step < o.max_steps:
        t0 = time.perf_counter()
        got = next(steps, None)
        batches = (got[0] if got else []) + [stream.padding_batch()] * (o.grad_accum - len(got[0] if got else []))
        counts = accelerator.reduce(torch.tensor([float(sum(b["weights"].sum() for b in batches)),
                                                  float(sum(len(b["skipped"]) for b in batches)),
                                                  float(got is not None)], device=device), "sum")
        n_real, skipped_total = counts[0].item(), skipped_total + int(counts[1].item())
        if counts[2].item() == 0:  # every rank has finished the epoch
            epoch, position, steps = epoch + 1, None, stream.steps(epoch + 1)
            continue
        position = got[1] if got else position
        if n_real == 0:  # only unreadable images on every rank: nothing to learn from
            continue
        loss_sum = torch.zeros((), device=device)
        for i, batch in enumerate(batches):
            with accelerator.accumulate(*trained.values()):
                per_sample = _forward(sd, unet, text_encoder, batch, cfg, cached, empty_ids, empty_context, device)
                local = (per_sample * batch["weights"].to(device)).sum()
                # gradient of the mean over the global batch: accelerate divides by grad_accum, DDP averages ranks
                accelerator.backward(local * (o.grad_accum * world / n_real))
                loss_sum += local.detach()
            if kill_at == step + 1 and i == 0:
                os.kill(os.getpid(), signal.SIGKILL)
        loss = (accelerator.reduce(loss_sum, "sum") / n_real).item()
        if not math.isfinite(loss):
            raise TrainingDiverged(f"step {step + 1}: the loss is {loss}; stopped before updating the weights. The "
                                   f"last good checkpoint is {last[-1] or 'none (no checkpoint yet)'}. Lower train.lr, "
                                   "set train.max_grad_norm, or use bf16 rather than fp16.")
        grad_norm = accelerator.clip_grad_norm_(list(_params(trained)), o.max_grad_norm or float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            fsdp = accelerator.distributed_type == DistributedType.FSDP
            with _full_params(accelerator, unet):  # FSDP: the gathered module; else the plain one
                ema.update(unet if fsdp else accelerator.unwrap_model(unet))
        step += 1
        dt = time.perf_counter() - t0
        metrics.log({"step": step, "epoch": epoch, "loss": loss, "lr": lr,
                     "grad_norm": None if grad_norm is None else float(grad_norm), "it_s": 1.0 / dt,
                     "images_s": n_real / dt, "samples": int(n_real), "skipped_images": skipped_total})
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if cfg.validation.every and step % cfg.validation.every == 0 and cfg.validation.prompts and main:
            if accelerator.distributed_type == DistributedType.FSDP:
                print("validation skipped: sampling from a sharded (FSDP) model is not supported", file=sys.stderr)
            else:
                validate(sd, cfg, step, ema)
        if step % cfg.checkpoint.every == 0 or step == o.max_steps:
            state = {"step": step, "epoch": epoch, "position": position, "skipped_total": skipped_total,
                     "global_batch": o.batch_size * o.grad_accum * world, "world_size": world,
                     "model_config": sd.config.to_dict(), "train_config": cfg.to_dict()}
            last = [save_checkpoint(accelerator, run_dir, step, trained, ema, state, cfg.checkpoint.keep)]
    progress.close()
    accelerator.end_training()
    return last[-1] or list_checkpoints(run_dir)[-1]


def _prepare(sd: StableDiffusion, cfg: TrainConfig, accelerator) -> tuple[dict, Any, Any, EMA | None]:
    """Freeze what is not trained, place the modules, build EMA, AdamW and the LR schedule, and hand the trained
    modules, optimizer and schedule to accelerate. Returns ({key prefix: prepared module}, optimizer, scheduler,
    ema)."""
    from accelerate.utils import DistributedType

    o, device, train_te = cfg.train, accelerator.device, cfg.model.train_text_encoder
    if train_te and accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError("model.train_text_encoder is not supported with DeepSpeed (one model per engine)")
    frozen_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(o.mixed_precision, torch.float32)
    frozen_dtype = frozen_dtype if device.type == "cuda" else torch.float32  # the CPU keeps frozen parts in fp32
    unet, text_encoder = sd.model.diffusion_model, sd.cond_stage_model
    unet.gradient_checkpointing = cfg.model.gradient_checkpointing
    sd.first_stage_model.requires_grad_(False).eval().to(device, frozen_dtype)
    text_encoder.requires_grad_(train_te).train(train_te).to(device, torch.float32 if train_te else frozen_dtype)
    unet.requires_grad_(True).train().to(device)  # a model from `ldm.load` comes frozen
    sd.to(device)  # the schedule buffers
    ema = EMA(unet, cfg.ema.decay, cfg.ema.warmup, "cpu" if cfg.ema.cpu else None) if cfg.ema.enabled else None
    groups = [{"params": list(unet.parameters()), "lr": o.lr}]
    if train_te:
        groups.append({"params": list(text_encoder.parameters()), "lr": o.text_encoder_lr or o.lr})
    optimizer = make_optimizer(groups, o, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRLambda(o.warmup_steps, o.max_steps, o.lr_schedule))
    if accelerator.state.deepspeed_plugin is not None:  # the batch is ours (no prepared DataLoader), and so is clipping
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config.update(train_micro_batch_size_per_gpu=o.batch_size, gradient_clipping=o.max_grad_norm or 0.0)
    modules = {UNET_PREFIX: unet, **({TEXT_PREFIX: text_encoder} if train_te else {})}
    *prepared, optimizer, scheduler = accelerator.prepare(*modules.values(), optimizer, scheduler)
    if accelerator.num_processes > 1:
        _KEPT_UNTIL_EXIT.extend(prepared)  # the DDP wrappers, which hold the process group: see `_KEPT_UNTIL_EXIT`
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        accelerator.register_save_state_pre_hook(_skip_duplicate_weights)
        accelerator.register_load_state_pre_hook(_skip_weight_loading)
    return dict(zip(modules, prepared)), optimizer, scheduler, ema


def _forward(sd, unet, text_encoder, batch: Batch, cfg: TrainConfig, cached: bool, empty_ids: Tensor,
             empty_context: Tensor, device: torch.device) -> Tensor:
    """Per-sample losses (B,) of one micro-batch: latents, text conditioning, noise, then the UNet."""
    o = cfg.train
    with torch.no_grad():
        if cached:
            mean, std = batch["latent_mean"].to(device).float(), batch["latent_std"].to(device).float()
        else:
            vae = sd.first_stage_model
            posterior = vae.encode(batch["pixels"].to(device, vae.quant_conv.weight.dtype))
            mean, std = posterior.mean.float(), posterior.std.float()
    dropped, t, noise, vae_noise = draw_sample_noise(batch["seeds"], tuple(mean.shape[1:]), len(sd.alphas_cumprod),
                                                     cfg.data.caption_dropout, o.noise_offset)
    x0 = (mean + std * vae_noise.to(device)) * sd.scale_factor
    dropped = dropped.to(device)
    if "text_emb" in batch and not cfg.model.train_text_encoder:
        context = torch.where(dropped.view(-1, 1, 1), empty_context, batch["text_emb"].to(device).float())
    else:
        ids = sd.tokenize(batch["captions"]).to(device)
        ids = torch.where(dropped.view(-1, 1), empty_ids.to(device), ids)
        with contextlib.nullcontext() if cfg.model.train_text_encoder else torch.no_grad():
            context = text_encoder(ids, clip_skip=cfg.model.clip_skip)
    return diffusion_loss(unet, x0, noise.to(device), t.to(device), context, sd.sqrt_alphas_cumprod,
                          sd.sqrt_one_minus_alphas_cumprod, sd.prediction, o.min_snr_gamma)


def _params(models: dict) -> typing.Iterator[torch.nn.Parameter]:
    for model in models.values():
        yield from (p for p in model.parameters() if p.requires_grad)


def _full_params(accelerator, model):
    """Under FSDP, gather the full parameters for the EMA update; elsewhere they are already whole."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.summon_full_params(model, writeback=False)
    return contextlib.nullcontext()


def _check(cfg: TrainConfig) -> None:
    o = cfg.train
    cfg.data.check()
    for name, value in (("train.max_steps", o.max_steps), ("train.batch_size", o.batch_size),
                        ("train.grad_accum", o.grad_accum), ("checkpoint.every", cfg.checkpoint.every)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0.0 <= cfg.ema.decay < 1.0:
        raise ValueError(f"ema.decay must be in [0, 1), got {cfg.ema.decay}")
    if o.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("train.mixed_precision=fp16 needs a CUDA device (fp16 loss scaling is GPU-only); use bf16 "
                         "or no on the CPU")


def _trackers(log: LogConfig) -> list[str] | None:
    import importlib.util

    names = []
    for name in log.trackers:
        if name == "auto":
            names += ["tensorboard"] if (importlib.util.find_spec("tensorboard") or
                                         importlib.util.find_spec("tensorboardX")) else []
        elif name != "none":
            names.append(name)
    return names or None


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _write_run_files(sd: StableDiffusion, cfg: TrainConfig, run_dir: Path) -> None:
    """config.yaml, and frozen.safetensors: the weights that are not trained (VAE, text encoder, schedule), with
    the model config, so that `ldm export` needs nothing but the run directory."""
    from ldm.models.checkpoint import METADATA_CONFIG_KEY, write_safetensors

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False))
    trained = (UNET_PREFIX, TEXT_PREFIX) if cfg.model.train_text_encoder else (UNET_PREFIX,)
    frozen = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
              for k, v in sd.state_dict().items() if not k.startswith(trained)}
    tmp = run_dir / ".frozen.safetensors.tmp"
    write_safetensors(frozen, tmp, metadata={METADATA_CONFIG_KEY: json.dumps(sd.config.to_dict())})
    os.replace(tmp, run_dir / "frozen.safetensors")


# --- command line ------------------------------------------------------------------------------------------------

def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training YAML, e.g. configs/train/tiny-shapes.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. train.lr=1e-5")
    parser.add_argument("--resume", default=None, metavar="latest|step-N|DIR",
                        help="continue from a checkpoint of run_dir (latest: the newest complete one)")


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"resume={args.resume}"] if args.resume else [])
    cfg = load_train_config(args.config, overrides)
    try:
        path = train(cfg)
    except TrainingDiverged as e:  # every rank stops at the same step: their losses are reduced
        _leave_process_group()
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"ldm train: error: {e}", file=sys.stderr)
        return _exit(1)
    _leave_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {path}")
    return _exit(0)


# A multi-process run's Accelerator and the DDP models it prepared, kept alive until the process exits (accelerate
# itself keeps only the unwrapped models). A DDP model holds the gloo process group, and freeing the last holder
# destroys the group: ~ProcessGroupGloo joins its worker threads while this thread holds the GIL, and a worker that is
# freeing a finished collective whose tensors have Python objects (an all_gather of `gather_object`, held by a later
# barrier) waits for the GIL, so neither moves. py-spy stack of the hung rank, at the return of `train`: MainThread in
# pybind11 dealloc of c10d::Reducer -> ~ProcessGroupGloo -> std::thread::join; the worker in
# ProcessGroupGloo::runLoop -> ~AsyncBarrierWork -> ~AsyncAllgatherWork -> decref_pyobject -> gil_scoped_acquire.
# So the group is never freed: `_exit` ends such a process without freeing anything, after the output is flushed.
_KEPT_UNTIL_EXIT: list = []


def _exit(code: int) -> int:
    if not _KEPT_UNTIL_EXIT:
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _leave_process_group() -> None:
    """Tear the process group down together before the interpreter exits. Left to the exit handlers, a gloo
    group whose peer is already gone can hang the last rank (seen about once in 50 two-process test runs)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def add_subcommand(subparsers) -> argparse.ArgumentParser:
    from ldm.cli import MODULE_COMMANDS

    p = subparsers.add_parser("train", help=MODULE_COMMANDS["train"][1],
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldm.training.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_train(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"ldm train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
