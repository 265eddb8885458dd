"""Attention backends shared by the UNet and the VAE.

Three interchangeable implementations of softmax(q k^T / sqrt(d)) v:
- `sdpa`: torch's scaled_dot_product_attention (flash / memory-efficient kernels where available; default);
- `xformers`: xformers.ops.memory_efficient_attention, only when it is installed and the tensors are on CUDA;
- `math`: the plain textbook formula, for reference and debugging.

`upcast=True` computes attention in fp32 even when the model runs in fp16/bf16 (the SD2 fix for fp16 NaNs).

Attention slicing bounds memory: the (N, M) attention matrix of N queries and M keys is computed `slice_size`
query rows at a time. Each query row's softmax involves only its own row of scores, so slicing gives the same
result. It matters for the `math` backend (which materialises the matrix: 17 GB for the VAE's mid attention of a
2048x2048 image, 65536 positions) and wherever sdpa falls back to its math kernel. "auto" picks the largest slice
whose matrix has at most `AUTO_SLICE_ELEMENTS` elements. xformers already works in blocks and ignores it.

Backend, upcast and slicing are chosen for a block of code with `options(backend=..., upcast=..., slice_size=...)`
(the pipeline enters it for each request), or per call through `attention(..., backend=)`. The setting lives in a
context variable: it holds in the thread (or asyncio task) that entered the block and nowhere else, so two
requests running at once in one process (a server) cannot see each other's.
"""
from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.config import SliceSize, is_slice_size

Backend = Literal["sdpa", "xformers", "math"]
BACKENDS: tuple[str, ...] = ("sdpa", "xformers", "math")
AUTO_SLICE_ELEMENTS = 2 ** 26  # "auto": at most this many scores per slice (256 MiB in fp32)


@dataclass(frozen=True)
class AttentionOptions:
    backend: Backend = "sdpa"
    upcast: bool = False
    slice_size: SliceSize = None


_OPTIONS: ContextVar[AttentionOptions] = ContextVar("ldm_attention", default=AttentionOptions())


def check_backend(backend: str) -> Backend:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "xformers" and not xformers_available():
        raise ValueError("attention backend 'xformers' needs the xformers package (pip install 'ldm[cuda]') "
                         "and a CUDA device; use 'sdpa' instead")
    return backend


def check_slice_size(slice_size: SliceSize) -> SliceSize:
    """A positive int, "auto" or None; anything else raises ValueError."""
    if not is_slice_size(slice_size):
        raise ValueError(f"attention slice size must be a positive integer, 'auto' or None, got {slice_size!r}")
    return slice_size


_KEEP = object()  # `options`: leave this setting as it is


@contextmanager
def options(backend: Backend | None = None, upcast: bool | None = None,
            slice_size: SliceSize | object = _KEEP) -> Iterator[AttentionOptions]:
    """The attention settings for the duration of a `with` block, in this thread or task only; those not given
    stay as they are (slice_size=None turns slicing off). The previous settings come back after, even on error."""
    current = _OPTIONS.get()
    new = AttentionOptions(current.backend if backend is None else check_backend(backend),
                           current.upcast if upcast is None else bool(upcast),
                           current.slice_size if slice_size is _KEEP else check_slice_size(slice_size))
    token = _OPTIONS.set(new)
    try:
        yield new
    finally:
        _OPTIONS.reset(token)


def current() -> AttentionOptions:
    """The settings in force here (`options`)."""
    return _OPTIONS.get()


def slicing(slice_size: SliceSize) -> AbstractContextManager[AttentionOptions]:
    """`options(slice_size=slice_size)`."""
    return options(slice_size=slice_size)


def slice_rows(slice_size: SliceSize, batch_heads: int, n: int, m: int) -> int:
    """How many of the n query rows one slice holds (n: no slicing), for a (batch * heads, n, m) score matrix."""
    if slice_size is None:
        return n
    if slice_size == "auto":
        slice_size = max(1, AUTO_SLICE_ELEMENTS // (batch_heads * m))
    return min(slice_size, n)


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None and torch.cuda.is_available()


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, backend: Backend | None = None,
              upcast: bool | None = None, slice_size: SliceSize = None) -> Tensor:
    """Multi-head attention on (B, N, heads * d) queries and (B, M, heads * d) keys and values; returns
    (B, N, heads * d). `backend`, `upcast` and `slice_size` default to the settings in force (`options`)."""
    settings = _OPTIONS.get()
    backend = backend or settings.backend
    upcast = settings.upcast if upcast is None else upcast
    slice_size = settings.slice_size if slice_size is None else check_slice_size(slice_size)
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
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, d), (B, heads, M, d)
    rows = slice_rows(slice_size, b * heads, n, k.shape[2])
    if rows >= n:
        out = _attend(q, k, v, backend)
    else:
        out = q.new_empty(q.shape)  # (B, heads, N, d), filled slice by slice
        for start in range(0, n, rows):
            out[:, :, start:start + rows] = _attend(q[:, :, start:start + rows], k, v, backend)
    return out.transpose(1, 2).reshape(b, n, inner).to(dtype)


def _attend(q: Tensor, k: Tensor, v: Tensor, backend: Backend) -> Tensor:
    """softmax(q k^T / sqrt(d)) v on (B, heads, n, d) queries and (B, heads, M, d) keys and values."""
    if backend == "math":
        weights = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, heads, n, M)
        return weights.softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v)
