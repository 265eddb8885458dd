"""The training configuration: `TrainConfig` and its sections, read from YAML plus `a.b=value` overrides and
checked key by key by `ldm.config.build`, the builder of the model configs too (unknown keys, wrong types and
values outside a Literal are errors that name the key).

    cfg = load_train_config("configs/train/tiny-shapes.yaml", ["train.max_steps=2000"])

Every field is documented where it is declared; `ldm.training.train` is the loop that reads them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ldm.config import build, read_yaml_mapping
from ldm.data.folder import DataConfig


@dataclass(frozen=True)
class ModelSpec:
    preset: str | None = None        # architecture to train from scratch: a preset name ("tiny", "sd-v1") or YAML
    checkpoint: str | None = None    # single-file checkpoint to fine-tune (VAE and text encoder come from it)
    config: str | None = None        # config= for ldm.load of the checkpoint (default: detect)
    reinit_unet: bool = False        # with a checkpoint: train a fresh UNet on its VAE and text encoder
    prediction: Literal["eps", "v"] | None = None  # override the model's eps / v prediction
    train_text_encoder: bool = False
    clip_skip: int = 1
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class OptimConfig:
    max_steps: int = 1000
    batch_size: int = 4              # per process and micro-batch; global batch = batch_size x grad_accum x processes
    grad_accum: int = 1
    lr: float = 1e-4
    text_encoder_lr: float | None = None  # default: lr
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    optimizer: Literal["auto", "adamw", "adamw8bit"] = "auto"  # auto: bitsandbytes 8-bit AdamW on CUDA if installed
    adam_betas: tuple[float, ...] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    noise_offset: float = 0.0        # std of a per-channel constant added to the noise (Guttenberg 2023)
    min_snr_gamma: float | None = None


@dataclass(frozen=True)
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    warmup: bool = True              # decay_t = min(decay, (1 + t) / (10 + t))
    cpu: bool = False                # keep the average on the CPU (saves accelerator memory)


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500
    keep: int = 3


@dataclass(frozen=True)
class ValidationConfig:
    every: int = 0                   # 0: never
    prompts: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    steps: int = 20
    guidance: float = 7.5
    sampler: str = "dpmpp_2m"
    use_ema: bool = True


@dataclass(frozen=True)
class LogConfig:
    trackers: tuple[str, ...] = ("auto",)  # accelerate trackers; auto: tensorboard when installed
    progress_bar: bool = True


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str
    seed: int = 0
    resume: str | None = None        # "latest", "step-N" or a checkpoint directory
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    train: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_train_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> TrainConfig:
    """A YAML file (or `base`) plus `a.b=value` overrides (values parsed as YAML), checked key by key."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data.update(read_yaml_mapping(path, "training config"))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. train.lr=1e-4)")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(value)
    if "run_dir" not in data:
        raise ValueError("the training config has no run_dir (where checkpoints, logs and samples go)")
    return build(TrainConfig, data)
