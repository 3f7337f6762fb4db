"""Quantized linears for CPU decoding, multiplied directly in their packed form: int8 rows (8-bit), and for
4-bit either bitsandbytes' NF4 (with the native kernels) or PyTorch's own int4 (without them).

Why not bitsandbytes' own modules on the CPU: one [5632, 2048] one-token product took 61 ms with LLM.int8 and
14 ms with NF4 on the 2-core AVX2 machine, against 1.7 ms in bf16: they save memory but make decoding 8-36x
slower. Decoding is bound by the bytes of weight read per token, so weights multiplied in their packed form make
it faster than bf16 instead.

- Int8Linear: symmetric int8 with one scale per output row. Each weight is within half a step of amax/127 (about
  1% relative error on a dot product with random weights); the native kernel also rounds the activation to int8
  per block of 32, as llama.cpp's Q8_0 does. Without native kernels: PyTorch's `_weight_int8pack_mm`.
- NF4Linear: quantized by bitsandbytes (NF4, blocks of 64, double-quantized absmax), so the weights are the same
  numbers bitsandbytes computes with on a GPU; the absmax is kept un-double-quantized in fp32 (4.5 bits per
  weight in all instead of ~4.13). Only the native kernel multiplies it fast; it rounds the activation to ±63 per
  block of 64 (`decode_kernels.c` says why), which moves a product's error against fp32 from 9.26 to 9.31%
  (random 2048² weights; bitsandbytes' own dequantized weights give 9.20%).
- Int4Linear: group-wise affine int4 (min/max per group of 64 weights, bf16 scale and zero: 4.5 bits per
  weight), multiplied by PyTorch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`), so 4-bit needs no
  compiler. About as accurate as NF4 on Gaussian weights (~9% relative error per product).

Many-row products (prefill) are compute-bound: int8 and NF4 run in the native GEMM (`native/gemm.c`), which
dequantizes each block of weights to fp32 as it packs it (a 600-token 1.3B prefill, 2026-12-06: 59.6 tok/s in
8-bit and 53.7 in 4-bit, against 49.2 and 50.1 dequantizing whole matrices first). Without it they dequantize to
fp32 (into a reused buffer when no gradient is wanted: `scratch.py`) and use PyTorch's fp32 matmul; int4 uses its
kernel for all rows.

On a CPU with bf16 instructions (AVX512_BF16, AMX) NF4 weights are dequantized to bf16, through reused buffers,
for PyTorch's bf16 GEMM, which uses them: on a 2-core Zen 4 (2026-12-07), [600 × 2048] · the 1.3B's three shapes
in 13.5–39.0 ms against 32.5–72.1 in the native GEMM (the dequantization 1.3–3.8 ms of it). Rounding a weight to
bf16 (≤ 0.4 %) is nothing beside NF4's own error (~9 % per product). int8 stays in the native GEMM's fp32 math:
8-bit is chosen for being close to bf16, and in bf16 math (codes exact, row scales after the product) the test
model's greedy answer no longer matched the bf16 model's.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import bf16, native, scratch


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
    """A frozen nn.Linear in a packed form. Subclasses say how to build it, multiply one row (and maybe several),
    and dequantize."""

    kind = ""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def gemv_weight(self) -> native.Weight | None:
        """The weight as the native matrix-vector kernel reads it; None where that kernel has no such format.
        (Called 169 times per decoded token: the subclasses read `_buffers` directly, as nn.Module's attribute
        lookup costs ~1 µs per buffer.)"""
        return None

    def one_row(self, x: torch.Tensor) -> torch.Tensor | None:
        """x holding one row → the product, or None when no fast path applies."""
        weight = self.gemv_weight()
        ys = native.gemv(x, [weight]) if weight is not None else None
        return ys[0] if ys is not None else None

    def gemm_weight(self) -> native.Weight | None:
        """The weight as the native matrix-matrix kernel reads it; None where that kernel has no such format."""
        return self.gemv_weight()

    def many_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """x holding several rows → the product by the native GEMM, or None to dequantize (see the module's note)."""
        weight = self.gemm_weight()
        return native.gemm(x, weight) if weight is not None else None

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [N, K] as floats. A subclass defines this or `dequantize_into`."""
        device = next(self.buffers()).device
        return self.dequantize_into(torch.empty(self.out_features, self.in_features, device=device)).to(dtype)

    def dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
        """Writes the weight into out ([N, K], fp32; NF4's also bf16, see `many_rows`); returns out."""
        return out.copy_(self.dequantized(torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.one_row(x) if x.numel() == self.in_features else self.many_rows(x)  # one row: memory-bound
        if y is None:
            y = scratch.linear(x, self.out_features, self.dequantize_into)  # inference on a CPU: reused buffers
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

    def gemv_weight(self):
        b = self._buffers
        return native.Weight(native.INT8, b["weight"], self.out_features, self.in_features, b["scale"])

    def one_row(self, x):
        y = super().one_row(x)
        if y is None and x.dtype in (torch.bfloat16, torch.float32) and x.device.type == "cpu":
            y = torch._weight_int8pack_mm(x.reshape(1, -1), self.weight, self.scale.to(x.dtype))
            y = y.view(*x.shape[:-1], self.out_features)
        return y

    def dequantize_into(self, out):
        return out.copy_(self.weight).mul_(self.scale[:, None])


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

    def gemv_weight(self):
        b = self._buffers
        return native.Weight(native.NF4, b["packed"], self.out_features, self.in_features, b["absmax"],
                             b["levels_int8"])

    def gemm_weight(self):
        b = self._buffers
        return native.Weight(native.NF4, b["packed"], self.out_features, self.in_features, b["absmax"], b["levels"])

    def many_rows(self, x):
        if x.dtype == torch.bfloat16 and bf16.native_bf16():  # 4-bit's own error dwarfs bf16's: see the module's note
            return scratch.linear(x, self.out_features, self.dequantize_into, compute=torch.bfloat16)
        return super().many_rows(x)

    def dequantize_into(self, out):
        if not native.dequantize_nf4(self.packed, self.absmax, self.levels, out):
            numel = out.numel()
            codes = torch.stack((self.packed >> 4, self.packed & 15), dim=1).flatten().long()  # [N·K]
            scales = self.absmax.repeat_interleave(self.BLOCK)[:numel]
            out.view(-1).copy_(self.levels[codes] * scales)
        return out


class Int4Linear(QuantizedLinear):
    """Group-wise affine int4: w ≈ (q - 8)·scale + zero, q in 0..15, one bf16 (scale, zero) per group of 64
    (32 where in_features is not a multiple of 64), in PyTorch's packed layout for its CPU int4 kernel."""

    kind = "int4"

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        N, K = self.out_features, self.in_features
        self.group = next((g for g in (64, 32) if K % g == 0), 0)
        if N % 16 or not self.group:
            raise ValueError(f"int4 needs out_features divisible by 16 and in_features by 32; got [{N}, {K}]")
        codes, scale_zero = quantize_groups(linear.weight, self.group)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))  # uint8 [N, K/2]
        self.register_buffer("scale_zero", scale_zero)  # bf16 [K/group, N, 2]

    def one_row(self, x):
        return self.many_rows(x)  # the same kernel: it reads each packed weight once per call

    def many_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):  # the kernel has no backward
            return None
        # bf16 activations: the kernel's fast path (its fp32 one was ~10x slower here); bf16 result.
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group, self.scale_zero)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def dequantized(self, dtype):
        codes = _int4_unpack(self.packed, self.out_features, self.in_features).float()  # [N, K]
        scale, zero = self.scale_zero.float().unbind(-1)  # [K/group, N] each
        groups = codes.view(self.out_features, -1, self.group)
        weight = (groups - 8) * scale.T[..., None] + zero.T[..., None]
        return weight.view(self.out_features, self.in_features).to(dtype)


def quantize_groups(weight: torch.Tensor, group: int, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float → (codes int32 [N, K] in 0..15, bf16 [K/group, N, 2] scale and zero) with
    weight ≈ (codes - 8)·scale + zero per group of `group` consecutive weights of a row."""
    N, K = weight.shape
    codes = torch.empty(N, K, dtype=torch.int32)
    scale_zero = torch.empty(K // group, N, 2, dtype=torch.bfloat16)
    for start in range(0, N, chunk):
        w = weight[start:start + chunk].detach().to(torch.float32, copy=True).view(-1, K // group, group)  # changed in place below
        low, high = w.amin(-1), w.amax(-1)
        # Rounded to bf16 first, and the codes computed against the rounded values: what the kernel multiplies by.
        scale = ((high - low) / 15).clamp_min(torch.finfo(torch.bfloat16).tiny).to(torch.bfloat16)
        zero = (low + 8 * scale.float()).to(torch.bfloat16)
        w.sub_(zero.float()[..., None]).mul_(1 / scale.float()[..., None]).round_().add_(8).clamp_(0, 15)  # in place: ~4x faster
        codes[start:start + chunk] = w.view(-1, K)
        scale_zero[:, start:start + chunk] = torch.stack((scale, zero), -1).transpose(0, 1)
    return codes, scale_zero


@functools.lru_cache(maxsize=4)
def _int4_order(N: int, K: int) -> torch.Tensor:
    """For each 4-bit slot of PyTorch's packed [N, K/2] layout, the index n·K + k of the weight it holds.

    The layout is PyTorch's internal one and differs between its AVX2 and AVX-512 builds, so it is read off the
    packing function itself: pack each weight's index, four bits at a time, and read the slots back."""
    index = torch.arange(N * K, dtype=torch.int64)
    order = torch.zeros(N * K, dtype=torch.int64)
    for shift in range(0, max(N * K - 1, 1).bit_length(), 4):
        digit = ((index >> shift) & 15).to(torch.int32).view(N, K)
        order |= _slots(torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit, 1)).long() << shift
    return order.to(torch.int32)


def _slots(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), -1).flatten()  # low nibble first


def _int4_unpack(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """The codes [N, K] (uint8, 0..15) held in PyTorch's packed int4 layout."""
    codes = torch.empty(N * K, dtype=torch.uint8)
    codes[_int4_order(N, K).long()] = _slots(packed.cpu())
    return codes.view(N, K)
