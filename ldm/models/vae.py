"""AutoencoderKL: the Stable Diffusion VAE, in the layout of CompVis `ldm.modules.diffusionmodules.model`.

Keys under `first_stage_model.`: `encoder.*`, `decoder.*`, `quant_conv`, `post_quant_conv`. Images are
(B, 3, H, W) in [-1, 1]; latents are (B, z, H/f, W/f), f = 8. `encode` returns the diagonal Gaussian
posterior; `decode` takes *unscaled* latents (multiply sampled latents by 1 / scale_factor first).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.models.attention import attention
from ldm.config import AutoencoderConfig
from ldm.models.tiling import DEFAULT_TILE_SIZE, tiled_decode, tiled_encode

LOGVAR_RANGE = (-30.0, 20.0)  # clamp of the posterior log-variance, as in the original


def norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.nin_shortcut is None else self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with 1x1 convs as projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def attend(self, y: Tensor) -> Tensor:
        """Attention of the normalised input y (B, C, H, W) over itself, before the output projection."""
        b, c, h, w = y.shape
        q, k, v = (proj(y).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # (B, N, C)
        return attention(q, k, v, heads=1).transpose(1, 2).reshape(b, c, h, w)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.proj_out(self.attend(self.norm(x)))


class Downsample(nn.Module):
    """Stride-2 conv with the original's asymmetric padding (right and bottom only)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: `block.N`, then `downsample` or `upsample` (checkpoint keys)."""

    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None, name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = name
        if resample is not None:
            self.add_module(name, resample)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        resample = getattr(self, self.resample_name, None)
        return x if resample is None else resample(x)


class Mid(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        g = cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            out = cfg.ch * mult
            blocks = [ResnetBlock(ch if j == 0 else out, out, g) for j in range(cfg.num_res_blocks)]
            last = i == len(cfg.ch_mult) - 1
            self.down.append(Level(blocks, None if last else Downsample(out), "downsample"))
            ch = out
        self.mid = Mid(ch, g)
        self.norm_out = norm(ch, g)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        g = cfg.norm_groups
        ch = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = Mid(ch, g)
        # `up` is indexed by resolution level (up.0 is the full-resolution one) but runs from the last
        levels: list[Level] = []
        for i, mult in reversed(list(enumerate(cfg.ch_mult))):
            out = cfg.ch * mult
            blocks = [ResnetBlock(ch if j == 0 else out, out, g) for j in range(cfg.num_res_blocks + 1)]
            levels.insert(0, Level(blocks, Upsample(out) if i != 0 else None, "upsample"))
            ch = out
        self.up = nn.ModuleList(levels)
        self.norm_out = norm(ch, g)
        self.conv_out = nn.Conv2d(ch, cfg.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, diag(exp(logvar)))."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(*LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """mean + std * noise; a list of generators draws image i's noise from generator i, on the CPU."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != self.mean.shape[0]:
                raise ValueError(f"got {len(generator)} generators for a batch of {self.mean.shape[0]}")
            noise = torch.cat([torch.randn(self.mean.shape[1:], generator=g, device=g.device, dtype=torch.float32)[None]
                               for g in generator])
        else:
            device = generator.device if generator is not None else self.mean.device
            noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        return self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per image, summed over latent dimensions."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, images: Tensor, tiled: bool = False, tile_size: int = DEFAULT_TILE_SIZE) -> DiagonalGaussian:
        """(B, 3, H, W) in [-1, 1] -> posterior over unscaled latents (B, z, H/f, W/f). `tiled` computes it in
        tiles of tile_size x tile_size pixels to bound memory, with the same result (see `ldm.models.tiling`)."""
        f = self.cfg.downsample_factor
        if images.ndim != 4 or images.shape[1] != self.cfg.in_channels:
            raise ValueError(f"VAE expects images of shape (B, {self.cfg.in_channels}, H, W), got {tuple(images.shape)}")
        if images.shape[-1] % f or images.shape[-2] % f:
            raise ValueError(f"image size {tuple(images.shape[-2:])} must be a multiple of {f}")
        if tiled:
            return DiagonalGaussian(tiled_encode(self, images, tile_size))
        dtype = self.quant_conv.weight.dtype
        return DiagonalGaussian(self.quant_conv(self.encoder(images.to(dtype))))

    def decode(self, latents: Tensor, tiled: bool = False, tile_size: int = DEFAULT_TILE_SIZE) -> Tensor:
        """Unscaled latents (B, z, h, w) -> images (B, 3, h*f, w*f), nominally in [-1, 1]. `tiled` computes it in
        tiles of tile_size x tile_size output pixels to bound memory, with the same result (see `ldm.models.tiling`)."""
        if latents.ndim != 4 or latents.shape[1] != self.cfg.embed_dim:
            raise ValueError(f"VAE expects latents of shape (B, {self.cfg.embed_dim}, h, w), got {tuple(latents.shape)}")
        if tiled:
            return tiled_decode(self, latents, tile_size)
        dtype = self.post_quant_conv.weight.dtype
        return self.decoder(self.post_quant_conv(latents.to(dtype)))

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        posterior = self.encode(images)
        return self.decode(posterior.sample(generator)), posterior
