"""Inference speed-ups that keep the numerics: prepacked CPU weights, cheaper upsampling and convolutions, kept
heap memory and opt-in torch.compile.

Prepacked weights (CPU). PyTorch runs CPU convolutions and linear layers through oneDNN, which computes in a
blocked weight layout (e.g. OIhw16i16o). An eager `nn.Conv2d` keeps its weight in the plain OIHW layout, so
every call first reorders the whole weight: for SD's 1280-channel convolutions at 8x8 or 4x4 latents that
reorder costs as much as the arithmetic (a 59 MB weight copied for 2-4 GFLOP of work). Inside
`packed_weights(model)`, every Conv2d and Linear of `model` computes from a copy of its weight reordered once,
and the plain weight is released meanwhile, so memory does not grow; on exit the plain weights are restored
bit for bit. Outputs equal the plain path up to float summation order (~1e-6 relative). Convolutions then
return channels-last tensors, which the following GroupNorm, SiLU, adds and attention reshapes take as they
are (no transposes; `to(memory_format=...)` is never needed).

While packed, a module's `weight` is a placeholder (`PackedWeight`) with the right shape, dtype and device but
no data of its own: reading its shape, dtype or device costs nothing, and any other use of it (`state_dict()`,
arithmetic, `.to()`, an optimizer, `requires_grad_()`) first gives the layer its plain weight back, bit for bit,
so nothing outside ldm's packed forward can see the placeholder. A call the packed weight cannot serve
(autograd, another device or dtype) does the same and computes from the plain weight. `mark_for_packing` (what
`ldm.accel.accelerate` uses) marks the layers for good: each packs at its first call and again after such a
restore, so that only a model's first call pays for packing (SD 1.5, 2 cores: ~2-3 s; docs/benchmarks.md).
Packing and restoring a layer hold a lock, so two threads running one model pack each layer once.

Upsampling (CPU, inside the block): `upsample_conv` computes the nearest x2 upsampling and 3x3 convolution of
the UNet and the VAE as four 2x2 convolutions of the small input, 4/9 of the work (SD 1.5 at 512 px: VAE decode
-9%, UNet step -2%).

Cheaper convolutions (CPU, fp32 and bf16, inside the block): 3x3 convolutions of 256 channels or more on inputs of 12
pixels a side or more, with 2048 output pixels or more per call, take Winograd's F(2x2, 3x3) (`ldm.accel.winograd`),
4/9 of the multiply-adds, from a transformed weight cached beside the plain one: for SD 1.5 at 512 px with
guidance, the UNet's 64 x 64 and 32 x 32 levels (0.42 GB), released by `release_derived_weights` when sampling
ends, and the VAE decoder's 512- and 256-channel convolutions, each made, used and freed in turn (`single_pass`).
Convolutions of more than SPLIT_CHANNELS input channels run in pieces. SD 1.5 at 512 px, 2 cores: UNet step -13%,
VAE decode -10%.

Kept heap memory (CPU, glibc): `keep_freed_memory`, entered around an accelerated model's sampling loop, keeps the
memory each UNet step frees for the next step instead of returning it to the kernel, which would fault it in
afresh (~1 GB per SD 1.5 step at 512 px).

torch.compile (opt-in, `compile_unet`): on CUDA with CUDA graphs, on CPU with inductor's freezing (which packs
weights itself). The first call per input shape compiles (about 70 s on an H100, minutes on 2 CPU cores).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
import threading
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves

from ldm.accel.cpu import onednn_supports
from ldm.accel.winograd import winograd_conv3x3, winograd_weight, workspace

PACKED_ATTR = "_ldm_packed"  # the packed weight; for a conv split by input channels, a tuple of packed pieces
UPSAMPLE_ATTR = "_ldm_packed_upsample"  # a conv's packed phase weights for `upsample_conv`, with their bias
WINOGRAD_ATTR = "_ldm_winograd"  # a conv's Winograd weight for `winograd_conv3x3`, with its bias
KEEP_ATTR = "_ldm_keep_packed"  # on a layer `mark_for_packing` marked: it packs again after a restore
# Where fp32 and bf16 3x3 convolutions take Winograd's algorithm (`ldm.accel.winograd`) inside the block, measured on 2 cores
# (docs/benchmarks.md, `tools/probe.py conv`): inputs of 12 pixels a side or more (smaller ones waste much of their
# tiles), 256 channels or more in and out (with fewer, the products are too small to outweigh the transforms), and
# at least 2048 output pixels per call, so that the time saved is worth the cached weight (16/9 the plain one, kept
# beside it): the UNet's 64 x 64 and 32 x 32 levels with guidance (SD 1.5 at 512 px: 0.42 GB) and the VAE
# decoder's 512- and 256-channel convolutions (0.30 GB), not the UNet's 16 x 16 level (1.2 GB more for -0.3 s
# per step) nor its 8 x 8 one. In bf16 (AMD Zen 4, AVX-512 BF16) it takes 0.36-0.68 of oneDNN's direct bf16
# convolution's time at these shapes, for 2.5-3x its rounding error (~1e-2 of the output's largest value, about one
# bf16 step; docs/benchmarks.md, the bf16 Winograd table).
WINOGRAD_DTYPES = (torch.float32, torch.bfloat16)
WINOGRAD_MIN_SIZE = 12
WINOGRAD_MIN_PIXELS = 2048
WINOGRAD_MIN_CHANNELS = 256
# fp32 convolutions with more input channels than this (the UNet decoder's, on the skip connection concatenated
# to its input) run as convolutions of at most this many channels each, summed in place: oneDNN's direct
# convolution of 2560 channels is 0.76x as fast as two of 1280 (SD 1.5, 16 x 16 latents, batch 2)
SPLIT_CHANNELS = 1280
# glibc's mallopt parameters (malloc.h), and the values its dynamic thresholds settle at in a process that frees
# large blocks (mmap threshold: at most 32 MiB; trim threshold: twice that)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_GLIBC_SETTLED_MMAP, _GLIBC_SETTLED_TRIM = 32 << 20, 64 << 20
_LOCK = threading.RLock()  # packing and restoring a layer
_heap = {"depth": 0, "largest": 0}  # open keep_freed_memory blocks in the process, the largest size they keep
_HEAP_LOCK = threading.Lock()
_single_pass = threading.local()  # depth: open single_pass blocks in this thread


def mkldnn_available() -> bool:
    """Whether oneDNN's CPU kernels can pack and compute fp32 here (bf16: `ldm.accel.cpu.onednn_supports`)."""
    return onednn_supports(torch.float32)


def _placeholder(t: Tensor) -> Tensor:
    """A tensor with `t`'s shape, dtype and device that holds one element (all strides 0)."""
    return torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)


# What a PackedWeight answers from its placeholder: the plain weight's shape, dtype and device (its strides and
# data are the placeholder's, so every other use restores the layer first).
_METADATA = frozenset([
    *(getattr(Tensor, name).__get__ for name in ("shape", "dtype", "device", "layout", "ndim", "requires_grad",
                                                  "is_leaf", "grad", "is_cuda", "is_cpu", "is_meta", "is_sparse",
                                                  "is_quantized", "is_mkldnn")),
    Tensor.size, Tensor.dim, Tensor.numel, Tensor.element_size, Tensor.is_floating_point, Tensor.is_complex,
    Tensor.get_device, Tensor.__len__,
])


class PackedWeight(nn.Parameter):
    """The `weight` of a layer whose weight is packed (`packed_weights`): a placeholder of the plain weight's
    shape, dtype and device. Any use other than reading those restores the layer's plain weight into this same
    Parameter object (so optimizers and other holders of it see the values) and then proceeds as on a plain
    Parameter."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func not in _METADATA:  # restores every packed weight among the arguments (lists included: torch.cat)
            for t in tree_leaves((args, kwargs)):
                if type(t) is PackedWeight:
                    _restore_owner(t)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    def __deepcopy__(self, memo: dict) -> nn.Parameter:
        """A plain Parameter with the weight's values; the layer stays packed. Its copy gets no packed weight: the
        packed tensors (which cannot be copied) copy to None, so the copied layer packs its own when it runs. (A
        module's `_parameters` come before the packed weight in its __dict__, so this runs first.)"""
        packed = _owner(self).__dict__[PACKED_ATTR]
        for t in (packed, *_pieces(packed)):
            memo[id(t)] = None
        copy = nn.Parameter(_to_dense(packed), self.requires_grad)
        memo[id(self)] = copy
        return copy


def _owner(w: PackedWeight) -> nn.Module:
    layer = w.__dict__["_ldm_layer"]()
    if layer is None:  # the layer is gone, and its packed weight with it: no values to give
        raise RuntimeError("this weight was packed for inference (ldm.accel.optimize) and its layer no longer exists")
    return layer


def _restore_owner(w: PackedWeight) -> None:
    _restore(_owner(w))


def _eligible(self: nn.Module, x: Tensor) -> bool:
    """Whether the packed weight can serve this call: CPU inference in the packed dtype, which oneDNN must be able
    to pack on this CPU (a module cast to fp64, or to bf16 on a CPU without oneDNN bf16, inside the block computes
    from its plain weight)."""
    packed = self.__dict__[PACKED_ATTR]
    dtype = self.weight.dtype if packed is None else _pieces(packed)[0].dtype
    return (x.device.type == "cpu" and self.weight.device.type == "cpu" and x.dtype == dtype
            and onednn_supports(dtype)
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)))


def _packed(self: nn.Module, reorder) -> Tensor:
    """The packed weight, made on the first call (oneDNN picks its layout for the input shape it sees)."""
    packed = self.__dict__[PACKED_ATTR]
    if packed is not None:
        return packed
    with _LOCK:  # two threads making the same layer's first call pack it once
        packed = self.__dict__[PACKED_ATTR]
        if packed is not None:
            return packed
        packed = self.__dict__[PACKED_ATTR] = reorder(self.weight.detach())
        # frees the plain weight (unless something else holds it, e.g. a memory-mapped file)
        w = self.weight
        w.data = _placeholder(w)
        w.__dict__["_ldm_class"] = type(w)
        w.__dict__["_ldm_layer"] = weakref.ref(self)
        w.__class__ = PackedWeight
        return packed


def _pieces(packed: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return packed if isinstance(packed, tuple) else (packed,)


def _to_dense(packed: Tensor | tuple[Tensor, ...]) -> Tensor:
    """The plain weight of a packed one, bit for bit (pieces split by input channels are concatenated)."""
    if not isinstance(packed, tuple):
        return packed.to_dense()
    return torch.cat([p.to_dense() for p in packed], dim=1)


def _plain(self: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """The plain weight and bias for x: on x's device and in its dtype, or, under autograd, the Parameters
    themselves. A packed layer gets its plain weight back: this call is one the packed weight cannot serve
    (autograd, another device or dtype)."""
    if PACKED_ATTR in self.__dict__:
        _restore(self)
    if torch.is_grad_enabled():
        return self.weight, self.bias
    return self.weight.to(x.device, x.dtype), _bias(self, x)


def _dense(self: nn.Module, x: Tensor) -> Tensor:
    """The plain weight in x's dtype, to derive a weight from (Winograd, upsampling phases): from the packed copy
    if the layer holds one (a call at another size packed it), which stays."""
    packed = self.__dict__.get(PACKED_ATTR)
    return (self.weight.detach() if packed is None else _to_dense(packed)).to(x.device, x.dtype)


def _bias(self: nn.Module, x: Tensor) -> Tensor | None:
    return None if self.bias is None else self.bias.detach().to(x.dtype)


def _conv(conv: nn.Conv2d, x: Tensor, padding: list[int], stride: list[int]) -> Tensor:
    """`conv`'s convolution of x with the given zero padding and stride: from the packed weight where it can
    serve, else F.conv2d on the plain one."""
    if PACKED_ATTR not in conv.__dict__:
        return F.conv2d(x, conv.weight, conv.bias, stride, padding, conv.dilation, conv.groups)
    if not _eligible(conv, x):
        return F.conv2d(x, *_plain(conv, x), stride, padding, conv.dilation, conv.groups)
    if padding == [1, 1] and stride == [1, 1] and _winograd_pays(conv, x):
        return _winograd(conv, x)
    args = padding, stride, list(conv.dilation), conv.groups
    pieces = _pieces(_packed(conv, lambda w: _reorder_conv(w, args, x)))
    size = pieces[0].shape[1]  # input channels per piece
    out = torch.ops.mkldnn._convolution_pointwise(x[:, :size], pieces[0], _bias(conv, x), *args, "none", [], "")
    for i, piece in enumerate(pieces[1:], 1):  # out += conv of the next channels, in oneDNN's epilogue
        out = torch.ops.mkldnn._convolution_pointwise_.binary(out, x[:, i * size:(i + 1) * size], piece, None,
                                                              *args, "add", 1.0, None, [], None)
    return out


def _reorder_conv(w: Tensor, args: tuple, x: Tensor) -> Tensor | tuple[Tensor, ...]:
    """w packed for x's shape; in pieces of at most SPLIT_CHANNELS input channels (fp32).

    For a channels-last input oneDNN packs from a channels-last weight: handed a plain (OIHW) one, it first copies
    it to that layout in fresh memory. The copy made here goes to this thread's kept workspace instead, which
    takes 0.4-0.65 of the time per weight on 2 cores (1280 channels: 27 against 41 ms; 640: 3 against 8 ms; the
    first UNet step of an SD 1.5 call at 256 px: 2.65 against 3.15 s)."""
    count = -(-w.shape[1] // SPLIT_CHANNELS) if w.dtype == torch.float32 else 1
    size = -(-w.shape[1] // count)
    last = w.shape[2:] != (1, 1) and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    pieces = []
    for i in range(0, w.shape[1], size):
        piece = w[:, i:i + size]
        if last:  # (O, I, kh, kw) with channels-last strides, in the workspace
            o, c, kh, kw = piece.shape
            piece = workspace().take(piece, (o, kh, kw, c))[0].permute(0, 3, 1, 2).copy_(piece)
        else:
            piece = piece.contiguous()
        shape = [x.shape[0], piece.shape[1], *x.shape[2:]]
        pieces.append(torch.ops.mkldnn._reorder_convolution_weight(piece, *args, shape))
    return tuple(pieces) if count > 1 else pieces[0]


def _winograd_pays(conv: nn.Conv2d, x: Tensor) -> bool:
    n, _, h, w = x.shape
    return (x.dtype in WINOGRAD_DTYPES and not torch.is_grad_enabled() and _is_3x3_same(conv)
            and min(h, w) >= WINOGRAD_MIN_SIZE and n * h * w >= WINOGRAD_MIN_PIXELS
            and min(conv.in_channels, conv.out_channels) >= WINOGRAD_MIN_CHANNELS)


def _derived(conv: nn.Conv2d, attr: str, make, dtype: torch.dtype) -> tuple:
    """conv's weight derived by `make()` for inputs of `dtype`, kept as conv.<attr> until `release_derived_weights`
    (or until a call in another dtype, e.g. the pipeline's fp32 retry of a bf16 VAE decode); inside a `single_pass`
    block made, used and freed."""
    derived = conv.__dict__.get(attr)
    if derived is not None and derived[0].dtype != dtype:
        derived = None
    if derived is None:
        derived = make()
        if not getattr(_single_pass, "depth", 0):
            conv.__dict__[attr] = derived
    return derived


@contextlib.contextmanager
def single_pass() -> Iterator[None]:
    """For a forward pass in which each layer runs once (the VAE's untiled decode and encode): in this thread,
    derived weights (Winograd, upsampling phases) are made, used and freed instead of kept, so that the pass's
    peak memory does not carry those of the layers it has passed (SD 1.5 decoder at 512 px: 0.3 GB)."""
    _single_pass.depth = getattr(_single_pass, "depth", 0) + 1
    try:
        yield
    finally:
        _single_pass.depth -= 1


def _winograd(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """conv(x) by `winograd_conv3x3`, from a Winograd weight made once per block (per call in a `single_pass`). A
    conv that takes this path keeps its plain weight (nothing is packed for it), so the cache is 16/9 of the weight
    in addition."""
    return winograd_conv3x3(x, *_derived(conv, WINOGRAD_ATTR, lambda: (winograd_weight(_dense(conv, x)),
                                                                       _bias(conv, x)), x.dtype))


def _packed_conv(self: nn.Conv2d, x: Tensor) -> Tensor:
    return _conv(self, x, list(self.padding), list(self.stride))


def _packed_linear(self: nn.Linear, x: Tensor) -> Tensor:
    if not _eligible(self, x):
        return F.linear(x, *_plain(self, x))
    x2 = x.reshape(-1, x.shape[-1])
    w = _packed(self, lambda w: torch.ops.mkldnn._reorder_linear_weight(w, x2.shape[0]))
    out = torch.ops.mkldnn._linear_pointwise(x2, w, _bias(self, x), "none", [], "")
    return out.reshape(*x.shape[:-1], out.shape[-1])


def conv2d(conv: nn.Conv2d, x: Tensor, padding: int, stride: int = 1) -> Tensor:
    """`conv`'s convolution with another zero padding (for tiled execution, `ldm.models.tiling`), on its packed weight
    inside a `packed_weights` block."""
    return _conv(conv, x, [padding] * 2, [stride] * 2)


# Which taps of a 3x3 kernel (columns) each output row phase of a nearest x2 upsampling reads from which input
# row (rows): output row 2i (phase 0) reads input rows i-1 (tap 0) and i (taps 1 and 2); row 2i+1 (phase 1) reads
# rows i (taps 0 and 1) and i+1 (tap 2). The same holds for columns.
_PHASE_TAPS = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))  # (phase, input row, tap)


def upsample_weight(weight: Tensor) -> Tensor:
    """A 3x3 kernel (O, I, 3, 3) as the four 2x2 kernels (4 * O, I, 2, 2) of `upsample_conv`, phase (a, b) of the
    output rows and columns in rows (2 * a + b) * O to (2 * a + b + 1) * O; sums taken in fp32, one matrix product
    over the 9 taps per phase."""
    o, i = weight.shape[:2]
    taps = torch.tensor(_PHASE_TAPS, device=weight.device)
    phases = torch.einsum("apk,bql->abpqkl", taps, taps).reshape(4, 4, 9)  # (phase a b, tap p q, tap k l)
    w = weight.float().reshape(o * i, 9)
    out = w.new_empty(4, o * i, 4)
    for ab in range(4):
        torch.mm(w, phases[ab].t(), out=out[ab])
    return out.view(4 * o, i, 2, 2).to(weight.dtype)


def _is_3x3_same(conv: nn.Conv2d) -> bool:
    """A 3x3 convolution that keeps the size (stride 1, padding 1), dense (no dilation or groups)."""
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1)


def _upsamples_fast(conv: nn.Conv2d, x: Tensor) -> bool:
    return (PACKED_ATTR in conv.__dict__ and not torch.is_grad_enabled() and _eligible(conv, x)
            and _is_3x3_same(conv))


def upsample_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """conv(F.interpolate(x, scale_factor=2, mode="nearest")) for a 3x3 conv with padding 1 (the SD UNet's and
    VAE's upsampling), x (N, I, H, W) -> (N, O, 2H, 2W).

    Each output pixel (2i + a, 2j + b) of the upsampled convolution reads only 2x2 distinct input pixels, the
    same for every pixel of its phase (a, b): the 3x3 kernel acting on repeated pixels is a 2x2 kernel of summed
    taps (`upsample_weight`). Inside a `packed_weights` block at inference the four phases are computed as one
    2x2 convolution of x with 4 * O outputs and interleaved, 4/9 of the multiply-adds, without the 4x larger
    upsampled input; the result equals the plain path up to float summation order (~1e-6 relative). Elsewhere
    (autograd, other devices) it is the plain path."""
    if not _upsamples_fast(conv, x):
        return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    n, _, h, w = x.shape
    o = conv.out_channels
    args = [1, 1], [1, 1], [1, 1], 1  # padding, stride, dilation, groups
    def make():  # from the plain weight, which stays: the summed phase weights do not give it back bit for bit
        bias = _bias(conv, x)
        return (torch.ops.mkldnn._reorder_convolution_weight(upsample_weight(_dense(conv, x)), *args, list(x.shape)),
                None if bias is None else bias.repeat(4))

    packed = _derived(conv, UPSAMPLE_ATTR, make, x.dtype)
    # (N, 4 * O, H + 1, W + 1): with one pixel of zero padding, phase (a, b) of output pixel (i, j) is at (i + a, j + b)
    phases = torch.ops.mkldnn._convolution_pointwise(x, *packed, *args, "none", [], "")
    channels_last = phases.is_contiguous(memory_format=torch.channels_last)
    out = torch.empty((n, o, 2 * h, 2 * w), dtype=phases.dtype, device=phases.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    phases = phases.unflatten(1, (2, 2, o))  # (N, a, b, O, H + 1, W + 1)
    pixels = out.unflatten(3, (w, 2)).unflatten(2, (h, 2))  # (N, O, H, a, W, b)
    for a in (0, 1):
        for b in (0, 1):
            pixels[:, :, :, a, :, b] = phases[:, a, b, :, a:a + h, b:b + w]
    return out


def mark_for_packing(model: nn.Module) -> int:
    """`model`'s CPU Conv2d/Linear layers compute from prepacked weights from now on: each packs at its first call
    the packed weight can serve, and packs again after a use that gave it its plain weight back (`_restore`), until
    `unpack_weights`. Returns how many layers it marked (0 off CPU or where oneDNN cannot compute their dtype)."""
    if not mkldnn_available():
        return 0
    layers = [m for m in model.modules() if _pack(m) or PACKED_ATTR in m.__dict__]
    for m in layers:
        m.__dict__[KEEP_ATTR] = True
    return len(layers)


def _pack(m: nn.Module) -> bool:
    # exact types only: subclasses such as nn.MultiheadAttention's out_proj are used through their weight
    if type(m) not in (nn.Conv2d, nn.Linear) or PACKED_ATTR in m.__dict__:
        return False
    w = m.weight
    if w.device.type != "cpu" or not onednn_supports(w.dtype):  # fp32, and bf16 where oneDNN computes it
        return False
    if type(m) is nn.Conv2d and not (m.padding_mode == "zeros" and isinstance(m.padding, tuple)):
        return False
    m.__dict__[PACKED_ATTR] = None  # packed on the first call
    m.forward = (_packed_conv if type(m) is nn.Conv2d else _packed_linear).__get__(m)
    return True


def _restore(m: nn.Module) -> None:
    """m back to its plain weight, bit for bit, in the same Parameter object. A layer marked for good
    (`mark_for_packing`) packs again at its next call the packed weight can serve; any other gets its own forward
    again."""
    with _LOCK:
        _drop_derived(m)
        if PACKED_ATTR not in m.__dict__:  # another thread restored it
            return
        # first: from here on a use of the weight does not come back here
        packed = m.__dict__.pop(PACKED_ATTR)
        if KEEP_ATTR in m.__dict__:
            m.__dict__[PACKED_ATTR] = None
        else:
            del m.forward
        w = m.weight
        if type(w) is PackedWeight:  # back to a plain layout, in the weight's dtype and on its device
            w.__class__ = w.__dict__.pop("_ldm_class")
            del w.__dict__["_ldm_layer"]
            w.data = _to_dense(packed).to(w.device, w.dtype)


def _unpack(m: nn.Module) -> None:
    """m back to its plain weight, bit for bit, and its own forward, for good."""
    m.__dict__.pop(KEEP_ATTR, None)
    _restore(m)


def unpack_weights(model: nn.Module) -> int:
    """Gives every packed layer of `model` its plain weight back (bit for bit); returns how many were packed.
    Not needed for correctness (any use of a packed weight does it for its layer), only to free the packed
    copies' layout for good, e.g. before handing the model to code that reads weights from C++."""
    layers = [m for m in model.modules() if PACKED_ATTR in m.__dict__]
    for m in layers:
        _unpack(m)
    return len(layers)


@contextlib.contextmanager
def packed_weights(model: nn.Module, enabled: bool = True, keep: bool = False) -> Iterator[int]:
    """Within the block, `model`'s CPU Conv2d/Linear layers (fp32 or bf16) compute from prepacked weights.

    Yields the number of layers it marked for packing (0 when disabled, off CPU, when oneDNN is unavailable or
    cannot compute the layers' dtype on this CPU (`ldm.accel.cpu.onednn_supports`), or when they are packed already:
    nested or repeated use is fine, layers already packed are left as they are).
    Each is packed on its first call. On exit they get their plain weights back, unless `keep`: then they stay
    packed until their weight is used otherwise (`PackedWeight`) or `unpack_weights`, so that the next block
    packs nothing. Either way the weights derived for the block (Winograd, upsampling phases) are freed."""
    modules = [m for m in model.modules() if enabled and mkldnn_available() and _pack(m)]
    try:
        yield len(modules)
    finally:
        if not keep:
            for m in modules:
                if PACKED_ATTR in m.__dict__:  # not already restored by a use of its weight
                    _unpack(m)
        if modules or is_packed(model):
            release_derived_weights(model)
            trim_heap()


def trim_heap() -> None:
    """Gives the heap's free memory back to the kernel (glibc's `malloc_trim`; elsewhere nothing). Packed weights
    made inside `keep_freed_memory` live in the heap, and once restored they leave it full of holes that glibc
    keeps: SD 1.5 held 1.06 GB more after a 512 px txt2img than after loading (5.93 against 4.85 GB) until this."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(ctypes.c_size_t(0))


def release_derived_weights(model: nn.Module) -> None:
    """Inside a packed block: frees the weights made from the plain ones and kept beside them (Winograd and
    upsampling-phase weights; SD 1.5 at 512 px: UNet 0.66 GB) and this thread's Winograd workspace; the next call
    that needs one makes it again. The pipeline calls it on the UNet when sampling ends and on the VAE after
    decoding (a tiled decode keeps them until then), so that neither phase's peak memory carries the other's."""
    for m in model.modules():
        _drop_derived(m)
    workspace().release()


def _drop_derived(m: nn.Module) -> None:
    m.__dict__.pop(WINOGRAD_ATTR, None)
    m.__dict__.pop(UPSAMPLE_ATTR, None)


@contextlib.contextmanager
def sampling_memory(unet: nn.Module, rows: int, h: int, w: int, device: torch.device | str) -> Iterator[None]:
    """What a sampling loop runs in: `keep_freed_memory` sized for UNet calls on `rows` latents of h x w, and on
    exit (errors included) `release_derived_weights(unet)`, whose derived weights the VAE decode that follows does
    not need. Used by the pipeline and by tools/bench.py's UNet-step timing, so that both run the same way.

    The derived weights are released inside the kept-memory block, so that its closing heap trim returns them:
    released after it, they stayed in the heap as free blocks under glibc's trim threshold (SD 1.5 at 512 px:
    ~0.6 GB more resident through the VAE decode that follows)."""
    with keep_freed_memory(largest_activation(unet, rows, h, w), device):
        try:
            yield
        finally:
            release_derived_weights(unet)


def compile_unet(unet: nn.Module, mode: str | None = "auto") -> nn.Module:
    """torch.compile the UNet in place (`nn.Module.compile`, so its state_dict keys are unchanged).

    mode "auto": on CUDA "reduce-overhead" (CUDA graphs: one launch per step instead of ~1000 kernel
    launches; measured on an H100, fp16 512 px batch 2: 134 it/s against 25-33 eager), on CPU inductor's
    default with freezing, which makes the weights constants of the graph, prepacked for oneDNN. Inference
    only: weights changed after the first call are not seen by the compiled graph. The first call per input
    shape compiles (about 70 s on the H100, minutes on 2 CPU cores). Any other `mode` is torch.compile's."""
    unpack_weights(unet)  # the graph is traced from the plain layers; it packs its own weights on CPU
    cuda = next(unet.parameters()).device.type == "cuda"
    if mode == "auto":
        mode = "reduce-overhead" if cuda else None
    # CPU: inductor's freezing for this graph only (options apply to this compilation, not process-wide)
    unet.compile(mode=mode, dynamic=False, options=None if cuda else {"freezing": True})
    return unet


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def is_packed(model: nn.Module) -> bool:
    """Whether some layer of `model` is inside a `packed_weights` block."""
    return any(PACKED_ATTR in m.__dict__ for m in model.modules())


def compile_model(sd, mode: str | None = "auto"):
    """`compile_unet` on a StableDiffusion's UNet; returns the model."""
    compile_unet(sd.unet, mode=mode)
    return sd


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library, where it is glibc (whose malloc `keep_freed_memory` tunes); None elsewhere."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def largest_activation(unet: nn.Module, rows: int, h: int, w: int) -> int:
    """Bytes of the largest activation of a UNet call on `rows` latents of h x w: the feed-forward's GEGLU
    projection at full latent resolution, 8 * model_channels wide (an upper bound when the first level has no
    transformer)."""
    itemsize = next(unet.parameters()).element_size()
    return rows * h * w * 8 * unet.cfg.model_channels * itemsize


@contextlib.contextmanager
def keep_freed_memory(largest: int, device: torch.device | str = "cpu") -> Iterator[bool]:
    """Within the block, freed CPU memory blocks of up to `largest` bytes stay in the process's heap for the next
    allocation instead of going back to the kernel (glibc only; yields whether it applies).

    A UNet step allocates and frees the same activations at every step. glibc serves each block above its mmap
    threshold (at most 32 MiB) with fresh pages, which the kernel faults in and zeroes on first touch: for SD 1.5
    at 512 px, ~270k page faults (~1 GB) per step, about 8% of the step on 2 cores (docs/benchmarks.md). Raising
    the mmap threshold above the largest activation and the trim threshold above the step's working set lets
    every step reuse the previous one's memory. On exit the thresholds go back to the values glibc's dynamic
    ones settle at and the heap is trimmed (`malloc_trim`), so the memory kept is returned. Process-wide while it
    lasts: other threads' allocations are kept alike. Blocks open at once, nested or in other threads (two requests
    of a server), share the settings: they keep the largest size any of them asks for, and the last one to close
    restores glibc's."""
    libc = _glibc() if torch.device(device).type == "cpu" else None
    if libc is None:
        yield False
        return
    with _HEAP_LOCK:
        _heap["depth"] += 1
        if largest > _heap["largest"]:
            _heap["largest"] = largest
            # older glibc refuses mmap thresholds above 32 MiB (returns 0): then only the trim threshold is raised
            mmap = max(_GLIBC_SETTLED_MMAP, min(largest + largest // 4, 1 << 30))
            libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap))
            libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(max(1 << 29, min(12 * largest, 2**31 - 1))))
    try:
        yield True
    finally:
        with _HEAP_LOCK:
            _heap["depth"] -= 1
            if not _heap["depth"]:
                _heap["largest"] = 0
                libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_GLIBC_SETTLED_MMAP))
                libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(_GLIBC_SETTLED_TRIM))
                trim_heap()
