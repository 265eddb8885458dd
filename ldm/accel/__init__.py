"""CPU speed code, applied to a model by explicit opt-in and never by the networks themselves.

    sd = ldm.load("v1-5-pruned-emaonly.safetensors")   # accelerate=True (the default): comes back accelerated
    ldm.accel.accelerate(model)                         # opt in on a model built otherwise (returns it)
    ldm.accel.plain(model)                              # the plain networks again, weights bit for bit

`ldm.models` holds the plain networks, which read like the CompVis code. `accelerate(model)` changes the model it is
handed, in place and only that one, for inference:
- its UNet and VAE blocks run the forwards of `ldm.accel.forwards` (in-place sums and activations, shared-latent
  guidance, cheaper upsampling): the same results as the plain forwards, to the bit;
- on CPU, where oneDNN computes the weights' dtype (`ldm.accel.cpu.onednn_supports`), its Conv2d and Linear layers
  compute from weights prepacked once for oneDNN, large 3x3 convolutions by Winograd's algorithm
  (`ldm.accel.optimize`): the same results up to float summation order (~1e-6 relative in fp32);
- the pipeline keeps freed heap memory through its sampling loop (`ldm.accel.sampling`).

A direct call of an accelerated model's networks (`sd.unet(x, t, context)`, `sd.vae.decode(z)`) gets all of it; the
UNet then also accepts k contexts per latent (`ldm.accel.forwards`). Anything else that uses a packed weight
(`state_dict()`, an optimizer, autograd) first gets the plain weight back, bit for bit, and the layer packs again at
its next inference call. The text encoder stays plain: it runs twice per image on 77 tokens, where packing costs
more than it saves.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from ldm.accel import optimize
from ldm.accel.forwards import FORWARDS

ACCEL_ATTR = "_ldm_accelerated"  # set on a model `accelerate` was applied to


def _parts(model: nn.Module) -> list[nn.Module]:
    """What `accelerate` changes: a StableDiffusion's UNet and VAE, or the module itself."""
    return [model.unet, model.vae] if hasattr(model, "unet") and hasattr(model, "vae") else [model]


def accelerate(model: nn.Module) -> nn.Module:
    """Runs `model` (a StableDiffusion, its UNet or VAE, or any module holding their blocks) on ldm's speed code
    from now on (see the module docstring); returns it. Applying it twice changes nothing."""
    for part in _parts(model):
        for m in part.modules():
            forward = FORWARDS.get(type(m))
            if forward is not None and "forward" not in m.__dict__:
                m.forward = forward.__get__(m)
        if not optimize.is_compiled(part):
            optimize.mark_for_packing(part)
        part.__dict__[ACCEL_ATTR] = True
    model.__dict__[ACCEL_ATTR] = True
    return model


def plain(model: nn.Module) -> nn.Module:
    """Undoes `accelerate`: the plain forwards and plain weights (bit for bit) again; returns the model."""
    for part in _parts(model):
        optimize.unpack_weights(part)
        for m in part.modules():
            if FORWARDS.get(type(m)) is not None and "forward" in m.__dict__:
                del m.forward
        part.__dict__.pop(ACCEL_ATTR, None)
    model.__dict__.pop(ACCEL_ATTR, None)
    return model


def is_accelerated(model: nn.Module) -> bool:
    return ACCEL_ATTR in model.__dict__


def shares_latents(unet: nn.Module) -> bool:
    """Whether `unet` takes k contexts per latent (an accelerated UNet does)."""
    return is_accelerated(unet)


@contextlib.contextmanager
def sampling(unet: nn.Module, rows: int, h: int, w: int) -> Iterator[None]:
    """What a sampling loop of UNet calls on `rows` latents of h x w runs in: for an accelerated UNet on CPU, freed
    heap memory kept for the next step and the weights derived for the loop freed after it
    (`optimize.sampling_memory`); for a plain one, nothing."""
    device = next(unet.parameters()).device
    if not is_accelerated(unet):
        yield
        return
    with optimize.sampling_memory(unet, rows, h, w, device):
        yield


def release(model: nn.Module) -> None:
    """Frees the weights an accelerated model derived for its last calls (Winograd, upsampling phases), so that the
    next phase's memory peak does not carry them; nothing for a plain model."""
    if is_accelerated(model):
        optimize.release_derived_weights(model)


def compile_unet(unet: nn.Module, mode: str | None = "auto") -> nn.Module:
    """`torch.compile` of the UNet (`optimize.compile_unet`), which packs its own CPU weights."""
    return optimize.compile_unet(unet, mode)


__all__ = ["accelerate", "compile_unet", "is_accelerated", "plain", "release", "sampling", "shares_latents"]
