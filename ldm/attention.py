"""Attention backends shared by the UNet and the VAE.

Three interchangeable implementations of softmax(q k^T / sqrt(d)) v:
- `sdpa`: torch's scaled_dot_product_attention (flash / memory-efficient kernels where available; default);
- `xformers`: xformers.ops.memory_efficient_attention, only when it is installed and the tensors are on CUDA;
- `math`: the plain textbook formula, for reference and debugging.

`upcast=True` computes attention in fp32 even when the model runs in fp16/bf16 (the SD2 fix for fp16 NaNs).
The backend is a process-wide setting chosen with `set_backend`, or per call through `attention(..., backend=)`.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Backend = Literal["sdpa", "xformers", "math"]
BACKENDS: tuple[str, ...] = ("sdpa", "xformers", "math")

_backend: Backend = "sdpa"
_upcast: bool = False


def set_backend(backend: Backend = "sdpa", *, upcast: bool | None = None) -> None:
    """Choose the attention implementation for all attention layers (and optionally fp32 upcasting)."""
    global _backend, _upcast
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "xformers" and not xformers_available():
        raise ValueError("attention backend 'xformers' needs the xformers package (pip install 'ldm[cuda]') "
                         "and a CUDA device; use 'sdpa' instead")
    _backend = backend
    if upcast is not None:
        _upcast = upcast


def get_backend() -> tuple[Backend, bool]:
    return _backend, _upcast


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None and torch.cuda.is_available()


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, backend: Backend | None = None,
              upcast: bool | None = None) -> Tensor:
    """Multi-head attention on (B, N, heads * d) tensors; returns (B, N, heads * d)."""
    backend = backend or _backend
    upcast = _upcast if upcast is None else upcast
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    b, n, inner = q.shape
    d = inner // heads
    if backend == "xformers" and q.is_cuda:
        import xformers.ops  # optional dependency, CUDA only

        # xformers takes (B, N, heads, d)
        out = xformers.ops.memory_efficient_attention(*(t.reshape(b, -1, heads, d) for t in (q, k, v)))
        return out.reshape(b, n, inner).to(dtype)
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, d)
    if backend == "math":
        weights = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(d))  # (B, heads, N, M)
        out = weights.softmax(dim=-1) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, n, inner).to(dtype)
