"""Training a small AutoencoderKL from scratch (for the bundled demo model).

Stable Diffusion's VAE was trained with an L1 + LPIPS + patch-GAN loss and a tiny KL weight (Rombach et al.
2022, appendix G). For flat-colour procedural images plain L1 + MSE with the same KL weight is enough, and needs
no pretrained perceptual network (none can be downloaded here). One process, deterministic from the seed:
the batch order, the posterior samples and the initial weights all come from explicit generators.

    loss = |x - x̂|_1 + |x - x̂|² + kl_weight * KL(q(z|x) || N(0, I)) / (H * W)
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from ldm.config import AutoencoderConfig
from ldm.models.vae import AutoencoderKL

KL_WEIGHT = 1e-6  # the SD VAE's (kl_weight in autoencoder_kl_*.yaml)


def train_vae(cfg: AutoencoderConfig, images: Callable[[Sequence[int]], Tensor], *, steps: int, batch_size: int = 32,
              lr: float = 2e-3, seed: int = 0, kl_weight: float = KL_WEIGHT, log: Callable[[dict], None] | None = None,
              progress: bool = True, device: str | torch.device = "cpu") -> AutoencoderKL:
    """Train from a seeded init. `images(indices)` returns (B, 3, H, W) in [-1, 1] for sample indices; index i
    always gives the same image. Cosine learning-rate decay after a 5% linear warm-up. The weights are initialised
    on the CPU and the posterior noise comes from a CPU generator, so the run starts the same on every device."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(cfg).to(device)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="vae", disable=not progress)
    for step in bar:
        x = images(range(step * batch_size, (step + 1) * batch_size)).to(device)
        posterior = vae.encode(x)
        recon = vae.decode(posterior.sample(g))
        rec = (recon - x).abs().mean() + (recon - x).pow(2).mean()
        kl = posterior.kl().mean() / (x.shape[-1] * x.shape[-2])
        loss = rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(rec=f"{rec.item():.4f}")
            if log is not None:
                log({"step": step, "rec": rec.item(), "kl": kl.item(), "lr": sched.get_last_lr()[0],
                     "elapsed_s": time.perf_counter() - start})
    return vae.eval()


@torch.no_grad()
def latent_scale(vae: AutoencoderKL, images: Tensor) -> float:
    """1 / std of the posterior means: the factor that gives latents unit variance (how SD chose 0.18215)."""
    return float(1.0 / vae.encode(images.to(next(vae.parameters()).device)).mean.std())


def finetune_decoder(vae: AutoencoderKL, images: Callable[[Sequence[int]], Tensor], *, steps: int,
                     batch_size: int = 32, lr: float = 5e-4, edge_weight: float = 20.0, seed: int = 0,
                     log: Callable[[dict], None] | None = None) -> AutoencoderKL:
    """Sharpen the decoder with the encoder frozen, so the latent space (and a UNet trained on it) is unchanged,
    as SD's ft-MSE VAE did. The loss is L1 on the decoded posterior mean, weighted up at the edges:

        loss = mean(w |x - D(E(x).mean)|),  w = 1 + edge_weight * mean_c |x - avgpool_3x3(x)|

    The edge term pays for the corners and apexes that decide a shape's class (a blunted triangle reads as a
    circle). Cosine learning-rate decay, no warm-up; deterministic from `seed` via the batch order. Runs on the
    device the VAE is on."""
    torch.manual_seed(seed)
    device = next(vae.parameters()).device
    vae.train().requires_grad_(True)  # a VAE from `ldm.load` comes frozen
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    start = time.perf_counter()
    for step in range(steps):
        x = images(range(step * batch_size, (step + 1) * batch_size)).to(device)
        with torch.no_grad():
            z = vae.encode(x).mean
            edges = (x - torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)).abs().mean(1, True)
        err = (vae.decode(z) - x).abs()
        loss = (err * (1 + edge_weight * edges)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if log is not None and (step % 50 == 0 or step == steps - 1):
            log({"step": step, "loss": loss.item(), "l1": err.mean().item(), "elapsed_s": time.perf_counter() - start})
    vae.requires_grad_(True)
    return vae.eval()
