"""benchmarks/bench_word_reading.py measures what it says: its word images are learnable (a small CNN reads two
words within 30 steps, so a tower at chance is the tower's doing, not the data's), and its rows run."""

import argparse
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_word_reading.py"


def load():
    spec = importlib.util.spec_from_file_location("bench_word_reading", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_cnn_reads_two_words_and_the_tower_rows_run():
    bench = load()
    args = argparse.Namespace(font=40, steps=30, lr=1e-3, lr_white0=3e-4, seed=0)
    words = bench.world.words()[:2]
    accuracy, seconds = bench.curve("cnn", args, words)
    assert len(accuracy) == 30 and sum(accuracy[-10:]) / 10 >= 0.9, accuracy
    for row in ("vit", "vit-white0"):
        accuracy, seconds = bench.curve(row, argparse.Namespace(**{**vars(args), "steps": 2}), words)
        assert len(accuracy) == 2 and all(0.0 <= a <= 1.0 for a in accuracy) and seconds > 0
