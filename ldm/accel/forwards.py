"""Elementwise steps shared by the UNet and the VAE that work in place at inference.

At 512x512 and beyond an activation is tens to hundreds of MB, and a fresh tensor of that size is fresh memory
for the kernel to fault in: SiLU and residual sums written into a tensor that nobody else reads save one such
allocation each (SD 1.5 on 2 CPU cores: UNet step -5%, VAE decode -7 to -12%; docs/benchmarks.md). Every
result equals the out-of-place expression to the bit, memory layout included (the layout decides the rounding of
the next convolution, and `make demo-model` must give the shipped file): with grad enabled they are the
out-of-place expressions, operands in the same order; in place, only where the target already has the layout
that `a + b` would give.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def add_residual(a: Tensor, b: Tensor) -> Tensor:
    """a + b; at inference summed into b, which must be a fresh layer output that nothing else reads, when b has
    a's memory layout (`a + b` takes a's layout, and the layout decides the rounding of the next convolution)."""
    if torch.is_grad_enabled() or a.shape != b.shape or a.stride() != b.stride():
        return a + b
    return b.add_(a)


def add_into(a: Tensor, b: Tensor) -> Tensor:
    """a + b; at inference summed into a, which must be a fresh layer output that nothing else reads (a + b has
    a's layout too, so the result is the same to the bit)."""
    return a + b if torch.is_grad_enabled() else a.add_(b)


def repeat_batch(x: Tensor, n: int) -> Tensor:
    """x (B, ...) as a batch of n = k * B: k copies of it one after the other, as `torch.cat([x] * k)` (which
    keeps x's memory layout); x itself when B == n."""
    b = x.shape[0]
    if b == n:
        return x
    if n % b:
        raise ValueError(f"cannot repeat a batch of {b} to {n}: {n} is not a multiple of {b}")
    return torch.cat([x] * (n // b))


def silu(x: Tensor) -> Tensor:
    """F.silu, in place at inference: x must be fresh (a GroupNorm output), never a shared input."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


class SiLU(nn.SiLU):
    """nn.SiLU computed by `silu` (for nn.Sequential stacks whose indices are checkpoint keys)."""

    def forward(self, x: Tensor) -> Tensor:
        return silu(x)
