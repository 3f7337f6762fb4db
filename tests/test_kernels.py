"""engine/kernels: the native decode kernels, the quantized linears built on them, and the dispatch, against float references."""

import contextlib
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from engine.kernels import native
from engine.kernels.quant import Int8Linear, quantize_rows
from tests.conftest import REPO

SUPPORTED = native._cpu_supported() is None
needs_kernels = pytest.mark.skipif(not SUPPORTED, reason=f"CPU cannot run the kernels: {native._cpu_supported()}")


def _quantize_blocks_of(x: torch.Tensor, size: int, qmax: int = 127):
    """The kernels' activation quantization, in PyTorch: symmetric to [-qmax, qmax] per block, half to even."""
    blocks = x.float().reshape(-1, size)
    amax = blocks.abs().amax(1, keepdim=True)
    inverse = torch.full_like(amax, qmax) / amax  # as C divides (`qmax / amax` would be amax.reciprocal() * qmax)
    q = torch.where(amax > 0, torch.round(blocks * inverse), torch.zeros_like(blocks))
    return q, amax / qmax  # [K/size, size], [K/size, 1]


@needs_kernels
def test_kernels_build_and_load_here():
    # This machine has x86-64 + AVX2 + a C compiler: the fast path must be the one the tests exercise.
    assert native.kernels() is not None, native.status()
    assert native.status() == "loaded"
    assert any(native.cache_dir().glob("dsvl_kernels-*.so"))


@needs_kernels
# K 16, 80, 96: the 16-wide tails of the AVX512_BF16 loop (64 a step), where the CPU has it.
@pytest.mark.parametrize("N, K", [(64, 128), (67, 96), (1, 16), (5, 80), (1030, 2048)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemv_bf16_matches_float_reference(N, K, dtype):
    g = torch.Generator().manual_seed(N + K)
    weight = torch.randn(N, K, generator=g).to(torch.bfloat16)
    x = torch.randn(1, 1, K, generator=g).to(dtype)
    (y,) = native.gemv(x, [native.Weight(native.BF16, weight, N, K)])
    assert y.shape == (1, 1, N) and y.dtype == dtype
    reference = x.float() @ weight.float().T
    # fp32 accumulation in another order, then (bf16 output) one rounding: within half a bf16 step.
    tolerance = (2**-8 if dtype == torch.bfloat16 else 1e-5) * reference.abs() + 1e-4 * K**0.5
    assert ((y.float() - reference).abs() <= tolerance).all()


@needs_kernels
@pytest.mark.parametrize("N, K", [(64, 128), (67, 96), (1030, 2048), (3, 5632)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemv_int8_is_exact_integer_arithmetic(N, K, dtype):
    g = torch.Generator().manual_seed(N * K)
    weight, scale = quantize_rows(torch.randn(N, K, generator=g))
    x = torch.randn(K, generator=g).to(dtype)
    (y,) = native.gemv(x, [native.Weight(native.INT8, weight, N, K, scale)])
    assert y.shape == (N,) and y.dtype == dtype
    xq, xs = _quantize_blocks_of(x, 32)
    # Per block an exact integer dot product, scaled by the block's activation scale and the row's scale.
    per_block = torch.einsum("nbk,bk->nb", weight.double().reshape(N, -1, 32), xq.double())
    terms = per_block * xs.double().T * scale.double()[:, None]  # [N, K/32]
    reference = terms.sum(1)
    # fp32 sums of K/32 terms: error relative to the terms' magnitude, not to a possibly cancelled total.
    tolerance = (2**-8 if dtype == torch.bfloat16 else 0) * reference.abs() + 1e-6 * terms.abs().sum(1)
    assert ((y.double() - reference).abs() <= tolerance).all()


@needs_kernels
def test_kernels_decline_what_they_cannot_do():
    def bf16(w):
        return native.Weight(native.BF16, w, *w.shape)

    w16 = torch.randn(8, 48).to(torch.bfloat16)
    assert native.gemv(torch.randn(1, 40), [bf16(torch.randn(8, 40).to(torch.bfloat16))]) is None  # K % 16
    assert native.gemv(torch.randn(2, 48), [bf16(w16)]) is None  # two rows: not a matrix-vector product
    assert native.gemv(torch.randn(1, 48).half(), [bf16(w16)]) is None  # fp16 activations
    assert native.gemv(torch.randn(1, 48), [bf16(w16.float())]) is None  # fp32 weights
    assert native.gemv(torch.randn(1, 48), [bf16(torch.randn(48, 8).to(torch.bfloat16).T)]) is None  # not contiguous
    assert native.gemv(torch.randn(1, 64), [bf16(w16)]) is None  # x and weight disagree on K
    w8, s8 = quantize_rows(torch.randn(8, 48))
    assert native.gemv(torch.randn(1, 48), [native.Weight(native.INT8, w8, 8, 48, s8)]) is None  # K % 32
    w8, s8 = quantize_rows(torch.randn(8, 64))
    int8 = native.Weight(native.INT8, w8, 8, 64, s8)
    assert native.gemv(torch.randn(1, 64), [int8, bf16(torch.randn(8, 64).to(torch.bfloat16))]) is None  # two kinds
    assert native.gemv(torch.randn(1, 64), [int8._replace(scale=s8[:4])]) is None  # a scale per row missing
    assert native.gemv(torch.randn(1, 64), [int8, int8._replace(rows=4, data=w8[:4])], swiglu=True) is None  # shapes


def test_disabled_by_environment():
    code = "from engine.kernels import native; print(native.kernels() is None, native.status())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "DSVL_NATIVE": "0"}).stdout
    assert out.strip() == "True disabled by DSVL_NATIVE=0"


@needs_kernels
def test_a_broken_compiler_falls_back_with_the_reason(tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'fatal: no such thing' >&2\nexit 1\n")
    fake.chmod(0o755)
    code = "from engine.kernels import native; print(native.kernels() is None); print(native.status())"
    env = {**os.environ, "CC": str(fake), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True, env=env)
    first, reason = out.stdout.strip().splitlines()
    assert first == "True" and reason.startswith("build failed:") and "no such thing" in reason


# ------------------------------------------------------------------ several products of one activation
def _linears(kind: str, shapes, dtype, seed=0):
    """Decode-ready linears [N, K] of one kind, as the runtime swaps them in: bf16 → UpcastLinear, else quantized."""
    from engine.kernels.bf16 import upcast_matmuls
    from engine.kernels.quant import NF4Linear

    g = torch.Generator().manual_seed(seed)
    modules = []
    for N, K in shapes:
        linear = nn.Linear(K, N, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(N, K, generator=g) * K**-0.5)
        if kind == "bf16":
            upcast_matmuls(linear.to(torch.bfloat16))
            modules.append(linear)
        else:
            modules.append({"int8": Int8Linear, "nf4": NF4Linear}[kind](linear))
    return modules


@needs_kernels
@pytest.mark.parametrize("kind", ["bf16", "int8", "nf4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linears_in_one_call_equal_one_call_each(kind, dtype):
    from engine import kernels

    q, k, v = _linears(kind, [(256, 192), (64, 192), (72, 192)], dtype)  # GQA-like: k, v narrower than q
    x = torch.randn(1, 1, 192, generator=torch.Generator().manual_seed(5)).to(dtype)
    with torch.no_grad():
        fused = kernels.linears(x, q, k, v)
        separate = [m(x) for m in (q, k, v)]
    for a, b in zip(fused, separate):  # the same rows in the same order: bitwise equal
        assert a.shape == b.shape and a.dtype == dtype and torch.equal(a, b)


@needs_kernels
@pytest.mark.parametrize("kind", ["bf16", "int8", "nf4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N", [256, 37])  # 37: rows that are no multiple of the 8 the SiLU takes at a time
def test_swiglu_in_one_call_matches_silu_gate_times_up(kind, dtype, N):
    import torch.nn.functional as F

    from engine import kernels

    gate, up = _linears(kind, [(N, 128), (N, 128)], dtype, seed=N)
    x = (torch.randn(1, 1, 128, generator=torch.Generator().manual_seed(6)) * 4).to(dtype)  # gate spread over ±10
    with torch.no_grad():
        fused = kernels.swiglu(x, gate, up)
        reference = F.silu(gate(x)) * up(x)  # PyTorch's ops, on the same products
        if not (kind == "bf16" and dtype == torch.float32):  # (PyTorch multiplies bf16 weights by bf16 only)
            with native.disabled():
                assert torch.equal(kernels.swiglu(x, gate, up), F.silu(gate(x)) * up(x))  # the fallback is that
    assert fused.shape == (1, 1, N) and fused.dtype == dtype
    # The same roundings; e^x from another approximation: one last bit in bf16, a few fp32 ulps at most.
    step = 2**-7 if dtype == torch.bfloat16 else 4e-7
    assert ((fused.float() - reference.float()).abs() <= step * reference.float().abs() + 1e-30).all()
    if dtype == torch.bfloat16:
        assert (fused == reference).float().mean() > 0.97


@needs_kernels
def test_swiglu_keeps_nan_and_saturates_at_large_gates():
    from engine import kernels

    gate, up = _linears("bf16", [(16, 64), (16, 64)], torch.float32)
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, 0] = torch.tensor([0, 1, -1, 50, -50, 90, -90, 1e4, -1e4, 3, -3, 0.5, -0.5, 20, -20, 0])
        up.weight.zero_()
        up.weight[:, 0] = 1.0
    x = torch.zeros(1, 64).to(torch.bfloat16)
    x[0, 0] = 1.0
    with torch.no_grad():
        y = kernels.swiglu(x, gate, up).float()[0]
        x[0, 0] = float("nan")
        assert kernels.swiglu(x, gate, up).isnan().all()
    g = gate.weight[:, 0].float()
    expected = (g * torch.sigmoid(g)).to(torch.bfloat16).float()
    assert torch.allclose(y, expected, rtol=2**-7, atol=1e-30) and y[7] == g[7] and y[8] == 0 and y[6] == 0


def test_linears_and_swiglu_call_the_modules_where_no_native_call_applies():
    import torch.nn.functional as F

    from engine import kernels

    calls = []
    biased = nn.Linear(64, 32)  # a bias (and plain nn.Linear): not read by the native kernel
    biased.register_forward_hook(lambda module, args, out: calls.append(module))
    x = torch.randn(1, 64)
    with torch.no_grad():
        (y,) = kernels.linears(x, biased)
        assert torch.equal(y, biased(x)) and len(calls) == 2
        assert torch.equal(kernels.swiglu(x, biased, biased), F.silu(biased(x)) * biased(x))


# ------------------------------------------------------------------ a whole decoder layer in one call
def _small_lm(kind: str):
    """A random 3-layer LLaMA (GQA, head dim 64) as the runtime sets it up on a CPU for `kind`: bf16 weights with
    the upcasting linears, or int8 / NF4 decoder linears."""
    from transformers import LlamaConfig

    from engine.kernels.bf16 import upcast_matmuls
    from engine.kernels.quant import NF4Linear
    from engine.model.llama import LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=704, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6))
    with torch.no_grad():
        for name, p in lm.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if name.endswith("norm.weight") else torch.randn_like(p) * 0.05)
    lm = lm.to(torch.bfloat16).eval()
    for layer in lm.model.layers if kind != "bf16" else ():
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                setattr(parent, name, {"int8": Int8Linear, "nf4": NF4Linear}[kind](child))
    upcast_matmuls(lm)
    return lm


def _decode(lm, tokens=(5, 6, 7, 8, 9)):
    """A 3-token prompt then `tokens` one at a time from a cache of capacity 4 (so it grows while decoding)."""
    cache = lm.new_cache(capacity=4)
    with torch.no_grad():
        lm(input_ids=torch.tensor([[1, 2, 3]]), cache=cache, use_cache=True)
        logits = [lm(input_ids=torch.tensor([[t]]), cache=cache, use_cache=True).logits for t in tokens]
    return torch.cat(logits, 1) if logits else None, cache


@needs_kernels
@pytest.mark.parametrize("kind", ["bf16", "int8", "nf4"])
def test_decoder_layer_in_one_call_equals_the_layer_op_by_op(kind, monkeypatch):
    from engine import kernels

    lm = _small_lm(kind)
    native_layers = []
    one_call = kernels.decoder_layer
    monkeypatch.setattr(kernels, "decoder_layer", lambda *a: native_layers.append(y := one_call(*a)) or y)
    fused, fused_cache = _decode(lm)
    prompt, steps = native_layers[:3], native_layers[3:]
    assert all(y is None for y in prompt) and len(steps) == 5 * 3 and all(y is not None for y in steps)
    monkeypatch.setattr(kernels, "decoder_layer", lambda *a: None)
    op_by_op, cache = _decode(lm)
    assert torch.equal(fused, op_by_op)  # the same kernels in the same order: bitwise
    for i in range(3):
        n = cache.get_seq_length(i)
        assert fused_cache.get_seq_length(i) == n == 8
        assert torch.equal(fused_cache.keys[i][:, :, :n], cache.keys[i][:, :, :n])
        assert torch.equal(fused_cache.values[i][..., :n], cache.values[i][..., :n])


@needs_kernels
def test_decoder_layer_declines_what_it_cannot_do():
    from engine import kernels
    from engine.model.llama import KVCache

    lm = _small_lm("nf4")
    layer, x = lm.model.layers[0], torch.randn(1, 1, 256).to(torch.bfloat16)
    cos, sin = lm.model.rotary(torch.tensor([[3]]), torch.bfloat16)
    cos, sin = cos[:, None], sin[:, None]
    empty = KVCache()
    with torch.no_grad():
        assert kernels.decoder_layer(layer, x, cos, sin, None, empty) is None  # no buffers for the layer yet
        assert empty.get_seq_length() == 0
        _, cache = _decode(lm, tokens=())
        mask = (torch.ones(1, 1, 1, 4, dtype=torch.bool), None)
        assert kernels.decoder_layer(layer, x, cos, sin, mask, cache) is None  # a mask: op by op
        assert kernels.decoder_layer(layer, torch.randn(1, 2, 256).to(torch.bfloat16), cos, sin, None, cache) is None
        original = layer.mlp.up_proj
        layer.mlp.up_proj = nn.Linear(256, 704).to(torch.bfloat16)  # a module the native kernel cannot read
        assert kernels.decoder_layer(layer, x, cos, sin, None, cache) is None
        layer.mlp.up_proj = original
        assert cache.get_seq_length(0) == 3  # nothing appended by the declined calls
        assert kernels.decoder_layer(layer, x, cos, sin, None, cache) is not None
        assert cache.get_seq_length(0) == 4
    with native.disabled():
        assert kernels.decoder_layer(layer, x, cos, sin, None, cache) is None


# ------------------------------------------------------------------ Int8Linear
def test_quantize_rows_bounds_the_error_per_row():
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.01, 10, 16)[:, None]
    weight[3] = 0  # an all-zero row must not divide by zero
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and q.abs().max() <= 127
    assert torch.equal(q[3], torch.zeros(64, dtype=torch.int8))
    error = (q.float() * scale[:, None] - weight).abs()
    assert (error <= scale[:, None] / 2 + 1e-6 * weight.abs()).all()  # half a step, plus fp32 rounding


@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_linear_close_to_the_float_linear(rows, dtype):
    torch.manual_seed(rows)
    linear = nn.Linear(256, 96, bias=True)
    q = Int8Linear(linear)
    assert q.weight.dtype == torch.int8 and not any(p.requires_grad for p in q.parameters())
    x = torch.randn(1, rows, 256)
    with torch.no_grad():
        expected = linear(x)
        y = q(x.to(dtype))
    assert y.shape == expected.shape and y.dtype == dtype
    relative = (y.float() - expected).norm() / expected.norm()
    assert relative < 0.02


def test_int8_linear_without_native_kernels_uses_pytorch():
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=False)
    q = Int8Linear(linear)
    x = torch.randn(1, 1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        fast = q(x)
        with native.disabled():
            fallback = q(x)  # torch._weight_int8pack_mm: same weights, activations not quantized
        expected = x.float() @ q.dequantized(torch.float32).T
    assert (fallback.float() - expected).norm() / expected.norm() < 0.01
    assert (fast.float() - expected).norm() / expected.norm() < 0.02


# ------------------------------------------------------------------ decode attention
@needs_kernels
@pytest.mark.parametrize("H, Hkv, S", [(4, 4, 1), (8, 2, 37), (16, 16, 600)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sharpness", [1.0, 30.0])  # 30: scores spread over hundreds, most weights below e^-87
def test_attend_decode_matches_softmax_attention_over_the_cache(H, Hkv, S, dtype, sharpness):
    from engine.model.llama import KVCache

    D = 64
    g = torch.Generator().manual_seed(S)
    cache = KVCache(capacity=16)  # grows by doubling: the kernel reads views into a larger buffer
    k, v = (torch.randn(1, Hkv, S, D, generator=g).to(dtype) for _ in range(2))
    k, v = cache.update(k, v, 0)
    q = (torch.randn(1, H, 1, D, generator=g) * sharpness).to(dtype)
    y = native.attend_decode(q, k, v, D**-0.5)
    assert y is not None and y.shape == (1, 1, H * D) and y.dtype == dtype
    kf, vf = (t.float().repeat_interleave(H // Hkv, dim=1) for t in (k, v))
    reference = torch.softmax(q.float() @ kf.transpose(-2, -1) * D**-0.5, -1) @ vf  # [1, H, 1, D]
    reference = reference.transpose(1, 2).reshape(1, 1, H * D)
    tolerance = 2**-8 if dtype == torch.bfloat16 else 1e-5
    assert ((y.float() - reference).abs() <= tolerance * reference.abs() + 1e-5).all()


@needs_kernels
def test_attend_decode_declines_batches_and_gradients():
    q = torch.randn(2, 4, 1, 8)
    k = v = torch.randn(2, 4, 5, 8)
    assert native.attend_decode(q, k, v, 0.3) is None
    q = torch.randn(1, 4, 1, 8, requires_grad=True)
    assert native.attend_decode(q, k[:1], v[:1], 0.3) is None


def test_decoding_with_and_without_native_kernels_agrees():
    from conftest import TALKATIVE
    from engine.loading import load_model

    lm = load_model(TALKATIVE).model.language_model  # fp32
    logits = []
    for use_native in (True, False):
        cache = lm.new_cache()
        with torch.no_grad(), (contextlib.nullcontext() if use_native else native.disabled()):
            lm(input_ids=torch.tensor([[1, 5, 9, 33, 70]]), cache=cache, use_cache=True)
            out = [lm(input_ids=torch.tensor([[t]]), cache=cache, use_cache=True).logits for t in (3, 4, 5)]
        logits.append(torch.cat(out, 1))
    assert (logits[0] - logits[1]).abs().max() < 1e-5 * logits[1].abs().max()


# ------------------------------------------------------------------ fused RMSNorm and rotary
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_the_pytorch_form(dtype):
    from engine.model.llama import RMSNorm

    norm = RMSNorm(2048, 1e-6).to(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(2048, generator=g) + 0.5)
    x = (torch.randn(1, 1, 2048, generator=g) * 3).to(dtype)
    with torch.no_grad():
        fused = native.rmsnorm(x, norm.weight, 1e-6)
        with native.disabled():
            reference = norm(x)
    assert fused is not None and fused.dtype == dtype
    # Same roundings; only the fp32 sum of squares is added up in another order (a last-bit difference at most).
    step = 2**-7 if dtype == torch.bfloat16 else 1e-6
    assert ((fused.float() - reference.float()).abs() <= step * reference.float().abs()).all()
    assert (fused == reference).float().mean() > 0.99


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [128, 20])  # 20: half a row is no multiple of the 8 lanes (the scalar tail)
def test_rotary_in_place_matches_apply_rotary(dtype, D):
    from engine.kernels import apply_rotary
    from engine.model.llama import Rotary

    cos, sin = Rotary(D, 10000.0)(torch.tensor([[777]]), dtype)
    cos, sin = cos[:, None], sin[:, None]  # [1, 1, 1, D]
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, heads, 1, D, generator=g).to(dtype) for heads in (16, 4))  # GQA: fewer key heads
    expected = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    assert native.rotary_(q, k, cos, sin)
    assert torch.equal(q, expected[0]) and torch.equal(k, expected[1])  # the same roundings: bitwise
    two = torch.randn(1, 16, 2, D).to(dtype)
    assert not native.rotary_(two, k, cos, sin) and not native.rotary_(q, two, cos, sin)  # not one decode step


# ------------------------------------------------------------------ NF4 (bitsandbytes' 4-bit format)
def _nf4(N, K, seed):
    from engine.kernels.quant import NF4Linear

    linear = nn.Linear(K, N, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(N, K, generator=torch.Generator().manual_seed(seed)))
    return linear, NF4Linear(linear)


def test_nf4_dequantizes_to_what_bitsandbytes_computes_with():
    import bitsandbytes.functional as bnbf

    linear, q = _nf4(24, 192, 0)
    packed, state = bnbf.quantize_4bit(linear.weight.detach(), blocksize=64, compress_statistics=True, quant_type="nf4")
    expected = bnbf.dequantize_4bit(packed, state).float()
    assert torch.allclose(q.dequantized(torch.float32), expected, rtol=1e-6, atol=1e-6)
    with native.disabled():  # the PyTorch unpacking agrees with the C one
        assert torch.allclose(q.dequantized(torch.float32), expected, rtol=1e-6, atol=1e-6)
    assert q.packed.numel() == 24 * 192 // 2 and q.absmax.numel() == 24 * 192 // 64


@pytest.mark.parametrize("use_native", [True, False])
def test_nf4_dequantizes_into_bf16_as_rounding_its_fp32_weights(use_native):
    # The bf16 prefill (a CPU with bf16 instructions) has the weights written straight in bf16: the same bits as
    # rounding the fp32 ones, to nearest even, ties included.
    _, q = _nf4(48, 256, 1)
    with torch.no_grad():
        q.absmax.mul_(1 + 2**-9)  # scales off the bf16 grid: many products land between two bf16 values
    expected = q.dequantized(torch.float32).to(torch.bfloat16)
    with contextlib.nullcontext() if use_native else native.disabled():
        out = q.dequantize_into(torch.empty(48, 256, dtype=torch.bfloat16))
    assert torch.equal(out.view(torch.int16), expected.view(torch.int16))
    if use_native and native.kernels() is not None:  # halfway between two bf16 values: to the even one
        levels = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.0] * 4)
        out = torch.empty(64, dtype=torch.bfloat16)
        assert native.dequantize_nf4(torch.tensor([0x01, 0x23] * 16, dtype=torch.uint8), torch.ones(1), levels, out)
        assert out[:4].float().tolist() == [1.0, 1 + 2**-6, -1.0, 3.0] == levels[:4].to(torch.bfloat16).float().tolist()


@needs_kernels
@pytest.mark.parametrize("N, K", [(8, 64), (37, 192), (300, 2048)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemv_nf4_is_exact_integer_arithmetic(N, K, dtype):
    _, q = _nf4(N, K, N + K)
    x = torch.randn(K, generator=torch.Generator().manual_seed(K)).to(dtype)
    y = q(x)
    assert y.shape == (N,) and y.dtype == dtype
    assert q.one_row(x) is not None  # the native kernel, not a fallback
    # Reference: int8 levels × activation quantized to ±63 per 64 (even/odd split does not change the sum), exactly.
    codes = torch.stack((q.packed >> 4, q.packed & 15), 1).flatten().long().view(N, K // 64, 64)
    w_int = q.levels_int8[codes].double()  # [N, K/64, 64]
    xq, xs = _quantize_blocks_of(x, 64, qmax=63)  # [K/64, 64], [K/64, 1]
    per_block = torch.einsum("nbk,bk->nb", w_int, xq.double())
    terms = per_block * (xs.double().T / 127) * q.absmax.double().view(N, K // 64)
    reference = terms.sum(1)
    tolerance = (2**-8 if dtype == torch.bfloat16 else 0) * reference.abs() + 1e-6 * terms.abs().sum(1)
    assert ((y.double() - reference).abs() <= tolerance).all()


@needs_kernels
def test_gemv_nf4_does_not_overflow_on_extreme_blocks():
    # Level +1 is stored as 254 and x reaches ±63: a pair of products is 2·254·63 = 32004, just inside maddubs'
    # 16 bits. Rows of extreme levels against extreme activations must give exactly what the levels say.
    from engine.kernels.quant import NF4Linear

    K = 128
    signs = torch.tensor([1.0, -1.0]).repeat(K // 2)
    linear = nn.Linear(K, 4, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.stack([torch.ones(K), -torch.ones(K), signs, -signs]))
    q = NF4Linear(linear)
    for x in (torch.ones(1, K), signs[None], -signs[None]):
        with torch.no_grad():
            y = q(x)
        assert q.one_row(x) is not None
        assert torch.allclose(y, x @ linear.weight.detach().T, rtol=1e-5, atol=1e-4), (x[0, :4], y)


# NF4's own error on Gaussian weights is ~9%; int4's measured ~8.5% (16 levels over each group's range).
@pytest.mark.parametrize("kind, bound", [("nf4", 0.12), ("int4", 0.10)])
def test_4bit_linear_close_to_the_float_linear(kind, bound):
    linear, q = {"nf4": _nf4, "int4": _int4}[kind](96, 256, 3)
    for rows in (1, 5):
        x = torch.randn(1, rows, 256, generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            expected = linear(x)
            y = q(x)
        assert (y - expected).norm() / expected.norm() < bound


# ------------------------------------------------------------------ int4 (PyTorch's own kernel, no compiler needed)
def _int4(N, K, seed, bias=False):
    from engine.kernels.quant import Int4Linear

    linear = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(N, K, generator=torch.Generator().manual_seed(seed)))
    original = linear.weight.detach().clone()
    q = Int4Linear(linear)
    assert torch.equal(linear.weight, original)  # quantizing leaves the float weights alone
    return linear, q


@pytest.mark.parametrize("N, K, group", [(96, 256, 64), (64, 352, 32), (48, 2048, 64)])
def test_int4_weights_are_within_half_a_step(N, K, group):
    linear, q = _int4(N, K, N)
    assert q.group == group and q.packed.dtype == torch.uint8 and q.packed.numel() == N * K // 2
    scale, zero = q.scale_zero.float().unbind(-1)  # [K/group, N]
    weight = q.dequantized(torch.float32)
    error = (weight - linear.weight.detach()).abs()
    step = scale.T.repeat_interleave(group, 1)  # [N, K]
    assert (error <= step / 2 + 1e-6 * linear.weight.detach().abs()).all()
    # Affine with 16 levels: every weight is one of zero + (c - 8)·scale.
    codes = (weight - zero.T.repeat_interleave(group, 1)) / step + 8
    assert (codes - codes.round()).abs().max() < 1e-3 and codes.round().min() >= 0 and codes.round().max() <= 15


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_kernel_computes_its_own_dequantized_product(rows, dtype):
    linear, q = _int4(96, 512, rows, bias=True)
    x = torch.randn(1, rows, 512, generator=torch.Generator().manual_seed(7)).to(dtype)
    with torch.no_grad():
        y = q(x)
    assert y.shape == (1, rows, 96) and y.dtype == dtype
    weight = q.dequantized(torch.float32)
    x16 = x.to(torch.bfloat16).float()  # the kernel takes bf16 activations
    reference = x16 @ weight.T + linear.bias.detach()
    magnitude = x16.abs() @ weight.abs().T  # what a dot product's rounding is relative to
    # bf16 result (half a step: 2^-9), fp32 sums in another order.
    assert ((y.float() - reference).abs() <= 2**-8 * reference.abs() + 2**-12 * magnitude).all()


def test_int4_gradient_flows_to_the_input():
    linear, q = _int4(32, 128, 0)
    x = torch.randn(2, 128, requires_grad=True)
    q(x).sum().backward()  # the kernel has no backward: the dequantized product does it
    expected = q.dequantized(torch.float32).sum(0).expand(2, -1)
    assert torch.allclose(x.grad, expected, atol=1e-5)


def test_int4_refuses_shapes_its_kernel_cannot_take():
    from engine.kernels.quant import Int4Linear

    with pytest.raises(ValueError, match="out_features divisible by 16"):
        Int4Linear(nn.Linear(64, 8))
    with pytest.raises(ValueError, match="in_features by 32"):
        Int4Linear(nn.Linear(48, 16))


# ------------------------------------------------------------------ the dispatch: what runs, and why
@pytest.fixture
def native_off(monkeypatch):
    """DSVL_NATIVE=0 decided afresh, as in a process started with it; decided again afterwards."""
    monkeypatch.setenv("DSVL_NATIVE", "0")
    native.reset()
    yield
    native.reset()


@needs_kernels
def test_backends_name_the_native_kernels_where_they_run():
    from engine import kernels
    from engine.kernels.bf16 import native_bf16

    rows = kernels.backends("cpu", torch.bfloat16)
    dot = "avx512_bf16" in open("/proc/cpuinfo").read() and not os.environ.get("DSVL_NO_AVX512")
    assert rows["bf16 matmul (decode)"] == ("native AVX512_BF16 bf16" if dot else "native AVX2 bf16")
    assert rows["decoder layer (decode)"] == "native AVX2, one call per layer"
    layer = "decoder layer (decode)"
    assert kernels.backends("cpu", torch.bfloat16, "4bit", "int4")[layer] == "op by op (int4 weights)"
    assert kernels.backends("cpu", torch.float32)[layer] == "op by op (fp32 weights)"
    assert kernels.backends("cpu", torch.float32, "8bit", "int8")[layer] == rows[layer]
    assert rows["bf16 matmul (prefill)"] == ("PyTorch bf16 (the CPU has bf16 instructions)" if native_bf16()
                                             else "native AVX2 GEMM, fp32 math (the CPU has no bf16 instructions)")
    for quantization, backend, key in (("8bit", "int8", "int8"), ("4bit", "nf4", "4-bit")):
        prefill = kernels.backends("cpu", torch.bfloat16, quantization, backend)[f"{key} matmul (prefill)"]
        bf16_gemm = backend == "nf4" and native_bf16()  # NF4 on a CPU with bf16 instructions: PyTorch's bf16 GEMM
        assert prefill == (kernels.BF16_GEMM if bf16_gemm else "native AVX2 GEMM, dequantized while packing")
    assert rows["attention (decode)"] == rows["rmsnorm (decode)"] == rows["rotary (decode)"] == "native AVX2"
    assert kernels.backends("cpu", torch.bfloat16, "8bit", "int8")["int8 matmul (decode)"] == "native AVX2 int8"
    assert kernels.summary("cpu", torch.bfloat16, "4bit", "nf4") == "native AVX2 NF4"
    assert kernels.summary("cpu", torch.bfloat16, "4bit", "int4") == "PyTorch int4, groups of 64 (--quant-backend int4)"
    assert "slow on a CPU" in kernels.summary("cpu", torch.bfloat16, "4bit", "bitsandbytes")
    with native.disabled():  # what this thread runs, not what the process could
        assert kernels.summary("cpu", torch.bfloat16) == "PyTorch bf16 (native kernels off in this thread)"


def test_backends_without_native_kernels_say_why(native_off):
    from engine import kernels
    from engine.kernels.bf16 import mkl_bf16, native_bf16
    from engine.quantize import pick_backend

    assert native.kernels() is None and native.status() == "disabled by DSVL_NATIVE=0"
    rows = kernels.backends("cpu", torch.bfloat16, "4bit", pick_backend("4bit", "cpu"))
    assert rows["4-bit matmul (decode)"] == "PyTorch int4, groups of 64 (DSVL_NATIVE=0)"
    assert rows["bf16 matmul (decode)"] == "PyTorch bf16 (DSVL_NATIVE=0)"
    assert rows["attention (decode)"] == "PyTorch matmul + softmax (DSVL_NATIVE=0)"
    assert rows["rmsnorm (decode)"] == rows["rotary (decode)"] == "PyTorch (DSVL_NATIVE=0)"
    assert rows["decoder layer (decode)"] == "op by op (DSVL_NATIVE=0)"
    assert rows["4-bit matmul (prefill)"] == "PyTorch int4, groups of 64"
    # A CPU with bf16 instructions needs no native kernel for prefill: PyTorch's bf16 GEMM uses them.
    assert kernels.backends("cpu", torch.bfloat16)["bf16 matmul (prefill)"] == (
        "PyTorch bf16 (the CPU has bf16 instructions)" if native_bf16()
        else f"{'MKL bf16 GEMM, fp32 math' if mkl_bf16() else 'fp32 upcast'} (DSVL_NATIVE=0)")
    rows = kernels.backends("cpu", torch.bfloat16, "8bit", "int8")
    assert rows["int8 matmul (prefill)"] == "fp32, dequantized per call (DSVL_NATIVE=0)"
    assert kernels.summary("cpu", torch.bfloat16, "8bit", "int8") == "PyTorch int8 (DSVL_NATIVE=0)"
    assert kernels.summary("cpu", torch.float32) == "PyTorch fp32"
    assert kernels.summary("cuda", torch.bfloat16, "4bit", "bitsandbytes") == "bitsandbytes NF4 on cuda"


def test_runtime_describes_its_backends_and_4bit_without_native_kernels_is_int4(native_off):
    from engine.chat import ChatSession
    from conftest import TALKATIVE
    from engine.generation import SamplingParams
    from engine.kernels.quant import Int4Linear
    from engine.runtime import Runtime

    runtime = Runtime.load(TALKATIVE, quantization="4bit")
    assert runtime.quant_backend == "int4" and runtime.advice() is None
    assert isinstance(runtime.model.language_model.model.layers[0].mlp.down_proj, Int4Linear)
    info = runtime.describe()
    assert info["backend"] == "PyTorch int4, groups of 64 (DSVL_NATIVE=0)"
    assert info["backends"] == runtime.backends() and info["backends"]["4-bit matmul (decode)"] == info["backend"]
    session = ChatSession(runtime)
    session.add_user("Hello")
    assert isinstance(session.answer(SamplingParams(max_new_tokens=4)), str)
