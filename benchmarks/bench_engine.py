"""End-to-end speed and memory of the real 1.3B (or 7B) architecture with random weights: our engine vs
transformers' DeepseekVL classes on the same weights, and time-to-first-token across a 5-turn conversation.

    .venv/bin/python benchmarks/bench_engine.py [--model 1.3b|7b] [--dtype bf16] [--turns 5] [--skip-hf]

Each implementation runs in its own subprocess so its peak memory (max RSS, or CUDA peak) is its own. Prints
one table; copy it into benchmarks/RESULTS.md with the machine line. Not part of the test suite.

What is measured, per implementation:
- image encode: seconds for one image through the vision tower(s) and adaptor;
- prefill: tokens/s of a text prompt (--prefill-tokens) through the language model;
- decode: tokens/s of one-token steps after a --context-token random KV cache;
- TTFT: seconds from "answer the last user turn" to the first token, for turn 1 and turn N of a conversation with one
  new image per turn: ours with its cross-turn KV/embedding reuse, and ours recomputing everything (the baseline
  that transformers' generate() amounts to).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.kernels.bf16 import prepare_cpu_bf16  # noqa: E402
from engine.demo import DEMO_DIR  # noqa: E402
from engine.tiny import TINY_CONFIG  # noqa: E402
from engine.layouts import to_community  # noqa: E402
from engine.loading import build_model, fill_random  # noqa: E402
from engine.model.config import VLConfig, deepseek_vl_1_3b, deepseek_vl_7b  # noqa: E402
from engine.quantize import quantize_language_model  # noqa: E402
from engine.runtime import DTYPES, model_bytes  # noqa: E402

PRESETS = {"1.3b": deepseek_vl_1_3b, "7b": deepseek_vl_7b, "tiny": lambda: VLConfig.from_official(TINY_CONFIG)}


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def random_pixels(config, n: int = 1) -> torch.Tensor:
    size = config.vision.input_size
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(n))


def random_kv(cache_update, config, context: int, dtype, device):
    lang = config.language
    head_dim = lang.hidden_size // lang.num_attention_heads
    g = torch.Generator().manual_seed(1)
    for layer in range(lang.num_hidden_layers):
        k, v = (torch.randn(1, lang.num_key_value_heads, context, head_dim, generator=g).to(device, dtype) for _ in range(2))
        cache_update(k, v, layer)


# ------------------------------------------------------------------ our engine
@torch.inference_mode()
def bench_ours(args, config, dtype, device) -> dict:
    from engine.chat import ChatSession
    from engine.processing import ImageProcessor, ImageProcessorConfig, VLChatProcessor
    from engine.runtime import Runtime
    from transformers import AutoTokenizer

    model = fill_random(build_model(config), dtype).to(device)
    backend = None
    if args.quantize:  # as Runtime.load does: int8 / NF4 kernels on the CPU, bitsandbytes on a GPU
        backend = quantize_language_model(model, args.quantize, dtype, device)
        model.to(device)
    if device.type == "cpu" and dtype == torch.bfloat16:
        prepare_cpu_bf16(model)  # as Runtime.load does
    lm = model.language_model
    impl = f"ours, {args.quantize} ({backend})" if args.quantize else "ours"
    result = {"impl": impl, "weights_gib": model_bytes(model) / 2**30}

    pixels = random_pixels(config)
    model.encode_images(pixels)  # warm-up
    result["encode_s"] = median_time(lambda: model.encode_images(pixels), args.repeat)

    ids = torch.randint(3, 1000, (1, args.prefill_tokens), device=device)
    result["prefill_tok_s"] = args.prefill_tokens / median_time(lambda: model(input_ids=ids, cache=lm.new_cache(), use_cache=True, logits_to_keep=1), args.repeat)

    cache = lm.new_cache()
    random_kv(cache.update, config, args.context, dtype, device)
    from engine.generation import step

    step(model, cache, 5)
    result["decode_tok_s"] = 1 / median_time(lambda: step(model, cache, 5), args.decode_steps)

    # A 5-turn conversation, one new image per turn (the demo tokenizer stands in for DeepSeek's: same template).
    image_config = ImageProcessorConfig(image_size=config.vision.input_size, do_normalize=not config.vision.hybrid,
                                        image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    processor = VLChatProcessor(AutoTokenizer.from_pretrained(str(DEMO_DIR)), ImageProcessor(image_config),
                                num_image_tokens=config.num_image_tokens)
    runtime = Runtime(model=model, processor=processor, config=config, directory=DEMO_DIR, name=args.model,
                      device=device, dtype=dtype, quantization=None)
    from engine.generation import SamplingParams
    from PIL import Image

    params = SamplingParams(max_new_tokens=args.answer_tokens)
    per_turn, full = [[] for _ in range(args.turns)], []
    # The same conversation --conversations times from a fresh session: each turn's TTFT is the median over
    # them, since one turn-1 figure on a shared machine varies by ±20%. Full recompute: the first time only.
    for conversation in range(args.conversations):
        session = ChatSession(runtime)
        for turn in range(args.turns):
            image = Image.new("RGB", (640, 480), (40 * turn, 255 - 40 * turn, 90))
            session.add_user(f"Turn {turn + 1}: what changed in this picture compared with the last one?", [image])
            session.answer(params)
            per_turn[turn].append(session.last_stats.ttft)
            if conversation == 0 and turn in (0, args.turns - 1):
                fresh = ChatSession(runtime)
                fresh.images = dict(session.images)
                fresh.turns = list(session.turns[:-1])
                fresh.answer(params)
                full.append(fresh.last_stats.ttft)
    reuse = [statistics.median(times) for times in per_turn]
    result.update(ttft_reuse=reuse, ttft_runs=per_turn, ttft_full=full,
                  prompt_tokens_last_turn=session.last_stats.prompt_tokens)
    result["peak_gib"] = peak_memory(device) / 2**30
    return result


# ------------------------------------------------------------------ transformers' classes, same weights
@torch.inference_mode()
def bench_hf(args, config, dtype, device) -> dict:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText, DynamicCache

    ours = fill_random(build_model(config), dtype)
    community_config, state = to_community(ours)
    del ours
    hf_config = AutoConfig.for_model(**community_config)
    with init_empty_weights():  # parameters on meta; buffers (the rotary table) real
        model = AutoModelForImageTextToText.from_config(hf_config, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    model.to(device).eval()
    result = {"impl": "transformers", "weights_gib": model_bytes(model) / 2**30}

    pixels = random_pixels(config).to(device, dtype)
    features = (lambda: model.model.get_image_features(pixel_values=pixels)) if not config.vision.hybrid else \
        (lambda: model.model.get_image_features(pixel_values=pixels, high_res_pixel_values=pixels))
    features()
    result["encode_s"] = median_time(features, args.repeat)

    ids = torch.randint(3, 1000, (1, args.prefill_tokens), device=device)
    result["prefill_tok_s"] = args.prefill_tokens / median_time(lambda: model(input_ids=ids, logits_to_keep=1), args.repeat)

    cache = DynamicCache(config=hf_config.text_config)
    random_kv(cache.update, config, args.context, dtype, device)

    def one_step():
        position = cache.get_seq_length()
        model(input_ids=torch.tensor([[5]], device=device), position_ids=torch.tensor([[position]], device=device),
              cache=cache, use_cache=True, logits_to_keep=1)

    one_step()
    result["decode_tok_s"] = 1 / median_time(one_step, args.decode_steps)
    result["peak_gib"] = peak_memory(device) / 2**30
    return result


# ------------------------------------------------------------------ driver
def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"


def table(results: list[dict], args) -> str:
    lines = [f"{args.model}, {args.dtype}, {args.device}; {machine()}",
             "",
             "| implementation | weights GiB | peak GiB | image encode s | prefill tok/s | decode tok/s |",
             "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['impl']} | {r['weights_gib']:.2f} | {r['peak_gib']:.2f} | {r['encode_s']:.2f} | "
                     f"{r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} |")
    ours = next((r for r in results if r["impl"].startswith("ours")), None)
    if ours:
        reuse, full = ours["ttft_reuse"], ours["ttft_full"]
        lines += ["", f"TTFT over a {args.turns}-turn conversation, one new image per turn "
                      f"({ours['prompt_tokens_last_turn']} prompt tokens at the last turn):", "",
                  "| | turn 1 s | turn %d s | turn %d / turn 1 |" % (args.turns, args.turns), "|---|---|---|---|",
                  f"| ours, KV + embedding reuse | {reuse[0]:.2f} | {reuse[-1]:.2f} | {reuse[-1] / reuse[0]:.2f}× |",
                  f"| full recompute | {full[0]:.2f} | {full[-1]:.2f} | {full[-1] / full[0]:.2f}× |",
                  "", f"per-turn TTFT with reuse (median of {len(ours['ttft_runs'][0])} conversations): "
                  + ", ".join(f"{t:.2f}" for t in reuse),
                  f"turn {args.turns} / turn 1 in each conversation: "
                  + ", ".join(f"{b / a:.2f}×" for a, b in zip(ours["ttft_runs"][0], ours["ttft_runs"][-1]))]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(PRESETS), default="1.3b")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--answer-tokens", type=int, default=8)
    parser.add_argument("--prefill-tokens", type=int, default=128)
    parser.add_argument("--context", type=int, default=600)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--conversations", type=int, default=3, help="repeat the TTFT conversation, take medians")
    parser.add_argument("--quantize", choices=["8bit", "4bit"], help="quantize our language model as --load-8bit/4bit do")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--child", choices=["ours", "transformers"])
    args = parser.parse_args()
    config, dtype, device = PRESETS[args.model](), DTYPES[args.dtype], torch.device(args.device)
    if args.child:
        run = bench_ours if args.child == "ours" else bench_hf
        print("RESULT " + json.dumps(run(args, config, dtype, device)), flush=True)
        return
    results = []
    for impl in ["ours"] + ([] if args.skip_hf else ["transformers"]):
        argv = [a for a in sys.argv[1:]] + ["--child", impl]
        out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"{impl} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(line.removeprefix("RESULT ")))
        print(f"{impl}: done", file=sys.stderr, flush=True)
    print(table(results, args))


if __name__ == "__main__":
    main()
