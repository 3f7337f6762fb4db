"""4/8-bit loading with bitsandbytes: only the language model's decoder linears are quantized.

Vision towers, adaptor, embeddings and lm_head stay in the compute dtype (they are small, or sensitive: the
paper's image features pass through them). Works on CPU too (bitsandbytes ≥ 0.45).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

MODES = ("8bit", "4bit")


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


def quantize_language_model(model: nn.Module, mode: str, compute_dtype: torch.dtype, device,
                            progress: Callable[[str, int, int], None] | None = None) -> int:
    """Replace every nn.Linear inside `model.language_model.model.layers` in place; returns how many."""
    if mode not in MODES:
        raise QuantizationError(f"unknown quantization {mode!r}; choose one of {MODES}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise QuantizationError("4/8-bit loading needs bitsandbytes: pip install bitsandbytes") from e
    layers = model.language_model.model.layers
    targets = [(parent, name, child) for layer in layers for parent in layer.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for done, (parent, name, child) in enumerate(targets, 1):
        setattr(parent, name, _quantized_linear(child, mode, compute_dtype, device))
        if progress:
            progress("quantize", done, len(targets))
    return len(targets)
