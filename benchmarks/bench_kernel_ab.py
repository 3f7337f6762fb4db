"""The native decode kernels of the working tree against those of another commit, in one process, on the 1.3B.

Compiles `engine/kernels/native/decode_kernels.c` as it is at REV (default HEAD) with the same flags as the
engine, and times bf16, 8-bit and 4-bit decode steps (bench_decode's models, context 600) round robin, each step run
with one library or the other swapped in. One run, one machine: the only difference between rows is the C source.

    .venv/bin/python benchmarks/bench_kernel_ab.py [--against HEAD] [--steps 30] [--warmup 3]

Not part of the test suite. Results go in benchmarks/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

import bench_decode as bd
from engine.kernels import native


def library_at(rev: str, workdir: Path) -> ctypes.CDLL:
    repo = Path(__file__).resolve().parents[1]
    relative = native.SOURCE.resolve().relative_to(repo)
    text = subprocess.run(["git", "show", f"{rev}:{relative}"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout
    (workdir / "decode_kernels.c").write_text(text)
    return native._bind(ctypes.CDLL(str(native._build(native.compiler(), workdir / "decode_kernels.c"))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", default="HEAD", help="the commit whose kernels are the baseline")
    ap.add_argument("--context", type=int, default=600)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()

    ours = native.kernels()
    if ours is None:
        raise SystemExit(f"native kernels not available: {native.status()}")
    with tempfile.TemporaryDirectory() as tmp:
        theirs = library_at(args.against, Path(tmp))
        load_before = os.getloadavg()[0]
        hf, model = bd.build()
        cfg = hf.config
        del hf
        bf16 = bd.sharing(model)
        bd.upcast_matmuls(bf16)  # as the runtime sets up bf16 on a CPU without bf16 instructions
        int8 = bd.quantized_decoder(bd.sharing(model), bd.Int8Linear)
        nf4 = bd.quantized_decoder(bd.sharing(model), bd.NF4Linear)
        _, caches = bd.filled_caches(cfg, args.context, torch.bfloat16, 6)

        def using(lib, decoder):  # gemv_* look the library up through native.kernels() at every call
            def run():
                native.kernels = lambda: lib
                decoder()
            return run

        rows = {f"bf16, kernels of {args.against}": (theirs, bf16), "bf16, working tree": (ours, bf16),
                f"--load-8bit, kernels of {args.against}": (theirs, int8), "--load-8bit, working tree": (ours, int8),
                f"--load-4bit, kernels of {args.against}": (theirs, nf4), "--load-4bit, working tree": (ours, nf4)}
        runs = {name: using(lib, bd.Decoder(m, cache)) for (name, (lib, m)), cache in zip(rows.items(), caches)}
        results = bd.round_robin(runs, args.warmup, args.steps)
    print(f"CPU: {bd.cpu_name()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"1-min load average before {load_before:.2f}, after {os.getloadavg()[0]:.2f}; 1.3B LM, context "
          f"{args.context}, {args.steps} timed steps each after {args.warmup} warm-up, round robin\n")
    print("| kernels | s/token (median) | tokens/s | min s/token |\n|---|---|---|---|")
    for name, times in results.items():
        med = statistics.median(times)
        print(f"| {name} | {med:.4f} | {1 / med:.2f} | {min(times):.4f} |")


if __name__ == "__main__":
    main()
