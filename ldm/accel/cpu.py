"""What this CPU and PyTorch's oneDNN build can do, asked once per process.

Two questions, kept apart because they have different answers on real machines:

- Does the CPU compute bf16 natively (AVX-512 BF16 or AMX)? Only then is `--precision bf16` worth running on it:
  elsewhere every bf16 product is emulated through fp32 conversions, and a bf16 txt2img takes well over twice the
  time of an fp32 one (diffusers at 256 px on a 2-core AVX2 AMD EPYC: stopped at 2.4x). `check_precision` refuses
  it there.
- Which dtypes can oneDNN pack and compute (`onednn_supports`)? fp32 wherever oneDNN is built in; bf16 only with
  AVX-512 BW/VL/DQ or AVX-NE-CONVERT (an AVX2-only CPU raises "bf16 path needs the cpu support ..." from inside
  the weight reorder). `ldm.accel.optimize` takes its packed and Winograd routes only for these dtypes; every other
  dtype runs PyTorch's plain layers and gives the same numbers.

Both are probed rather than inferred from a CPU model name: the answer of oneDNN itself is what decides whether
its kernels run, and PyTorch's own flags say what the CPU offers.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

# Overrides the bf16 refusal of `check_precision` (for tests and for timing the emulation): "1" allows bf16 on a CPU
# without native bf16 arithmetic. The Python API's `allow_emulated_bf16=True` does the same for one call.
ALLOW_EMULATED_BF16_ENV = "LDM_ALLOW_EMULATED_BF16"


@dataclass(frozen=True)
class CPUFeatures:
    """The capabilities that decide ldm's CPU routes (see the module docstring)."""
    capability: str  # PyTorch's vectorised kernels: "AVX2", "AVX512", "DEFAULT", ...
    avx512_bf16: bool
    amx: bool

    @property
    def native_bf16(self) -> bool:
        return self.avx512_bf16 or self.amx

    def describe(self) -> str:
        extras = [name for name, has in (("AVX-512 BF16", self.avx512_bf16), ("AMX", self.amx)) if has]
        return " + ".join([self.capability, *extras])


def _flag(name: str) -> bool:
    """One of `torch.cpu`'s private feature probes; False where this PyTorch lacks it."""
    probe = getattr(torch.cpu, name, None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


@functools.cache
def cpu_features() -> CPUFeatures:
    return CPUFeatures(capability=torch.backends.cpu.get_cpu_capability(),
                       avx512_bf16=_flag("_is_avx512_bf16_supported"), amx=_flag("_is_amx_tile_supported"))


@functools.cache
def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs weights and computes convolutions and linear layers of `dtype` on this CPU: asks
    PyTorch, then runs the very calls `ldm.accel.optimize` makes on tiny tensors, so that a oneDNN error can only
    show up here, once, as False."""
    if dtype not in (torch.float32, torch.bfloat16):
        return False
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        return False
    try:
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        x = torch.ones(1, 16, 4, 4, dtype=dtype)
        args = [1, 1], [1, 1], [1, 1], 1  # padding, stride, dilation, groups
        w = torch.ops.mkldnn._reorder_convolution_weight(torch.ones(16, 16, 3, 3, dtype=dtype), *args, list(x.shape))
        torch.ops.mkldnn._convolution_pointwise(x, w, None, *args, "none", [], "")
        x2 = torch.ones(2, 16, dtype=dtype)
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 16, dtype=dtype), 2)
        torch.ops.mkldnn._linear_pointwise(x2, w, None, "none", [], "")
    except (RuntimeError, AttributeError):  # AttributeError: a PyTorch without one of these ops
        return False
    return True


def emulated_bf16_reason(dtype: torch.dtype, device: torch.device | str) -> str | None:
    """Why `dtype` on `device` would only be emulated (bf16 on a CPU without AVX-512 BF16 or AMX), or None. The
    LDM_ALLOW_EMULATED_BF16=1 environment variable makes it None everywhere."""
    if dtype != torch.bfloat16 or torch.device(device).type != "cpu":
        return None
    if os.environ.get(ALLOW_EMULATED_BF16_ENV) == "1" or cpu_features().native_bf16:
        return None
    return (f"this CPU ({cpu_features().describe()}) has no native bf16 arithmetic (AVX-512 BF16 or AMX), so bf16 "
            "would run emulated and slower than fp32")


def check_precision(dtype: torch.dtype, device: torch.device | str, allow_emulated_bf16: bool = False) -> None:
    """ValueError for bf16 on a CPU that would only emulate it (see `emulated_bf16_reason`). `allow_emulated_bf16`
    runs it anyway."""
    reason = None if allow_emulated_bf16 else emulated_bf16_reason(dtype, device)
    if reason is not None:
        raise ValueError(f"bf16: {reason}; load in fp32 (dtype=torch.float32), or pass allow_emulated_bf16=True to "
                         "run it anyway")
