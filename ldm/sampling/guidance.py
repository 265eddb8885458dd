"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance").

Guidance is linear in the model output, so mixing the unconditional and conditional x_0 predictions,

    D̃ = D(x, σ | ∅) + s (D(x, σ | c) - D(x, σ | ∅))       (Ho & Salimans eq. 6, with scale s = 1 + w)

gives the same sample as mixing ε or v predictions, whichever the network makes. The optional rescale of Lin et
al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed", §3.4) is not linear; it is applied to
v-predictions, as in the paper, so it has the same effect for ε- and v-models.

A guidance interval (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and
Distribution Quality in Diffusion Models") applies guidance only at the noise levels lo < σ <= hi and samples
conditionally elsewhere, without the unconditional pass. Guidance decides the layout and colours at high noise;
at low noise it mostly over-sharpens details (for the demo model: blunted squares that read as crosses).
A1111's "negative guidance minimum sigma" is the special case hi = ∞, used there for speed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.config import Interval, check_interval
from ldm.sampling.denoisers import Denoiser, append_dims


@dataclass(frozen=True)
class Conditioning:
    """What the UNet is conditioned on, row by row: the cross-attention context (B, M, D) and, for SDXL, the
    vector y (B, adm) of the pooled text embedding and the size conditions. A plain context tensor stands for
    itself wherever a Conditioning is taken."""
    context: Tensor
    y: Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.context.shape

    def __getitem__(self, rows: slice) -> Conditioning:
        return Conditioning(self.context[rows], None if self.y is None else self.y[rows])


def cat_conditions(conds: list[Tensor | Conditioning]) -> Tensor | Conditioning:
    """The rows of `conds` one after the other (torch.cat for plain contexts)."""
    if not isinstance(conds[0], Conditioning):
        return torch.cat(conds)
    ys = [c.y for c in conds]
    return Conditioning(torch.cat([c.context for c in conds]), None if ys[0] is None else torch.cat(ys))


def x0_to_v(x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
    """The v-prediction that corresponds to the x_0 prediction `x0` at the VE point (x, σ):
    v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x_0 (Salimans & Ho 2022, §4) with ε = (x - x_0) / σ and sqrt(ᾱ) = 1 / sqrt(σ² + 1)."""
    s = append_dims(sigma, x.ndim)
    return ((x - x0) / s - s * x0) / (s ** 2 + 1).sqrt()


def v_to_x0(x: Tensor, sigma: Tensor, v: Tensor) -> Tensor:
    """Inverse of `x0_to_v`: x_0 = ᾱ x - σ sqrt(ᾱ) v, with ᾱ = 1 / (σ² + 1)."""
    s = append_dims(sigma, x.ndim)
    return (x - s * (s ** 2 + 1).sqrt() * v) / (s ** 2 + 1)


def rescale_guidance(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """Lin et al. 2023, eqs. (15)-(16): scale the guided prediction so that its per-sample standard deviation
    matches the conditional one, then mix with the plain guided prediction by φ.

        x_rescaled = x_cfg · std(x_pos) / std(x_cfg)                              (15)
        x_final = φ x_rescaled + (1 - φ) x_cfg                                      (16)
    """
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1.0 - phi) * guided


class CFGDenoiser:
    """A denoiser that applies classifier-free guidance to another one.

    `cond` and `uncond` are the text embeddings (B, L, D) of the prompts and of the negative prompts (the
    empty prompt's embedding when there is none), or their `Conditioning`s. For `scale` != 1 the unconditional and
    conditional passes run as one batch [uncond, cond] of size 2B (x itself given once when the inner denoiser
    `shares_latents`); `scale` == 1 is plain conditional sampling and skips the unconditional pass.
    `guidance_rescale` is φ of Lin et al. 2023 (0.7 in the paper, for v-models).
    `interval` (lo, hi) limits guidance to lo < σ <= hi (see the module's docstring; None: every σ).
    """

    def __init__(self, denoiser: Denoiser, cond: Tensor | Conditioning, uncond: Tensor | Conditioning | None,
                 scale: float, guidance_rescale: float = 0.0, interval: Interval | None = None):
        if scale != 1.0 and uncond is None:
            raise ValueError(f"guidance scale {scale} needs an unconditional embedding (uncond)")
        if uncond is not None and uncond.shape != cond.shape:
            raise ValueError(f"uncond has shape {tuple(uncond.shape)} but cond has {tuple(cond.shape)}; encode "
                             "the negative prompts with the same batch size and length")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        self.inner = denoiser
        self.cond, self.uncond = cond, uncond
        self.scale = float(scale)
        self.guidance_rescale = float(guidance_rescale)
        self.interval = check_interval(interval)

    @property
    def log_sigmas(self) -> Tensor:
        """The wrapped denoiser's σ table, so `make_sigmas(cfg_denoiser, ...)` works."""
        return self.inner.log_sigmas

    def guides(self, sigma: Tensor) -> Tensor | None:
        """(B,) bool: which samples get guidance at these noise levels; None: all of them (no interval)."""
        if self.interval is None:
            return None
        lo, hi = self.interval
        inside = sigma > lo
        return inside if hi is None else inside & (sigma <= hi)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        if self.scale == 1.0:
            return self.inner(x, sigma, cond=self.cond)
        guides = self.guides(sigma)
        if guides is not None and not guides.any():  # outside the guidance interval: the conditional pass alone
            return self.inner(x, sigma, cond=self.cond)
        conds = cat_conditions([self.uncond, self.cond])
        if getattr(self.inner, "shares_latents", False):  # both passes from one copy of x (UNetModel's docstring)
            out = self.inner(x, sigma, cond=conds)
        else:
            out = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=conds)
        x0_uncond, x0_cond = out.chunk(2)
        guided = x0_uncond + self.scale * (x0_cond - x0_uncond)              # Ho & Salimans eq. (6)
        if self.guidance_rescale != 0.0:
            s = sigma.to(x.dtype)
            v = rescale_guidance(x0_to_v(x, s, guided), x0_to_v(x, s, x0_cond), self.guidance_rescale)
            guided = v_to_x0(x, s, v)
        return guided if guides is None or guides.all() else torch.where(append_dims(guides, x.ndim), guided, x0_cond)
