"""benchmarks/bench_vision.py compares like with like: on its tiny towers, transformers' SiglipVisionModel and
DeepseekVLHybridModel (SAM-B half and SigLIP half), given our weights through its mapping, compute what ours does."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vision.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_vision", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, parts", [("1.3b", {"SigLIP-L"}), ("7b", {"SAM-B", "SigLIP-L"})])
def test_smoke_towers_equal_transformers(bench, name, parts):
    pair = bench.build_pair(name, bench.tiny_configs()[name], ["fp32"], torch.device("cpu"))
    result = bench.equality(pair, "fp32")
    assert set(result) == parts
    for part, (diff, rel) in result.items():
        # A weight off by 0.01 moves the output by ≥ 5e-4 relative (checked by hand); fp32 reordering stays ~1e-6.
        assert rel < 1e-5, (part, diff, rel)
