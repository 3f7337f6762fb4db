"""Which samples make each global step: the language:multimodal ratio with modality warm-up, modality grouping,
and sequence packing of text-only samples.

The paper (section 3.2 / 4): stage 2 mixes language and multimodal data at about 7:3, starting at all-language and
lowering the language share gradually ("modality warm-up"); each global step draws one modality ("modality
grouping": a mixed batch waits for its slowest, image-heavy sample); text-only data is packed.

Everything here is a pure function of (seed, step) plus a small state (the per-modality cursors), so a resumed
run draws exactly the batches an uninterrupted run draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .data import IGNORE, LANGUAGE, MULTIMODAL, Encoded

MODALITIES = (LANGUAGE, MULTIMODAL)


@dataclass(frozen=True)
class ModalitySchedule:
    """Share of language samples at each step: 1.0 at step 0, linearly down to `target` at `warmup_steps`."""

    target: float  # language share after warm-up (the paper: 0.7)
    warmup_steps: int = 0

    def language_ratio(self, step: int) -> float:
        if self.warmup_steps <= 0 or step >= self.warmup_steps:
            return self.target
        return 1.0 - (1.0 - self.target) * step / self.warmup_steps


@dataclass
class Sampler:
    """Draws the global batch of each step. `grouped`: one modality per step (drawn with the schedule's ratio);
    otherwise every sample draws its own modality. Within a modality, samples come in shuffled epochs."""

    pools: dict[str, list[int]]  # modality → indices of encoded samples
    schedule: ModalitySchedule
    batch_size: int
    seed: int
    grouped: bool = True
    cursors: dict[str, int] = field(default_factory=dict)  # samples drawn so far per modality

    def __post_init__(self):
        self.pools = {m: list(v) for m, v in self.pools.items() if v}
        if not self.pools:
            raise ValueError("no samples to draw from")
        self.cursors = {m: self.cursors.get(m, 0) for m in self.pools}

    def _ratio(self, step: int) -> float:
        if LANGUAGE not in self.pools:
            return 0.0
        if MULTIMODAL not in self.pools:
            return 1.0
        return self.schedule.language_ratio(step)

    def _next(self, modality: str) -> int:
        pool, n = self.pools[modality], self.cursors[modality]
        epoch, i = divmod(n, len(pool))
        order = np.random.default_rng([self.seed, MODALITIES.index(modality), epoch]).permutation(len(pool))
        self.cursors[modality] = n + 1
        return pool[order[i]]

    def draw(self, step: int) -> tuple[str, list[int]]:
        """(modality of the step — "mixed" when it has both —, sample indices). Call with consecutive steps."""
        rng = np.random.default_rng([self.seed, 1_000_003, step])
        ratio = self._ratio(step)
        if self.grouped:
            modality = LANGUAGE if rng.random() < ratio else MULTIMODAL
            return modality, [self._next(modality) for _ in range(self.batch_size)]
        picks = [LANGUAGE if r < ratio else MULTIMODAL for r in rng.random(self.batch_size)]
        kinds = set(picks)
        return (picks[0] if len(kinds) == 1 else "mixed"), [self._next(m) for m in picks]

    def state(self) -> dict:
        return {"cursors": dict(self.cursors)}

    def load_state(self, state: dict) -> None:
        self.cursors.update(state["cursors"])


# ------------------------------------------------------------------ batches
@dataclass
class Rows:
    """A micro-batch for the model. Right padded; `attention_mask` is None (plain causal) or a block-diagonal
    [B, 1, T, T] bool mask for packed rows; `position_ids` restart at 0 for each packed sample."""

    input_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    images_seq_mask: torch.Tensor  # [B, T]
    images: list[list]  # per row, the image paths in the order of the row's image-token runs
    tokens: int  # real (not padding) tokens
    attention_mask: torch.Tensor | None = None

    @property
    def supervised_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())



def collate(samples: list[Encoded], pad_id: int) -> Rows:
    """One sample per row, right padded (padding is after every real token, so a causal mask suffices)."""
    T = max(len(s) for s in samples)
    B = len(samples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    seq_mask = torch.zeros((B, T), dtype=torch.bool)
    for i, s in enumerate(samples):
        n = len(s)
        ids[i, :n], labels[i, :n], seq_mask[i, :n] = s.input_ids, s.labels, s.images_seq_mask
    positions = torch.arange(T).expand(B, T).clone()
    return Rows(ids, labels, positions, seq_mask, [list(s.images) for s in samples], sum(len(s) for s in samples))


def pack(samples: list[Encoded], length: int, pad_id: int) -> Rows:
    """Text-only samples packed greedily (first fit, in order) into rows of at most `length` tokens. Attention is
    block-diagonal (causal within each sample, never across) and positions restart per sample, so each packed
    sample's logits equal its logits alone."""
    if any(s.images for s in samples):
        raise ValueError("only text-only samples are packed")
    rows: list[list[Encoded]] = []
    for s in samples:
        if len(s) > length:
            raise ValueError(f"{s.source}: {len(s)} tokens do not fit a packed row of {length}")
        for row in rows:
            if sum(len(x) for x in row) + len(s) <= length:
                row.append(s)
                break
        else:
            rows.append([s])
    T = max(sum(len(x) for x in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    segment = torch.full((B, T), -1, dtype=torch.long)  # which sample each position belongs to; -1 padding
    for i, row in enumerate(rows):
        at = 0
        for j, s in enumerate(row):
            n = len(s)
            ids[i, at:at + n], labels[i, at:at + n] = s.input_ids, s.labels
            positions[i, at:at + n] = torch.arange(n)
            segment[i, at:at + n] = j
            at += n
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]  # [B, T, T]
    # Padding positions see themselves only: no NaN rows, and their (ignored) outputs touch nothing real.
    pad_self = (segment < 0)[:, :, None] & torch.eye(T, dtype=torch.bool)
    allowed = ((same & (segment >= 0)[:, :, None]) | pad_self) & causal
    return Rows(ids, labels, positions, torch.zeros((B, T), dtype=torch.bool), [[] for _ in rows], sum(len(s) for s in samples),
                allowed[:, None])


def micro_batches(samples: list[Encoded], size: int, pad_id: int, pack_length: int | None = None) -> list[Rows]:
    """Split one process's share of a global batch into micro-batches of `size` samples each."""
    out = []
    for i in range(0, len(samples), size):
        chunk = samples[i:i + size]
        text_only = all(not s.images for s in chunk)
        out.append(pack(chunk, pack_length, pad_id) if pack_length and text_only else collate(chunk, pad_id))
    return out
