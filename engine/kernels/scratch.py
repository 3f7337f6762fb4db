"""Many-row products of bf16 or quantized weights on a CPU, through buffers reused from call to call.

A prefill or an image encode multiplies each weight matrix in fp32 (`bf16.py` says why), or NF4 in bf16 on a CPU
with bf16 instructions (`quant.py`), written straight into a buffer of that dtype. Converting it into a new
tensor on every call cost more than the conversion: glibc gives blocks this large back to the OS when they
are freed, so each call faults tens of MB of fresh pages in again. Measured on the 2-core AVX2 machine for a
[5632 × 2048] weight: bf16 → fp32 22 ms into a new tensor, 3 ms into a reused one; int8 dequantization 44 vs
4 ms; the [600 × 2048] product itself 102 vs 92 ms when its output buffer is reused.

The process keeps one set of three flat buffers (weight, input rows, output) per compute dtype, each grown to
the largest product run, up to MAX_ELEMENTS each: the 7B's largest decoder matrix (45 M weights) fits, an output
layer over every position (the 1.3B's is 210 M weights) takes the allocating path instead of pinning a gigabyte.
One set, not one per thread: the app runs each request on a new or pooled thread, and per-thread sets would
multiply the memory. A product that finds the set in use by another thread allocates as before instead of waiting.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

MAX_ELEMENTS = 64 * 2**20  # per buffer: 256 MB of fp32

_lock = threading.Lock()  # held for the whole product: the buffers' contents belong to one product at a time
_buffers: dict[str, torch.Tensor] = {}


def _buffer(name: str, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    key = f"{name} {dtype}"
    buf = _buffers.get(key)
    if buf is None or buf.numel() < numel:
        _buffers.pop(key, None)  # the old one is freed before the larger one is allocated
        with torch.inference_mode(False):  # an inference tensor could not be written later under no_grad
            buf = _buffers[key] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def applies(x: torch.Tensor, out_features: int) -> bool:
    """True where `linear` may run: CPU, no autograd (the buffers are overwritten by the next call, so nothing may
    save them for a backward pass), every buffer within the cap."""
    rows = x.numel() // x.shape[-1]
    return (x.device.type == "cpu" and not torch.is_grad_enabled()
            and max(out_features * x.shape[-1], rows * out_features, x.numel()) <= MAX_ELEMENTS)


def linear(x: torch.Tensor, out_features: int, weight_into: Callable[[torch.Tensor], object],
           bias: torch.Tensor | None = None, compute: torch.dtype = torch.float32) -> torch.Tensor | None:
    """x [..., K] times a weight [out_features, K] that `weight_into(w)` writes into w, a buffer of the `compute`
    dtype, plus bias, computed in `compute` → [..., out_features] in x's dtype. `compute` is fp32, or bf16 on a
    CPU whose bf16 instructions PyTorch's GEMM uses. None where it does not apply (see `applies`) or while another
    thread's product holds the buffers."""
    if not applies(x, out_features) or not _lock.acquire(blocking=False):
        return None
    try:
        K = x.shape[-1]
        rows = x.reshape(-1, K)
        M, N = rows.shape[0], out_features
        weight = _buffer("weight", N * K, compute).view(N, K)
        weight_into(weight)
        if rows.dtype != compute:
            rows = _buffer("input", M * K, compute).view(M, K).copy_(rows)
        # A caller of the compute dtype keeps the result, so only a result converted to another goes through a buffer.
        out = _buffer("output", M * N, compute).view(M, N) if x.dtype != compute else torch.empty(M, N, dtype=compute)
        if bias is None:
            torch.mm(rows, weight.t(), out=out)
        else:
            torch.addmm(bias.to(compute), rows, weight.t(), out=out)
        return out.to(x.dtype).view(*x.shape[:-1], N)
    finally:
        _lock.release()
