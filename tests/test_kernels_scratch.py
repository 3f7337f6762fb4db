"""Many-row fp32 products through reused buffers (engine/kernels/scratch.py): the same bits as the allocating
path, results that do not alias the buffers, threads that never share a product's buffers, and the allocating
path wherever a gradient is wanted or a product is over the cap."""

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import bf16, native, scratch
from engine.kernels.bf16 import upcast_matmuls
from engine.kernels.quant import Int8Linear, NF4Linear


@pytest.fixture(autouse=True)
def without_gemm_kernels(monkeypatch):
    """Many-row products take the fp32 buffers where neither the native GEMM (tests/test_kernels_gemm.py) nor, for
    bf16, MKL's bf16 GEMM (tests/test_kernels_bf16.py), nor for NF4 on a CPU with bf16 instructions the bf16 buffers
    (tests/test_kernels_gemm.py) run. These tests are about the fp32 buffers, so the others are off here."""
    monkeypatch.setattr(native, "gemm", lambda *args, **kwargs: None)
    monkeypatch.setattr(bf16, "_mkl_gemm_bf16", lambda: None)
    monkeypatch.setattr(bf16, "native_bf16", lambda: False)


def bf16_linear(n_in=256, n_out=96, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(n_in, n_out).to(torch.bfloat16)
    upcast_matmuls(linear)
    return linear


def test_bf16_product_through_the_buffers_is_the_fp32_product():
    linear = bf16_linear()
    x = torch.randn(2, 40, 256, dtype=torch.bfloat16)
    expected = F.linear(x.float(), linear.weight.float(), linear.bias.float()).to(torch.bfloat16)
    with torch.inference_mode():
        assert scratch.applies(x, linear.out_features)
        y = linear(x)
    assert y.shape == (2, 40, 96) and y.dtype == torch.bfloat16
    assert torch.equal(y, expected)


@pytest.mark.parametrize("kind", [Int8Linear, NF4Linear])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantized_product_through_the_buffers_is_the_dequantized_product(kind, dtype):
    torch.manual_seed(1)
    q = kind(nn.Linear(256, 128, bias=False))
    x = torch.randn(30, 256, dtype=dtype)
    expected = F.linear(x.float(), q.dequantized(torch.float32)).to(dtype)
    with torch.no_grad():
        y = q(x)
    assert y.dtype == dtype and torch.equal(y, expected)


def test_nf4_without_native_kernels_dequantizes_into_the_buffer_the_same_weights():
    # The PyTorch form of NF4 dequantization writes into the buffer where the C kernel cannot run.
    torch.manual_seed(4)
    q = NF4Linear(nn.Linear(256, 128, bias=False))
    x = torch.randn(30, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = q(x)
        with native.disabled():
            assert native.kernels() is None
            assert torch.equal(q(x), expected)


def test_results_do_not_alias_the_buffers():
    linear = bf16_linear()
    a, b = (torch.randn(20, 256, dtype=torch.bfloat16) for _ in range(2))
    with torch.inference_mode():
        ya = linear(a)
        kept = ya.clone()
        linear(b)
        linear_fp32 = Int8Linear(nn.Linear(256, 96, bias=False))
        y32 = linear_fp32(a.float())
        kept32 = y32.clone()
        linear_fp32(b.float())
    assert torch.equal(ya, kept) and torch.equal(y32, kept32)


def test_training_takes_the_allocating_path_and_gets_its_gradients():
    linear = bf16_linear()
    x = torch.randn(20, 256, dtype=torch.bfloat16, requires_grad=True)
    assert not scratch.applies(x, linear.out_features)  # grad mode: the buffers would be saved for backward
    linear(x).float().square().sum().backward()
    reference = x.detach().float().requires_grad_()
    F.linear(reference, linear.weight.float(), linear.bias.float()).to(torch.bfloat16).float().square().sum().backward()
    assert torch.equal(x.grad, reference.grad.to(torch.bfloat16))


def test_buffers_made_in_inference_mode_serve_no_grad_callers():
    # The app generates under inference_mode, evaluation and training's sampling under no_grad, in one process.
    scratch._buffers.clear()
    linear = bf16_linear()
    x = torch.randn(20, 256, dtype=torch.bfloat16)
    with torch.inference_mode():
        first = linear(x)
    with torch.no_grad():
        assert torch.equal(linear(x), first)


def test_a_product_over_the_cap_allocates(monkeypatch):
    linear = bf16_linear()
    x = torch.randn(20, 256, dtype=torch.bfloat16)
    expected = F.linear(x.float(), linear.weight.float(), linear.bias.float()).to(torch.bfloat16)
    monkeypatch.setattr(scratch, "MAX_ELEMENTS", 256 * 96 - 1)
    with torch.inference_mode():
        assert not scratch.applies(x, linear.out_features)
        assert torch.equal(linear(x), expected)


def test_threads_multiplying_at_once_get_their_own_products():
    # Two threads multiplying different shapes at once: a buffer written by both would mix their weights and rows.
    layers = [bf16_linear(256, 96, seed=2), bf16_linear(512, 160, seed=3)]
    inputs = [torch.randn(33, 256, dtype=torch.bfloat16), torch.randn(17, 512, dtype=torch.bfloat16)]
    expected = [F.linear(x.float(), l.weight.float(), l.bias.float()).to(torch.bfloat16) for l, x in zip(layers, inputs)]
    wrong = []

    def work(i):
        with torch.inference_mode():
            for _ in range(200):
                if not torch.equal(layers[i](inputs[i]), expected[i]):
                    wrong.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_a_product_finding_the_buffers_in_use_allocates():
    linear = bf16_linear()
    x = torch.randn(20, 256, dtype=torch.bfloat16)
    expected = F.linear(x.float(), linear.weight.float(), linear.bias.float()).to(torch.bfloat16)
    with torch.inference_mode(), scratch._lock:  # as if another thread's product were running
        assert scratch.linear(x, linear.out_features, lambda w: w.copy_(linear.weight)) is None
        assert torch.equal(linear(x), expected)
