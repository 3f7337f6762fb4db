"""Prefill speed of the 1.3B language model on this CPU with the reused fp32 buffers of engine/kernels/scratch.py
and without them (the allocating path: each weight converted or dequantized into a new tensor per product).

bench_decode's models (random bf16 1.3B; --load-8bit and --load-4bit as the runtime builds them on a CPU) run
the chat's prefill call on one --context-token prompt, every row in turn for --reps rounds, so all rows see the
same drift in the machine's load. Also prints a torch.profiler split of one bf16 prefill each way.

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
from engine.kernels import scratch


@torch.inference_mode()
def prefill(model, ids: torch.Tensor):
    model(input_ids=ids, cache=model.new_cache(), use_cache=True, logits_to_keep=1)


def with_buffers(on: bool) -> int:
    """Sets the cap that decides whether products go through the buffers (0: none does)."""
    scratch.MAX_ELEMENTS = CAP if on else 0
    return scratch.MAX_ELEMENTS


CAP = scratch.MAX_ELEMENTS


def split(model, ids) -> str:
    with profile(activities=[ProfilerActivity.CPU]) as p:
        prefill(model, ids)
    ms = sorted(((e.self_cpu_time_total / 1e3, e.key) for e in p.key_averages()), reverse=True)
    total = sum(t for t, _ in ms)
    return f"{total / 1e3:.2f} s: " + ", ".join(f"{name.removeprefix('aten::')} {t / 1e3:.2f}" for t, name in ms[:4])


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
    times: dict[tuple[str, bool], list[float]] = {(name, on): [] for name in models for on in (False, True)}
    for rep in range(args.reps + 1):  # the first round warms up (buffers sized, kernels built): not counted
        for (name, on), seconds in times.items():
            with_buffers(on)
            t = time.perf_counter()
            prefill(models[name], ids)
            if rep:
                seconds.append(time.perf_counter() - t)
    splits = {}
    for on in (False, True):
        with_buffers(on)
        splits[on] = split(bf16, ids)
    with_buffers(True)

    print(f"CPU: {bd.cpu_name()}, torch {torch.__version__} ({torch.get_num_threads()} threads), 1-min load average "
          f"before {load_before:.2f}, after {os.getloadavg()[0]:.2f}; 1.3B LM, a {args.context}-token prefill, "
          f"{args.reps} timed rounds after one warm-up, round robin\n")
    print("| model | allocating: tok/s (median; min-max) | reused buffers: tok/s | ratio |\n|---|---|---|---|")
    for name in models:
        old, new = (args.context / statistics.median(times[name, on]) for on in (False, True))
        spread = lambda on: "–".join(f"{args.context / t:.1f}" for t in (max(times[name, on]), min(times[name, on])))
        print(f"| {name} | {old:.1f} ({spread(False)}) | {new:.1f} ({spread(True)}) | {new / old:.2f}× |")
    print(f"\nbf16 prefill under torch.profiler, self CPU time: allocating {splits[False]}; "
          f"reused buffers {splits[True]}")


if __name__ == "__main__":
    main()
