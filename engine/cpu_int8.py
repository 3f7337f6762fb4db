"""8-bit weights for CPU decoding: int8 with one scale per output row (weight-only quantization).

Why not bitsandbytes on the CPU: its 8-bit matmul measured 61 ms for one [5632, 2048] one-token product on the
2-core AVX2 machine, against 1.7 ms in bf16 (NF4: 14 ms) — it saves memory but makes decoding 10-40x slower.
Decoding is bound by the bytes of weight read per token, so int8 weights that are multiplied directly make it
faster than bf16 instead: `engine/native` does a one-row product in ~0.6 of the bf16 time.

Accuracy: symmetric per-row int8 keeps each weight to within half a step of amax/127 (about 1% relative
error on a dot product with random weights); the native kernel also rounds the activation to int8 per block
of 32, as llama.cpp's Q8_0 does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import native


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float → (int8 [N, K], float32 scale [N]) with weight ≈ q * scale[:, None]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    q = torch.round(w / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp_(-127, 127)
    return q.to(torch.int8).contiguous(), scale.contiguous()


class Int8Linear(nn.Module):
    """A frozen nn.Linear stored as int8 rows + float32 scales; computes in the activation's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        q.weight, q.scale = quantize_rows(linear.weight)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return q

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.to(torch.float32) * self.scale[:, None]).to(dtype)  # [N, K]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        y = None
        if rows == 1:  # decoding: memory-bound, multiply the int8 weights directly
            y = native.gemv_int8(x, self.weight, self.scale)
            if y is None and x.dtype in (torch.bfloat16, torch.float32) and x.device.type == "cpu":
                y = torch._weight_int8pack_mm(x.reshape(1, -1), self.weight, self.scale.to(x.dtype))
                y = y.view(*x.shape[:-1], self.out_features)
        if y is None:
            # Prefill (compute-bound) and other devices: float32 maths on the dequantized weight; CPUs without
            # bf16 instructions run fp32 matrix products several times faster than bf16 ones.
            compute = torch.float32 if x.device.type == "cpu" else x.dtype
            y = F.linear(x.to(compute), self.dequantized(compute)).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def quantize_linears(modules: list[tuple[nn.Module, str, nn.Linear]], progress=None) -> int:
    """Swap each (parent, name, linear) for an Int8Linear in place; returns how many."""
    for done, (parent, name, linear) in enumerate(modules, 1):
        setattr(parent, name, Int8Linear.from_linear(linear))
        if progress:
            progress("quantize", done, len(modules))
    return len(modules)
