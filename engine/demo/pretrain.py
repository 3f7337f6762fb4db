"""The demo's stand-ins for the paper's pretrained parts: the paper starts from a pretrained SigLIP and a pretrained
DeepSeek LLM; the demo first pretrains its tiny vision tower and tiny LLM on the shapes world.

- Vision tower: supervised, not SigLIP's contrastive loss, but the same role: features that name what is in the
  image. Per patch, what covers it (background, each shape, the word: pixel fractions) and whether a shape's
  centre lies in it (and which shape); per image, colour, shape, count and word read by attention pooling, as the
  LLM reads image tokens; and colour, shape and count from every patch alone, so that whichever image tokens the
  LLM attends to carry them (with pooled heads only, the tower kept the shape in the few tokens on a shape and the
  LLM, though it read colour and count, answered shape questions at chance). A ViT this small learns from scratch
  slowly: the per-patch targets are local and early to learn, and teach circle from square where image-level
  labels alone left the two confused (tower experiments of 2026-12-06: shape 0.49 -> 0.58 held-out at 500 steps).
  The heads are thrown away; only the tower is kept.
- LLM: next-token prediction on the generated text corpus (packed rows).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..model.vlm import DeepSeekVL
from ..processing import ImageProcessor, VLChatProcessor
from . import world

ATTRIBUTES = ("color", "shape", "count", "word")


def _classes(vocabulary: list[str]) -> dict[str, list[str]]:
    return {"color": list(world.COLORS), "shape": list(world.SHAPES), "count": [str(i) for i in range(1, 6)],
            "word": ["-"] + vocabulary}  # "-": no word in the image


def _labels(scene: world.Scene, classes: dict[str, list[str]]) -> list[int]:
    values = {"color": scene.color, "shape": scene.shape, "count": str(scene.count), "word": scene.word or "-"}
    return [classes[a].index(values[a]) for a in ATTRIBUTES]


class AttributeHeads(nn.Module):
    """Per attribute, `heads` learned queries attend over the patch features; an MLP reads the pooled vector."""

    def __init__(self, width: int, sizes: list[int], heads: int = 4):
        super().__init__()
        self.norm, self.heads = nn.LayerNorm(width), heads
        self.key = nn.Linear(width, width)
        self.queries = nn.Parameter(torch.randn(len(sizes), heads, width // heads) * 0.02)
        self.read = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, n)) for n in sizes)

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:  # [B, T, D] -> per attribute [B, n_classes]
        x = self.norm(features)
        B, T, D = x.shape
        keys, values = self.key(x).view(B, T, self.heads, -1), x.view(B, T, self.heads, -1)
        scores = torch.einsum("bthd,ahd->abht", keys, self.queries) / math.sqrt(D // self.heads)
        pooled = torch.einsum("abht,bthd->abhd", scores.softmax(-1), values).reshape(len(self.read), B, D)
        return [read(p) for read, p in zip(self.read, pooled)]


class PatchHeads(nn.Module):
    """Per patch: what covers it (world.LABELS), which shape, if any, has its centre in it (0: none), and the
    image's colour, shape and count, read from that patch alone."""

    def __init__(self, width: int, sizes: list[int]):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.cover = nn.Linear(width, len(world.LABELS))
        self.centre = nn.Linear(width, 1 + len(world.SHAPES))
        self.image = nn.ModuleList(nn.Linear(width, n) for n in sizes)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        x = self.norm(features)  # [B, T, D] -> [B, T, n] each
        return self.cover(x), self.centre(x), [read(x) for read in self.image]


def patch_targets(scene: world.Scene, images: ImageProcessor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The scene's per-patch targets in the processed image: cover fractions [T, labels] and centres [T]."""
    labels = np.asarray(images.square(world.label_map(scene), Image.Resampling.NEAREST))[..., 0].astype(np.int64)
    labels[labels >= len(world.LABELS)] = 0  # the square's padding
    onehot = F.one_hot(torch.from_numpy(labels), len(world.LABELS)).permute(2, 0, 1).float()
    cover = F.avg_pool2d(onehot[None], patch)[0].flatten(1).T  # [T, labels]
    grid = labels.shape[0] // patch
    new_w, new_h, x, y = images.frame(scene.width, scene.height)
    sx, sy = new_w / scene.width, new_h / scene.height
    centre = torch.zeros(grid * grid, dtype=torch.long)
    for x0, y0, x1, y1 in scene.boxes:
        col = min(grid - 1, int((x + (x0 + x1) / 2 * sx) // patch))
        row = min(grid - 1, int((y + (y0 + y1) / 2 * sy) // patch))
        centre[row * grid + col] = 1 + world.SHAPES.index(scene.shape)
    return cover, centre


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
                    log: Callable[[str], None] = print, lr: float = 2e-3) -> list[dict]:
    """Train `model.vision_model` in place on freshly drawn scenes; returns one record per logged step (the
    attribute accuracies on the step's own fresh batch, before its update)."""
    rng, vocabulary = random.Random(seed), world.words()
    classes = _classes(vocabulary)
    tower, images = model.vision_model, processor.image_processor
    width = model.config.vision.low.width  # SigLIP-only: the tower outputs SigLIP features
    patch = model.config.vision.low.patch_size
    sizes = [len(classes[a]) for a in ATTRIBUTES]
    heads = AttributeHeads(width, sizes)
    patches = PatchHeads(width, sizes[:3])  # every patch: colour, shape, count (not the word)
    params = [*tower.parameters(), *heads.parameters(), *patches.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    background = torch.tensor([0.2] + [1.0] * len(world.SHAPES))  # most patches hold no centre
    tower.train()
    records, t0 = [], time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * _cosine(step, steps, max(1, steps // 20))
        # Most images carry a word: reading is the hardest attribute and needs the most examples.
        scenes = [world.random_scene(rng, vocabulary, word=rng.random() < 0.6) for _ in range(batch)]
        pixels = torch.stack([images.to_tensor(images.square(world.draw(s))) for s in scenes])
        labels = torch.tensor([_labels(s, classes) for s in scenes])  # [B, A]
        cover, centre = map(torch.stack, zip(*(patch_targets(s, images, patch) for s in scenes)))
        features = tower(pixels)
        logits = heads(features)  # per attribute [B, n]
        cover_logits, centre_logits, everywhere = patches(features)
        T = features.shape[1]
        loss = (sum(F.cross_entropy(lg, labels[:, i]) for i, lg in enumerate(logits))
                + F.cross_entropy(cover_logits.flatten(0, 1), cover.flatten(0, 1))
                + F.cross_entropy(centre_logits.flatten(0, 1), centre.flatten(), weight=background)
                + sum(F.cross_entropy(lg.flatten(0, 1), labels[:, i].repeat_interleave(T))
                      for i, lg in enumerate(everywhere)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if _reporting(step, steps):
            accuracy = {f"acc_{a}": round(float((lg.argmax(-1) == labels[:, i]).float().mean()), 3)
                        for i, (a, lg) in enumerate(zip(ATTRIBUTES, logits))}
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
