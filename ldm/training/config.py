"""The training configuration: `TrainConfig` and its sections, read from YAML plus `a.b=value` overrides and
checked key by key (unknown keys, wrong types and values outside a Literal are errors that name the key).

    cfg = load_train_config("configs/train/tiny-shapes.yaml", ["train.max_steps=2000"])

Every field is documented where it is declared; `ldm.training.train` is the loop that reads them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ldm.config import read_yaml_mapping
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
    return _build(TrainConfig, data, "")


def _build(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"config section '{where.rstrip('.') or 'top'}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"unknown key(s) {[where + k for k in unknown]}; valid keys: {sorted(hints)}")
    out = {}
    for key, value in values.items():
        t = hints[key]
        if dataclasses.is_dataclass(t):
            out[key] = _build(t, value or {}, f"{where}{key}.")
        else:
            out[key] = _coerce(t, value, where + key)
    return cls(**out)


def _coerce(t: Any, v: Any, name: str) -> Any:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            with contextlib.suppress(ValueError):
                return _coerce(arg, v, name)
        raise ValueError(f"{name}: {v!r} is not a valid {t}")
    if origin is Literal:
        if v in args:
            return v
        raise ValueError(f"{name} must be one of {list(args)}, got {v!r}")
    if origin is tuple:
        items = v if isinstance(v, (list, tuple)) else [v]
        return tuple(_coerce(args[0], x, f"{name}[]") for x in items)
    if t is bool and isinstance(v, bool) or t is str and isinstance(v, str):
        return v
    if t is int and isinstance(v, int) and not isinstance(v, bool):
        return v
    if t is float and not isinstance(v, bool):
        with contextlib.suppress(TypeError, ValueError):
            return float(v)  # YAML reads 1e-4 (no dot) as a string
    raise ValueError(f"{name}: expected {getattr(t, '__name__', t)}, got {v!r}")
