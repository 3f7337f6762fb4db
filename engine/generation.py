"""Token sampling and the decode loop.

The loop feeds one token at a time through the language model with a KV cache, checks a cancel flag every
step (so Stop ends the computation within one step) and yields token ids as they are chosen.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from .model.vlm import DeepSeekVL


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    repetition_penalty: float = 1.0
    max_new_tokens: int = 512
    seed: int | None = None

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, "temperature must be ≥ 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be ≥ 0"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.max_new_tokens >= 1, "max_new_tokens must be ≥ 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def with_(self, **changes) -> "SamplingParams":
        return replace(self, **changes)


class Sampler:
    """Chooses the next token from logits; stateful only through its random generator."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor, previous: torch.Tensor | None = None) -> int:
        """logits: [V]; previous: ids seen so far (for the repetition penalty)."""
        p = self.params
        logits = logits.float()
        if p.repetition_penalty != 1.0 and previous is not None and previous.numel():
            # CTRL-style penalty, as in transformers: shrink positive scores, grow negative ones.
            seen = previous.unique().to(logits.device)
            scores = logits[seen]
            logits[seen] = torch.where(scores > 0, scores / p.repetition_penalty, scores * p.repetition_penalty)
        if p.temperature == 0:
            return int(logits.argmax())
        logits = logits / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) >= p.top_p  # keep the smallest set reaching top_p
            logits[order[drop]] = float("-inf")
        probs = logits.softmax(-1).cpu()
        return int(torch.multinomial(probs, 1, generator=self.generator))


class Cancelled(Exception):
    pass


def decode(
    model: DeepSeekVL,
    cache,
    first_logits: torch.Tensor,  # [V] logits after the prompt
    sampler: Sampler,
    *,
    history: torch.Tensor | None = None,  # prompt ids, for the repetition penalty
    stop_ids: Sequence[int] = (),
    cancel: threading.Event | None = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` ids. Each id is fed to the cache before it is yielded (a stop id is not),
    so the cache always holds the prompt plus exactly the ids yielded so far, even after a cancel."""
    seen = history.clone() if history is not None else torch.empty(0, dtype=torch.long)
    logits = first_logits
    for _ in range(sampler.params.max_new_tokens):
        if cancel is not None and cancel.is_set():
            raise Cancelled()
        token = sampler(logits, seen)
        if token in stop_ids:
            return
        logits = step(model, cache, token)
        seen = torch.cat([seen, torch.tensor([token])])
        yield token


def step(model: DeepSeekVL, cache, token: int) -> torch.Tensor:
    """Feed one token at the next position; returns the next-token logits [V]."""
    position = cache.get_seq_length()
    out = model(
        input_ids=torch.tensor([[token]], device=model.device),
        position_ids=torch.tensor([[position]], device=model.device),
        cache=cache,
        use_cache=True,
    )
    return out.logits[0, -1]


class Detokenizer:
    """Token ids -> new text, one id at a time, decoding only a short window of recent ids.

    Decoding the whole answer after every token costs O(n²) over an answer; this keeps two offsets into the ids
    (as transformers' TextIteratorStreamer and vLLM's detokenizer do): `prefix` where the window starts, and
    `read` where the text already handed out ends. Each step decodes ids[prefix:read] and ids[prefix:]; the
    difference is the new text. Decoding from a few ids back, rather than from `read`, keeps byte-level merges
    and leading-space rules right at the seam. A window whose text ends in U+FFFD stops at an incomplete UTF-8
    character (an emoji spread over several byte tokens): it is held until the character's last byte arrives.
    """

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token: int) -> str:
        """The text this id completes ("" while a character is still incomplete)."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """What is still held back at the end (an incomplete character decodes to U+FFFD)."""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return after[len(before):]
