"""The native GEMM (engine/kernels/native/gemm.c) for many-row products: bf16, int8 and NF4 weights against the float64
product of the same numbers, every edge of its blocking (rows not a multiple of 6, weight rows not a multiple of 16,
depths over one pass and with a tail), the same bits whatever the thread count or the rows beside a row, and the
layers that call it (prefill, image encode) falling back to PyTorch where it does not apply."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import native
from engine.kernels.bf16 import upcast_matmuls
from engine.kernels.quant import Int8Linear, NF4Linear

needs_kernels = pytest.mark.skipif(native._cpu_supported() is not None,
                                   reason=f"CPU cannot run the kernels: {native._cpu_supported()}")
pytestmark = needs_kernels

# (rows, weight rows, depth): one pass (K <= 512) and several with a tail; rows 1..6 past a multiple of 6 and of
# the 48-row block; weight rows past a multiple of 16, and over 2 x 512 so that each of two threads packs twice.
SHAPES = [(8, 16, 16), (13, 40, 304), (50, 1040, 64), (97, 33, 1040), (600, 96, 1536)]


def _bf16_weight(N, K, g):
    return (torch.randn(N, K, generator=g) * 0.05).to(torch.bfloat16)


def _close_to_float64(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias=None):
    """y against the float64 product of the same inputs: fp32 sums of K terms, then the output dtype's rounding."""
    exact = x.double() @ w.double().T + (0 if bias is None else bias.double())
    magnitude = x.double().abs() @ w.double().abs().T  # bounds the fp32 accumulation error: ~K·eps·Σ|x||w|
    slack = x.shape[-1] * 2**-24 * magnitude + (exact.abs() * 2**-8 if y.dtype == torch.bfloat16 else 0)
    assert (y.double() - exact).abs().le(slack + 1e-6).all()


@pytest.mark.parametrize("M, N, K", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bf16_weights_give_the_fp32_product(M, N, K, dtype):
    g = torch.Generator().manual_seed(M + N + K)
    x, w, bias = torch.randn(M, K, generator=g).to(dtype), _bf16_weight(N, K, g), torch.randn(N, generator=g)
    y = native.gemm(x, native.Weight(native.BF16, w, N, K), bias)
    assert y.shape == (M, N) and y.dtype == dtype
    _close_to_float64(y, x, w, bias)
    if dtype == torch.bfloat16:  # PyTorch's product differs in the order of the fp32 sums: rarely after rounding
        assert (y == F.linear(x.float(), w.float(), bias).to(dtype)).float().mean() > 0.97


@pytest.mark.parametrize("M, N, K", [(13, 40, 320), (97, 48, 1088), (600, 64, 640)])
@pytest.mark.parametrize("quantized", [Int8Linear, NF4Linear])
def test_quantized_weights_are_dequantized_while_packing(M, N, K, quantized, monkeypatch):
    from engine.kernels import bf16

    monkeypatch.setattr(bf16, "native_bf16", lambda: False)  # NF4 with bf16 instructions: the test below
    torch.manual_seed(M)
    q = quantized(nn.Linear(K, N, bias=False))
    x = torch.randn(M, K).to(torch.bfloat16)
    with torch.no_grad():
        y = q(x)  # many rows: QuantizedLinear.many_rows → native.gemm
    assert y.dtype == torch.bfloat16 and torch.equal(y, native.gemm(x, q.gemm_weight()))
    _close_to_float64(y, x, q.dequantized(torch.float32))


def test_a_row_gets_the_same_bits_whatever_rows_and_threads_surround_it():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(600, 1040, generator=g).to(torch.bfloat16), _bf16_weight(1056, 1040, g)
    weight = native.Weight(native.BF16, w, 1056, 1040)
    full = native.gemm(x, weight)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(native.gemm(x, weight), full)
    finally:
        torch.set_num_threads(threads)
    for rows in (slice(0, 1), slice(5, 12), slice(593, 600)):  # a prefix reused across turns changes the rows beside
        assert torch.equal(native.gemm(x[rows], weight), full[rows])


def test_declines_what_it_cannot_multiply():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(8, 64, generator=g).to(torch.bfloat16), _bf16_weight(32, 64, g)
    weight = native.Weight(native.BF16, w, 32, 64)
    assert native.gemm(x.half(), weight) is None  # fp16 activations
    assert native.gemm(x[:, :48], weight) is None  # depth differs from the weight's
    assert native.gemm(x, native.Weight(native.BF16, w[:, :40].contiguous(), 32, 40)) is None  # K not a multiple of 16
    assert native.gemm(x.requires_grad_(), weight) is None  # autograd: PyTorch's ops carry the backward
    assert native.gemm(x.detach(), weight, torch.zeros(16)) is None  # bias of another length
    with native.disabled():
        assert native.gemm(x.detach(), weight) is None


def test_layers_use_it_for_many_rows_and_pytorch_without_it():
    torch.manual_seed(3)
    linear = nn.Linear(256, 96).to(torch.bfloat16)
    upcast_matmuls(linear)  # as the runtime does for bf16 on a CPU without bf16 instructions
    x = torch.randn(2, 40, 256).to(torch.bfloat16)
    with torch.no_grad():
        y = linear(x)
        assert torch.equal(y, native.gemm(x, linear.gemv_weight(), linear.bias))
        with native.disabled():
            fallback = linear(x)  # MKL's bf16 GEMM or PyTorch's fp32 product
    assert (y == fallback).float().mean() > 0.97
    _close_to_float64(y, x, linear.weight, linear.bias)
    x.requires_grad_(True)  # training: PyTorch's product, which has a backward
    linear(x).float().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_out_of_range_values_stay_nan_and_inf():
    x = torch.ones(8, 32, dtype=torch.bfloat16)
    w = torch.ones(16, 32, dtype=torch.bfloat16)
    w[3, 0], w[5, 1] = float("nan"), float("inf")
    y = native.gemm(x, native.Weight(native.BF16, w, 16, 32))
    assert y[:, 3].isnan().all() and y[:, 5].isinf().all() and (y[:, 0] == 32).all()


def test_with_bf16_instructions_nf4_uses_pytorchs_bf16_gemm_and_int8_stays(monkeypatch):
    # On such a CPU PyTorch's bf16 GEMM runs ~1.9x the native fp32 one (quant.py's note): NF4's many rows go there,
    # the weights rounded to bf16, sums in fp32; int8 keeps the native GEMM's fp32 math.
    from engine import kernels
    from engine.kernels import bf16

    monkeypatch.setattr(bf16, "native_bf16", lambda: True)  # every caller asks the bf16 module
    assert kernels.backends("cpu", torch.bfloat16, "4bit", "nf4")["4-bit matmul (prefill)"] == kernels.BF16_GEMM
    torch.manual_seed(4)
    x = torch.randn(40, 256).to(torch.bfloat16)
    nf4 = NF4Linear(nn.Linear(256, 96, bias=False))
    with torch.no_grad():
        y, again = nf4(x), nf4(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, again)  # the reused buffers leave nothing behind
    _close_to_float64(y, x, nf4.dequantized(torch.float32).to(torch.bfloat16))
    assert not torch.equal(y, native.gemm(x, nf4.gemm_weight()))  # not the native GEMM's fp32 weights
    int8 = Int8Linear(nn.Linear(256, 96, bias=False))
    with torch.no_grad():
        assert torch.equal(int8(x), native.gemm(x, int8.gemm_weight()))
