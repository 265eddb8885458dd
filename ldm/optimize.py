"""Inference speed-ups that keep the numerics: prepacked CPU weights and opt-in torch.compile.

Prepacked weights (CPU). PyTorch runs CPU convolutions and linear layers through oneDNN, which computes in a
blocked weight layout (e.g. OIhw16i16o). An eager `nn.Conv2d` keeps its weight in the plain OIHW layout, so
every call first reorders the whole weight: for SD's 1280-channel convolutions at 8x8 or 4x4 latents that
reorder costs as much as the arithmetic (a 59 MB weight copied for 2-4 GFLOP of work). Inside
`packed_weights(model)`, every Conv2d and Linear of `model` computes from a copy of its weight reordered once,
and the plain weight is released meanwhile, so memory does not grow; on exit the plain weights are restored
bit for bit. Outputs equal the plain path up to float summation order (~1e-6 relative). Convolutions then
return channels-last tensors, which the following GroupNorm, SiLU, adds and attention reshapes take as they
are (no transposes; `to(memory_format=...)` is never needed).

While packed, a module's `weight` is a placeholder with the right shape and dtype but no data: the context
is for inference only (no autograd, no `.to()`, no `state_dict()` inside it). The pipeline enters it for the
duration of a txt2img/img2img call on CPU.

torch.compile (opt-in, `compile_unet`): inductor fuses the elementwise work (GroupNorm + SiLU, GEGLU, residual
adds) and packs weights itself. The first call compiles (tens of seconds on CPU for SD's UNet, once per input
shape); later calls are faster.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PACKED_ATTR = "_ldm_packed"
PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def mkldnn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _placeholder(t: Tensor) -> Tensor:
    """A tensor with `t`'s shape, dtype and device that holds one element (all strides 0)."""
    return torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)


def _eligible(self: nn.Module, x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == self.weight.dtype and not (torch.is_grad_enabled() and x.requires_grad)


def _packed(self: nn.Module, reorder) -> Tensor:
    """The packed weight, made on the first call (oneDNN picks its layout for the input shape it sees)."""
    w = self.__dict__[PACKED_ATTR]
    if w.layout == torch.strided:
        w = self.__dict__[PACKED_ATTR] = reorder(w)
        self.weight.data = _placeholder(w)  # frees the plain weight (unless something else holds it, e.g. an mmap)
    return w


def _dense(self: nn.Module) -> Tensor:
    w = self.__dict__[PACKED_ATTR]
    return w if w.layout == torch.strided else w.to_dense()


def _packed_conv(self: nn.Conv2d, x: Tensor) -> Tensor:
    bias = None if self.bias is None else self.bias.detach()
    if not _eligible(self, x):
        return self._conv_forward(x, _dense(self), bias)
    args = list(self.padding), list(self.stride), list(self.dilation), self.groups
    w = _packed(self, lambda w: torch.ops.mkldnn._reorder_convolution_weight(w, *args, list(x.shape)))
    return torch.ops.mkldnn._convolution_pointwise(x, w, bias, *args, "none", [], "")


def _packed_linear(self: nn.Linear, x: Tensor) -> Tensor:
    bias = None if self.bias is None else self.bias.detach()
    if not _eligible(self, x):
        return F.linear(x, _dense(self), bias)
    x2 = x.reshape(-1, x.shape[-1])
    w = _packed(self, lambda w: torch.ops.mkldnn._reorder_linear_weight(w, x2.shape[0]))
    out = torch.ops.mkldnn._linear_pointwise(x2, w, bias, "none", [], "")
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _pack(m: nn.Module) -> bool:
    # exact types only: subclasses such as nn.MultiheadAttention's out_proj are used through their weight
    if type(m) not in (nn.Conv2d, nn.Linear) or PACKED_ATTR in m.__dict__:
        return False
    w = m.weight
    if w.device.type != "cpu" or w.dtype not in PACKABLE_DTYPES:
        return False
    if type(m) is nn.Conv2d and not (m.padding_mode == "zeros" and isinstance(m.padding, tuple)):
        return False
    m.__dict__[PACKED_ATTR] = w.detach()
    m.forward = (_packed_conv if type(m) is nn.Conv2d else _packed_linear).__get__(m)
    return True


def _unpack(m: nn.Module) -> None:
    w = m.__dict__.pop(PACKED_ATTR)
    if w.layout != torch.strided:
        m.weight.data = w.to_dense()  # a permutation of the values back: bit-exact
    del m.forward


@contextlib.contextmanager
def packed_weights(model: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within the block, `model`'s CPU Conv2d/Linear layers (fp32 or bf16) compute from prepacked weights.

    Yields the number of layers packed (0 when disabled, off CPU, or when oneDNN is unavailable). Nested or
    repeated use is fine: layers already packed are left to the outer block."""
    modules = [m for m in model.modules() if enabled and mkldnn_available() and _pack(m)]
    try:
        yield len(modules)
    finally:
        for m in modules:
            _unpack(m)


def compile_unet(unet: nn.Module, **kwargs) -> nn.Module:
    """torch.compile the UNet in place (`nn.Module.compile`); its state_dict keys are unchanged."""
    unet.compile(**kwargs)
    return unet


def is_packed(model: nn.Module) -> bool:
    """Whether some layer of `model` is inside a `packed_weights` block."""
    return any(PACKED_ATTR in m.__dict__ for m in model.modules())
