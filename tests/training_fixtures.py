"""Tiny checkpoints and synthetic data sets for the training tests (real files in temporary directories)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from engine.tiny import build_tiny

REPO_ROOT = Path(__file__).resolve().parents[1]

COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 200, 60), "yellow": (230, 220, 40)}


def tiny_model(directory: Path) -> Path:
    """The demo architecture (SigLIP, mlp_gelu adaptor, 2-layer LLaMA), 64-pixel images (16 image tokens)."""
    return build_tiny(directory, seed=0, image_size=64)


def image(directory: Path, colour: str, size=(40, 30)) -> Path:
    path = directory / "img" / f"{colour}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        Image.new("RGB", size, COLOURS[colour]).save(path)
    return path


def conversations(directory: Path, n: int = 8, name: str = "data.jsonl") -> Path:
    """`n` one-image conversations whose answer names the picture's colour, plus two text-only conversations."""
    lines = []
    colours = list(COLOURS)
    for i in range(n):
        colour = colours[i % len(colours)]
        image(directory, colour)
        lines.append({"conversations": [
            {"role": "User", "content": "<image_placeholder>What colour is it?", "images": [f"img/{colour}.png"]},
            {"role": "Assistant", "content": f"It is {colour}."}]})
    for q, a in (("What is two plus two?", "Four."), ("Say hello.", "Hello!")):
        lines.append({"conversations": [{"role": "User", "content": q}, {"role": "Assistant", "content": a}]})
    path = directory / name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def text_data(directory: Path, n: int = 8, name: str = "text.jsonl") -> Path:
    sentences = ["The quick brown fox jumps over the lazy dog.", "A page has a title and two paragraphs.",
                 "The chart shows three bars of different colours.", "Numbers: 0123456789."]
    path = directory / name
    path.write_text("".join(json.dumps({"text": sentences[i % len(sentences)]}) + "\n" for i in range(n)))
    return path
