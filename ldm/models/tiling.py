"""Exact, seam-free tiled VAE decoding and encoding: large images in bounded memory.

The usual tiled decode (diffusers, AUTOMATIC1111) decodes overlapping latent tiles one at a time and blends them.
Each tile then goes through every GroupNorm with its *own* mean and variance, so its colours and contrast differ
from those of the untiled decode everywhere, not only near the seams, and the blending only hides the seams.

Here the network runs op by op, each op over the whole image but computed tile by tile into a preallocated output:

- GroupNorm: the statistics (per image and group, the mean and variance over *all* positions) are reduced over
  the whole tensor, a chunk of rows at a time; each tile is then normalised with them. A tile normalised with
  local statistics would be a different function of the image: the statistics must be global for the result to
  equal the untiled network.
- 3x3 convolution: an output tile reads its input tile plus a one-pixel border from its neighbours (the halo);
  zeros are padded only at the true image border, where the untiled conv pads.
- Upsample (nearest x2, then a 3x3 conv), Downsample (a stride-2 conv) and the 1x1 shortcut follow the same rule;
  the identity shortcut adds each output tile onto the block's input in place.
- The mid block's attention is global (every position attends to every other), so the mid block runs untiled at
  latent resolution, where it is cheap: a 2048x2048 image has 256x256 latents.

The output equals the untiled network up to floating-point summation order (about 1e-6 in fp32), with no seams.
The memory peak is about one input and one output activation of one op (plus one tile's temporaries), where the
untiled forward holds several full-size temporaries (x, norm(x), silu(norm(x)), the conv output, ...).

`tile_size` is in image pixels: at a level of resolution 1/s the tiles are tile_size // s tensor pixels wide.

The functions take `ldm.models.vae`'s modules (AutoencoderKL, ResnetBlock, Upsample, Downsample), typed as nn.Module here:
the VAE calls into this module, not the other way round.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.models import attention

DEFAULT_TILE_SIZE = 512  # image pixels per tile side

# load(r0, r1, c0, c1) -> rows [r0, r1) and columns [c0, c1) of an op's input, ready for the op (e.g. normalised
# and activated): ops read their input through it, so that no full-size activated copy is ever made.
Load = Callable[[int, int, int, int], Tensor]


def check_tile_size(tile_size: int, downsample_factor: int) -> None:
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < downsample_factor:
        raise ValueError(f"VAE tile size must be an integer >= {downsample_factor} (the VAE's downsampling factor), "
                         f"got {tile_size!r}")


def _tiles(height: int, width: int, tile: int) -> Iterator[tuple[int, int, int, int]]:
    """(r0, r1, c0, c1) of the tiles covering a height x width plane; the last row and column may be smaller."""
    for r0 in range(0, height, tile):
        for c0 in range(0, width, tile):
            yield r0, min(r0 + tile, height), c0, min(c0 + tile, width)


def _window(x: Tensor) -> Load:
    """Read x as it is."""
    return lambda r0, r1, c0, c1: x[:, :, r0:r1, c0:c1]


def group_norm_affine(norm: nn.GroupNorm, x: Tensor, tile: int) -> tuple[Tensor, Tensor]:
    """GroupNorm over all of x as a per-channel affine map norm(x) = x * scale + shift, (B, C, 1, 1) each in fp32.

    The mean and variance of each (image, group) take two passes over x, a chunk of about tile * tile positions
    at a time: the mean, then the mean squared deviation from it (the two-pass algorithm: no cancellation, unlike
    E[x^2] - E[x]^2). Each pass sums along rows in fp32 and adds the row sums up in fp64."""
    b, c, height, width = x.shape
    g = norm.num_groups
    rows = max(1, tile * tile // width)
    count = c // g * height * width  # values per (image, group)

    def chunks() -> Iterator[Tensor]:  # fp32 views of x (copies, one at a time, if x is half precision)
        return (x[:, :, r0:r0 + rows].float() for r0 in range(0, height, rows))

    def group_sums(row_sums: Tensor) -> Tensor:  # (B, C, rows) -> (B, G) in fp64
        return row_sums.double().reshape(b, g, -1).sum(dim=-1)

    mean = sum(group_sums(chunk.sum(dim=-1)) for chunk in chunks()) / count  # (B, G)
    channel_mean = mean.repeat_interleave(c // g, dim=1).float()[:, :, None, None]  # (B, C, 1, 1)
    var = sum(group_sums(torch.linalg.vector_norm(chunk - channel_mean, dim=-1).double() ** 2)
              for chunk in chunks()) / count
    rstd = (var + norm.eps).rsqrt()  # (B, G)
    scale = (rstd[:, :, None] * norm.weight.double().view(1, g, c // g)).reshape(b, c)
    shift = norm.bias.double()[None] - mean.repeat_interleave(c // g, dim=1) * scale
    return scale.float()[:, :, None, None], shift.float()[:, :, None, None]


def _norm_silu(norm: nn.GroupNorm, x: Tensor, tile: int) -> Load:
    """Read silu(norm(x)) one window at a time, the statistics of norm taken over the whole of x."""
    scale, shift = group_norm_affine(norm, x, tile)

    def load(r0: int, r1: int, c0: int, c1: int) -> Tensor:
        return F.silu(torch.addcmul(shift, x[:, :, r0:r1, c0:c1].float(), scale).to(x.dtype), inplace=True)
    return load


def conv_tiled(conv: nn.Conv2d, load: Load, in_size: tuple[int, int], out: Tensor, tile: int, *,
               accumulate: bool = False) -> Tensor:
    """out (=, or += with `accumulate`) conv(input), one output tile at a time.

    The input (in_size = (H, W), read through `load`) is zero padded by the layer's own padding before its first row and column,
    and by whatever the last output rows and columns read past its end, as the untiled convolution pads it. Each
    output tile reads the input window its receptive field covers: its own tile plus a halo of the neighbours."""
    k, stride, pad = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    height, width = in_size
    for o0, o1, p0, p1 in _tiles(out.shape[2], out.shape[3], tile):
        i0, i1 = o0 * stride - pad, (o1 - 1) * stride - pad + k  # input rows [i0, i1) of output rows [o0, o1)
        j0, j1 = p0 * stride - pad, (p1 - 1) * stride - pad + k
        a0, a1, b0, b1 = max(i0, 0), min(i1, height), max(j0, 0), min(j1, width)
        window, zeros = load(a0, a1, b0, b1), (b0 - j0, j1 - b1, a0 - i0, i1 - a1)  # zeros only past the border
        y = _conv(conv, window, zeros, o1 - o0, p1 - p0)
        if accumulate:
            out[:, :, o0:o1, p0:p1] += y
        else:
            out[:, :, o0:o1, p0:p1] = y
    return out


def _conv(conv: nn.Conv2d, window: Tensor, zeros: tuple[int, int, int, int], rows: int, columns: int) -> Tensor:
    """conv of `window` zero padded by `zeros` (left, right, top, bottom), through the layer's own call (so that
    whatever runs the layer, e.g. `ldm.accel`'s packed weights, runs here too). A layer that pads p pixels itself
    (the 3x3 convolutions, stride 1) pads every side, also where the window already holds the neighbours' pixels:
    the outputs those zeros reach are computed and dropped, p - zeros pixels on each side."""
    p = conv.padding[0]
    if p == 0:
        return conv(F.pad(window, zeros) if any(zeros) else window)
    left, _, top, _ = zeros
    return conv(window)[:, :, p - top:p - top + rows, p - left:p - left + columns]


def resnet_block(block: nn.Module, x: Tensor, tile: int) -> Tensor:
    """block(x) computed in tiles. The result is written into x's storage where it fits (x is consumed), so that
    the block holds two activations at a time: x and h = conv1(silu(norm1(x)))."""
    b, c_in, height, width = x.shape
    c_out = block.conv1.out_channels
    h = conv_tiled(block.conv1, _norm_silu(block.norm1, x, tile), (height, width),
                   x.new_empty(b, c_out, height, width), tile)
    if block.nin_shortcut is None:
        out = x  # the identity shortcut: conv2's tiles are added onto x, which nothing reads again
    else:
        # The 1x1 shortcut reads each tile of x only to write the same tile of its output, and nothing reads x
        # after it: when the width shrinks, its output can take the place of x's first c_out channels.
        out = x[:, :c_out] if c_out <= c_in else x.new_empty(b, c_out, height, width)
        conv_tiled(block.nin_shortcut, _window(x), (height, width), out, tile)
    return conv_tiled(block.conv2, _norm_silu(block.norm2, h, tile), (height, width), out, tile, accumulate=True)


def upsample(up: nn.Module, x: Tensor, tile: int) -> Tensor:
    """up(x) = conv(nearest x2 upsampling of x) in tiles of the (2H, 2W) output; `tile` is in output pixels."""
    b, c, height, width = x.shape

    def load(r0: int, r1: int, c0: int, c1: int) -> Tensor:  # rows [r0, r1), columns [c0, c1) of the upsampled x
        source = x[:, :, r0 // 2:(r1 + 1) // 2, c0 // 2:(c1 + 1) // 2]
        big = F.interpolate(source, scale_factor=2.0, mode="nearest")
        return big[:, :, r0 % 2:r0 % 2 + r1 - r0, c0 % 2:c0 % 2 + c1 - c0]
    return conv_tiled(up.conv, load, (2 * height, 2 * width), x.new_empty(b, c, 2 * height, 2 * width), tile)


def downsample(down: nn.Module, x: Tensor, tile: int) -> Tensor:
    """down(x): the stride-2 conv padded at the right and bottom only (as `vae.Downsample`), in tiles of the
    (H/2, W/2) output; `tile` is in output pixels."""
    b, c, height, width = x.shape
    out = x.new_empty(b, c, height // 2, width // 2)
    return conv_tiled(down.conv, _window(x), (height, width), out, tile)


def _global_attention():
    """The mid block's attention spans the whole latent; slice it ("auto") unless slicing is already set, so that
    no backend materialises the full (hw, hw) matrix (17 GB in fp32 for a 2048x2048 image)."""
    return attention.slicing("auto") if attention.current().slice_size is None else nullcontext()


@torch.no_grad()
def tiled_decode(vae: nn.Module, latents: Tensor, tile_size: int = DEFAULT_TILE_SIZE) -> Tensor:
    """vae.decode(latents) computed in tiles of tile_size x tile_size output pixels: unscaled latents
    (B, z, h, w) -> images (B, 3, h*f, w*f). Equal to the untiled decode up to summation order."""
    dec = vae.decoder
    scale = vae.cfg.downsample_factor  # the resolution of h is 1/scale of the image's
    check_tile_size(tile_size, scale)
    with _global_attention():
        h = dec.mid(dec.conv_in(vae.post_quant_conv(latents.to(vae.post_quant_conv.weight.dtype))))
    for level in reversed(dec.up):
        for block in level.block:
            h = resnet_block(block, h, tile_size // scale)
        up = getattr(level, level.resample_name, None)
        if up is not None:
            scale //= 2
            h = upsample(up, h, tile_size // scale)
    b, _, height, width = h.shape
    out = h.new_empty(b, dec.conv_out.out_channels, height, width)
    return conv_tiled(dec.conv_out, _norm_silu(dec.norm_out, h, tile_size), (height, width), out, tile_size)


@torch.no_grad()
def tiled_encode(vae: nn.Module, images: Tensor, tile_size: int = DEFAULT_TILE_SIZE) -> Tensor:
    """The posterior moments of vae.encode(images), computed in tiles of tile_size x tile_size input pixels:
    images (B, 3, H, W) -> (B, 2 * embed_dim, H/f, W/f). The down levels run in tiles; the mid block, norm_out
    and conv_out run untiled at latent resolution."""
    enc = vae.encoder
    check_tile_size(tile_size, vae.cfg.downsample_factor)
    x = images.to(vae.quant_conv.weight.dtype)
    b, _, height, width = x.shape
    h = conv_tiled(enc.conv_in, _window(x), (height, width), x.new_empty(b, enc.conv_in.out_channels, height, width),
                   tile_size)
    scale = 1
    for level in enc.down:
        for block in level.block:
            h = resnet_block(block, h, tile_size // scale)
        down = getattr(level, level.resample_name, None)
        if down is not None:
            scale *= 2
            h = downsample(down, h, tile_size // scale)
    with _global_attention():
        h = enc.mid(h)
    return vae.quant_conv(enc.conv_out(F.silu(enc.norm_out(h))))
