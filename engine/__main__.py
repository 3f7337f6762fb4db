"""Command line: `python -m engine chat|inspect|make-demo`. A thin shell over the library."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from .processing import ImageError

HELP = """Commands inside the chat:
  /image PATH   attach an image to your next message (repeat for several)
  /reset        start a new conversation
  /exit         quit (Ctrl-D works too)
Ctrl-C while an answer streams stops it; Ctrl-C at the prompt quits."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from .demo import DEMO_DIR

    parser.add_argument("--model", default=str(DEMO_DIR), help="checkpoint directory or hub id (default: the embedded demo)")
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument("--load-4bit", action="store_true",
                       help="4-bit-quantize the language model (CPU: NF4 with the native kernels, else PyTorch int4; "
                            "GPU: bitsandbytes NF4)")
    quant.add_argument("--load-8bit", action="store_true",
                       help="8-bit-quantize the language model (int8 kernels on CPU, bitsandbytes on GPU)")
    parser.add_argument("--quant-backend", choices=["auto", "bitsandbytes", "int8", "nf4", "int4"], default="auto",
                        help="who quantizes (default auto: the engine's int8/nf4 kernels on CPU, int4 for 4-bit "
                             "without native kernels, bitsandbytes on GPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: by device)")


def load_runtime(args):
    from .runtime import Runtime

    quantization = "4bit" if args.load_4bit else "8bit" if args.load_8bit else None

    def progress(stage, done, total):
        if done == total or done % 50 == 0:
            print(f"\rloading {stage}: {done}/{total}", end="", file=sys.stderr, flush=True)

    runtime = Runtime.load(args.model, device=args.device, dtype=args.dtype, quantization=quantization,
                           quant_backend=args.quant_backend, progress=progress)
    info = runtime.describe()
    print(f"\r{info['model']} on {info['device']} ({info['dtype']}, quantization {info['quantized_as']}, "
          f"{info['memory_bytes'] / 2**20:.0f} MiB; {info['backend']})", file=sys.stderr)
    if info["advice"]:
        print(f"note: {info['advice']}", file=sys.stderr)
    return runtime


def chat(args) -> int:
    from .chat import ChatSession, ContextOverflow
    from .generation import SamplingParams

    runtime = load_runtime(args)
    session = ChatSession(runtime, system_prompt=args.system_prompt)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens, seed=args.seed)
    pending = [path for path in args.image if _image_ok(path)]
    print(HELP, file=sys.stderr)
    while True:
        try:
            line = input(f"\nUser{f' [{len(pending)} image(s)]' if pending else ''}: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        text = line.strip()
        if text == "/exit":
            return 0
        if text == "/reset":
            session.reset()
            pending.clear()
            print("(new conversation)")
            continue
        if text.startswith("/image"):
            path = text.removeprefix("/image").strip()
            if _image_ok(path):
                pending.append(path)
            continue
        if not text and not pending:
            continue
        try:
            session.add_user(text, pending, reserve=min(params.max_new_tokens, 64))
        except (ContextOverflow, ValueError) as e:
            print(f"error: {e}\n(message not sent; its images were detached)")
            pending = []
            continue
        pending = []
        print("\nAssistant: ", end="", flush=True)
        _stream_with_ctrl_c(session, params)
        stats = session.last_stats
        print(f"\n[{stats.tokens} tokens, first after {stats.ttft:.2f}s, {stats.tokens_per_second:.1f} tok/s, "
              f"{stats.reused_tokens}/{stats.prompt_tokens} prompt tokens from cache, {stats.finish}]", file=sys.stderr)


def _image_ok(path: str) -> bool:
    """Check an image when it is attached, so a bad file never blocks the next message."""
    from .processing import load_image

    if not Path(path).is_file():
        print(f"no such file: {path!r}")
        return False
    try:
        load_image(path)
    except ImageError as e:
        print(f"error: {e}")
        return False
    return True


def _stream_with_ctrl_c(session, params) -> None:
    """Ctrl-C during the answer cancels it (the partial answer stays in the conversation)."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, lambda *_: session.cancel())
    try:
        for piece in session.stream(params):
            print(piece, end="", flush=True)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)


def inspect(args) -> int:
    import json

    import torch

    from . import kernels
    from .loading import build_model, read_config, resolve_directory
    from .model.config import deepseek_vl_1_3b, deepseek_vl_7b
    from .quantize import pick_backend
    from .runtime import estimate_bytes, pick_device

    presets = {"1.3b": deepseek_vl_1_3b, "7b": deepseek_vl_7b}
    config = presets[args.model]() if args.model in presets else read_config(resolve_directory(args.model))[0]
    model = build_model(config)  # meta device: nothing is allocated
    params = sum(p.numel() for p in model.parameters())
    parts = {name: sum(p.numel() for p in module.parameters()) for name, module in model.named_children()}
    report = {
        "parameters": params,
        "parts": parts,
        "vision": "SAM-B + SigLIP-L hybrid" if config.vision.hybrid else "SigLIP",
        "input_size": config.vision.input_size,
        "image_tokens": config.num_image_tokens,
        "context": config.max_context,
        "memory_gib": {name: round(estimate_bytes(config, dtype, q) / 2**30, 2)
                       for name, dtype, q in (("fp32", torch.float32, None), ("bf16", torch.bfloat16, None),
                                              ("8bit", torch.bfloat16, "8bit"), ("4bit", torch.bfloat16, "4bit"))},
    }
    # What would run each kind of operation on this machine, as `chat` would load it by default.
    device = pick_device(None)
    dtypes = {"bf16": (torch.bfloat16, None), "8bit": (torch.bfloat16, "8bit"), "4bit": (torch.bfloat16, "4bit")}
    if device.type == "cpu":
        dtypes = {"fp32": (torch.float32, None), **dtypes}
    report["device"] = str(device)
    report["native_kernels"] = kernels.native.status() if device.type == "cpu" else "not used off the CPU"
    report["backends"] = {}
    for name, (dtype, quantization) in dtypes.items():
        backend = pick_backend(quantization, device) if quantization else None
        report["backends"][name] = {"summary": kernels.summary(device, dtype, quantization, backend),
                                    **kernels.backends(device, dtype, quantization, backend)}
    print(json.dumps(report, indent=1))
    return 0


def make_demo(args) -> int:
    from .demo import build_demo

    print(build_demo(args.directory, seed=args.seed))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine", description="DeepSeek-VL engine")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="interactive multimodal chat in the terminal")
    add_model_arguments(p)
    p.add_argument("--image", action="append", default=[], help="image for the first message (repeatable)")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(run=chat)

    p = sub.add_parser("inspect", help="architecture, parameter count, memory need and the kernels that would run, "
                                       "without loading weights")
    p.add_argument("--model", default="1.3b", help="'1.3b', '7b', a checkpoint directory or hub id")
    p.set_defaults(run=inspect)

    p = sub.add_parser("make-demo", help="rebuild the embedded demo model")
    p.add_argument("directory", nargs="?", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=make_demo)

    args = parser.parse_args(argv)
    if getattr(args, "directory", "") is None:
        from .demo import DEMO_DIR

        args.directory = DEMO_DIR
    from .loading import LoadError

    try:
        return args.run(args)
    except (LoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
