"""Elementwise steps shared by the UNet and the VAE that work in place at inference.

At 512x512 and beyond an activation is tens to hundreds of MB, and a fresh tensor of that size is fresh memory
for the kernel to fault in: SiLU and residual sums written into a tensor that nobody else reads save one such
allocation each (SD 1.5 on 2 CPU cores: UNet step -5%, VAE decode -7 to -12%; docs/benchmarks.md). With grad
enabled they are exactly the out-of-place expressions, operands in the same order, so training runs the same
ops and gives the same bits as without them (an in-place sum keeps its target's memory layout, which can change
the float rounding of the next convolution).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def add_residual(a: Tensor, b: Tensor) -> Tensor:
    """a + b; at inference summed into b, which must be a fresh layer output that nothing else reads."""
    return a + b if torch.is_grad_enabled() else b.add_(a)


def add_into(a: Tensor, b: Tensor) -> Tensor:
    """a + b; at inference summed into a, which must be a fresh layer output that nothing else reads."""
    return a + b if torch.is_grad_enabled() else a.add_(b)


def silu(x: Tensor) -> Tensor:
    """F.silu, in place at inference: x must be fresh (a GroupNorm output), never a shared input."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


class SiLU(nn.SiLU):
    """nn.SiLU computed by `silu` (for nn.Sequential stacks whose indices are checkpoint keys)."""

    def forward(self, x: Tensor) -> Tensor:
        return silu(x)
