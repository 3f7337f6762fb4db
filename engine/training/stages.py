"""The paper's three stages: what each one trains, and its Table 4 settings scaled to the user's data.

Table 4 (1.3B and 7B alike, except batch size and stage-2 steps):

| stage | trains | LR | schedule | warm-up | steps | batch | seq len | packing |
|---|---|---|---|---|---|---|---|---|
| 1 adaptor warm-up | adaptor | 1e-3 | cosine | 128 | 15,000 | 256 | 512 | no |
| 2 joint VL pretraining | adaptor + LLM | 3e-5 | step | 2,000 | 96,000 | 1,024 | 4,096 | yes |
| 3 SFT | all but SAM | 2e-5 | cosine | 256 | 10,000 | 256 | 4,096 | no |

AdamW β=(0.9, 0.95), weight decay 0, gradient clip 1.0 everywhere.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from torch import nn

STAGES = (1, 2, 3)
STAGE_NAMES = {1: "adaptor warm-up", 2: "joint VL pretraining", 3: "supervised fine-tuning"}


@dataclass(frozen=True)
class StageConfig:
    stage: int
    lr: float
    schedule: str  # "cosine" or "step"
    warmup_steps: int
    steps: int
    batch_size: int  # global: samples per optimizer step, over all processes
    seq_len: int  # grows to fit the longest sample (an image is never cut)
    pack: bool  # pack text-only samples into rows of seq_len
    answers_only: bool  # loss on Assistant answers + EOS only (SFT); else on every text token
    language_ratio: float | None  # language share of steps after modality warm-up; None: the data's own share
    modality_warmup_steps: int = 0  # steps from all-language to language_ratio
    grouped: bool = True  # one modality per global step
    micro_batch_size: int = 1  # samples per forward pass per process (gradient accumulation fills the rest)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    clip: float = 1.0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    vision_lr_ratio: float = 1.0  # the vision tower's lr as a share of lr (it trains in stage 3 only)
    epochs: float = 1.0  # used by `scaled` to choose steps from the data size

    def to_dict(self) -> dict:
        return asdict(self)


# Table 4, 1.3B column (the 7B differs only in stage-2 batch and steps, which are rescaled anyway).
TABLE4 = {
    1: StageConfig(1, lr=1e-3, schedule="cosine", warmup_steps=128, steps=15_000, batch_size=256, seq_len=512,
                   pack=False, answers_only=False, language_ratio=0.0),
    2: StageConfig(2, lr=3e-5, schedule="step", warmup_steps=2_000, steps=96_000, batch_size=1_024, seq_len=4_096,
                   pack=True, answers_only=False, language_ratio=0.7),
    3: StageConfig(3, lr=2e-5, schedule="cosine", warmup_steps=256, steps=10_000, batch_size=256, seq_len=4_096,
                   pack=False, answers_only=True, language_ratio=None),
}
OVERRIDABLE = {f.name for f in fields(StageConfig)} - {"stage"}


def scaled(stage: int, n_samples: int, overrides: dict | None = None) -> StageConfig:
    """Table 4 for a data set of `n_samples`: the batch shrinks (to a power of two, about 1/8 of the data, at most
    the paper's), steps cover `epochs` passes, and warm-ups keep their share of the paper's steps. Stage 2's
    modality warm-up (length not given in the paper) takes the first quarter. Then `overrides` win."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(overrides) - OVERRIDABLE
    if unknown:
        raise ValueError(f"unknown stage setting(s): {', '.join(sorted(unknown))}")
    paper = TABLE4[stage]
    batch = overrides.get("batch_size") or min(paper.batch_size, 2 ** max(0, int(math.log2(max(1, n_samples // 8)))))
    epochs = overrides.get("epochs", paper.epochs)
    steps = overrides.get("steps") or max(1, math.ceil(epochs * n_samples / batch))
    warmup = round(paper.warmup_steps / paper.steps * steps)
    config = replace(paper, batch_size=batch, steps=steps, warmup_steps=warmup, epochs=epochs,
                     modality_warmup_steps=steps // 4 if stage == 2 else 0)
    return replace(config, **overrides)


# ------------------------------------------------------------------ what trains
SAM = "vision_model.vision_tower_high."
# Parameters the forward never uses (kept only so official checkpoints load): never trainable.
UNUSED = ("vision_model.high_layer_norm.", "vision_model.low_layer_norm.", ".attn_pool.")


def trains(stage: int, name: str) -> bool:
    """Whether parameter `name` (official key) trains in `stage`."""
    if any(u in name for u in UNUSED) or name.startswith(SAM):
        return False
    if stage == 1:
        return name.startswith("aligner.")
    if stage == 2:
        return name.startswith(("aligner.", "language_model."))
    if stage == 3:
        return True  # SigLIP, adaptor and LLM; SAM is excluded above
    raise ValueError(f"unknown stage {stage}; stages are {STAGES}")


def set_trainable(model: nn.Module, stage: int) -> list[str]:
    """Freeze everything the stage does not train; returns the names that train."""
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(trains(stage, name))
        if p.requires_grad:
            names.append(name)
    return names
