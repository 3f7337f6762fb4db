"""benchmarks/bench_word_reading.py measures what it says: its word images are learnable (a small CNN reads two
words within 30 steps, so a tower at chance is the tower's doing, not the data's), and its rows run."""

import argparse

from benchmarks import bench_word_reading as bench


def test_the_cnn_reads_two_words_and_the_tower_rows_run():
    args = argparse.Namespace(font=40, steps=30, lr=1e-3, lr_white0=3e-4, seed=0)
    words = bench.world.words()[:2]
    accuracy, seconds = bench.curve("cnn", args, words)
    assert len(accuracy) == 30 and sum(accuracy[-10:]) / 10 >= 0.9, accuracy
    for row in ("vit", "vit-white0"):
        accuracy, seconds = bench.curve(row, argparse.Namespace(**{**vars(args), "steps": 2}), words)
        assert len(accuracy) == 2 and all(0.0 <= a <= 1.0 for a in accuracy) and seconds > 0
