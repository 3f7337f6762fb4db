"""Which kernel runs each operation, chosen in one place.

The model calls `rmsnorm`, `linears`, `rotary`, `attend` and `swiglu` once per operation (decoding, `decoder_layer`
once per layer first); each uses the native C kernel (`native/`) where it applies (decoding on an x86-64 CPU with
AVX2, a C compiler, DSVL_NATIVE not 0) and PyTorch otherwise. Weight products run in the modules the runtime swaps
in at load time, which choose the same way: `bf16.py` (bf16 weights on a CPU) and `quant.py` (int8, NF4, int4);
`linears` and `swiglu` multiply several of them in one native call while decoding. `backends()` says what runs
each kind of operation and why; `summary()` says it in a few words.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import bf16, native


# ------------------------------------------------------------------ operations the model calls
def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm over the last dim: statistics in float32 even for bf16 activations, cast back before
    the weight, as HF does."""
    if x.numel() == x.shape[-1] and (y := native.rmsnorm(x, weight, eps)) is not None:
        return y  # decoding: one C call instead of seven small ops
    # (F.rms_norm gives the same bits but was ~0.5 ms/token slower per layer here: its CPU kernel goes
    # multi-threaded even for one 2048-vector, and waiting on a busy second core is costly.)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # HF convention: the two halves of the head dim form the (real, imaginary) pairs.
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos, sin [B, 1, T, D]."""
    return x * cos + rotate_half(x) * sin


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on queries and keys [B, heads, T, D] with cos, sin [B, 1, T, D]. A decode step is rotated in
    place (one C call for both); otherwise new tensors are returned."""
    if native.rotary_(q, k, cos, sin):
        return q, k
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask) -> torch.Tensor:
    """Attention of q [B, H, T, D] over k, v [B, Hkv, S, D] (v as the KV cache hands it back: a transposed
    view), Hkv dividing H (GQA) → [B, T, H·D]. mask: None (decode sees everything; a fresh prefill is plainly
    causal), or (allowed [B or 1, 1, T, S] bool, empty [B, 1, T, 1] bool or None) from LlamaModel._mask."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    allowed, empty = mask if mask is not None else (None, None)
    if T == 1 and mask is None and (y := native.attend_decode(q, k, v, scale)) is not None:
        return y  # fp32 scores, softmax and sum in one pass over the cache, threads over heads
    if T == 1:
        # Decode: one query row per head. Two bf16 matrix-vector products + softmax take about half the time
        # of SDPA's CPU flash kernel here (measured: ~1.1 vs ~1.9 ms per layer at 600 tokens).
        # Query heads that share a kv head (GQA) are consecutive, so they group without repeating k/v.
        q = q.view(B, Hkv, H // Hkv, D)  # [B, Hkv, G, D]
        att = (q @ k.transpose(-2, -1)) * scale  # [B, Hkv, G, S]
        if allowed is not None:  # [B, 1, 1, S] True where allowed
            att = att.masked_fill(~allowed, float("-inf"))
        att = att.softmax(-1, dtype=torch.float32).to(q.dtype)  # float32 softmax, as HF's eager attention
        y = att @ v  # [B, Hkv, G, D]
        if empty is not None:
            y = y.masked_fill(empty, 0.0)
        return y.reshape(B, 1, H * D)
    # The cache hands v back as a transposed view; SDPA's CPU flash kernel needs a unit last-dim stride
    # and otherwise falls back to the math path (measured 2.3x slower for a 620-token turn over 3,100).
    y = F.scaled_dot_product_attention(
        q, k, v.contiguous(),
        attn_mask=allowed,  # [B or 1, 1, T, S] bool, or None: plain causal (no cache, no padding)
        is_causal=allowed is None,
        scale=scale,
        enable_gqa=H != Hkv,
    )  # [B, H, T, D]
    if empty is not None:
        y = y.masked_fill(empty, 0.0)
    return y.transpose(1, 2).reshape(B, T, H * D)


def linears(x: torch.Tensor, *modules: nn.Module) -> list[torch.Tensor]:
    """x through several linears that read it (q, k and v) → their outputs. Decoding, one native call for all:
    it prepares x once and wakes the threads once, where three calls cost ~3 x 30 µs of fixed overhead."""
    if x.numel() == x.shape[-1] and (weights := _gemv_weights(modules)) and (ys := native.gemv(x, weights)) is not None:
        return ys
    return [module(x) for module in modules]


def swiglu(x: torch.Tensor, gate: nn.Module, up: nn.Module) -> torch.Tensor:
    """silu(gate(x)) · up(x), the first half of LLaMA's MLP; one native call while decoding."""
    if x.numel() == x.shape[-1] and (weights := _gemv_weights((gate, up))):
        if (y := native.gemv(x, weights, swiglu=True)) is not None:
            return y
    return F.silu(gate(x)) * up(x)


def decoder_layer(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask, cache):
    """One decoded token through a whole LLaMA decoder layer (model/llama.py's DecoderLayer) in one native call,
    its keys and values appended to `cache`; None where that does not apply (a mask, no KV cache buffers for the
    layer yet, weights the native kernel cannot read, autograd): the layer then runs op by op, with the same
    results. Python's ~25 calls per layer cost ~0.4 ms on top of the kernels on the 2-core machine."""
    if mask is not None or x.numel() != x.shape[-1] or not hasattr(cache, "slot"):
        return None
    attn, mlp = layer.self_attn, layer.mlp
    weights = _gemv_weights((attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                             mlp.down_proj))
    if weights is None or (slot := cache.slot(attn.layer_idx)) is None:
        return None
    keys, values, pos = slot
    y = native.decode_layer(x, (layer.input_layernorm.weight, layer.post_attention_layernorm.weight),
                            layer.input_layernorm.eps, weights, cos, sin, keys, values, pos, attn.n_heads, attn.scale)
    if y is not None:
        cache.advance(attn.layer_idx)
    return y


def _gemv_weights(modules) -> list[native.Weight] | None:
    """The modules' weights as the native kernel reads them; None if one cannot be read so (a plain nn.Linear, a
    LoRA wrapper, int4 weights, a bias): the caller then calls the modules."""
    weights = []
    for module in modules:
        weight = module.gemv_weight() if hasattr(module, "gemv_weight") and module.bias is None else None
        if weight is None:
            return None
        weights.append(weight)
    return weights


# ------------------------------------------------------------------ what runs, and why
NATIVE = "native AVX2"
GEMM = NATIVE + " GEMM"
BF16_GEMM = "PyTorch bf16 GEMM (the CPU has bf16 instructions), dequantized to bf16 per call"


def _without_native() -> str | None:
    """None when the native kernels run in this thread, else a few words on why not."""
    if native.kernels() is not None:
        return None
    reason = native.status()
    if reason.startswith("disabled by"):
        return reason.removeprefix("disabled by ")  # "DSVL_NATIVE=0"
    if reason.startswith("no C compiler"):
        return "no C compiler"
    if reason.startswith("build failed"):
        return "native build failed"
    if reason in ("loaded", ""):
        return "native kernels off in this thread"
    return reason  # the CPU: "the CPU lacks avx2", "the kernels are written for x86-64 (...)"


def backends(device="cpu", dtype: torch.dtype = torch.bfloat16, quantization: str | None = None,
             quant_backend: str | None = None) -> dict[str, str]:
    """{kind of operation: what runs it (and why, when it is not the fast path)} for a model on `device` in
    `dtype`, its decoder linears quantized as `quantization` ("8bit"/"4bit") by `quant_backend` ("int8", "nf4",
    "int4", "bitsandbytes"). Says what the dispatch picks for the real checkpoints' shapes, on this machine now."""
    device = torch.device(device)
    name = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}.get(dtype, str(dtype))
    if device.type != "cpu":
        rows = {"matmul": f"PyTorch {device.type} {name}"}
        if quantization:
            rows[f"{quantization} matmul"] = f"bitsandbytes {'NF4' if quantization == '4bit' else 'LLM.int8'}"
        rows["attention"] = f"PyTorch SDPA ({device.type})"
        return rows

    off = _without_native() if dtype in (torch.bfloat16, torch.float32) else f"native kernels take bf16/fp32, not {name}"
    fallback = f"({off})"
    rows: dict[str, str] = {}
    if quantization == "8bit":
        rows["int8 matmul (decode)"] = {
            "int8": NATIVE + " int8" if off is None else f"PyTorch int8 {fallback}",
            "bitsandbytes": "bitsandbytes LLM.int8 (slow on a CPU)",
        }[quant_backend]
        rows["int8 matmul (prefill)"] = (rows["int8 matmul (decode)"] if quant_backend == "bitsandbytes"
                                         else GEMM + ", dequantized while packing" if off is None
                                         else f"fp32, dequantized per call {fallback}")
    elif quantization == "4bit":
        rows["4-bit matmul (decode)"] = {
            "nf4": NATIVE + " NF4" if off is None else f"PyTorch NF4, dequantized per call {fallback}",
            "int4": "PyTorch int4, groups of 64 " + (fallback if off else "(--quant-backend int4)"),
            "bitsandbytes": "bitsandbytes NF4 (slow on a CPU)",
        }[quant_backend]
        nf4 = (BF16_GEMM if bf16.native_bf16() else GEMM + ", dequantized while packing" if off is None
               else f"fp32, dequantized per call {fallback}")
        rows["4-bit matmul (prefill)"] = {"nf4": nf4, "int4": "PyTorch int4, groups of 64",
                                          "bitsandbytes": rows["4-bit matmul (decode)"]}[quant_backend]
    if dtype == torch.bfloat16:
        native_gemv = "native AVX512_BF16 bf16" if native.bf16_dot() else NATIVE + " bf16"
        rows["bf16 matmul (decode)"] = native_gemv if off is None else f"PyTorch bf16 {fallback}"
        if bf16.native_bf16():
            rows["bf16 matmul (prefill)"] = "PyTorch bf16 (the CPU has bf16 instructions)"
        elif off is None:
            rows["bf16 matmul (prefill)"] = GEMM + ", fp32 math (the CPU has no bf16 instructions)"
        else:
            upcast = "MKL bf16 GEMM, fp32 math" if bf16.mkl_bf16() else "fp32 upcast"
            rows["bf16 matmul (prefill)"] = f"{upcast} {fallback}"
    else:
        rows[f"{name} matmul"] = f"PyTorch {name}"
    if off:
        rows["decoder layer (decode)"] = f"op by op {fallback}"
    elif quantization and quant_backend in ("int4", "bitsandbytes"):  # weights the native layer cannot read
        rows["decoder layer (decode)"] = f"op by op ({quant_backend} weights)"
    elif not quantization and dtype != torch.bfloat16:  # plain fp32/fp16 linears: PyTorch's GEMV
        rows["decoder layer (decode)"] = f"op by op ({name} weights)"
    else:
        rows["decoder layer (decode)"] = NATIVE + ", one call per layer"
    rows["attention (decode)"] = NATIVE if off is None else f"PyTorch matmul + softmax {fallback}"
    rows["attention (prefill)"] = "PyTorch SDPA"
    rows["rmsnorm (decode)"] = NATIVE if off is None else f"PyTorch {fallback}"
    rows["rotary (decode)"] = NATIVE if off is None else f"PyTorch {fallback}"
    return rows


def summary(device="cpu", dtype: torch.dtype = torch.bfloat16, quantization: str | None = None,
            quant_backend: str | None = None) -> str:
    """One line for banners and stats: what multiplies the decoder's weights while decoding, e.g.
    "native AVX2 int8" or "PyTorch int4, groups of 64 (DSVL_NATIVE=0)"."""
    rows = backends(device, dtype, quantization, quant_backend)
    if torch.device(device).type != "cpu":
        return rows[f"{quantization} matmul"] + f" on {torch.device(device).type}" if quantization else rows["matmul"]
    key = {"8bit": "int8 matmul (decode)", "4bit": "4-bit matmul (decode)"}.get(quantization)
    if key is None:
        key = "bf16 matmul (decode)" if dtype == torch.bfloat16 else next(k for k in rows if k.endswith(" matmul"))
    return rows[key]
