"""llama.cpp vs our engine (and transformers) on the same random 1.3B LLaMA: prefill and decode, one table.

The deepseek-vl-1.3b language model's architecture with random bf16 weights (benchmarks/bench_decode.py's
`build`, seeded) is written as GGUF (F16 and BF16, with gguf's GGUFWriter), quantized with llama.cpp's
llama-quantize (Q8_0, Q4_0, Q4_K_M) and timed with llama-bench; the same weights are timed in our engine
(bf16, --load-8bit's int8, --load-4bit's NF4, --quant-backend int4) and transformers (bf16).

    .venv/bin/python benchmarks/bench_llamacpp.py [--context 600] [--gen 64] [--threads 2] [--reps 2] [--smoke]
        [--rounds N] [--kinds BF16,Q8_0]

--rounds N measures every row N times, llama.cpp and ours back to back within a row (alternating which goes
first), and reports medians, of the per-round ratios too: on a shared machine whose speed swings by a third within
minutes, a ratio taken between measurements minutes apart is mostly the swing. --kinds picks rows by llama.cpp type.
The last column is each row's prefill against llama.cpp's F16 prefill of the same round (issue 14's prefill goal,
≥ 0.9, is against F16 for every precision); it needs the F16 row among --kinds.

What is measured, per row:
- prefill: tokens/s of one --context-token prompt through the LM from an empty cache. llama.cpp:
  `llama-bench -p 600 -n 0`; ours: the LM forward the chat's prefill runs (`cache=new_cache(), use_cache=True,
  logits_to_keep=1`, as bench_engine.py times it); transformers: the same call with a fresh DynamicCache.
- decode: tokens/s of one-token steps after a --context-token KV cache. llama.cpp: `llama-bench -p 0 -n 64
  -d 600` (64 tokens after filling 600); ours and transformers: bench_decode.py's `Decoder` on its random
  600-token caches, --steps steps after --warmup.
llama.cpp runs with -t --threads, torch with set_num_threads(--threads). llama-quantize keeps its defaults
(Q8_0 keeps the output matrix in Q8_0, Q4_0 and Q4_K_M make it Q6_K; ours stores it as int8 rows in the 8-bit
and 4-bit rows, as the engine's CPU backends do by default, and in bf16 in the bf16 row).

llama.cpp comes from benchmarks/setup_llamacpp.sh (binaries under .bench-cache/llama.cpp/build/bin, or
--llama-cpp DIR); without it the llama.cpp columns say so and the rest still runs. The GGUFs go to
--gguf-dir (default .bench-cache/gguf) and are deleted afterwards unless --keep-gguf.

--smoke: a tiny LLaMA (hidden 256 so every llama.cpp type, Q4_K's 256-blocks included, applies as it does
to the real one; 2 layers, vocab 512) through the whole path in seconds. --gguf-only: write the GGUFs, stop.

Not part of the test suite (tests/test_bench_llamacpp.py checks the GGUF writing). Results go in
benchmarks/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import gguf  # noqa: E402

from benchmarks.bench_decode import (CONFIG, Decoder, build, cpu_name, filled_caches,  # noqa: E402
                                     prefill as prefill_ours, quantized_decoder, round_robin, sharing)
from benchmarks.bench_engine import median_time  # noqa: E402
from engine.kernels import native  # noqa: E402
from engine.kernels.bf16 import prepare_cpu_bf16  # noqa: E402
from engine.kernels.quant import Int4Linear, Int8Linear, NF4Linear  # noqa: E402

CACHE = REPO / ".bench-cache"
LLAMA_CPP_BIN = CACHE / "llama.cpp" / "build" / "bin"
NOT_BUILT = "not built (run benchmarks/setup_llamacpp.sh)"
SMOKE_CONFIG = dict(CONFIG, vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)
QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_K_M")  # made with llama-quantize from the BF16 file


# ------------------------------------------------------------------ GGUF
def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's q/k rows as llama.cpp's llama architecture wants them (as convert_hf_to_gguf.py does): HF rotates
    the two halves of each head (rotate_half), llama.cpp adjacent pairs, so each head's rows are interleaved."""
    head_half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, 2, head_half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def vocabulary(size: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style ("llama") vocabulary of `size` tokens, which llama.cpp needs to load a model but
    llama-bench never uses for text: <unk>, <s>, </s>, the 256 byte tokens, then distinct filler pieces."""
    T = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256
    if size < len(tokens):
        raise ValueError(f"a vocabulary needs at least {len(tokens)} tokens, got {size}")
    tokens += [f"\u2581t{i}" for i in range(size - len(tokens))]
    types += [T.NORMAL] * (size - len(types))
    scores = [0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(size - 259)]
    return tokens, scores, [int(t) for t in types]


def gguf_tensors(state: dict[str, torch.Tensor], config: dict, ftype: str):
    """(GGUF name, numpy array, raw GGML type or None) per tensor, in the order they are written; arrays are
    made one at a time (an F16 copy of the 1.3B is 2.7 GB). Norms stay F32, as llama.cpp's converter writes them."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    for hf_name, tensor in state.items():
        if "rotary_emb" in hf_name:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        if hf_name.endswith("q_proj.weight"):
            tensor = permute_qk(tensor, config["num_attention_heads"])
        elif hf_name.endswith("k_proj.weight"):
            tensor = permute_qk(tensor, config["num_key_value_heads"])
        if tensor.ndim == 1:
            yield name, tensor.float().numpy(), None
        elif ftype == "F16":
            yield name, tensor.to(torch.float16).numpy(), None
        else:  # BF16: numpy has no bfloat16; the same bits as int16, typed by raw_dtype
            yield name, tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy(), gguf.GGMLQuantizationType.BF16


def write_gguf(path: Path, state: dict[str, torch.Tensor], config: dict, ftype: str) -> Path:
    """The LM as a llama-architecture GGUF, F16 or BF16, streamed tensor by tensor."""
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name("random deepseek-vl LM (benchmark)")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type({"F16": gguf.LlamaFileType.MOSTLY_F16, "BF16": gguf.LlamaFileType.MOSTLY_BF16}[ftype])
    tokens, scores, types = vocabulary(config["vocab_size"])
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    # Tensor infos first (they need only shapes and sizes), then the data, one array alive at a time.
    for name, array, raw in gguf_tensors(state, config, ftype):
        writer.add_tensor_info(name, array.shape, array.dtype, array.nbytes, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, array, _ in gguf_tensors(state, config, ftype):
        writer.write_tensor_data(array)
    writer.close()
    return path


# ------------------------------------------------------------------ llama.cpp
def run_checked(cmd: list[str]) -> subprocess.CompletedProcess | None:
    """Run a llama.cpp tool; on failure print its command and the end of its output and return None."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"FAILED ({done.returncode}): {' '.join(cmd)}\n{(done.stdout + done.stderr)[-3000:]}", flush=True)
        return None
    return done


def quantize(bin_dir: Path, source: Path, kind: str, threads: int) -> Path | None:
    out = source.with_name(source.name.replace("-BF16.gguf", f"-{kind}.gguf"))
    return out if run_checked([str(bin_dir / "llama-quantize"), str(source), str(out), kind, str(threads)]) else None


def llama_bench(bin_dir: Path, model: Path, args, prompt: int, gen: int, depth: int) -> dict | None:
    """llama-bench's JSON record of one test (tokens/s in avg_ts)."""
    done = run_checked([str(bin_dir / "llama-bench"), "-m", str(model), "-p", str(prompt), "-n", str(gen),
                        "-d", str(depth), "-t", str(args.threads), "-r", str(args.reps), "-o", "json"])
    if done is None:
        return None
    records = json.loads(done.stdout)
    return records[0] if len(records) == 1 else None


def llama_cpp_version(bin_dir: Path) -> str:
    version = bin_dir.parents[1] / "VERSION"  # written by setup_llamacpp.sh
    if version.is_file():
        return f"llama.cpp from llama-cpp-python {version.read_text().strip()}"
    return f"llama.cpp in {bin_dir}"


# ------------------------------------------------------------------ ours and transformers
@torch.inference_mode()
def prefill_hf(model, ids: torch.Tensor):
    model(input_ids=ids, cache=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)


def prefill_tok_s(prefill, model, args) -> float:
    g, high = torch.Generator().manual_seed(3), min(1000, model.config.vocab_size)
    prefill(model, torch.randint(3, high, (1, 16), generator=g))  # warm-up: kernels built, buffers sized
    ids = torch.randint(3, high, (1, args.context), generator=g)
    return args.context / median_time(lambda: prefill(model, ids), args.reps)


def decode_tok_s(decoders: dict[str, Decoder], args) -> dict[str, float]:
    """Median tokens/s per decoder, timed one step each in turn (as bench_decode.py: all see the same drift)."""
    times = round_robin(decoders, args.warmup, args.steps)
    return {name: 1 / statistics.median(t) for name, t in times.items()}


# ------------------------------------------------------------------ driver
def measure_row(precision, kind, ours_row, with_hf, llama_first, args, files, have_llama, ours_models, caches,
                hf, hf_cache) -> dict:
    """One round of one row: llama.cpp's prefill and decode, ours (and transformers') prefill and decode."""
    r = {"precision": precision, "kind": kind, "ours": ours_row[0] if ours_row else "-"}

    def llama():
        if not have_llama:
            r["lc_prefill"] = r["lc_decode"] = NOT_BUILT
        elif files.get(kind) is None:
            r["lc_prefill"] = r["lc_decode"] = "failed (see above)"
        else:
            pp = llama_bench(args.llama_cpp, files[kind], args, args.context, 0, 0)
            tg = llama_bench(args.llama_cpp, files[kind], args, 0, args.gen, args.context)
            r["lc_prefill"] = pp["avg_ts"] if pp else "failed (see above)"
            r["lc_decode"] = tg["avg_ts"] if tg else "failed (see above)"
            r["lc_info"] = pp or tg

    def engines():
        decoders = {}
        if ours_row:
            model = ours_models[ours_row[1]]
            r["ours_prefill"] = prefill_tok_s(prefill_ours, model, args)
            decoders["ours"] = Decoder(model, caches[ours_row[1]])
        if with_hf and not args.skip_hf:
            r["hf_prefill"] = prefill_tok_s(prefill_hf, hf, args)
            decoders["hf"] = Decoder(hf, hf_cache)
        speeds = decode_tok_s(decoders, args)
        r["ours_decode"], r["hf_decode"] = speeds.get("ours"), speeds.get("hf")

    for part in (llama, engines) if llama_first else (engines, llama):
        part()
    return r


def combine(rounds: list[dict]) -> dict:
    """A row's rounds as one: the median of each speed, the median (and range) of the per-round ratios."""
    r = {k: rounds[0][k] for k in ("precision", "kind", "ours")}
    r["lc_info"] = next((x["lc_info"] for x in rounds if x.get("lc_info")), None)
    for key in ("lc_prefill", "lc_decode", "ours_prefill", "ours_decode", "hf_prefill", "hf_decode"):
        values = [x.get(key) for x in rounds]
        numbers = [v for v in values if isinstance(v, float)]
        r[key] = statistics.median(numbers) if numbers and len(numbers) == len(values) else values[0]
    for phase in ("prefill", "decode"):
        ratios = [x[f"ours_{phase}"] / x[f"lc_{phase}"] for x in rounds
                  if isinstance(x.get(f"ours_{phase}"), float) and isinstance(x.get(f"lc_{phase}"), float)]
        r[f"{phase}_ratio"] = ratios
    r["prefill_vs_f16"] = [x["ours_prefill_vs_f16"] for x in rounds if "ours_prefill_vs_f16" in x]
    return r


def size(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"


def fmt(value, digits: int = 1) -> str:
    return value if isinstance(value, str) else "-" if value is None else f"{value:.{digits}f}"


def ratio(ratios: list[float]) -> str:
    """The median per-round ratio, with its range when there were several rounds."""
    if not ratios:
        return "-"
    spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
    return f"{statistics.median(ratios):.2f}{spread}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=600, help="prompt length of prefill, and the KV cache of decode")
    ap.add_argument("--gen", type=int, default=64, help="tokens llama-bench decodes per repetition")
    ap.add_argument("--steps", type=int, default=20, help="timed decode steps of ours and transformers")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2, help="prefill repetitions (llama-bench -r)")
    ap.add_argument("--rounds", type=int, default=1, help="times every row is measured; medians are reported")
    ap.add_argument("--kinds", type=lambda v: v.split(","), default=None,
                    help="only these llama.cpp rows, e.g. BF16,Q8_0 (default: all)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="llama-bench -t and torch threads")
    ap.add_argument("--llama-cpp", type=Path, default=Path(os.environ.get("LLAMACPP_BIN", LLAMA_CPP_BIN)),
                    help="folder with llama-bench and llama-quantize")
    ap.add_argument("--gguf-dir", type=Path, default=CACHE / "gguf")
    ap.add_argument("--keep-gguf", action="store_true", help="leave the GGUF files in --gguf-dir")
    ap.add_argument("--skip-hf", action="store_true", help="no transformers columns (its bf16 prefill is slow)")
    ap.add_argument("--smoke", action="store_true", help="a tiny LLaMA through the whole path")
    ap.add_argument("--gguf-only", action="store_true", help="write the F16 and BF16 GGUFs, then stop")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config, tag = (SMOKE_CONFIG, "smoke") if args.smoke else (CONFIG, "lm-1.3b")

    load_start = os.getloadavg()
    started = datetime.datetime.now()
    hf, ours = build(config=config)
    have_llama = all((args.llama_cpp / tool).is_file() for tool in ("llama-bench", "llama-quantize"))

    files: dict[str, Path | None] = {}
    if have_llama or args.gguf_only:
        args.gguf_dir.mkdir(parents=True, exist_ok=True)
        state = hf.state_dict()
        for ftype in ("F16", "BF16"):
            t = time.perf_counter()
            files[ftype] = write_gguf(args.gguf_dir / f"{tag}-{ftype}.gguf", state, config, ftype)
            print(f"wrote {files[ftype]} ({size(files[ftype])}, {time.perf_counter() - t:.0f} s)", flush=True)
        del state
        if args.gguf_only:
            return
        for kind in QUANT_TYPES:
            if args.kinds and kind not in args.kinds:
                continue
            t = time.perf_counter()
            files[kind] = quantize(args.llama_cpp, files["BF16"], kind, args.threads)
            if files[kind]:
                print(f"quantized {files[kind]} ({size(files[kind])}, {time.perf_counter() - t:.0f} s)", flush=True)

    # Our models, as Runtime sets them up on this CPU: bf16 as prepare_cpu_bf16 does for the CPU's instructions;
    # the quantized ones as --load-8bit / --load-4bit / --quant-backend int4 give.
    bf16 = sharing(ours)
    prepare_cpu_bf16(bf16)
    ours_models = {"bf16": bf16, "int8": quantized_decoder(sharing(ours), Int8Linear),
                   "nf4": quantized_decoder(sharing(ours), NF4Linear),
                   "int4": quantized_decoder(sharing(ours), Int4Linear)}
    hf_cache, our_caches = filled_caches(hf.config, args.context, torch.bfloat16, len(ours_models))
    caches = dict(zip(ours_models, our_caches))
    # (precision, llama.cpp type, ours: (label, model key) or None, with transformers)
    rows = [("bf16", "BF16", ("bf16", "bf16"), True),
            ("16-bit", "F16", None, False),
            ("8-bit", "Q8_0", ("int8 (--load-8bit)", "int8"), False),
            ("4-bit", "Q4_0", ("nf4 (--load-4bit)", "nf4"), False),
            ("4-bit", "Q4_K_M", ("int4 (--quant-backend int4)", "int4"), False)]
    rows = [row for row in rows if not args.kinds or row[1] in args.kinds]
    # Each round times every row, llama.cpp and ours back to back (which goes first alternates), so a ratio is
    # taken between measurements seconds apart; the table gives medians over rounds, of the ratios too.
    rounds = []
    for n in range(args.rounds):
        for precision, kind, ours_row, with_hf in rows:
            print(f"== round {n + 1}/{args.rounds}, {precision}: llama.cpp {kind}, "
                  f"ours {ours_row[0] if ours_row else '-'}", flush=True)
            r = measure_row(precision, kind, ours_row, with_hf, llama_first=n % 2 == 0, args=args, files=files,
                            have_llama=have_llama, ours_models=ours_models, caches=caches, hf=hf, hf_cache=hf_cache)
            print("   " + ", ".join(f"{k} {fmt(r.get(k), 2)}" for k in ("lc_prefill", "ours_prefill", "lc_decode",
                                                                        "ours_decode")), flush=True)
            rounds.append({**r, "round": n})
    # Issue 14's prefill goal is against llama.cpp's F16 (its fastest prefill here), whatever our precision: each
    # row's prefill over the F16 row's of the same round.
    f16 = {r["round"]: r["lc_prefill"] for r in rounds if r["kind"] == "F16" and isinstance(r["lc_prefill"], float)}
    for r in rounds:
        if isinstance(r.get("ours_prefill"), float) and r["round"] in f16:
            r["ours_prefill_vs_f16"] = r["ours_prefill"] / f16[r["round"]]
    table = [combine([r for r in rounds if r["kind"] == row[1]]) for row in rows]

    if not args.keep_gguf:
        for path in files.values():
            if path:
                path.unlink(missing_ok=True)

    load_end = os.getloadavg()
    info = next((r["lc_info"] for r in table if r.get("lc_info")), None)
    if info:
        commit = info.get("build_commit")  # "unknown" when built from the sdist, which has no git history
        llama = (f"{llama_cpp_version(args.llama_cpp)}{'' if commit in (None, 'unknown') else f' ({commit})'}, "
                 f"llama-bench -t {args.threads} -r {args.reps}, prefill -p {args.context} -n 0, "
                 f"decode -p 0 -n {args.gen} -d {args.context}")
    else:
        llama = f"llama.cpp: {NOT_BUILT}" if not have_llama else "llama.cpp: every run failed"
    model = "smoke LLaMA (hidden 256, 2 layers, vocab 512)" if args.smoke else "deepseek-vl-1.3b LM"
    kernels = "yes" if native.kernels() is not None else native.status()
    print(f"\n{model}, random weights; {cpu_name()}, {os.cpu_count()} logical cores; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), native kernels: {kernels}; {started:%Y-%m-%d %H:%M}; "
          f"1-min load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end")
    print(llama)
    rounds = (f", medians over {args.rounds} rounds (each row: llama.cpp and ours back to back; ratio's range in "
              f"brackets)" if args.rounds > 1 else "")
    print(f"prefill: a {args.context}-token prompt; decode: one-token steps after {args.context} tokens "
          f"(ours/transformers: median of {args.steps} after {args.warmup} warm-up); tokens/s; ratios ours/llama.cpp"
          f"{rounds}\n")
    print("| precision | llama.cpp | ours | llama.cpp prefill tok/s | ours prefill tok/s | transformers prefill tok/s "
          "| llama.cpp decode tok/s | ours decode tok/s | transformers decode tok/s | prefill ours/llama.cpp "
          "| decode ours/llama.cpp | prefill ours/llama.cpp F16 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['precision']} | {r['kind']} | {r['ours']} | {fmt(r['lc_prefill'])} | {fmt(r.get('ours_prefill'))} "
              f"| {fmt(r.get('hf_prefill'))} | {fmt(r['lc_decode'], 2)} | {fmt(r.get('ours_decode'), 2)} "
              f"| {fmt(r.get('hf_decode'), 2)} | {ratio(r['prefill_ratio'])} | {ratio(r['decode_ratio'])} "
              f"| {ratio(r['prefill_vs_f16'])} |")


if __name__ == "__main__":
    main()
