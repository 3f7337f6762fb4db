"""benchmarks/bench_reading_curriculum.py runs end to end on a few steps (the easy square, then the real scenes
with the window, greys and shapes: --stretch puts every switch point inside them) and prints its table."""

import sys

from benchmarks import bench_reading_curriculum as bench


def test_a_short_curriculum_runs_through_every_phase_and_prints_its_table(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench", "--steps", "8", "--stretch", "0.001", "--every", "4", "--threads", "1"])
    bench.main()
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 4 |") or line.startswith("| 8 |")]
    assert len(rows) == 2, out
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert 0.0 <= float(cells[1]) <= 1.0 and len(cells) == 2 + len(bench.BINS) + 1


def test_the_height_is_the_font_size_after_the_resize_of_the_long_side_to_256():
    scene = bench.world.Scene(1024, 512, (255, 255, 255), "circle", "red", [], "cat", 40, (0, 0))
    assert bench.height(scene) == 10.0
    assert bench.rising(0, 10, 20) == 0.0 and bench.rising(15, 10, 20) == 0.5 and bench.rising(30, 10, 20) == 1.0
