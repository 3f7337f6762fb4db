"""Quantized linears for CPU decoding: int8 rows (8-bit) and bitsandbytes' NF4 (4-bit), multiplied directly.

Why not bitsandbytes' own modules on the CPU: one [5632, 2048] one-token product took 61 ms with LLM.int8 and
14 ms with NF4 on the 2-core AVX2 machine, against 1.7 ms in bf16: they save memory but make decoding 8-36x
slower. Decoding is bound by the bytes of weight read per token, so weights multiplied in their packed form make
it faster than bf16 instead (`engine/native`).

- Int8Linear: symmetric int8 with one scale per output row. Each weight is within half a step of amax/127 (about
  1% relative error on a dot product with random weights); the kernel also rounds the activation to int8 per
  block of 32, as llama.cpp's Q8_0 does.
- NF4Linear: quantized by bitsandbytes (NF4, blocks of 64, double-quantized absmax), so the weights are the same
  numbers bitsandbytes computes with on a GPU; the absmax is kept un-double-quantized in fp32 (4.5 bits per
  weight in all instead of ~4.13).

Many-row products (prefill) are compute-bound: they dequantize to fp32 and use PyTorch's matmul, which on CPUs
without bf16 instructions runs several times faster than bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import native


def quantize_rows(weight: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float → (int8 [N, K], float32 scale [N]) with weight ≈ q * scale[:, None].

    Works `chunk` rows at a time: whole-matrix fp32 temporaries (tens of MB per matrix, freed and reallocated 168
    times) left the allocator holding ~2 GB more than the model during a 1.3B load."""
    N, K = weight.shape
    q = torch.empty(N, K, dtype=torch.int8, device=weight.device)
    scale = torch.empty(N, dtype=torch.float32, device=weight.device)
    for start in range(0, N, chunk):
        w = weight[start:start + chunk].detach().float()
        s = w.abs().amax(dim=1) / 127.0
        scale[start:start + chunk] = s
        q[start:start + chunk] = torch.round(w / s.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp_(-127, 127)
    return q, scale


class QuantizedLinear(nn.Module):
    """A frozen nn.Linear in a packed form. Subclasses say how to build it, multiply one row, and dequantize."""

    kind = ""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def one_row(self, x: torch.Tensor) -> torch.Tensor | None:
        """x holding one row → the product, or None when no fast path applies."""
        raise NotImplementedError

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [N, K] as floats."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.one_row(x) if x.numel() == self.in_features else None  # decoding: memory-bound
        if y is None:
            compute = torch.float32 if x.device.type == "cpu" else x.dtype
            y = F.linear(x.to(compute), self.dequantized(compute)).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {self.kind}"


class Int8Linear(QuantizedLinear):
    kind = "int8"

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        weight, scale = quantize_rows(linear.weight)
        self.register_buffer("weight", weight)  # int8 [N, K]
        self.register_buffer("scale", scale)  # fp32 [N]

    def one_row(self, x):
        y = native.gemv_int8(x, self.weight, self.scale)
        if y is None and x.dtype in (torch.bfloat16, torch.float32) and x.device.type == "cpu":
            y = torch._weight_int8pack_mm(x.reshape(1, -1), self.weight, self.scale.to(x.dtype))
            y = y.view(*x.shape[:-1], self.out_features)
        return y

    def dequantized(self, dtype):
        return (self.weight.to(torch.float32) * self.scale[:, None]).to(dtype)


class NF4Linear(QuantizedLinear):
    kind = "nf4"
    BLOCK = 64

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        import bitsandbytes.functional as bnbf

        weight = linear.weight.detach()
        packed, state = bnbf.quantize_4bit(weight, blocksize=self.BLOCK, compress_statistics=True, quant_type="nf4")
        absmax = state.absmax
        if state.nested:  # the absmax themselves are 8-bit: undo that once here
            absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
        self.register_buffer("packed", packed.flatten().contiguous())  # uint8 [N·K/2], first element high nibble
        self.register_buffer("absmax", absmax.float().contiguous())  # fp32 [N·K/64]
        self.register_buffer("levels", state.code.float().contiguous())  # the 16 NF4 levels in [-1, 1]
        self.register_buffer("levels_int8", torch.round(self.levels * 127).to(torch.int8))

    def one_row(self, x):
        return native.gemv_nf4(x, self.packed, self.absmax, self.levels_int8, (self.out_features, self.in_features))

    def dequantized(self, dtype):
        numel = self.out_features * self.in_features
        weight = native.dequantize_nf4(self.packed, self.absmax, self.levels, numel)
        if weight is None:
            codes = torch.stack((self.packed >> 4, self.packed & 15), dim=1).flatten().long()  # [N·K]
            scales = self.absmax.repeat_interleave(self.BLOCK)[:numel]
            weight = self.levels[codes] * scales
        return weight.view(self.out_features, self.in_features).to(dtype)
