"""Peak memory and time of loading a real-size checkpoint: bf16 vs --load-8bit vs --load-4bit.

Writes the 1.3B (or 7B) architecture with random bf16 weights as an official-layout checkpoint once, then loads it
with `Runtime.load` in a fresh process per mode and reports that process's peak RSS (on a GPU, also the CUDA peak).
Quantized loads replace each decoder linear as soon as its weights are read, so their peak should stay near the
quantized size instead of the full-precision one.

    .venv/bin/python benchmarks/bench_load.py [--model 1.3b|7b] [--dir /tmp/dsvl-random-1.3b] [--device cpu]

Not part of the test suite; results go in benchmarks/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.demo import DEMO_DIR  # noqa: E402
from engine.loading import build_model, fill_random, save_pretrained  # noqa: E402
from engine.model.config import deepseek_vl_1_3b, deepseek_vl_7b  # noqa: E402

PRESETS = {"1.3b": deepseek_vl_1_3b, "7b": deepseek_vl_7b}


def anon_bytes() -> int:
    """Anonymous resident memory of this process. Peak RSS alone misleads here: weights read from the mmapped
    safetensors file count as resident while they are page cache, which the kernel can drop at will."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def child(directory: str, mode: str, device: str) -> dict:
    from engine.runtime import Runtime, model_bytes

    peak, done = [0], threading.Event()

    def sample():
        while not done.wait(0.02):
            peak[0] = max(peak[0], anon_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    runtime = Runtime.load(directory, device=device, dtype="bf16", quantization=None if mode == "bf16" else mode,
                           check_memory=False)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    result = {"mode": mode, "backend": runtime.quant_backend or "-", "seconds": seconds,
              "model_gib": model_bytes(runtime.model) / 2**30, "peak_anon_gib": max(peak[0], anon_bytes()) / 2**30,
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if runtime.device.type == "cuda":
        result["cuda_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(PRESETS), default="1.3b")
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", default="bf16,8bit,4bit")
    parser.add_argument("--child", nargs=2, metavar=("DIR", "MODE"))
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, args.device)), flush=True)
        return
    directory = args.dir or Path(f"/tmp/dsvl-random-{args.model}")
    if not (directory / "config.json").exists():
        print(f"writing a random {args.model} checkpoint to {directory} ...", file=sys.stderr, flush=True)
        model = fill_random(build_model(PRESETS[args.model]()), torch.bfloat16)
        save_pretrained(model, directory)
        del model
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):  # the demo's stand in
        if not (directory / name).exists():
            shutil.copy(DEMO_DIR / name, directory / name)
    rows = []
    for mode in args.modes.split(","):
        out = subprocess.run([sys.executable, __file__, "--device", args.device, "--child", str(directory), mode],
                             capture_output=True, text=True)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"{mode} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line.removeprefix("RESULT ")))
    print(f"\n{args.model}, device {args.device}, torch {torch.__version__}\n")
    print("| load | backend | seconds | model GiB | peak anonymous GiB | peak RSS GiB (incl. page cache) | CUDA peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cuda = f"{r['cuda_peak_gib']:.2f}" if "cuda_peak_gib" in r else "-"
        print(f"| {r['mode']} | {r['backend']} | {r['seconds']:.1f} | {r['model_gib']:.2f} | {r['peak_anon_gib']:.2f} | "
              f"{r['peak_rss_gib']:.2f} | {cuda} |")


if __name__ == "__main__":
    main()
