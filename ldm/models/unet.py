"""The Stable Diffusion UNet, in the layout of CompVis `openaimodel.UNetModel`.

Attribute paths reproduce the checkpoint keys under `model.diffusion_model.` (`time_embed.0`,
`input_blocks.N.M`, `middle_block`, `output_blocks`, `out`), so loading is a plain `load_state_dict`.
Numbered `nn.Sequential` children (`in_layers.2`, `out_layers.3`, `to_out.0`, `ff.net.2`) exist only because
the checkpoint keys name them so; each is commented where it is built.

Notation: B batch, C channels, H x W latent size, N = H * W tokens, M context tokens, D context width.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ldm.models.attention import attention
from ldm.config import UNetConfig

TIME_EMBED_MAX_PERIOD = 10000


def timestep_embedding(t: Tensor, dim: int, max_period: float = TIME_EMBED_MAX_PERIOD) -> Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017), cos first as in CompVis: (B,) -> (B, dim) in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the input dtype, as the original (a no-op in fp32)."""

    def forward(self, x: Tensor) -> Tensor:
        # weight and bias too: CPU group_norm rejects an fp32 input with bf16/fp16 parameters
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).type(x.dtype)


def normalization(channels: int, groups: int, eps: float = 1e-5) -> nn.GroupNorm:
    return GroupNorm32(groups, channels, eps=eps)


class ResBlock(nn.Module):
    """Two 3x3 convs with a timestep-conditioned bias between them, and a skip connection."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        # in_layers.{0,2} and out_layers.{0,3}: Sequential indices kept for the checkpoint keys
        self.in_layers = nn.Sequential(normalization(channels, groups), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(normalization(out_channels, groups), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)                                          # (B, C_out, H, W)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]  # (B, C_out, 1, 1) broadcast
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention of x (B, N, C) over a context (B, M, D); self-attention when context is None."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))  # to_out.0: checkpoint key

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection to 2 * inner, half of it gating the other half."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        # net.0 is the GEGLU, net.2 the output projection: checkpoint keys
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention on the text, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, head_dim, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the H*W positions of a feature map, conditioned on the text context.

    SD1 projects in and out with 1x1 convs on (B, C, H, W); SD2 with Linear layers on (B, N, C).
    """

    def __init__(self, channels: int, heads: int, head_dim: int, depth: int, context_dim: int, groups: int,
                 use_linear: bool, dropout: float = 0.0):
        super().__init__()
        inner = heads * head_dim
        self.use_linear = use_linear
        self.norm = normalization(channels, groups, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, context_dim, dropout) for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def project_in(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> normalised and projected tokens (B, N, inner)."""
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)                  # (B, N, C)
        return self.proj_in(x) if self.use_linear else x

    def project_out(self, x: Tensor, h: int, w: int) -> Tensor:
        """Tokens (B, N, inner) -> the block's residual (B, C, H, W)."""
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)  # (B, C, H, W)
        return x if self.use_linear else self.proj_out(x)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        tokens = self.project_in(x)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return self.project_out(tokens, *x.shape[2:]) + x  # the output's memory layout, as the original


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        # `size` lets latents whose side is not a multiple of 2**levels meet their skip connection exactly
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TimestepEmbedSequential(nn.ModuleList):
    """One UNet stage: layers applied in order, each given what it needs (emb, context or the output size)."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """eps- or v-predicting UNet: (x (B, 4, H, W), timesteps (B,), context (B, M, D)) -> (B, 4, H, W); SDXL's
    also takes the vector y (B, adm_in_channels), embedded by `label_emb` and added to the timestep embedding."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = mc * 4

        def transformer(ch: int, level: int | None) -> SpatialTransformer:
            heads, head_dim = cfg.heads(ch)
            return SpatialTransformer(ch, heads, head_dim, cfg.depth(level), cfg.context_dim, groups,
                                      cfg.use_linear_in_transformer, cfg.dropout)

        # time_embed.{0,2}: Sequential indices are checkpoint keys
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.adm_in_channels is not None:
            # SDXL's vector y (`num_classes: sequential`): label_emb.0.{0,2}, nested as the checkpoint keys are
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, groups, cfg.dropout)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential([Downsample(ch)]))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential([
            ResBlock(ch, emb_dim, ch, groups, cfg.dropout), transformer(ch, None), ResBlock(ch, emb_dim, ch, groups, cfg.dropout)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult, groups, cfg.dropout)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch, level))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(layers))

        # out.{0,2}: checkpoint keys
        self.out = nn.Sequential(normalization(ch, groups), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def _run(self, block: TimestepEmbedSequential, *args) -> Tensor:
        if self.gradient_checkpointing and self.training:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def check_inputs(self, x: Tensor, context: Tensor, y: Tensor | None = None) -> None:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"UNet expects latents of shape (B, {self.cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if context.ndim != 3 or context.shape[-1] != self.cfg.context_dim:
            raise ValueError(f"UNet expects context of shape (B, M, {self.cfg.context_dim}), got {tuple(context.shape)}")
        adm = self.cfg.adm_in_channels
        if adm is None and y is not None:
            raise ValueError("this UNet takes no vector y (only SDXL's do)")
        if adm is not None and (y is None or y.shape != (context.shape[0], adm)):
            raise ValueError(f"this SDXL UNet needs y of shape ({context.shape[0]}, {adm}), one per context, got "
                             f"{None if y is None else tuple(y.shape)}")

    def embed(self, timesteps: Tensor, y: Tensor | None) -> Tensor:
        """The embedding the ResBlocks add: of the timesteps (B,), plus SDXL's vector y (B, adm)."""
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.model_channels).to(dtype))  # (B, 4 * mc)
        return emb if y is None else emb + self.label_emb(y.to(dtype))

    def timesteps_for(self, x: Tensor, timesteps: Tensor | float) -> Tensor:
        """One timestep per latent: a scalar is shared by all."""
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.numel() == 1:
            return timesteps.reshape(()).expand(x.shape[0])
        if timesteps.shape != x.shape[:1]:
            raise ValueError(f"UNet expects one timestep per latent ({x.shape[0]}), got shape {tuple(timesteps.shape)}")
        return timesteps

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        self.check_inputs(x, context, y)
        if context.shape[0] != x.shape[0]:
            raise ValueError(f"UNet got {x.shape[0]} latents for {context.shape[0]} contexts; give one context per "
                             "latent")
        emb = self.embed(self.timesteps_for(x, timesteps), y)
        dtype = emb.dtype
        h = x.to(dtype)
        context = context.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            # the next skip (if any) fixes the size an upsampling layer must produce
            size = tuple(skips[-1].shape[-2:]) if skips else None
            h = self._run(block, h, emb, context, size)
        return self.out(h).to(x.dtype)
