"""Prefill and image-encode speed of the 1.3B on this CPU by each path a many-row product can take: a new fp32 tensor
per product (allocating), the reused fp32 buffers of engine/kernels/scratch.py, for bf16 weights MKL's bf16 GEMM
(engine/kernels/bf16.py), and the native GEMM (engine/kernels/native/gemm.c; the default where it builds).

bench_decode's models (random bf16 1.3B; --load-8bit and --load-4bit as the runtime builds them on a CPU) run
the chat's prefill call on one --context-token prompt, and bench_vision's 1.3B SigLIP-L tower (random weights,
bf16 with fp32 products, as the app runs it) encodes one 384² image; every row in turn for --reps rounds, so all
rows see the same drift in the machine's load. Also prints a torch.profiler split of one bf16 prefill each way.

    .venv/bin/python benchmarks/bench_prefill.py [--context 600] [--reps 3]

Not part of the test suite. Results go in benchmarks/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import bench_decode as bd
import bench_vision as bv
from engine.kernels import bf16 as kernels_bf16
from engine.kernels import native, scratch


@torch.inference_mode()
def encode(tower, pixels: torch.Tensor):
    tower(pixels)


CAP = scratch.MAX_ELEMENTS
MKL_GEMM = kernels_bf16._mkl_gemm_bf16()
NATIVE_GEMM = native.gemm
PATHS = ("allocating", "reused buffers", "MKL bf16 GEMM", "native GEMM")


def take(path: str) -> None:
    """Sends many-row products down `path`: the buffers' cap (0: none goes through them), MKL's GEMM and the native
    GEMM each on or off (the modules call both through their modules' attributes)."""
    scratch.MAX_ELEMENTS = 0 if path == "allocating" else CAP
    kernels_bf16._mkl_gemm_bf16 = (lambda: MKL_GEMM) if path == "MKL bf16 GEMM" else (lambda: None)
    native.gemm = NATIVE_GEMM if path == "native GEMM" else (lambda *args, **kwargs: None)


def split(model, ids) -> str:
    with profile(activities=[ProfilerActivity.CPU]) as p:
        bd.prefill(model, ids)
    ms = sorted(((e.self_cpu_time_total / 1e3, e.key) for e in p.key_averages()), reverse=True)
    total = sum(t for t, _ in ms)
    return f"{total / 1e3:.2f} s: " + ", ".join(f"{name.removeprefix('aten::')} {t / 1e3:.2f}" for t, name in ms[:4])


def cell(seconds: list[float], tokens: int | None) -> str:
    """Tokens/s of a prefill (tokens given) or seconds per image: median (slowest–fastest)."""
    if tokens:
        return f"{tokens / statistics.median(seconds):.1f} tok/s ({tokens / max(seconds):.1f}–{tokens / min(seconds):.1f})"
    return f"{statistics.median(seconds):.2f} s/image ({min(seconds):.2f}–{max(seconds):.2f})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=600)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    load_before = os.getloadavg()[0]
    hf, model = bd.build()
    del hf
    bf16 = bd.sharing(model)
    bd.upcast_matmuls(bf16)  # as the runtime sets up bf16 on a CPU without bf16 instructions
    models = {"bf16": bf16, "--load-8bit": bd.quantized_decoder(bd.sharing(model), bd.Int8Linear),
              "--load-4bit": bd.quantized_decoder(bd.sharing(model), bd.NF4Linear)}
    ids = torch.randint(3, 1000, (1, args.context), generator=torch.Generator().manual_seed(3))
    tower = bv.our_tower(bv.full_configs()["1.3b"]).to(torch.bfloat16).eval()
    bd.upcast_matmuls(tower)
    pixels = (2 * torch.rand(1, 3, 384, 384, generator=torch.Generator().manual_seed(1)) - 1).to(torch.bfloat16)
    runs = {name: (lambda m=m: bd.prefill(m, ids)) for name, m in models.items()}
    runs["1.3B SigLIP-L encode"] = lambda: encode(tower, pixels)
    bf16_runs = ("bf16", "1.3B SigLIP-L encode")  # the only rows MKL's bf16 GEMM can change
    skip = set() if native.kernels() is not None else {"native GEMM"}
    paths = {name: [path for path in PATHS if path not in skip
                    and (path != "MKL bf16 GEMM" or (name in bf16_runs and MKL_GEMM is not None))] for name in runs}
    times: dict[tuple[str, str], list[float]] = {(name, path): [] for name in runs for path in paths[name]}
    for rep in range(args.reps + 1):  # the first round warms up (buffers sized, kernels built): not counted
        for (name, path), seconds in times.items():
            take(path)
            t = time.perf_counter()
            runs[name]()
            if rep:
                seconds.append(time.perf_counter() - t)
    splits = {}
    for path in paths["bf16"]:
        take(path)
        splits[path] = split(bf16, ids)
    take(paths["bf16"][-1])

    print(f"CPU: {bd.cpu_name()}, torch {torch.__version__} ({torch.get_num_threads()} threads), 1-min load average "
          f"before {load_before:.2f}, after {os.getloadavg()[0]:.2f}; 1.3B LM, a {args.context}-token prefill; "
          f"1.3B SigLIP-L, one 384² image; {args.reps} timed rounds after one warm-up, round robin\n")
    print("| run | " + " | ".join(f"{path} (median; min–max)" for path in PATHS) + " |")
    print("|---" * (len(PATHS) + 1) + "|")
    for name in runs:
        tokens = args.context if name in models else None
        cells = [cell(times[name, path], tokens) if (name, path) in times else "–" for path in PATHS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nbf16 prefill under torch.profiler, self CPU time of aten ops (MKL's and the native GEMM, called through "
          "ctypes, are not ones): " + "; ".join(f"{path} {text}" for path, text in splits.items()))


if __name__ == "__main__":
    main()
