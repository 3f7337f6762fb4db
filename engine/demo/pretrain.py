"""The demo's stand-ins for the paper's pretrained parts: the paper starts from a pretrained SigLIP and a pretrained
DeepSeek LLM; the demo first pretrains its tiny vision tower and tiny LLM on the shapes world.

- Vision tower: supervised attribute prediction (colour, shape, count, word) from every patch feature — not
  SigLIP's contrastive loss, but the same role: features that name what is in the image. Every token must tell
  the whole image (not only the tokens on a shape), so whichever image tokens the LLM attends to carry the answer;
  pooled heads let the tower hide it in a few tokens, and the LLM then failed to find it (colour at chance after
  stage 3). The heads are thrown away; only the tower's weights are kept.
- LLM: next-token prediction on the generated text corpus (packed rows).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..model.vlm import DeepSeekVL
from ..processing import VLChatProcessor
from . import world

ATTRIBUTES = ("color", "shape", "count", "word")


def _classes(vocabulary: list[str]) -> dict[str, list[str]]:
    return {"color": list(world.COLORS), "shape": list(world.SHAPES), "count": [str(i) for i in range(1, 6)],
            "word": ["-"] + vocabulary}  # "-": no word in the image


def _labels(scene: world.Scene, classes: dict[str, list[str]]) -> list[int]:
    values = {"color": scene.color, "shape": scene.shape, "count": str(scene.count), "word": scene.word or "-"}
    return [classes[a].index(values[a]) for a in ATTRIBUTES]


class AttributeHeads(nn.Module):
    """A linear read-out per attribute, applied to every patch feature."""

    def __init__(self, width: int, sizes: list[int]):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.read = nn.ModuleList(nn.Linear(width, n) for n in sizes)

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:  # [B, T, D] → per attribute [B, T, n_classes]
        x = self.norm(features)
        return [read(x) for read in self.read]


def _cosine(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _reporting(step: int, steps: int) -> bool:
    return (step + 1) % 25 == 0 or step + 1 == steps


def _report(records: list[dict], log: Callable[[str], None], kind: str, step: int, steps: int,
            loss: torch.Tensor, t0: float, extra: dict | None = None) -> None:
    """One progress record (kept for pretrain.jsonl, and logged as key=value)."""
    record = {"type": kind, "step": step + 1, "steps": steps, "loss": round(loss.item(), 4), **(extra or {}),
              "seconds": round(time.perf_counter() - t0, 1)}
    records.append(record)
    log(" ".join(f"{k}={v}" for k, v in record.items()))


def pretrain_vision(model: DeepSeekVL, processor: VLChatProcessor, steps: int, batch: int, seed: int,
                    log: Callable[[str], None] = print, lr: float = 1e-3) -> list[dict]:
    """Train `model.vision_model` in place on freshly drawn scenes; returns one record per logged step."""
    rng, vocabulary = random.Random(seed), world.words()
    classes = _classes(vocabulary)
    tower = model.vision_model
    width = model.config.vision.low.width  # SigLIP-only: the tower outputs SigLIP features
    heads = AttributeHeads(width, [len(classes[a]) for a in ATTRIBUTES])
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    tower.train()
    records, t0 = [], time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * _cosine(step, steps, max(1, steps // 20))
        # Half the images carry a word: reading is the hardest attribute and needs the most examples.
        scenes = [world.random_scene(rng, vocabulary, word=rng.random() < 0.6) for _ in range(batch)]
        pixels = torch.stack([processor.image_processor.to_tensor(processor.image_processor.square(world.draw(s)))
                              for s in scenes])
        labels = torch.tensor([_labels(s, classes) for s in scenes])  # [B, A]
        logits = heads(tower(pixels))  # per attribute [B, T, n]
        T = logits[0].shape[1]
        losses = [F.cross_entropy(lg.flatten(0, 1), labels[:, i].repeat_interleave(T)) for i, lg in enumerate(logits)]
        loss = sum(losses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if _reporting(step, steps):
            # The image's answer: the vote of its tokens (mean of their log-probabilities).
            votes = [lg.log_softmax(-1).mean(1).argmax(-1) for lg in logits]  # [B] per attribute
            accuracy = {f"acc_{a}": round(float((v == labels[:, i]).float().mean()), 3)
                        for i, (a, v) in enumerate(zip(ATTRIBUTES, votes))}
            _report(records, log, "pretrain_vision", step, steps, loss, t0, accuracy)
    tower.eval()
    return records


def pretrain_language(model: DeepSeekVL, processor: VLChatProcessor, texts: list[str], steps: int, batch: int,
                      length: int, seed: int, log: Callable[[str], None] = print, lr: float = 3e-3) -> list[dict]:
    """Train `model.language_model` in place on `texts`, packed into rows of `length` tokens (EOS between
    texts; a plain causal LM, as an LLM is pretrained)."""
    tokenizer = processor.tokenizer
    stream = []
    for text in texts:
        stream += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    data = torch.tensor(stream)
    g = torch.Generator().manual_seed(seed)
    lm = model.language_model
    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    lm.train()
    records, t0 = [], time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * _cosine(step, steps, max(1, steps // 20))
        starts = torch.randint(0, len(data) - length - 1, (batch,), generator=g)
        rows = torch.stack([data[s:s + length + 1] for s in starts])  # [B, L+1]
        logits = lm(input_ids=rows[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), rows[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        optimizer.step()
        if _reporting(step, steps):
            _report(records, log, "pretrain_language", step, steps, loss, t0)
    lm.eval()
    return records
