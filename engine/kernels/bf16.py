"""bf16 weights on a CPU without native bf16 arithmetic (AVX2, AVX-512 without BF16): fp32 math for
matrix-matrix products.

Measured on the 2-core AVX2 machine (2026-12-06): a [650 × 2048] · [2048 × 5632] product runs at ~21 GFLOP/s in
bf16 and ~153 GFLOP/s in fp32 (MKL's sgemm), so prefill and image encoding upcast: the weights are converted per
call, into a buffer reused from call to call when no gradient is wanted (`scratch.py`); memory stays bf16.
A one-row product (decoding) is memory-bound: it stays in bf16, which halves the bytes read per token, and
runs in the native matrix-vector kernel (`native/`) where it is available (it streams the weights ~10% faster
than PyTorch's bf16 GEMV here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import native, scratch

UPCAST_MIN_ROWS = 8  # below this a product is memory-bound and bf16 is faster


def native_bf16() -> bool:
    """True where the CPU has bf16 dot-product instructions (AVX512_BF16 or AMX), so nothing needs upcasting."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class UpcastLinear(nn.Linear):
    def gemv_weight(self) -> native.Weight:
        """The weight as the native matrix-vector kernel reads it (it declines other dtypes)."""
        return native.Weight(native.BF16, self._parameters["weight"], self.out_features, self.in_features)  # (fast lookup)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.numel() >= UPCAST_MIN_ROWS * x.shape[-1]:
            if (y := scratch.linear(x, self.out_features, lambda w: w.copy_(self.weight), self.bias)) is not None:
                return y  # inference: converted into reused buffers
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        if x.numel() == x.shape[-1] and (ys := native.gemv(x, [self.gemv_weight()])) is not None:
            return ys[0] if self.bias is None else ys[0] + self.bias
        return super().forward(x)


class UpcastConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            return super().forward(x)
        bias = None if self.bias is None else self.bias.float()
        return self._conv_forward(x.float(), self.weight.float(), bias).to(x.dtype)


def upcast_matmuls(model: nn.Module) -> int:
    """Switch plain nn.Linear / nn.Conv2d modules to the upcasting forward in place (parameters and their
    names are untouched; quantized linears are not nn.Linear and are left alone). Returns how many."""
    swapped = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = UpcastLinear
            swapped += 1
        elif type(module) is nn.Conv2d:
            module.__class__ = UpcastConv2d
            swapped += 1
    return swapped
