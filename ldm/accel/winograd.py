"""3x3 convolutions by Winograd's minimal filtering, F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional
Neural Networks", 2015): 16 multiplications per 2x2 output pixels instead of 36.

In one dimension, two outputs of a 3-tap correlation, y0 = d0 g0 + d1 g1 + d2 g2 and y1 = d1 g0 + d2 g1 + d3 g2,
take four products of transformed inputs and transformed taps:

    m0 = (d0 - d2) g0    m1 = (d1 + d2) (g0 + g1 + g2) / 2    m2 = (d2 - d1) (g0 - g1 + g2) / 2    m3 = (d1 - d3) g2
    y0 = m0 + m1 + m2    y1 = m1 - m2 - m3

that is y = A^T [(G g) * (B^T d)] with the matrices below. Nesting it over rows and columns gives the 2D form: each
4x4 input tile d (tiles overlap by 2) becomes V = B^T d B, each 3x3 kernel g becomes U = G g G^T, and the 2x2 output
tile is A^T (U * V) A. Summed over input channels, the 16 elementwise products are 16 matrix products, one per
position in the 4x4 tile: M[k] = V[k] @ U[k] with V[k] (tiles, in channels) and U[k] (in channels, out channels).
The multiply-adds drop to 16/36 = 4/9 of a direct convolution's, in large matrix products; the price is the
transforms (additions and subtractions, memory bound) and a weight 16/9 the size.

The transforms use only 0, +-1 and 1/2, so the result equals the direct convolution up to float summation order
(measured ~7e-7 relative to the output's largest value in fp32, as accurate as oneDNN's direct convolution). In
bf16 the transformed tiles and products are rounded to bf16 (the products accumulate in fp32): ~1e-2 of the
output's largest value, 2.5-3x the error of oneDNN's direct bf16 convolution, about one bf16 step.
`ldm.accel.optimize` decides where it pays.

The transforms are PyTorch additions over chunks of tile rows, bound by memory bandwidth; their temporaries come
from a kept `Workspace`, since fresh pages (faulted in and zeroed by the kernel) would cost more than the
algorithm saves at 64 pixels a side and above."""
from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

# G (4 x 3): the kernel transform. Rows 0 and 3 are taps 0 and 2; rows 1 and 2 the halved sums with tap 1 added and
# subtracted. B^T (input) and A^T (output) are written out as additions in `winograd_conv3x3`.
G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
# Transformed tiles per chunk: the 16 matrices of a whole 32 x 32 input with 1920 channels, batch 2, would take
# 252 MB; chunks of 16 MB stay in cache and are as fast or faster (1920 -> 640 channels: 87 -> 75 ms; 2 cores)
CHUNK_BYTES = 16 << 20


def winograd_weight(weight: Tensor) -> Tensor:
    """A 3x3 kernel (O, I, 3, 3) as the 16 matrices U = G g G^T (16, I, O) of `winograd_conv3x3`, matrix 4 * j + i
    for row i and column j of the transformed 4x4 kernel. One matrix product over the 9 taps, (16, 9) @ (9, O * I),
    into (16, O, I) storage, returned as its (16, I, O) transpose, which the products in `winograd_conv3x3` take
    as it is (SD 1.5's 1920 -> 640 kernel: 21 ms; computing it in (I, O) storage took 100 ms, mostly the transpose)."""
    o, i = weight.shape[:2]
    g = torch.tensor(G, dtype=weight.dtype, device=weight.device)
    taps = torch.einsum("ik,jl->jikl", g, g).reshape(16, 9)  # row 4 * j + i, column 3 * k + l: G[i, k] G[j, l]
    return (taps @ weight.reshape(o * i, 9).t()).view(16, o, i).transpose(1, 2)


class Workspace:
    """One flat buffer that a call's per-chunk temporaries are cut from, kept for the next chunks and calls. Fresh
    temporaries for every chunk are fresh pages, which the kernel faults in and zeroes: on 2 cores that cost more
    than Winograd saves at 64 pixels and above (VAE decoder at 512 px, 512 channels at 128 px: 140 ms from a kept
    buffer, 250 ms from fresh ones; oneDNN's direct convolution: 184-200 ms). About 3.5 CHUNK_BYTES."""

    def __init__(self) -> None:
        self.buffer: Tensor | None = None

    def take(self, like: Tensor, *shapes: tuple[int, ...]) -> list[Tensor]:
        """Contiguous tensors of the given shapes in `like`'s dtype and device, 64-byte aligned, valid until the
        next `take`."""
        line = 64 // like.element_size()  # elements per 64 bytes (an AVX-512 load)
        sizes = [-(-math.prod(shape) // line) * line for shape in shapes]
        b = self.buffer
        if b is None or b.numel() < sum(sizes) + line or b.dtype != like.dtype or b.device != like.device:
            self.buffer = None  # the old one goes before the new one comes
            b = self.buffer = like.new_empty(sum(sizes) + line)
        b = b[(-b.data_ptr() % 64) // b.element_size():]  # 64-byte aligned start
        out, start = [], 0
        for shape, size in zip(shapes, sizes):
            out.append(b[start:start + math.prod(shape)].view(shape))
            start += size
        return out

    def release(self) -> None:
        self.buffer = None


_workspaces = threading.local()


def workspace() -> Workspace:
    """This thread's workspace (threads must not share one)."""
    if not hasattr(_workspaces, "ws"):
        _workspaces.ws = Workspace()
    return _workspaces.ws


def winograd_conv3x3(x: Tensor, u: Tensor, bias: Tensor | None = None, ws: Workspace | None = None) -> Tensor:
    """F.conv2d(x, weight, bias, padding=1) for a 3x3 kernel given as u = winograd_weight(weight); x (N, I, H, W)
    -> (N, O, H, W), channels-last (as oneDNN's convolutions return it). Any H and W (odd ones are padded to whole
    tiles and cropped). Works through the tile rows in chunks of about CHUNK_BYTES of transformed tiles, whose
    temporaries come from `ws` (default: this thread's `workspace()`, kept until released)."""
    n, c, h, w = x.shape
    o = u.shape[-1]
    ws = workspace() if ws is None else ws
    rows, cols = (h + 1) // 2, (w + 1) // 2  # 2x2 output tiles
    pixels = x.permute(0, 2, 3, 1)  # (N, H, W, I): a view, contiguous when x is channels-last
    out = x.new_empty(n, 2 * rows, 2 * cols, o)
    step = max(1, CHUNK_BYTES // (16 * n * cols * max(c, o) * x.element_size()))  # tile rows per chunk
    for first in range(0, rows, step):
        count = min(step, rows - first)
        xc, by_rows, v, m, s = ws.take(x, (n, 2 * count + 2, 2 * cols + 2, c), (4, n, count, 2 * cols + 2, c),
                                       (4, 4, n, count, cols, c), (4, 4, n, count, cols, o),
                                       (2, 4, n, count, cols, o))
        # the chunk's input rows, zero-padded: row r of xc is input row 2 * first - 1 + r
        top = 2 * first - 1
        lo, hi = max(top, 0), min(top + 2 * count + 2, h)
        xc[:, :lo - top] = 0
        xc[:, hi - top:] = 0
        xc[:, lo - top:hi - top, :1] = 0
        xc[:, lo - top:hi - top, w + 1:] = 0
        xc[:, lo - top:hi - top, 1:w + 1] = pixels[:, lo:hi]
        _transform_in(xc, 1, by_rows)  # B^T along the rows ...
        _transform_in(by_rows, 3, v)  # ... then the columns: v (column j, row i, N, tile row, tile column, I)
        torch.bmm(v.view(16, -1, c), u, out=m.view(16, -1, o))
        if bias is not None:
            m[1, 1] += bias  # A^T's middle column is all ones: M[1, 1] reaches every output pixel once
        # A^T along the columns (j): s[b] = (m0 + m1 + m2, m1 - m2 - m3)[b], (row i, N, tile row, tile column, O)
        torch.add(m[1], m[2], out=s[0])
        s[0] += m[0]
        torch.sub(m[1], m[2], out=s[1])
        s[1] -= m[3]
        # then along the rows (i), into output pixel (2 * tile row + a, 2 * tile column + b)
        dst = out[:, 2 * first:2 * (first + count)]
        for b in (0, 1):
            even, odd = dst[:, 0::2, b::2], dst[:, 1::2, b::2]
            torch.add(s[b, 0], s[b, 1], out=even)
            even += s[b, 2]
            torch.sub(s[b, 1], s[b, 2], out=odd)
            odd -= s[b, 3]
    if 2 * rows != h or 2 * cols != w:
        out = out[:, :h, :w].contiguous()
    return out.permute(0, 3, 1, 2)


def _transform_in(t: Tensor, dim: int, out: Tensor) -> None:
    """B^T along `dim`: tap k of tile i is t's index 2 * i + k; out[0..3] gets the 4 transformed taps."""
    tiles = (t.shape[dim] - 2) // 2
    d = [t[(slice(None),) * dim + (slice(k, k + 2 * tiles, 2),)] for k in range(4)]
    torch.sub(d[0], d[2], out=out[0])
    torch.add(d[1], d[2], out=out[1])
    torch.sub(d[2], d[1], out=out[2])
    torch.sub(d[1], d[3], out=out[3])
