"""The clickable examples the empty chat shows: images in assets/examples/ with a question each, listed in
examples.json (made by `python -m engine make-demo`, which keeps only questions the demo model answers right)."""

from __future__ import annotations

import json
from pathlib import Path

from engine.demo import EXAMPLES_DIR


def examples(directory: Path = EXAMPLES_DIR) -> list[dict]:
    """Gradio Chatbot examples: {"text", "files", "display_text", "icon"}; [] when there are none."""
    index = directory / "examples.json"
    if not index.is_file():
        return []
    out = []
    for item in json.loads(index.read_text(encoding="utf-8")):
        files = [str((directory / f).resolve()) for f in item["images"]]
        out.append({"text": item["question"], "files": files, "display_text": item["question"], "icon": files[0]})
    return out
