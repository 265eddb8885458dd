"""The accelerated forwards of the UNet's and the VAE's blocks: the plain forwards of `ldm.models` with in-place
sums and activations, shared-latent guidance and the cheaper nearest x2 upsampling, installed on a model's blocks
by `ldm.accel.accelerate` (as instance attributes: the classes keep their plain forwards).

In place. At 512x512 and beyond an activation is tens to hundreds of MB, and a fresh tensor of that size is fresh
memory for the kernel to fault in: SiLU and residual sums written into a tensor that nobody else reads save one
such allocation each (SD 1.5 on 2 CPU cores: UNet step -5%, VAE decode -7 to -12%; docs/benchmarks.md). Every
result equals the plain expression to the bit, memory layout included (the layout decides the rounding of the next
convolution): with grad enabled they are the plain expressions, operands in the same order; in place, only where
the target already has the layout that `a + b` would give.

Shared latents. An accelerated UNet also takes k * B contexts for B latents (k prompts per latent, e.g. the
[uncond, cond] pair of classifier-free guidance) and returns k * B rows, the same as for the latents repeated k
times (`torch.cat([x] * k)`); but the layers before the first cross-attention (conv_in, the first ResBlocks, the
first self-attention: ~3% of SD's work) run once per latent instead of k times. The batch grows where the latents
first meet the context (`repeat_batch`, in the layout the plain batch has there), and the timestep embedding is
computed for all k * B rows, as the plain batch computes it, so that the rows are bit for bit those of the
repeated latents wherever a layer rounds each row alike whatever the batch (the tiny presets, any CPU; a plain bf16
model in the pipeline). oneDNN's packed convolutions at SD's sizes do not: SD 1.5, fp32, 32 x 32 latents, one
latent shared by two contexts against two latents: 3.6e-6 apart at most, for outputs up to 1.3.

Upsampling. Where the convolution after a nearest x2 upsampling computes from packed weights, it runs as four 2x2
convolutions of the small input (`ldm.accel.optimize.upsample_conv`, 4/9 of the work).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.accel.optimize import single_pass, upsample_conv
from ldm.models import unet, vae


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


def silu(x: Tensor) -> Tensor:
    """F.silu, in place at inference: x must be fresh (a GroupNorm output), never a shared input."""
    return F.silu(x, inplace=not torch.is_grad_enabled())


def repeat_batch(x: Tensor, n: int) -> Tensor:
    """x (B, ...) as a batch of n = k * B: k copies of it one after the other, in x's memory layout (the layout
    the plain forward would have given the k * B rows, and the layout decides the rounding of the next
    convolution); x itself when B == n. (`torch.cat` keeps only the standard and channels-last layouts: the
    tokens of a transformer, (B, N, C) stored as (B, C, N), would come out (B, N, C).)"""
    b = x.shape[0]
    if b == n:
        return x
    if n % b:
        raise ValueError(f"cannot repeat a batch of {b} to {n}: {n} is not a multiple of {b}")
    order = sorted(range(x.ndim), key=lambda d: -x.stride(d))  # x's dims from the outermost in memory
    if order[0] != 0:  # the batch is not outermost: no layout of k * B rows to keep
        return torch.cat([x] * (n // b))
    return torch.cat([x.permute(order)] * (n // b)).permute([order.index(d) for d in range(x.ndim)])


# --- UNet (ldm.models.unet) ---------------------------------------------------------------------------------

def unet_resblock(self: unet.ResBlock, x: Tensor, emb: Tensor) -> Tensor:
    """ResBlock.forward; `emb` may have more rows than x (the k * B rows of shared latents, of which x's B rows are
    the first): its projection is computed on all of them, as the plain forward of k * B rows does (a linear layer
    on one row can round otherwise than on two), and the first B taken."""
    norm1, _, conv1 = self.in_layers
    norm2, _, dropout, conv2 = self.out_layers
    h = conv1(silu(norm1(x)))                                                  # (B, C_out, H, W)
    e = self.emb_layers(emb).type(h.dtype)[:h.shape[0], :, None, None]
    h = add_into(h, e)                                                         # emb is shared: not in place
    return add_residual(self.skip_connection(x), conv2(dropout(silu(norm2(h)))))


def geglu(self: unet.GEGLU, x: Tensor) -> Tensor:
    x, gate = self.proj(x).chunk(2, dim=-1)
    if torch.is_grad_enabled():
        return x * F.gelu(gate)
    return F.gelu(gate).mul_(x)  # the product into gelu's fresh output


def transformer_block(self: unet.BasicTransformerBlock, x: Tensor, context: Tensor) -> Tensor:
    x = add_residual(x, self.attn1(self.norm1(x)))
    x = repeat_batch(x, context.shape[0])  # shared latents meet their k contexts here
    x = add_residual(x, self.attn2(self.norm2(x), context))
    return add_residual(x, self.ff(self.norm3(x)))


def spatial_transformer(self: unet.SpatialTransformer, x: Tensor, context: Tensor) -> Tensor:
    tokens = self.project_in(x)
    for block in self.transformer_blocks:
        tokens = block(tokens, context)                   # (k * B, N, C)
    out = self.project_out(tokens, *x.shape[2:])
    return add_into(out, repeat_batch(x, out.shape[0]))


def unet_upsample(self: unet.Upsample, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    if size is None or tuple(size) == (2 * x.shape[2], 2 * x.shape[3]):
        return upsample_conv(self.conv, x)
    return self.conv(F.interpolate(x, size=size, mode="nearest"))


def timestep_sequential(self: unet.TimestepEmbedSequential, x: Tensor, emb: Tensor, context: Tensor,
                        size: tuple[int, int] | None = None) -> Tensor:
    for layer in self:
        if isinstance(layer, unet.ResBlock):
            x = layer(x, emb)  # emb: the k * B rows (`unet_model`)
        elif isinstance(layer, unet.SpatialTransformer):
            x = layer(x, context)
        elif isinstance(layer, unet.Upsample):
            x = layer(x, size)
        else:
            x = layer(x)
    return x


def unet_model(self: unet.UNetModel, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
    """UNetModel.forward for B latents and k * B contexts (shared latents); (k * B, 4, H, W). With SDXL's vector y
    (one per context) the embedding differs per context from the first block on: the latents are repeated first."""
    self.check_inputs(x, context, y)
    if context.shape[0] % x.shape[0]:
        raise ValueError(f"UNet got {x.shape[0]} latents for {context.shape[0]} contexts; the contexts must be as "
                         "many as the latents or a multiple of them (latents shared by several prompts)")
    # the embedding of all k * B rows, as the plain forward computes it: the rows of B shared latents are its first B
    timesteps = repeat_batch(self.timesteps_for(x, timesteps), context.shape[0])
    if y is not None:
        x = repeat_batch(x, context.shape[0])
    emb = self.embed(timesteps, y)
    dtype = emb.dtype
    h, context = x.to(dtype), context.to(dtype)
    skips = []
    for block in self.input_blocks:
        h = self._run(block, h, emb, context)
        skips.append(h)
    h = self._run(self.middle_block, h, emb, context)
    for block in self.output_blocks:
        h = torch.cat([h, repeat_batch(skips.pop(), h.shape[0])], dim=1)
        size = tuple(skips[-1].shape[-2:]) if skips else None
        h = self._run(block, h, emb, context, size)
    norm, _, conv = self.out
    # packed CPU convolutions return channels-last tensors; give callers a plain one
    return repeat_batch(conv(silu(norm(h))).to(x.dtype).contiguous(), context.shape[0])


# --- VAE (ldm.models.vae) -------------------------------------------------------------------------------------

def vae_resblock(self: vae.ResnetBlock, x: Tensor) -> Tensor:
    h = self.conv1(silu(self.norm1(x)))
    h = self.conv2(silu(self.norm2(h)))
    return add_into(h, x if self.nin_shortcut is None else self.nin_shortcut(x))


def vae_attention(self: vae.AttnBlock, x: Tensor) -> Tensor:
    return add_residual(x, self.proj_out(self.attend(self.norm(x))))


def vae_upsample(self: vae.Upsample, x: Tensor) -> Tensor:
    return upsample_conv(self.conv, x)


def encoder(self: vae.Encoder, x: Tensor) -> Tensor:
    with single_pass():  # each layer runs once: its derived weights are made, used and freed
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(silu(self.norm_out(self.mid(h))))


def decoder(self: vae.Decoder, z: Tensor) -> Tensor:
    with single_pass():
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(silu(self.norm_out(h)))


# block class -> its accelerated forward
FORWARDS: dict[type[nn.Module], Callable[..., Tensor]] = {
    unet.ResBlock: unet_resblock, unet.GEGLU: geglu, unet.BasicTransformerBlock: transformer_block,
    unet.SpatialTransformer: spatial_transformer, unet.Upsample: unet_upsample,
    unet.TimestepEmbedSequential: timestep_sequential, unet.UNetModel: unet_model,
    vae.ResnetBlock: vae_resblock, vae.AttnBlock: vae_attention, vae.Upsample: vae_upsample,
    vae.Encoder: encoder, vae.Decoder: decoder,
}
