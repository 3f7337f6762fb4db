"""Every GPU measurement the project owes, in one prepared run of under 8 minutes on one H100 or H200.

    bash benchmarks/gpu_check.sh              # the GPU machine (the script picks a Python whose torch has CUDA)
    bash benchmarks/gpu_check.sh --smoke      # anywhere: tiny models on the CPU, 2 steps, proves the code paths
    python benchmarks/gpu_check.py --only decode-7b-4bit,qlora-7b   # a rerun of some items (checkpoints are kept)

What it measures, with random weights at the real deepseek-vl-1.3b and -7b architectures (nothing is downloaded):
1. Load and decode: the weights are made on the GPU in bf16 and written once as an official-layout checkpoint
   under --work; each mode then loads it through `Runtime.load` (bf16, 8-bit, 4-bit: bitsandbytes, the
   project's quantization path). Load time, memory after load, time to first token and greedy decode tokens/s of
   --new-tokens tokens after a prompt with one image, through `ChatSession` as the app runs it.
2. Stage 3 (SFT) steps through `engine.training.loop.train`: 8-bit AdamW, gradient checkpointing, bf16 autocast,
   on one-image conversations (tests/training_fixtures.py). s/step, tokens/s, peak memory, and the trainer's own
   memory estimate beside it.
3. QLoRA stage-3 steps on the 7B (4-bit NF4 language model + LoRA), the same settings.

Each item runs in its own subprocess with its own timeout, so an out-of-memory error or a crash becomes
"failed: reason" in its row and the others still run; a global --budget skips what no longer fits. Memory is
`torch.cuda.max_memory_allocated` on a GPU (the process's peak RSS in --smoke on the CPU, not comparable).
The table is printed and written as gpu_check.md / gpu_check.json (+ gpu_check.log, each item's stderr tail)
under $OUT when set, else under benchmarks/ (--out overrides). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

GiB = 2**30
COMPLETE = ".gpu-check-complete"  # written last into a checkpoint directory: a rerun reuses only whole ones


# ------------------------------------------------------------------ what is measured
@dataclass
class Item:
    id: str
    kind: str  # "checkpoint", "decode" or "train"
    model: str  # "1.3b" or "7b"
    mode: str = ""  # decode: bf16 / 8bit / 4bit; train: sft / qlora
    timeout: int = 120  # seconds on the GPU; --smoke uses its own
    train: dict = field(default_factory=dict)  # batch_size, micro_batch_size

    @property
    def title(self) -> str:
        return {"checkpoint": f"{self.model}: write random bf16 checkpoint",
                "decode": f"{self.model}: load + decode, {self.mode}",
                "train": f"{self.model}: {'QLoRA' if self.mode == 'qlora' else 'SFT'} steps (stage 3)"}[self.kind]


# In order of what matters most should the budget run out; the 7B full SFT (~70 GiB of fp32 weights, gradients and
# 8-bit AdamW state) goes last: it may not fit an H100, and its row then says so.
ITEMS = [
    Item("checkpoint-1.3b", "checkpoint", "1.3b", timeout=90),
    Item("decode-1.3b-bf16", "decode", "1.3b", "bf16", timeout=90),
    Item("decode-1.3b-8bit", "decode", "1.3b", "8bit", timeout=120),
    Item("decode-1.3b-4bit", "decode", "1.3b", "4bit", timeout=90),
    Item("sft-1.3b", "train", "1.3b", "sft", timeout=150, train={"batch_size": 8, "micro_batch_size": 4}),
    Item("checkpoint-7b", "checkpoint", "7b", timeout=180),
    Item("decode-7b-bf16", "decode", "7b", "bf16", timeout=120),
    Item("decode-7b-4bit", "decode", "7b", "4bit", timeout=120),
    Item("decode-7b-8bit", "decode", "7b", "8bit", timeout=150),
    Item("qlora-7b", "train", "7b", "qlora", timeout=180, train={"batch_size": 8, "micro_batch_size": 2}),
    Item("sft-7b", "train", "7b", "sft", timeout=180, train={"batch_size": 8, "micro_batch_size": 2}),
]
SMOKE_TRAIN = {"batch_size": 2, "micro_batch_size": 2}


def shrunk(official: dict) -> dict:
    """The same config.json structure (SigLIP alone, or SAM + SigLIP hybrid) at a few MB, through the size-override
    keys the config parser accepts: for --smoke on the CPU."""
    cfg = copy.deepcopy(official)
    vision = cfg["vision_config"]["params"]
    siglip = {"width": 64, "layers": 2, "heads": 4, "mlp_ratio": 4, "patch_size": 16}
    if "low_res_cfg" in vision:
        vision["low_res_cfg"].update(siglip, output_dim=64)
        vision["high_res_cfg"].update(width=32, layers=4, heads=2, global_attn_indexes=[1, 3],
                                      downsample_channels=[40, 64], prompt_embed_dim=24, output_dim=64)
    else:
        vision.update(siglip)
    cfg["aligner_config"]["params"].update(input_dim=64, n_embed=128)
    cfg["language_config"].update(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=4,
                                  num_hidden_layers=2, vocab_size=1024)
    return cfg


def model_config(name: str, smoke: bool):
    from engine.model.config import OFFICIAL_1_3B, OFFICIAL_7B, VLConfig

    official = {"1.3b": OFFICIAL_1_3B, "7b": OFFICIAL_7B}[name]
    return VLConfig.from_official(shrunk(official) if smoke else official)


# ------------------------------------------------------------------ measuring, in a child process
def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device) -> int:
    """CUDA: max allocated since the last reset. CPU: the process's peak RSS (never resets)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def allocated_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def picture(seed: int):
    """A 640x480 photo-like test image (smooth colour gradients plus noise), different per seed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:480, 0:640]
    base = np.stack([(x * (seed + 1)) % 256, (y * 2 + 40 * seed) % 256, (x + y) // 5 % 256], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


def write_checkpoint(spec: dict, device) -> dict:
    """Random bf16 weights made on `device`, saved in the official layout with a processor that fits the tower."""
    import torch

    from engine.demo import DEMO_DIR
    from engine.loading import build_model, fill_random, save_pretrained

    directory = Path(spec["dir"])
    if (directory / COMPLETE).is_file():
        return {"reused": True, "checkpoint_gib": dir_bytes(directory) / GiB,
                "params_b": json.loads((directory / COMPLETE).read_text())["params"] / 1e9}
    shutil.rmtree(directory, ignore_errors=True)
    config = model_config(spec["model"], spec["smoke"])
    start = time.perf_counter()
    model = fill_random(build_model(config), torch.bfloat16, device=device)
    sync(device)
    made = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    save_pretrained(model, directory)
    del model
    # The demo's byte-level tokenizer stands in for DeepSeek's (same chat template); the image size is the
    # tower's (384, or 1024 for the hybrid, which normalises inside its towers).
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_DIR / name, directory / name)
    hybrid = config.vision.hybrid
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "image_size": config.vision.input_size, "min_size": 14, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
        "do_normalize": not hybrid, "image_processor_type": "VLMImageProcessor"}, indent=1))
    (directory / COMPLETE).write_text(json.dumps({"params": params}))
    return {"reused": False, "make_s": made, "write_s": time.perf_counter() - start - made,
            "checkpoint_gib": dir_bytes(directory) / GiB, "params_b": params / 1e9}


def dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def decode(spec: dict, device) -> dict:
    """Runtime.load, then one warm-up answer and one measured answer (prompt with one new image) in fresh
    ChatSessions: exactly the app's path, greedy."""
    from engine.chat import ChatSession
    from engine.generation import SamplingParams
    from engine.runtime import Runtime, model_bytes

    quantization = None if spec["mode"] == "bf16" else spec["mode"]
    reset_peak(device)
    start = time.perf_counter()
    runtime = Runtime.load(spec["dir"], device=str(device), dtype="bf16", quantization=quantization,
                           quant_backend=spec["quant_backend"] if quantization else "auto", check_memory=False)
    sync(device)
    result = {"load_s": time.perf_counter() - start, "after_load_gib": allocated_bytes(device) / GiB,
              "load_peak_gib": peak_bytes(device) / GiB, "weights_gib": model_bytes(runtime.model) / GiB,
              "backend": runtime.quant_backend or "-"}
    warm = ChatSession(runtime)  # first CUDA kernels, cuBLAS handles, bitsandbytes' lazy setup
    warm.add_user("Warm up.", [picture(0)])
    warm.answer(SamplingParams(max_new_tokens=4))
    session = ChatSession(runtime)
    session.add_user("Describe this picture in detail.", [picture(1)])
    session.answer(SamplingParams(max_new_tokens=spec["new_tokens"]))
    stats = session.last_stats
    result.update(ttft_s=stats.ttft, decode_tok_s=stats.tokens_per_second, tokens=stats.tokens,
                  prompt_tokens=stats.prompt_tokens, finish=stats.finish, peak_gib=peak_bytes(device) / GiB)
    return result


class Measured(Exception):
    """Raised from on_step after the last measured step: the stage's export (the whole model written to disk in
    float32, ~28 GiB for the 7B) is not part of what is measured."""


def train_steps(spec: dict, device) -> dict:
    from dataclasses import replace

    from engine.training.loop import RunConfig, plan, train
    from training_fixtures import conversations

    work = Path(spec["work"])
    data = conversations(work / "data", n=16)
    out = work / "runs" / spec["id"]
    shutil.rmtree(out, ignore_errors=True)
    steps = spec["steps"]
    # seq_len 1 grows to the longest sample (stage 3 does not pack), so the memory estimate is for these samples;
    # language_ratio 0: every step is a batch of one-image conversations.
    run = RunConfig(model=spec["dir"], out=str(out), data=[str(data)], stages=[3], bf16=True,
                    gradient_checkpointing=True, optimizer="adamw8bit", qlora=spec["mode"] == "qlora",
                    device=str(device), check_memory=False,
                    overrides={"steps": steps, "warmup_steps": 1, "language_ratio": 0.0, "seq_len": 1, **spec["train"]})
    estimate = plan(replace(run, check_memory=True))["stages"][0]["memory"]["total_bytes"]

    marks = []  # (time, step record, peak bytes since the last reset)
    peak_first = [0]

    def on_step(record: dict) -> None:
        sync(device)
        marks.append((time.perf_counter(), record, peak_bytes(device)))
        if record["step"] == 1:  # loading (float32, before QLoRA's quantization) and the first step's one-offs
            peak_first[0] = peak_bytes(device)
            reset_peak(device)
        if record["step"] >= steps:
            raise Measured()

    reset_peak(device)
    start = time.perf_counter()
    try:
        train(run, log=lambda message: print(message, file=sys.stderr, flush=True), on_step=on_step)
    except Measured:
        pass
    if len(marks) < steps:
        raise RuntimeError(f"training ended after {len(marks)} of {steps} steps")
    later = [(marks[i][0] - marks[i - 1][0], marks[i][1]) for i in range(1, len(marks))]  # steps 2..N
    seconds = sum(s for s, _ in later)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trainable = next((e.get("trainable_parameters") for e in events if e.get("event") == "stage_start"), None)
    return {"first_step_incl_load_s": marks[0][0] - start,
            "s_per_step": seconds / len(later), "median_s_per_step": statistics.median(s for s, _ in later),
            "tokens_per_s": sum(r["tokens"] for _, r in later) / seconds,
            "tokens_per_step": statistics.mean(r["tokens"] for _, r in later),
            "loop_s_per_step": statistics.mean(r["seconds"] for _, r in later),
            "loss": [round(r["loss"], 4) for _, r, _ in marks],
            "peak_gib": max(p for _, _, p in marks[1:]) / GiB, "peak_incl_load_gib": peak_first[0] / GiB,
            "estimate_gib": estimate / GiB, "trainable_m": trainable / 1e6 if trainable else None,
            "steps_timed": len(later), **spec["train"]}


def child(spec: dict) -> dict:
    import torch

    device = torch.device(spec["device"])
    work = {"checkpoint": write_checkpoint, "decode": decode, "train": train_steps}[spec["kind"]]
    result = work(spec, device)
    result["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return result


# ------------------------------------------------------------------ running the items
def failure_reason(stderr: str, returncode: int) -> str:
    """The exception line of a traceback (the last `SomethingError: ...`), else the last line printed."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", line)]
    reason = errors[-1] if errors else (lines[-1] if lines else "")
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (killed: out of host memory?)" if -returncode == signal.SIGKILL else ""
        reason = f"{name}{hint}" + (f"; last output: {reason}" if reason else "")
    reason = re.sub(r"\s+", " ", reason or f"exit code {returncode}")
    return reason if len(reason) <= 200 else reason[:197] + "..."


def run_item(spec: dict, timeout: float) -> tuple[dict, str]:
    """(result, stderr) of one child process; its own process group, so a timeout kills all it started."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=REPO)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        status = None
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        status = f"failed: timed out after {timeout:.0f} s"
    wall = time.monotonic() - start
    line = next((l for l in reversed(stdout.splitlines()) if l.startswith("RESULT ")), None)
    if status is None and line is not None and proc.returncode == 0:
        return {"status": "ok", "wall_s": wall, **json.loads(line.removeprefix("RESULT "))}, stderr
    return {"status": status or f"failed: {failure_reason(stderr, proc.returncode)}", "wall_s": wall}, stderr


def machine(device: str) -> dict:
    import importlib.metadata as md

    import torch

    info = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "host": platform.node(),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda or "-",
            "device": device, "cpus": os.cpu_count()}
    for package in ("bitsandbytes", "transformers", "peft", "accelerate"):
        try:
            info[package] = md.version(package)
        except md.PackageNotFoundError:
            info[package] = "missing"
    try:  # nvidia-smi, not torch: the parent process keeps no CUDA context (it would hold GPU memory all along)
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["gpu"] = out.stdout.strip() or out.stderr.strip() or "-"
    except (OSError, subprocess.TimeoutExpired) as e:
        info["gpu"] = f"no nvidia-smi ({e.__class__.__name__})"
    return info


def fmt(value, digits: int = 2) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def size(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 0.1 else f"{gib * 1024:.1f} MiB"


def count(billions: float) -> str:
    return f"{billions:.2f} B" if billions >= 0.1 else f"{billions * 1000:.1f} M"


def row(item: Item, r: dict) -> list[str]:
    cells = {"load": "-", "after": "-", "peak": "-", "ttft": "-", "decode": "-", "step": "-", "train": "-"}
    notes = ""
    if r["status"] == "ok" and item.kind == "checkpoint":
        notes = (f"{count(r['params_b'])} parameters, {size(r['checkpoint_gib'])}; "
                 + ("reused from an earlier run" if r["reused"] else f"made in {r['make_s']:.1f} s, written in {r['write_s']:.1f} s"))
    elif r["status"] == "ok" and item.kind == "decode":
        cells.update(load=fmt(r["load_s"], 1), after=f"{r['after_load_gib']:.2f} (max {r['load_peak_gib']:.2f})",
                     peak=fmt(r["peak_gib"]), ttft=fmt(r["ttft_s"]), decode=fmt(r["decode_tok_s"], 1))
        notes = (f"{r['tokens']} new tokens ({r['finish']}) after {r['prompt_tokens']} prompt tokens; weights "
                 f"{size(r['weights_gib'])}; backend {r['backend']}")
    elif r["status"] == "ok" and item.kind == "train":
        cells.update(peak=fmt(r["peak_gib"]), step=f"{r['s_per_step']:.2f} (median {r['median_s_per_step']:.2f})",
                     train=fmt(r["tokens_per_s"], 0))
        trainable = f"{count(r['trainable_m'] / 1000)} trainable; " if r.get("trainable_m") else ""
        notes = (f"{trainable}batch {r['batch_size']} (micro {r['micro_batch_size']}), {r['tokens_per_step']:.0f} "
                 f"tokens/step, steps 2-{r['steps_timed'] + 1} timed; peak incl. load + step 1 "
                 f"{size(r['peak_incl_load_gib'])}; trainer's estimate {size(r['estimate_gib'])}; "
                 f"load + step 1 {r['first_step_incl_load_s']:.1f} s")
    status = r["status"] if r["status"] != "ok" else f"ok ({r['wall_s']:.0f} s)"
    return [item.title, status, cells["load"], cells["after"], cells["peak"], cells["ttft"], cells["decode"],
            cells["step"], cells["train"], notes]


HEADER = ["measurement", "result (wall)", "load s", "GiB after load", "peak GiB", "TTFT s", "decode tok/s", "s/step",
          "train tok/s", "notes"]


def markdown(info: dict, rows: list[list[str]], smoke: bool, budget: float, used: float) -> str:
    memory = ("memory: the process's peak RSS (CPU; not comparable with GPU figures)" if smoke
              else "memory: torch.cuda.max_memory_allocated / memory_allocated")
    lines = [f"GPU check{' (--smoke: tiny configs on the CPU, not real-size numbers)' if smoke else ''}, {info['date']}: "
             f"{info['gpu']}; torch {info['torch']} (CUDA {info['cuda']}), bitsandbytes {info['bitsandbytes']}, "
             f"transformers {info['transformers']}, peft {info['peft']}, Python {info['python']}; {info['cpus']} CPUs. "
             f"{used:.0f} s of a {budget:.0f} s budget. {memory}.",
             "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny configs on the CPU, 2 steps: checks the code paths")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all items (default 450; smoke 900)")
    parser.add_argument("--only", default="", help="comma-separated item ids: " + ",".join(i.id for i in ITEMS))
    parser.add_argument("--out", type=Path, default=None, help="where the table goes (default $OUT, else benchmarks/)")
    parser.add_argument("--work", type=Path, default=None, help="checkpoints and runs (default /tmp/dsvl-gpu-check)")
    parser.add_argument("--new-tokens", type=int, default=None, help="decode length (default 128; smoke 16)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per item (default 5; smoke 2)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return

    import torch

    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        sys.exit("gpu_check: this torch sees no CUDA GPU; on a machine without one run it with --smoke")
    device = "cpu" if smoke else "cuda"
    budget = args.budget or (900.0 if smoke else 450.0)
    work = args.work or Path("/tmp/dsvl-gpu-check" + ("-smoke" if smoke else ""))
    out = args.out or Path(os.environ.get("OUT") or REPO / "benchmarks")
    out.mkdir(parents=True, exist_ok=True)
    new_tokens = args.new_tokens or (16 if smoke else 128)
    steps = args.steps or (2 if smoke else 5)
    wanted = {s for s in args.only.split(",") if s}
    unknown = wanted - {i.id for i in ITEMS}
    if unknown:
        sys.exit(f"gpu_check: unknown item(s) {', '.join(sorted(unknown))}")
    items = [i for i in ITEMS if not wanted or i.id in wanted]

    info = machine(device)
    print(f"gpu_check: {info['gpu']}; torch {info['torch']} CUDA {info['cuda']}; bitsandbytes {info['bitsandbytes']}; "
          f"budget {budget:.0f} s; work {work}", flush=True)
    begin = time.monotonic()
    results, rows, logs = {}, [], []
    for item in items:
        directory = work / f"random-{item.model}"
        spec = {"id": item.id, "kind": item.kind, "model": item.model, "mode": item.mode, "smoke": smoke,
                "device": device, "dir": str(directory), "work": str(work), "new_tokens": new_tokens, "steps": steps,
                # --smoke forces bitsandbytes on the CPU too, the library the GPU path uses
                "quant_backend": "bitsandbytes" if smoke else "auto",
                "train": SMOKE_TRAIN if smoke else item.train}
        left = budget - (time.monotonic() - begin)
        timeout = min(300 if smoke else item.timeout, left)
        prepared = results.get(f"checkpoint-{item.model}")
        needs_checkpoint = item.kind != "checkpoint" and not (directory / COMPLETE).is_file()
        if needs_checkpoint and prepared is not None and prepared["status"] != "ok":
            result, stderr = {"status": "skipped: its checkpoint was not written", "wall_s": 0.0}, ""
        elif needs_checkpoint:
            result, stderr = {"status": "skipped: no checkpoint (run its checkpoint item first)", "wall_s": 0.0}, ""
        elif timeout < 20:
            result, stderr = {"status": f"skipped: the {budget:.0f} s budget was spent", "wall_s": 0.0}, ""
        else:
            print(f"[{time.monotonic() - begin:5.0f} s] {item.id} (timeout {timeout:.0f} s) ...", flush=True)
            result, stderr = run_item(spec, timeout)
            if result["status"].startswith("failed: timed out") and timeout < (300 if smoke else item.timeout):
                result["status"] += ", cut short by the budget's end"
        results[item.id] = {**asdict(item), **result}
        rows.append(row(item, result))
        logs.append(f"===== {item.id}: {result['status']}\n{stderr[-6000:]}")
        print(f"[{time.monotonic() - begin:5.0f} s] {item.id}: {result['status']}", flush=True)
    used = time.monotonic() - begin

    table = markdown(info, rows, smoke, budget, used)
    print("\n" + table, flush=True)
    stem = "gpu_check-smoke" if smoke else "gpu_check"
    (out / f"{stem}.md").write_text(table)
    (out / f"{stem}.json").write_text(json.dumps({"machine": info, "budget_s": budget, "used_s": used,
                                                  "new_tokens": new_tokens, "steps": steps, "items": results}, indent=1))
    (out / f"{stem}.log").write_text("\n".join(logs))
    print(f"written: {out / stem}.md, .json, .log", flush=True)


if __name__ == "__main__":
    main()
