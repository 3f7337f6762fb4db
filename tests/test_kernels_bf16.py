"""bf16 on CPUs without bf16 arithmetic: fp32 math for matrix-matrix products, same parameters."""

import torch
from torch import nn

from engine.kernels.bf16 import UpcastConv2d, UpcastLinear, upcast_matmuls
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


def test_runtime_applies_it_for_cpu_bf16(monkeypatch):
    import engine.runtime as runtime

    monkeypatch.setattr(runtime, "native_bf16", lambda: False)
    loaded = runtime.Runtime.load(TALKATIVE, dtype="bf16")
    assert isinstance(loaded.model.aligner.layers[0], UpcastLinear)
    assert type(runtime.Runtime.load(TALKATIVE).model.aligner.layers[0]) is nn.Linear  # fp32: untouched


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
