"""Can the demo's vision tower learn to read? Learning curves of the demo tower (SigLIP layout, 256 px, patch 32,
width 128, 4 blocks, as `engine/demo/build.py` makes it) against a three-layer CNN, on the shapes world's words.

    .venv/bin/python benchmarks/bench_word_reading.py [--words 2] [--font 40] [--steps 150] [--rows vit,vit-white0,cnn]

Every step draws a fresh batch of 32 word images (white 256 px squares, one word in Pillow's default font at
--font px, anywhere), so the accuracy on a step's batch, taken before its update, is held-out accuracy. The word
is classified from the mean of the output features (the CNN: global max-pool) by a linear layer.

Rows:
- vit: the tower as the demo pretrains it (pixel mean 0.5: white is +1) at --lr (default 1e-3).
- vit-white0: pixel mean 1.0, so white is 0 and a patch's embedding is its strokes, at --lr-white0 (3e-4).
- cnn: 5x5 convolutions (3 -> 16 -> 32 -> 64 channels, stride 2, GELU), then max-pool: the same data and steps.

Why it is here: the demo never reads its words (issue 11, word accuracy 0 %), and these curves show where that
starts: on 2 words the tower stays at chance where the CNN reads them in 50 steps (benchmarks/RESULTS.md, 2026-12-07).
Prints one Markdown table with the machine line.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import ImageFont
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.demo import build, world  # noqa: E402
from engine.processing import ImageProcessor, ImageProcessorConfig  # noqa: E402

SIDE = 256
BATCH = 32


class ViTReader(nn.Module):
    def __init__(self, seed: int, classes: int, width: int = 128):
        super().__init__()
        self.tower, self.read = build.initial_model(seed).vision_model, nn.Linear(width, classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.read(self.tower(pixels).mean(1))


def cnn_reader(seed: int, classes: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 5, 2, 2), nn.GELU(), nn.Conv2d(16, 32, 5, 2, 2), nn.GELU(),
                         nn.Conv2d(32, 64, 5, 2, 2), nn.GELU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                         nn.Linear(64, classes))


def word_batch(rng: random.Random, vocabulary: list[str], font: int, processor: ImageProcessor):
    scenes = []
    for _ in range(BATCH):
        word = rng.choice(vocabulary)
        _, _, x1, y1 = ImageFont.load_default(font).getbbox(word)
        scene = world.Scene(SIDE, SIDE, (255, 255, 255), "circle", "red", [], word, font, (0, 0))
        scene.word_at = (rng.randint(4, max(4, SIDE - 4 - x1)), rng.randint(4, max(4, SIDE - 4 - y1)))
        scenes.append(scene)
    pixels = torch.stack([processor.to_tensor(processor.square(world.draw(s))) for s in scenes])
    return pixels, torch.tensor([vocabulary.index(s.word) for s in scenes])


def curve(row: str, args, vocabulary: list[str]) -> tuple[list[float], float]:
    """Accuracy per step (before the step's update) and seconds per step."""
    mean = 1.0 if row == "vit-white0" else 0.5
    processor = ImageProcessor(ImageProcessorConfig.from_dict({**build.PREPROCESSOR, "image_mean": [mean] * 3}))
    net = cnn_reader(args.seed, len(vocabulary)) if row == "cnn" else ViTReader(args.seed, len(vocabulary))
    lr = args.lr_white0 if row == "vit-white0" else args.lr
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng, accuracy, t0 = random.Random(args.seed), [], time.perf_counter()
    for _ in range(args.steps):
        pixels, labels = word_batch(rng, vocabulary, args.font, processor)
        logits = net(pixels)
        accuracy.append((logits.argmax(-1) == labels).float().mean().item())
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return accuracy, (time.perf_counter() - t0) / args.steps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--words", type=int, default=2, help="how many words of assets/demo-words.txt (its first N)")
    p.add_argument("--font", type=int, default=40, help="text height in px")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--rows", default="vit,vit-white0,cnn")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-white0", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    vocabulary = world.words()[:args.words]
    window = max(1, min(25, args.steps // 3))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), load "
          f"{os.getloadavg()[0]:.2f}, torch {torch.__version__}; {len(vocabulary)} words, font {args.font} px, "
          f"{args.steps} steps of {BATCH}; accuracy = mean over {window} steps, chance {1 / len(vocabulary):.3f}\n")
    marks = sorted({min(args.steps, m) for m in (window, args.steps // 3, 2 * args.steps // 3, args.steps)})
    print("| row | " + " | ".join(f"step {m}" for m in marks) + " | s/step |")
    print("|---|" + "---|" * (len(marks) + 1))
    for row in args.rows.split(","):
        accuracy, seconds = curve(row, args, vocabulary)
        cells = [f"{sum(accuracy[m - window:m]) / window:.3f}" for m in marks]
        print(f"| {row} | " + " | ".join(cells) + f" | {seconds:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
