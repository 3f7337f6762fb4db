"""Decode speed of the 1.3B DeepSeek-VL language model on this machine: transformers vs engine/model/llama.py.

Builds the real LM architecture (hidden 2048, 24 layers, vocab 102400) with random bf16 weights (nothing is
downloaded), fills a KV cache with a ~600-token context, then times one-token decode steps exactly as
engine/generation.py runs them. Both models share the same weight tensors, so only one copy (~3.3 GB) is held.

    .venv/bin/python benchmarks/bench_decode.py [--context 600] [--steps 40] [--profile] [--only hf|ours|kernels]

`--only kernels`: bf16, 8-bit and 4-bit each with and without the native kernels (as DSVL_NATIVE=0), no
transformers. Every engine row also gives the error of its decoder's weight products against fp32 ones.

Not part of the test suite. Results go in benchmarks/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import time

import torch
from accelerate import init_empty_weights
from transformers import DynamicCache, LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from engine.kernels import native
from engine.kernels.bf16 import upcast_matmuls
from engine.kernels.quant import Int4Linear, Int8Linear, NF4Linear
from engine.model.llama import KVCache, LlamaForCausalLM

# deepseek-vl-1.3b-chat's language_config
CONFIG = dict(vocab_size=102400, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
              num_key_value_heads=16, max_position_embeddings=16384, rms_norm_eps=1e-6,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)


def build(dtype=torch.bfloat16, config: dict = CONFIG):
    """(HF model, ours) sharing one set of random weights (seeded: the same weights every time)."""
    cfg = LlamaConfig(**config)
    with init_empty_weights():  # parameters and buffers on the meta device: nothing allocated
        hf = HFLlama(cfg)
    hf.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.data = p.data.to(dtype)
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
        rotary = hf.model.rotary_emb  # to_empty left its buffer uninitialised
        rotary.inv_freq.copy_(rotary.compute_default_rope_parameters(cfg)[0])
    with torch.device("meta"):
        ours = LlamaForCausalLM(cfg)
    ours.load_state_dict(hf.state_dict(), strict=True, assign=True)  # the same tensors, no copy
    return hf.eval(), ours.eval()


def sharing(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """Another instance of our model holding the same weight tensors (modules can then be swapped per copy)."""
    with torch.device("meta"):
        twin = LlamaForCausalLM(model.config)
    twin.load_state_dict(model.state_dict(), strict=True, assign=True)
    return twin.eval()


def quantized_decoder(model: LlamaForCausalLM, kind, int8_head: bool = True) -> LlamaForCausalLM:
    """What `--load-8bit` (kind=Int8Linear) or `--load-4bit` (NF4Linear) give on a CPU: quantized decoder
    linears, the lm_head as int8 rows (int8_head=False: in bf16, as with --full-output-layer); embeddings bf16."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                setattr(parent, name, kind(child))
    if int8_head:
        model.lm_head = Int8Linear(model.lm_head)
    upcast_matmuls(model)
    return model


def filled_caches(cfg: LlamaConfig, context: int, dtype, n_ours: int):
    """The same random ~context-token K/V in an HF DynamicCache and in n_ours of our KVCaches."""
    hf_cache, our_caches = DynamicCache(config=cfg), [KVCache() for _ in range(n_ours)]
    D = cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(1)
    for i in range(cfg.num_hidden_layers):
        k = torch.randn(1, cfg.num_key_value_heads, context, D, generator=g).to(dtype)
        v = torch.randn(1, cfg.num_key_value_heads, context, D, generator=g).to(dtype)
        hf_cache.update(k, v, i)
        for cache in our_caches:
            cache.update(k, v, i)
    return hf_cache, our_caches


@torch.inference_mode()
def prefill(model, ids: torch.Tensor):
    """The chat's prefill call: a prompt [1, T] through the LM from an empty cache, logits of the last position."""
    model(input_ids=ids, cache=model.new_cache(), use_cache=True, logits_to_keep=1)


def step(model, cache, token: int):
    pos = cache.get_seq_length()
    out = model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[pos]]), cache=cache, use_cache=True)
    return out.logits[0, -1]


class Decoder:
    """One model decoding greedily from its own cache, one timed step at a time."""

    def __init__(self, model, cache, use_native: bool = True):
        self.model, self.cache = model, cache
        self.kernels = contextlib.nullcontext if use_native else native.disabled
        with torch.inference_mode(), self.kernels():
            self.first = self.logits = step(model, cache, 1)

    @torch.inference_mode()
    def __call__(self):
        with self.kernels():
            self.logits = step(self.model, self.cache, int(self.logits.float().argmax()))  # as the greedy Sampler


def decode_modules(model) -> list[torch.nn.Module]:
    """The 24 x 7 layer linears one decode step reads, in order."""
    return [m for layer in model.model.layers
            for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                      layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]


def product_error(model, reference, use_native: bool) -> float:
    """How far `model`'s 168 decoder products are from fp32 ones with `reference`'s (unquantized) weights, one
    random bf16 row each: sqrt(Σ|y - y_fp32|²) / sqrt(Σ|y_fp32|²). Quantization error plus bf16 rounding."""
    g = torch.Generator().manual_seed(2)
    error = norm = 0.0
    with torch.inference_mode(), (contextlib.nullcontext() if use_native else native.disabled()):
        for module, original in zip(decode_modules(model), decode_modules(reference)):
            x = torch.randn(1, original.in_features, generator=g).to(torch.bfloat16)
            exact = x.float() @ original.weight.float().T
            error += float((module(x).float() - exact).pow(2).sum())
            norm += float(exact.pow(2).sum())
    return (error / norm) ** 0.5


def decode_weights(model) -> list[torch.Tensor]:
    """The matrices one decode step reads, in order: 24 x 7 layer weights, then the lm_head."""
    return [m.weight for m in decode_modules(model)] + [model.lm_head.weight]


def matmuls(model):
    """The floor: only the 169 weight matrix-vector products of a decode step (same tensors, same order)."""
    weights = decode_weights(model)
    inputs = {w.shape[1]: torch.randn(1, w.shape[1]).to(w.dtype) for w in weights}  # [1, in]
    return lambda: [torch.nn.functional.linear(inputs[w.shape[1]], w) for w in weights]


def native_matmuls(model):
    """The same 169 products through the native bf16 kernel (engine/kernels/native)."""
    weights = [native.Weight(native.BF16, w, *w.shape) for w in decode_weights(model)]
    inputs = {w.cols: torch.randn(1, w.cols).to(torch.bfloat16) for w in weights}
    return lambda: [native.gemv(inputs[w.cols], [w]) for w in weights]


def reads(model):
    """A memory-bandwidth yardstick: summing the same weights once (read once, float32 accumulation)."""
    weights = decode_weights(model)
    return lambda: [w.sum() for w in weights]


def profile(decoder: Decoder, label: str, steps: int = 5):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            decoder()
    print(f"\n--- {label}: {steps} decode steps")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def round_robin(runs: dict, warmup: int, steps: int) -> dict[str, list[float]]:
    """Seconds of each call after `warmup`, one call of each in turn: the machine's load drifts, and this way
    every row sees the same drift."""
    results: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(warmup + steps):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            if i >= warmup:
                results[name].append(time.perf_counter() - t)
    return results


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=600)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default)")
    ap.add_argument("--profile", action="store_true", help="then print torch.profiler tables of 5 more steps")
    ap.add_argument("--only", choices=["hf", "ours", "kernels"], default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()  # this benchmark itself adds ~2 to the load average once it runs
    hf, ours = build()
    ours_native = sharing(ours)
    upcast_matmuls(ours_native)  # what Runtime does for bf16 on a CPU without bf16 instructions
    int8 = quantized_decoder(sharing(ours), Int8Linear)
    nf4 = quantized_decoder(sharing(ours), NF4Linear)
    int4 = quantized_decoder(sharing(ours), Int4Linear)
    int8_bf16_head = quantized_decoder(sharing(ours), Int8Linear, int8_head=False)
    nf4_bf16_head = quantized_decoder(sharing(ours), NF4Linear, int8_head=False)
    have_native = native.kernels() is not None
    if not have_native:
        print(f"native kernels not used: {native.status()}")
    # name: (model, uses the native kernels); the rows without them run as under DSVL_NATIVE=0
    engine_rows = {
        "engine, native GEMV + attention (the default)": (ours_native, True),
        "engine, PyTorch kernels only (DSVL_NATIVE=0)": (ours, False),
        "engine, --load-8bit (int8 decoder, int8 lm_head)": (int8, True),
        "engine, --load-8bit --full-output-layer (bf16 lm_head)": (int8_bf16_head, True),
        "engine, --load-8bit, DSVL_NATIVE=0 (torch int8)": (int8, False),
        "engine, --load-4bit (nf4 decoder, int8 lm_head)": (nf4, True),
        "engine, --load-4bit --full-output-layer (bf16 lm_head)": (nf4_bf16_head, True),
        "engine, --load-4bit, DSVL_NATIVE=0 (torch int4)": (int4, False),
        "engine, --quant-backend int4 (native attention etc.)": (int4, True),
    }
    engine_rows = {name: row for name, row in engine_rows.items() if have_native or not row[1]}
    hf_cache, our_caches = filled_caches(hf.config, args.context, torch.bfloat16, len(engine_rows))
    runs = {}
    if args.only != "kernels":
        runs["transformers LlamaForCausalLM + DynamicCache"] = Decoder(hf, hf_cache)
        runs["(floor: the 169 weight matmuls alone)"] = torch.inference_mode()(matmuls(ours))
        runs["(yardstick: Tensor.sum over the same weights)"] = torch.inference_mode()(reads(ours))
        if have_native:
            runs["(floor: the 169 products, native kernel)"] = torch.inference_mode()(native_matmuls(ours))
    for (name, (model, use_native)), cache in zip(engine_rows.items(), our_caches):
        runs[name] = Decoder(model, cache, use_native=use_native)
    errors = {name: product_error(model, ours, use_native) for name, (model, use_native) in engine_rows.items()}
    if args.only in ("hf", "ours"):
        runs = {name: run for name, run in runs.items() if (args.only == "hf") == name.startswith("transformers")}
    results = round_robin(runs, args.warmup, args.steps)
    decoders = {name: run for name, run in runs.items() if isinstance(run, Decoder)}
    reference = decoders.pop("transformers LlamaForCausalLM + DynamicCache", None)
    for name, run in decoders.items() if reference else ():
        b, a = reference.first.float(), run.first.float()
        error = float((a - b).abs().max() / b.abs().max())
        print(f"first-step logits, {name} vs HF: max |diff| / max |HF| = {error:.2e}")

    gigabytes = sum(w.numel() * w.element_size() for w in decode_weights(ours)) / 1e9
    def stored(m: torch.nn.Module) -> int:  # bytes of a layer as stored: packed weights and scales
        return sum(t.numel() * t.element_size() for t in [*m.buffers(), *m.parameters()])

    bytes_read = {name: sum(map(stored, [*decode_modules(run.model), run.model.lm_head])) / 1e9
                  for name, run in runs.items() if "--load" in name or "int4" in name}
    print(f"\nCPU: {cpu_name()}, {os.cpu_count()} logical cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {datetime.datetime.now():%Y-%m-%d %H:%M}, "
          f"1-min load average before the run {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")
    print(f"1.3B LM, bf16, context {args.context} (+ steps), {args.steps} timed steps each after {args.warmup} warm-up; "
          f"{gigabytes:.2f} GB of weights read per token in bf16; error: decoder products vs fp32\n")
    print(f"| {'implementation':<56} | s/token (median) | tokens/s | min s/token | weights GB/s | error vs fp32 |")
    print(f"|{'-' * 58}|------------------|----------|-------------|--------------|---------------|")
    for name, times in results.items():
        if times:
            med = statistics.median(times)
            gb = bytes_read.get(name, gigabytes)
            error = f"{errors[name]:.2%}" if name in errors else "-"
            print(f"| {name:<56} | {med:16.3f} | {1 / med:8.2f} | {min(times):11.3f} | {gb / med:12.1f} | {error:>13} |")

    if args.profile:
        for name, run in runs.items():
            if isinstance(run, Decoder):
                profile(run, name)


if __name__ == "__main__":
    main()
