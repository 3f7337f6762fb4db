"""bf16 on a CPU: without bf16 arithmetic, fp32 math for matrix-matrix products; with it, PyTorch's bf16 for those;
one-row products by the native GEMV either way; same parameters."""

import pytest
import torch
from torch import nn

from engine.kernels import bf16 as bf16_kernels
from engine.kernels.bf16 import NativeBf16Linear, UpcastConv2d, UpcastLinear, prepare_cpu_bf16, upcast_matmuls
from conftest import TALKATIVE
from engine.loading import load_model


def test_upcast_keeps_parameters_and_computes_in_fp32():
    model = load_model(TALKATIVE, dtype=torch.bfloat16).model
    keys = list(model.state_dict())
    pixels = torch.rand(1, 3, 384, 384, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.encode_images(pixels).float()
        reference = load_model(TALKATIVE).model.encode_images(pixels)
        assert upcast_matmuls(model) > 0
        after = model.encode_images(pixels).float()
    assert list(model.state_dict()) == keys
    assert isinstance(model.aligner.layers[0], UpcastLinear)
    assert isinstance(model.vision_model.vision_tower.patch_embed.proj, UpcastConv2d)
    # The same function within bf16 rounding, and as close to the fp32 model as the bf16 path is.
    scale = reference.abs().max()
    assert (after - before).abs().max() < 0.02 * scale
    assert (after - reference).abs().max() < 0.02 * scale


def test_many_row_products_run_in_fp32():
    linear = nn.Linear(64, 32).to(torch.bfloat16)
    upcast_matmuls(linear)
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    expected = nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float()).to(torch.bfloat16)
    assert torch.equal(linear(x), expected)


def test_one_row_products_stay_in_bf16():
    # Memory-bound: bf16 weights read as they are (the native GEMV where it runs), bf16 result.
    linear = nn.Linear(64, 32).to(torch.bfloat16)
    upcast_matmuls(linear)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        y = linear(x)
    expected = nn.functional.linear(x.float(), linear.weight.float(), linear.bias.float())
    assert y.dtype == torch.bfloat16
    assert ((y.float() - expected).abs() <= 2**-7 * expected.abs() + 1e-3).all()


def test_one_row_products_keep_their_gradient():
    linear = nn.Linear(64, 32).to(torch.bfloat16)
    upcast_matmuls(linear)
    linear(torch.randn(1, 64, dtype=torch.bfloat16)).float().sum().backward()  # native kernels have no backward
    assert linear.weight.grad is not None


@pytest.mark.parametrize("has_bf16", [False, True])
def test_runtime_applies_it_for_cpu_bf16(monkeypatch, has_bf16):
    import engine.runtime as runtime

    monkeypatch.setattr(bf16_kernels, "native_bf16", lambda: has_bf16)
    loaded = runtime.Runtime.load(TALKATIVE, dtype="bf16")
    assert type(loaded.model.aligner.layers[0]) is (NativeBf16Linear if has_bf16 else UpcastLinear)
    conv = type(loaded.model.vision_model.vision_tower.patch_embed.proj)
    assert conv is (nn.Conv2d if has_bf16 else UpcastConv2d)
    assert type(runtime.Runtime.load(TALKATIVE).model.aligner.layers[0]) is nn.Linear  # fp32: untouched


def test_with_bf16_instructions_only_one_row_products_change(monkeypatch):
    # Several rows: PyTorch's bf16 GEMM (it uses the CPU's bf16 instructions), bitwise as before; one row: the
    # native GEMV, which reads bf16 weights faster than PyTorch's on such a CPU too.
    from engine.kernels import native

    monkeypatch.setattr(bf16_kernels, "native_bf16", lambda: True)
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(96, 40).to(torch.bfloat16)
    plain = nn.Linear(96, 40).to(torch.bfloat16)
    plain.load_state_dict(linear.state_dict())
    assert prepare_cpu_bf16(linear) == 1 and type(linear) is NativeBf16Linear
    rows, row = torch.randn(2, 17, 96, generator=g).bfloat16(), torch.randn(1, 96, generator=g).bfloat16()
    with torch.no_grad():
        assert torch.equal(linear(rows), plain(rows))
        y = linear(row)
        if native.kernels() is not None:
            w = native.Weight(native.BF16, linear.weight, 40, 96)
            assert torch.equal(y, native.gemv(row, [w])[0] + linear.bias)
        expected = nn.functional.linear(row.float(), linear.weight.float(), linear.bias.float())
        assert y.dtype == torch.bfloat16 and ((y.float() - expected).abs() <= 2**-7 * expected.abs() + 1e-3).all()
    linear(row).float().sum().backward()  # training: PyTorch's ops, with their gradient
    assert linear.weight.grad is not None


def test_mkl_bf16_gemm_gives_the_upcast_product_bitwise(monkeypatch):
    import sys

    from engine.kernels import bf16, native

    if sys.platform == "linux" and "x86_64" in __import__("platform").machine():
        assert bf16._mkl_gemm_bf16() is not None  # PyTorch's x86 Linux wheels carry MKL: the path must run here
    g = torch.Generator().manual_seed(0)
    for shape, N, bias in (((1, 40, 96), 72, False), ((3, 17, 96), 40, True), ((650, 256), 300, True)):
        x = torch.randn(*shape, generator=g).to(torch.bfloat16)
        w = torch.randn(N, shape[-1], generator=g).to(torch.bfloat16)
        b = torch.randn(N, generator=g).to(torch.bfloat16) if bias else None
        expected = nn.functional.linear(x.float(), w.float(), None if b is None else b.float()).to(torch.bfloat16)
        with torch.no_grad():
            y = bf16.mkl_linear(x, w, b)
        if bf16._mkl_gemm_bf16() is not None:
            assert y.shape == (*shape[:-1], N) and torch.equal(y, expected)
    w.requires_grad_(True)
    assert bf16.mkl_linear(x, w, b) is None  # autograd: PyTorch's own ops
    assert bf16.mkl_linear(x.float(), w.detach(), b) is None  # fp32 activations
    # Without the native GEMM the layer takes MKL's; without MKL (another PyTorch build) the reused-buffer path,
    # with the same result.
    linear = nn.Linear(96, 40).to(torch.bfloat16)
    upcast_matmuls(linear)
    x = torch.randn(2, 17, 96, generator=g).to(torch.bfloat16)
    monkeypatch.setattr(native, "gemm", lambda *args, **kwargs: None)
    with torch.no_grad():
        with_mkl = linear(x)
        monkeypatch.setattr(bf16, "_mkl_gemm_bf16", lambda: None)
        assert torch.equal(linear(x), with_mkl)
