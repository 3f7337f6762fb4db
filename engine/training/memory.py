"""Will a stage fit? An estimate of one training process's memory before the run starts, with advice when not.

Weights (float32 master copy; 4-bit NF4 decoder linears under QLoRA), gradients and AdamW state for what trains,
activations for a micro-batch (what autograd keeps per token and layer, or only the layer inputs with gradient
checkpointing) and the logits. Rough by design (±20 %): it is for refusing the hopeless, like the chat's check.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.config import VLConfig
from .stages import StageConfig, trains

GiB = 2**30
QLORA_BYTES = 0.55  # NF4 + double-quantized scales, per weight
OVERHEAD = 1.10  # allocator fragmentation, temporary buffers


@dataclass
class MemoryEstimate:
    parts: dict[str, int]  # bytes: weights, gradients, optimizer, activations, logits
    available: int | None  # bytes free on the device, when known
    device: str
    advice: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return int(sum(self.parts.values()) * OVERHEAD)

    @property
    def fits(self) -> bool:
        return self.available is None or self.total <= self.available

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.parts.items())
        have = f" of {self.available / GiB:.1f} GiB free" if self.available is not None else ""
        return f"memory estimate on {self.device}: {self.total / GiB:.2f} GiB ({parts} GiB){have}"

    def refusal(self) -> str:
        tips = "; ".join(self.advice) or "use a machine with more memory"
        return f"this stage will not fit: {self.summary()}. Try: {tips}."

    def to_dict(self) -> dict:
        return {"parts_bytes": self.parts, "total_bytes": self.total, "available_bytes": self.available,
                "fits": self.fits, "advice": self.advice}


def estimate(config: VLConfig, stage: int, cfg: StageConfig, *, lora: bool = False, qlora: bool = False, lora_rank: int = 16,
             gradient_checkpointing: bool = False, bf16: bool = False, optimizer: str = "adamw",
             device: torch.device | str = "cpu", world: int = 1, available: int | None = -1) -> MemoryEstimate:
    """Bytes one process needs for `stage` at `cfg.micro_batch_size` x `cfg.seq_len`. `available=-1`: ask the
    device (None: unknown, never refuse)."""
    from ..loading import build_model
    from ..quantize import is_decoder_linear
    from ..runtime import available_bytes

    device = torch.device(device)
    model = build_model(config)  # meta: nothing allocated
    weights = trainable = 0
    for name, p in model.named_parameters():
        quantized = qlora and is_decoder_linear(name.rpartition(".")[0]) and p.dim() == 2
        weights += int(p.numel() * (QLORA_BYTES if quantized else 4))
        if trains(stage, name):
            if not (lora or qlora) or name.startswith("aligner."):
                trainable += p.numel()
            elif p.dim() == 2:  # a LoRA pair on this linear instead of the weight itself
                trainable += lora_rank * sum(p.shape)
    lm = config.language
    h, inter, layers, vocab = lm.hidden_size, lm.intermediate_size, lm.num_hidden_layers, lm.vocab_size
    elem = 2 if bf16 else 4
    tokens = cfg.micro_batch_size * cfg.seq_len
    # Per token and decoder layer autograd keeps ~9 hidden-size and 4 intermediate-size tensors (norms, q/k/v,
    # attention output, residuals; gate, up, SiLU, product); with checkpointing only the layer input, plus one
    # layer recomputed at a time. Gradients flow back through the LLM in every stage (to reach the adaptor).
    per_layer = (9 * h + 4 * inter) * elem
    llm = tokens * (h * elem * layers + per_layer) if gradient_checkpointing else tokens * per_layer * layers
    vision = 0
    if stage == 3:  # the SigLIP tower trains: its activations for one image per sample
        v = config.vision.low
        per_block = (9 * v.width + 4 * int(v.width * v.mlp_ratio)) * elem
        n = cfg.micro_batch_size * config.num_image_tokens
        vision = n * (v.width * elem * v.layers + per_block) if gradient_checkpointing else n * per_block * v.layers
    parts = {
        "weights": weights,
        "gradients": trainable * 4,
        "optimizer": trainable * (2 if optimizer == "adamw8bit" else 8),
        "activations": llm + vision,
        "logits": tokens * vocab * 4 * 3,  # float32 logits, their copy for the loss, and its gradient
    }
    free = available_bytes(device) if available == -1 else available
    est = MemoryEstimate(parts, free, str(device))
    if not gradient_checkpointing:
        est.advice.append("--gradient-checkpointing (keeps only each layer's input)")
    if cfg.micro_batch_size > 1:
        est.advice.append("--micro-batch-size 1 (gradient accumulation keeps the global batch)")
    if not (lora or qlora) and stage > 1:
        est.advice.append("--lora (trains small adapters instead of the whole LLM)")
    if not qlora:
        est.advice.append("--qlora (4-bit language model + LoRA)")
    if optimizer != "adamw8bit" and device.type == "cuda":
        est.advice.append("--optimizer adamw8bit")
    if not bf16 and device.type == "cuda":
        est.advice.append("--bf16")
    return est
