"""The decode step (or prefill) of the working tree's engine against another commit's, in one process, on the 1.3B.

Extracts `engine/` as it is at REV (default HEAD) into a temporary folder and imports it under another name beside
the working tree's (the package's own imports are relative, and its native kernels compile from its own C
source), so both the C kernels and the Python around them are compared. Each engine builds bf16, 8-bit and 4-bit
models over the same random weights (bench_decode's, context 600), and the six decoders run round robin, one step
each in turn; with --prefill, the six models each run the chat's prefill of a --context-token prompt in turn
instead. One run, one machine: the only difference between the two rows of a precision is the code.

    .venv/bin/python benchmarks/bench_kernel_ab.py [--against HEAD] [--steps 30] [--warmup 3] [--prefill]

Not part of the test suite. Results go in benchmarks/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

import bench_decode as bd
import engine

REPO = Path(__file__).resolve().parents[1]


def engine_at(rev: str, workdir: Path):
    """The `engine` package at `rev`, imported as `engine_at_rev`."""
    archive = subprocess.run(["git", "archive", rev, "engine"], cwd=REPO, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(workdir, filter="data")
    (workdir / "engine").rename(workdir / "engine_at_rev")
    sys.path.insert(0, str(workdir))
    return importlib.import_module("engine_at_rev")


def models(package, weights: torch.nn.Module) -> dict:
    """{precision: the package's LM over `weights`' tensors, set up as its runtime does on a CPU}."""
    importlib.import_module(f"{package.__name__}.kernels.quant")  # the submodules, as attributes of the package
    importlib.import_module(f"{package.__name__}.model.llama")

    def twin():
        with torch.device("meta"):
            lm = package.model.llama.LlamaForCausalLM(weights.config)
        lm.load_state_dict(weights.state_dict(), strict=True, assign=True)  # the same tensors, no copy
        return lm.eval()

    bf16 = twin()
    # As that engine's Runtime sets up bf16 on this CPU (commits before prepare_cpu_bf16 always upcast).
    getattr(package.kernels.bf16, "prepare_cpu_bf16", package.kernels.bf16.upcast_matmuls)(bf16)
    quant = package.kernels.quant
    return {"bf16": bf16, "--load-8bit": bd.quantized_decoder(twin(), quant.Int8Linear),
            "--load-4bit": bd.quantized_decoder(twin(), quant.NF4Linear)}


def filled(model, k: list[torch.Tensor], v: list[torch.Tensor]):
    """The model's own cache type holding the given per-layer keys and values."""
    cache = model.new_cache()
    for i, (keys, values) in enumerate(zip(k, v)):
        cache.update(keys, values, i)
    return cache


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", default="HEAD", help="the commit whose engine is the baseline")
    ap.add_argument("--context", type=int, default=600)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--prefill", action="store_true", help="time prefills of --context tokens instead of decode steps")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        theirs = engine_at(args.against, Path(tmp))
        load_before = os.getloadavg()[0]
        hf, weights = bd.build()
        cfg = hf.config
        del hf
        g = torch.Generator().manual_seed(1)
        D = cfg.hidden_size // cfg.num_attention_heads
        shape = (1, cfg.num_key_value_heads, args.context, D)
        k = [torch.randn(*shape, generator=g).to(torch.bfloat16) for _ in range(cfg.num_hidden_layers)]
        v = [torch.randn(*shape, generator=g).to(torch.bfloat16) for _ in range(cfg.num_hidden_layers)]
        engines = {args.against: models(theirs, weights), "working tree": models(engine, weights)}
        ids = torch.randint(3, 1000, (1, args.context), generator=g)
        runs = {f"{precision}, {label}": (lambda m=model: bd.prefill(m, ids)) if args.prefill
                else bd.Decoder(model, filled(model, k, v))
                for precision in ("bf16", "--load-8bit", "--load-4bit") for label, built in engines.items()
                for model in (built[precision],)}
        results = bd.round_robin(runs, args.warmup, args.steps)
    print(f"CPU: {bd.cpu_name()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"1-min load average before {load_before:.2f}, after {os.getloadavg()[0]:.2f}; 1.3B LM, context "
          f"{args.context}, {args.steps} timed {'prefills' if args.prefill else 'steps'} each after {args.warmup} "
          "warm-up, round robin\n")
    unit = "prefill" if args.prefill else "token"
    tokens = args.context if args.prefill else 1
    print(f"| engine | s/{unit} (median) | tokens/s | min s/{unit} |\n|---|---|---|---|")
    for name, times in results.items():
        med = statistics.median(times)
        print(f"| {name} | {med:.4f} | {tokens / med:.2f} | {min(times):.4f} |")


if __name__ == "__main__":
    main()
