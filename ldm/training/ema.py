"""Exponential moving average of model weights, with decay warm-up and optional CPU offload.

    ema = EMA(unet, decay=0.9999)        # a copy of unet's floating-point parameters
    ...optimizer.step()...
    ema.update(unet)                     # once per optimizer step, never per micro-batch
    with ema.swapped_into(unet): ...     # e.g. sample validation images with the averaged weights

Every rank keeps its own EMA and updates it from the same (all-reduced) weights, so the copies are identical
without any communication; only rank 0 writes it to disk. The decay warm-up is the one of the original
LitEma / diffusers EMAModel: decay_t = min(decay, (1 + t) / (10 + t)) after t updates, so that the average
is not dominated by the random initial weights.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn


class EMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True,
                 device: str | torch.device | None = None):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        # names follow model.named_parameters(), so the state dict is the model's own (e.g. UNet) key layout
        self.shadow: dict[str, Tensor] = {
            name: p.detach().to(device or p.device, copy=True).float()
            for name, p in model.named_parameters() if p.is_floating_point()}

    def current_decay(self) -> float:
        """The decay the next update will use."""
        if not self.warmup:
            return self.decay
        t = self.num_updates
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * param, for every tracked parameter."""
        decay = self.current_decay()
        names, shadows, params = [], [], []
        for name, p in model.named_parameters():
            if name in self.shadow:
                names.append(name)
                shadows.append(self.shadow[name])
                params.append(p.detach().to(self.shadow[name].device, torch.float32))
        if len(names) != len(self.shadow):
            missing = sorted(set(self.shadow) - set(names))[:3]
            raise ValueError(f"EMA.update: the model lacks {len(self.shadow) - len(names)} tracked parameters, "
                             f"e.g. {missing}")
        torch._foreach_lerp_(shadows, params, 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name].to(p.device, p.dtype))

    @contextlib.contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into `model` (e.g. for validation), restoring the raw ones after."""
        backup = {name: p.detach().clone() for name, p in model.named_parameters() if name in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name in backup:
                        p.copy_(backup[name])

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor], num_updates: int) -> None:
        unexpected = sorted(set(state) - set(self.shadow))
        missing = sorted(set(self.shadow) - set(state))
        if unexpected or missing:
            raise ValueError(f"EMA state does not fit the model: {len(missing)} missing keys (e.g. {missing[:3]}), "
                             f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        for name, value in state.items():
            if tuple(value.shape) != tuple(self.shadow[name].shape):
                raise ValueError(f"EMA tensor {name}: saved shape {tuple(value.shape)}, "
                                 f"model {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(value)
        self.num_updates = num_updates

    def fingerprint(self) -> float:
        """A cheap checksum of the shadow weights (float64 sums); equal on every rank when the copies are equal."""
        return float(sum(t.double().sum() + t.double().square().sum() for t in self.shadow.values()))
