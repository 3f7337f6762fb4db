"""4/8-bit loading: only the language model's decoder linears are quantized.

Vision towers, adaptor, embeddings and lm_head stay in the compute dtype (they are small, or sensitive: the
paper's image features pass through them). Two backends:
- bitsandbytes (NF4 with double quantization, or LLM.int8): the default on GPUs, and the only 4-bit one.
  It works on the CPU too (bitsandbytes ≥ 0.45), but slowly: measured 10-40x slower per token than bf16 there.
- int8 (`engine/cpu_int8.py`): int8 rows + scales multiplied directly by `engine/native`; the default for
  8-bit on the CPU, where it decodes faster than bf16 instead of slower.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import cpu_int8

MODES = ("8bit", "4bit")
BACKENDS = ("auto", "bitsandbytes", "int8")


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
    else:
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=6.0, device="meta")
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return q.to(device)  # quantization happens on this move


def pick_backend(mode: str, device, backend: str = "auto") -> str:
    """`auto`: the engine's int8 kernels for 8-bit on the CPU, bitsandbytes otherwise."""
    if mode not in MODES:
        raise QuantizationError(f"unknown quantization {mode!r}; choose one of {MODES}")
    if backend not in BACKENDS:
        raise QuantizationError(f"unknown quantization backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "int8" if mode == "8bit" and torch.device(device).type == "cpu" else "bitsandbytes"
    if backend == "int8" and mode != "8bit":
        raise QuantizationError("the int8 backend does 8-bit only; 4-bit needs --quant-backend bitsandbytes")
    return backend


def quantize_language_model(model: nn.Module, mode: str, compute_dtype: torch.dtype, device,
                            progress: Callable[[str, int, int], None] | None = None, backend: str = "auto") -> str:
    """Replace every nn.Linear inside `model.language_model.model.layers` in place; returns the backend used."""
    backend = pick_backend(mode, device, backend)
    layers = model.language_model.model.layers
    targets = [(parent, name, child) for layer in layers for parent in layer.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    if backend == "int8":
        cpu_int8.quantize_linears(targets, progress)
        return backend
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise QuantizationError("4/8-bit loading needs bitsandbytes: pip install bitsandbytes") from e
    for done, (parent, name, child) in enumerate(targets, 1):
        setattr(parent, name, _quantized_linear(child, mode, compute_dtype, device))
        if progress:
            progress("quantize", done, len(targets))
    return backend
