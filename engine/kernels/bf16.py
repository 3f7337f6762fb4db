"""bf16 weights on a CPU. Without native bf16 arithmetic (AVX2, AVX-512 without BF16): fp32 math for
matrix-matrix products; with it, PyTorch's own (last paragraph). One-row products by the native GEMV either way.

Measured on the 2-core AVX2 machine (2026-12-06): a [650 × 2048] · [2048 × 5632] product runs at ~21 GFLOP/s in
bf16 and ~153 GFLOP/s in fp32 (MKL's sgemm), so prefill and image encoding multiply in fp32, converting the weights
while packing them so that no fp32 copy is written and read: the native GEMM (`native/gemm.c`, ~165 GFLOP/s on
the 1.3B's shapes against MKL's ~150) where it builds; else MKL's own bf16 × bf16 → fp32 GEMM where PyTorch
carries MKL (its x86 wheels do; bitwise the products of converting first, 4–8% faster than that: 139 vs 134
GFLOP/s for [600 × 2048] · [2048 × 2048], 153 vs 142 for 5632 rows); else the weights are converted per call, into
a buffer reused from call to call when no gradient is wanted (`scratch.py`). Memory stays bf16 either way.
A one-row product (decoding) is memory-bound: it stays in bf16, which halves the bytes read per token, and
runs in the native matrix-vector kernel (`native/`) where it is available (it streams the weights ~10% faster
than PyTorch's bf16 GEMV here).

On a CPU with bf16 instructions (AVX512_BF16, AMX) PyTorch's own bf16 GEMM uses them, and nothing is upcast; a
one-row product still goes to the native GEMV (`NativeBf16Linear`). Measured on a 2-core Zen 4 (2026-12-07), the
1.3B's shapes: [600 × 2048] · [2048 × N]ᵀ 320–388 GFLOP/s in PyTorch's bf16 against 110–168 in the native fp32 GEMM;
one row over 24 matrices 13.7–14.8 GB/s in PyTorch's bf16 against 18.6–23.0 in the native GEMV.
`prepare_cpu_bf16` picks the one that fits the CPU.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import native, scratch

UPCAST_MIN_ROWS = 8  # below this a product is memory-bound and bf16 is faster


@functools.cache
def native_bf16() -> bool:
    """True where the CPU has bf16 dot-product instructions (AVX512_BF16 or AMX), so nothing needs upcasting."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.cache
def _mkl_gemm_bf16():
    """MKL's cblas_gemm_bf16bf16f32 in the PyTorch library already loaded, or None (a build without MKL)."""
    for path in sorted((Path(torch.__file__).parent / "lib").glob("*torch_cpu.*")):
        try:
            gemm = ctypes.CDLL(str(path)).cblas_gemm_bf16bf16f32
        except (OSError, AttributeError):
            continue
        i, p = ctypes.c_int, ctypes.c_void_p
        gemm.argtypes = [i, i, i, i, i, i, ctypes.c_float, p, i, p, i, ctypes.c_float, p, i]
        gemm.restype = None
        return gemm
    return None


def mkl_bf16() -> bool:
    """True where MKL's bf16 GEMM is there for many-row bf16 products."""
    return _mkl_gemm_bf16() is not None


def mkl_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [..., K] bf16 times weight [N, K] bf16 (+ bias) by MKL's bf16 GEMM, fp32 accumulation → [..., N] bf16,
    as F.linear(x.float(), weight.float(), bias) would give; None where it does not apply (no MKL, autograd,
    another device or dtype, more than 2³¹ elements)."""
    gemm = _mkl_gemm_bf16()
    K, N = x.shape[-1], weight.shape[0]
    rows = x.numel() // K
    if (gemm is None or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or not x.is_cpu
            or not weight.is_cpu or weight.shape[1] != K or not weight.is_contiguous()
            or max(x.numel(), weight.numel(), rows * N) >= 2**31
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return None
    a = x.reshape(rows, K).contiguous()
    out = torch.empty(rows, N) if bias is None else bias.float().expand(rows, N).contiguous()
    ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112  # MKL's CBLAS enums: out = a · weightᵀ (+ out when beta = 1)
    gemm(ROW_MAJOR, NO_TRANS, TRANS, rows, N, K, 1.0, a.data_ptr(), K, weight.data_ptr(), K,
         0.0 if bias is None else 1.0, out.data_ptr(), N)
    return out.to(torch.bfloat16).view(*x.shape[:-1], N)


class UpcastLinear(nn.Linear):
    """bf16 linear on a CPU without bf16 instructions: several rows in fp32 math, one row by the native GEMV."""

    def gemv_weight(self) -> native.Weight:
        """The weight as the native matrix-vector kernel reads it (it declines other dtypes)."""
        weight = self._parameters["weight"]  # (not self.weight: nn.Module's lookup costs ~1 µs, 169 calls a token)
        return native.Weight(native.BF16, weight, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.numel() >= UPCAST_MIN_ROWS * x.shape[-1]:
            return self.many_rows(x)
        if x.numel() == x.shape[-1] and (ys := native.gemv(x, [self.gemv_weight()])) is not None:
            return ys[0] if self.bias is None else ys[0] + self.bias
        return super().forward(x)

    def many_rows(self, x: torch.Tensor) -> torch.Tensor:
        if (y := native.gemm(x, self.gemv_weight(), self.bias)) is not None:
            return y  # inference: the native GEMM converts while packing, at ~90 % of the FMA peak
        if (y := mkl_linear(x, self.weight, self.bias)) is not None:
            return y  # inference where PyTorch carries MKL: converted while packing
        if (y := scratch.linear(x, self.out_features, lambda w: w.copy_(self.weight), self.bias)) is not None:
            return y  # inference: converted into reused buffers
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)


class NativeBf16Linear(UpcastLinear):
    """bf16 linear on a CPU with bf16 instructions: several rows by PyTorch's bf16 GEMM, which uses them; one row
    by the native GEMV, which streams the weights faster than PyTorch's (the module's note has the figures)."""

    def many_rows(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class UpcastConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            return super().forward(x)
        bias = None if self.bias is None else self.bias.float()
        return self._conv_forward(x.float(), self.weight.float(), bias).to(x.dtype)


def _swap(model: nn.Module, classes: dict[type, type]) -> int:
    """Give every module whose exact type is a key of `classes` that key's value as its class, in place (parameters
    and their names are untouched). Returns how many."""
    swapped = 0
    for module in model.modules():
        if (cls := classes.get(type(module))) is not None:
            module.__class__ = cls
            swapped += 1
    return swapped


def upcast_matmuls(model: nn.Module) -> int:
    """Switch plain nn.Linear / nn.Conv2d modules to the upcasting forward in place (quantized linears are not
    nn.Linear and are left alone). Returns how many."""
    return _swap(model, {nn.Linear: UpcastLinear, nn.Conv2d: UpcastConv2d})


def prepare_cpu_bf16(model: nn.Module) -> int:
    """Set up a bf16 model's products for this CPU, in place: with bf16 instructions, only one-row products change
    (to the native GEMV); without them, `upcast_matmuls`. Returns how many modules changed."""
    return _swap(model, {nn.Linear: NativeBf16Linear}) if native_bf16() else upcast_matmuls(model)
