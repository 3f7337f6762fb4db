"""How far does a size curriculum teach the demo's tower to read the real scenes' words? (issue 11)

    .venv/bin/python benchmarks/bench_reading_curriculum.py [--steps 18000] [--stretch 1.0] [--every 1000]

The demo's tower (as `engine/demo/build.py` makes it: 256 px, patch 32, width 128, 4 blocks) with an
attention-pooled word head (344 words) and a bag-of-letters head, lr 1e-3 on one cosine over --steps, fresh
batches of 32 word images, white at 0 through the processor (`image_mean` 1.0, so the square's padding is white
too). The curriculum, at these steps times --stretch:
- to 1200: the easy square: one word at font 40 on a white 256 px square, anywhere;
- then real scenes (`world.random_scene(word=True)`) drawn until the word's height after the processor's resize
  lies in a window around 40 px that stays 34-44 px to step 2250 and widens in log space to the whole 8-100 px
  at step 7500;
- grey backgrounds let into a share of them rising from 0 at step 1500 to all (the real 50 %) at 5250, and
  shapes from 0 at step 3000 to all at 6750 (the others drawn white, without shapes).
Every --every steps: word accuracy on 192 fixed scenes drawn as the held-out word questions are (chance 0.003),
overall and by the word's height after the resize. Ends with a Markdown table and the machine line.

These defaults are the 18000-step run in benchmarks/RESULTS.md (0.312 at the end; 89 min on a 2-core Zen 3);
`--steps 9000` is the 9000-step run before it (0.094).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.demo import build, world  # noqa: E402
from engine.demo.pretrain import AttributeHeads, _cosine  # noqa: E402
from engine.processing import ImageProcessor, ImageProcessorConfig  # noqa: E402

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SIDE = build.IMAGE_SIZE  # the processor's square, px
LO, MID, HI = 8.0, 40.0, 100.0  # px after the resize: the window's centre and the whole range
BINS = [(0, 12), (12, 20), (20, 30), (30, 50), (50, 999)]


def height(scene: world.Scene) -> float:
    """The word's font size after the processor's resize of the long side to SIDE."""
    return scene.font_size * SIDE / max(scene.width, scene.height)


def rising(step: int, start: float, end: float) -> float:
    return min(1.0, max(0.0, (step - start) / (end - start)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=18000)
    p.add_argument("--stretch", type=float, default=1.0, help="multiplies every switch point of the curriculum")
    p.add_argument("--every", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    at = {k: v * a.stretch for k, v in {"easy": 1200, "w0": 2250, "w1": 7500, "grey0": 1500, "grey1": 5250,
                                         "shapes0": 3000, "shapes1": 6750}.items()}
    torch.set_num_threads(a.threads)
    model = build.initial_model(0)
    tower = model.vision_model
    images = ImageProcessor(ImageProcessorConfig.from_dict({**build.PREPROCESSOR, "image_mean": [1.0] * 3}))
    vocab = world.words()
    width = model.config.vision.low.width
    heads = AttributeHeads(width, [len(vocab), len(LETTERS)])
    params = [*tower.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(1)

    def easy() -> world.Scene:
        w = rng.choice(vocab)
        x0, y0, x1, y1 = ImageFont.load_default(40).getbbox(w)
        return world.Scene(SIDE, SIDE, (255, 255, 255), "circle", "red", [], w, 40,
                           (rng.randint(4, max(4, SIDE - 4 - x1)), rng.randint(4, SIDE - 4 - y1)))

    def real(step: int) -> world.Scene:
        f = 0.1 + 0.9 * rising(step, at["w0"], at["w1"])  # the window's width, in log space, 0.1 -> 1
        lo, hi = MID * (LO / MID) ** f, MID * (HI / MID) ** f
        while True:
            s = world.random_scene(rng, vocab, word=True)
            if f >= 1.0 or lo <= height(s) <= hi:
                break
        if rng.random() >= rising(step, at["grey0"], at["grey1"]):
            s.background = (255, 255, 255)
        if rng.random() >= rising(step, at["shapes0"], at["shapes1"]):
            s.boxes = []
        return s

    def pixels(scenes: list[world.Scene]) -> torch.Tensor:
        return torch.stack([images.to_tensor(images.square(world.draw(s))) for s in scenes])

    erng = random.Random(999)
    held = [world.random_scene(erng, vocab, word=True) for _ in range(192)]
    held_px, held_y = pixels(held), torch.tensor([vocab.index(s.word) for s in held])
    held_h = torch.tensor([height(s) for s in held])
    rows, t0 = [], time.perf_counter()
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = 1e-3 * _cosine(step, a.steps, max(1, a.steps // 20))
        scenes = [easy() if step < at["easy"] else real(step) for _ in range(32)]
        y = torch.tensor([vocab.index(s.word) for s in scenes])
        bag = torch.tensor([[float(c in s.word) for c in LETTERS] for s in scenes])
        word_logits, bag_logits = heads(tower(pixels(scenes)))
        loss = F.cross_entropy(word_logits, y) + F.binary_cross_entropy_with_logits(bag_logits, bag) * len(LETTERS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % a.every == 0 or step + 1 == a.steps:
            tower.eval()
            with torch.no_grad():
                right = torch.cat([heads(tower(held_px[i:i + 64]))[0].argmax(-1) for i in range(0, 192, 64)]) == held_y
            tower.train()
            by = [right[(held_h >= lo) & (held_h < hi)].float().mean().item() for lo, hi in BINS]
            rows.append((step + 1, right.float().mean().item(), by, time.perf_counter() - t0))
            print(f"step {step + 1}: real {rows[-1][1]:.3f}, {rows[-1][3] / (step + 1):.2f} s/step", flush=True)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{a.threads} threads, width {width}, {a.steps} steps, stretch {a.stretch}\n")
    print("| step | real | " + " | ".join(f"{lo}-{hi} px" for lo, hi in BINS) + " | minutes |")
    print("|---" * (len(BINS) + 3) + "|")
    for step, acc, by, seconds in rows:
        print(f"| {step} | {acc:.3f} | " + " | ".join(f"{b:.2f}" for b in by) + f" | {seconds / 60:.1f} |")


if __name__ == "__main__":
    main()
