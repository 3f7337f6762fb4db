"""4/8-bit loading: the language model's decoder linears, and on the CPU its output layer, are quantized.

Vision towers, adaptor and embeddings stay in the compute dtype (they are small, or sensitive: the paper's image
features pass through them). The output layer (lm_head, vocabulary x hidden: 0.4 GB of the 1.3B in bf16, a quarter
of what a 4-bit decode step reads) is stored as int8 rows by the CPU backends, whichever the mode, as llama.cpp
keeps it in Q8_0/Q6_K: one byte per weight is accurate enough for the logits (tests/test_quantize.py bounds the
change) and the decode step reads 0.2 GB less. `quantize_output=False` keeps it in the compute dtype; bitsandbytes
always does. Backends:
- bitsandbytes (NF4 with double quantization, or LLM.int8): the default on GPUs. It works on the CPU too
  (bitsandbytes ≥ 0.45), but slowly: measured 8-36x slower per token than bf16 there.
- int8, nf4 and int4 (`engine/kernels/quant.py`): the defaults on the CPU, where they decode faster than bf16
  instead of slower. int8 rows + scales for 8-bit. For 4-bit, the very NF4 weights bitsandbytes computes,
  multiplied in their packed form by the native kernels; where those do not run (no C compiler, DSVL_NATIVE=0),
  PyTorch's own group-wise int4 instead (other numbers than NF4, about as accurate).
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable

import torch
from torch import nn

from .kernels import native, quant
from .loading import LinearSwap, set_module

MODES = ("8bit", "4bit")
BACKENDS = ("auto", "bitsandbytes", "int8", "nf4", "int4")
DECODER_LINEAR = re.compile(r"^language_model\.model\.layers\.\d+\.(self_attn|mlp)\.\w+$")
OUTPUT_LAYER = "language_model.lm_head"
CPU_BACKENDS = {"int8": ("8bit", quant.Int8Linear), "nf4": ("4bit", quant.NF4Linear), "int4": ("4bit", quant.Int4Linear)}


class QuantizationError(RuntimeError):
    pass


def _quantized_linear(linear: nn.Linear, mode: str, compute_dtype: torch.dtype, device) -> nn.Module:
    import bitsandbytes as bnb

    weight = linear.weight.data
    if mode == "4bit":
        # NF4 with double quantization and bf16/fp16 compute: the QLoRA recipe, ~0.55 bytes per weight.
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True, device="meta")
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
        # On a CPU with AVX512_BF16 bitsandbytes repacks the weight for its own kernel at the first product; in
        # 0.50.2 that fails (an assert, or a reshape of the nested absmax, which is padded to 256 blocks) unless
        # out_features is a multiple of 32 and the blocks of 64 a multiple of 256. Such layers keep its generic path.
        if linear.out_features % 32 or (linear.out_features * linear.in_features // 64) % 256:
            q.support_avx512bf16_for_cpu = False
    else:
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=6.0, device="meta")
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return q.to(device)  # quantization happens on this move


def pick_backend(mode: str, device, backend: str = "auto") -> str:
    """`auto`: the engine's CPU kernels on the CPU (int8 for 8-bit; nf4 for 4-bit, or int4 without native
    kernels or bitsandbytes), bitsandbytes elsewhere."""
    if mode not in MODES:
        raise QuantizationError(f"unknown quantization {mode!r}; choose one of {MODES}")
    if backend not in BACKENDS:
        raise QuantizationError(f"unknown quantization backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        if torch.device(device).type != "cpu":
            return "bitsandbytes"
        if mode == "8bit":
            return "int8"  # without native kernels, torch._weight_int8pack_mm is still faster than bf16
        # NF4 has no PyTorch kernel: without native ones it would dequantize every matrix every token.
        # (bitsandbytes computes the NF4 weights; without it, int4 needs nothing beyond PyTorch.)
        has_bitsandbytes = importlib.util.find_spec("bitsandbytes") is not None
        return "nf4" if native.kernels() is not None and has_bitsandbytes else "int4"
    if backend in CPU_BACKENDS and CPU_BACKENDS[backend][0] != mode:
        raise QuantizationError(f"the {backend} backend does {CPU_BACKENDS[backend][0]} only, not {mode}")
    if backend == "int4" and torch.device(device).type != "cpu":
        raise QuantizationError("the int4 backend runs on the CPU only (PyTorch's int4 CPU kernel)")
    return backend


def is_decoder_linear(name: str) -> bool:
    """The linears that get quantized: q/k/v/o and gate/up/down of every decoder layer."""
    return DECODER_LINEAR.match(name) is not None


def quantizes_output(backend: str, quantize_output: bool | None = None) -> bool:
    """Whether the output layer is stored as int8 rows (None: yes with the CPU backends, see the module's note)."""
    if quantize_output and backend not in CPU_BACKENDS:
        raise QuantizationError(f"the output layer is quantized by the CPU backends only, not by {backend}")
    return backend in CPU_BACKENDS if quantize_output is None else quantize_output


def linear_swap(mode: str, compute_dtype: torch.dtype, device, backend: str = "auto",
                quantize_output: bool | None = None) -> tuple[LinearSwap, str]:
    """What to replace and with what, for loading (layer by layer) or for a model in memory; and the backend."""
    backend = pick_backend(mode, device, backend)
    output = quantizes_output(backend, quantize_output)
    if backend in ("bitsandbytes", "nf4"):  # nf4 quantizes with bitsandbytes too
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise QuantizationError(f"{mode} loading with {backend} needs bitsandbytes: pip install bitsandbytes") from e
    def selects(name: str) -> bool:
        return is_decoder_linear(name) or (output and name == OUTPUT_LAYER)

    def build(name: str, linear: nn.Linear) -> nn.Module:
        if name == OUTPUT_LAYER:
            return quant.Int8Linear(linear)
        if backend in CPU_BACKENDS:
            return CPU_BACKENDS[backend][1](linear)
        return _quantized_linear(linear, mode, compute_dtype, device)

    return LinearSwap(selects=selects, build=build), backend


def quantize_language_model(model: nn.Module, mode: str, compute_dtype: torch.dtype, device,
                            progress: Callable[[str, int, int], None] | None = None, backend: str = "auto",
                            quantize_output: bool | None = None) -> str:
    """Replace the decoder linears (and the output layer, see the module's note) of a model already in memory;
    returns the backend used. (Runtime.load quantizes while loading instead, which never holds the
    full-precision language model.)"""
    swap, backend = linear_swap(mode, compute_dtype, device, backend, quantize_output)
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and swap.selects(name)]
    for done, (name, linear) in enumerate(targets, 1):
        set_module(model, name, swap.build(name, linear))
        if progress:
            progress("quantize", done, len(targets))
    return backend
