"""Command line: `python -m engine chat|inspect|make-demo|train|eval|data`. A thin shell over the library."""

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
    parser.add_argument("--full-output-layer", action="store_true",
                        help="keep the output layer (lm_head) in the compute dtype when quantizing on a CPU "
                             "(default: int8 rows, about 0.2 GB less to read per token on the 1.3B)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: by device)")


def load_runtime(args):
    from .runtime import Runtime

    quantization = "4bit" if args.load_4bit else "8bit" if args.load_8bit else None

    def progress(stage, done, total):
        if done == total or done % 50 == 0:
            print(f"\rloading {stage}: {done}/{total}", end="", file=sys.stderr, flush=True)

    runtime = Runtime.load(args.model, device=args.device, dtype=args.dtype, quantization=quantization,
                           quant_backend=args.quant_backend, progress=progress,
                           quantize_output=False if args.full_output_layer else None)
    info = runtime.describe()
    print(f"\r{info['model']} on {info['device']} ({info['dtype']}, quantization {info['quantized_as']}, "
          f"{info['memory_bytes'] / 2**20:.0f} MiB; {info['backend']})", file=sys.stderr)
    if info["advice"]:
        print(f"note: {info['advice']}", file=sys.stderr)
    return runtime


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=None)


def sampling_params(args):
    from .generation import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens, seed=args.seed)


def chat(args) -> int:
    from .chat import ChatSession, ContextOverflow

    runtime = load_runtime(args)
    session = ChatSession(runtime, system_prompt=args.system_prompt)
    params = sampling_params(args)
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
    from pathlib import Path

    from .demo.build import FULL, SMOKE, make_demo as build

    print(build(Path(args.directory), SMOKE if args.smoke else FULL, seed=args.seed, install=args.install))
    return 0


# ------------------------------------------------------------------ training
# Flags that set a StageConfig field for every stage that runs (None: the stage's scaled Table 4 value).
STAGE_FLAGS = {"steps": int, "batch_size": int, "micro_batch_size": int, "lr": float, "warmup_steps": int,
               "seq_len": int, "epochs": float, "language_ratio": float, "modality_warmup_steps": int,
               "schedule": str, "clip": float, "weight_decay": float, "min_lr_ratio": float,
               "vision_lr_ratio": float}
RUN_FLAGS = ("model", "out", "data", "text_data", "seed", "save_every", "keep_checkpoints", "resume", "skip_bad",
             "lora", "qlora", "lora_rank", "lora_alpha", "bf16", "gradient_checkpointing", "fsdp", "optimizer", "device",
             "max_length", "eval_mc", "eval_text", "eval_every")
EXIT_STOPPED = 3  # the run was stopped on request after saving a checkpoint; --resume continues it


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory or hub id the first stage starts from")
    p.add_argument("--data", action="append", help="conversation data: DeepSeek JSONL, LLaVA JSON or messages JSONL (repeatable)")
    p.add_argument("--text-data", action="append", help='language data for stage 2: {"text": ...} JSONL or .txt (repeatable)')
    p.add_argument("--stages", help="stages to run, e.g. 1,2,3 or 3 (default 1,2,3)")
    p.add_argument("--out", help="run directory: stage-N/, final/, metrics.jsonl, checkpoints/")
    p.add_argument("--config", help="YAML file with any of these settings (flags win); stage_1: {...} for one stage")
    for name, kind in STAGE_FLAGS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                       help=f"override the preset {name} of every stage")
    p.add_argument("--no-grouping", dest="grouped", action="store_const", const=False, default=None,
                   help="mix modalities inside a batch instead of one modality per step")
    p.add_argument("--seed", type=int)
    p.add_argument("--save-every", type=int, help="resume checkpoint every N optimizer steps")
    p.add_argument("--keep-checkpoints", type=int, help="resume checkpoints kept per stage (default 2)")
    p.add_argument("--resume", action="store_true", default=None, help="continue the run in --out from its last checkpoint")
    p.add_argument("--skip-bad", action="store_true", default=None, help="leave out bad samples instead of refusing the data")
    tune = p.add_mutually_exclusive_group()
    tune.add_argument("--lora", action="store_true", default=None, help="LoRA adapters (merged on export)")
    tune.add_argument("--qlora", action="store_true", default=None, help="4-bit language model + LoRA (bitsandbytes)")
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--lora-alpha", type=int)
    p.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None)
    p.add_argument("--fsdp", action="store_true", default=None,
                   help="under torchrun / accelerate launch: shard weights, gradients and optimizer state (FSDP2)")
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit"])
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1")
    p.add_argument("--max-length", type=int, help="longest sample allowed (default: the model's context)")
    p.add_argument("--eval-mc", help="multi-choice PPL file evaluated at each stage end")
    p.add_argument("--eval-text", help="text perplexity file evaluated at each stage end")
    p.add_argument("--eval-every", type=int, help="also evaluate every N steps")
    p.add_argument("--no-memory-check", dest="check_memory", action="store_false", default=None)
    p.add_argument("--dry-run", action="store_true",
                   help="print the data report and each stage's settings and memory estimate as JSON; train nothing")


def run_config(args):
    """Settings from --config (YAML), then the flags on top."""
    from .training.loop import RunConfig

    settings: dict = {}
    if args.config:
        import yaml

        with open(args.config, encoding="utf-8") as f:
            settings = yaml.safe_load(f) or {}
        if not isinstance(settings, dict):
            raise ValueError(f"{args.config}: expected a mapping of settings")
    stage_overrides = {int(k.removeprefix("stage_")): v for k, v in settings.items() if str(k).startswith("stage_")}
    overrides = {k: settings[k] for k in STAGE_FLAGS.keys() | {"grouped", "pack", "answers_only"} if k in settings}
    fields = {k: settings[k] for k in RUN_FLAGS + ("stages", "check_memory") if k in settings}
    unknown = set(settings) - set(overrides) - set(fields) - {f"stage_{s}" for s in stage_overrides}
    if unknown:
        raise ValueError(f"{args.config}: unknown setting(s) {', '.join(sorted(unknown))}")
    for name in list(STAGE_FLAGS) + ["grouped"]:
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    for name in RUN_FLAGS + ("check_memory",):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.stages:
        fields["stages"] = [int(s) for s in args.stages.split(",") if s.strip()]
    if isinstance(fields.get("stages"), str):
        fields["stages"] = [int(s) for s in fields["stages"].split(",")]
    for key in ("data", "text_data"):
        if isinstance(fields.get(key), str):
            fields[key] = [fields[key]]
    missing = [k for k in ("model", "out") if not fields.get(k)]
    if missing or not fields.get("data") and not fields.get("text_data"):
        raise ValueError(f"train needs --model, --out and --data (missing: {', '.join(missing) or '--data'})")
    return RunConfig(**fields, overrides=overrides, stage_overrides=stage_overrides)


def train(args) -> int:
    from .training.data import DataError
    from .training.loop import TrainingError, train as run_training

    config = run_config(args)
    if args.dry_run:
        import json

        from .training.loop import plan

        try:
            print(json.dumps(plan(config), indent=1))
        except (DataError, TrainingError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    stop = threading.Event()

    def request_stop(*_):
        print("\nstopping after this step (a checkpoint is saved; --resume continues)", file=sys.stderr)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    try:
        result = run_training(config, log=lambda m: print(m, file=sys.stderr), stop=stop)
    except (DataError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.stopped:
        return EXIT_STOPPED
    print(result.final)
    return 0


def evaluate(args) -> int:
    import json

    from .training.evaluate import answers, evaluate as run_eval

    if not args.mc and not args.text and not args.qa:
        raise ValueError("eval needs --mc FILE, --text FILE and/or --qa FILE")
    runtime = load_runtime(args)
    result = run_eval(runtime.model, runtime.processor, mc=args.mc, text=args.text)
    if args.qa:
        result.update(answers(runtime, args.qa))
    print(json.dumps(result))
    return 0


def ask(args) -> int:
    """One question, one answer on stdout: the chat path the app uses, without the conversation."""
    from .chat import ChatSession

    for path in args.image:
        if not _image_ok(path):
            return 2
    runtime = load_runtime(args)
    session = ChatSession(runtime, system_prompt=args.system_prompt)
    params = sampling_params(args)
    session.add_user(args.question, args.image, reserve=min(params.max_new_tokens, 64))
    print(session.answer(params).strip())
    return 0


def data_check(args) -> int:
    import json

    from .loading import read_config, resolve_directory
    from .processing import VLChatProcessor
    from .training.data import check

    directory = resolve_directory(args.model)
    config = read_config(directory)[0]
    processor = VLChatProcessor.from_pretrained(directory, num_image_tokens=config.num_image_tokens)
    report = check(args.paths, args.text or [], processor, max_length=args.max_length or config.max_context)
    print(json.dumps(report.summary(), indent=1) if args.json else report.format())
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine", description="DeepSeek-VL engine")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="interactive multimodal chat in the terminal")
    add_model_arguments(p)
    p.add_argument("--image", action="append", default=[], help="image for the first message (repeatable)")
    add_sampling_arguments(p)
    p.set_defaults(run=chat)

    p = sub.add_parser("ask", help="one question (with images), one answer on stdout; greedy unless told")
    add_model_arguments(p)
    p.add_argument("--image", action="append", default=[], help="image to ask about (repeatable, in order)")
    p.add_argument("question")
    add_sampling_arguments(p)
    p.set_defaults(run=ask)

    p = sub.add_parser("inspect", help="architecture, parameter count, memory need and the kernels that would run, "
                                       "without loading weights")
    p.add_argument("--model", default="1.3b", help="'1.3b', '7b', a checkpoint directory or hub id")
    p.set_defaults(run=inspect)

    p = sub.add_parser("make-demo", help="rebuild the embedded demo model from nothing: data, tokenizer, "
                                         "pretraining, stages 1-3, evaluation, model card (about an hour and a half on 2 cores)")
    p.add_argument("directory", nargs="?", default="runs/make-demo", help="output (default runs/make-demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a tiny budget that proves the path in about a minute")
    p.add_argument("--install", action="store_true", help="replace assets/demo-model/ with the result")
    p.set_defaults(run=make_demo)

    p = sub.add_parser("train", help="the paper's three-stage training recipe on your data")
    add_train_arguments(p)
    p.set_defaults(run=train)

    p = sub.add_parser("eval", help="multi-choice PPL, text perplexity and answer accuracy of a checkpoint "
                                    "(one JSON object)")
    add_model_arguments(p)
    p.add_argument("--mc", help='multi-choice JSONL: {"images", "question", "options", "answer"}')
    p.add_argument("--text", help='text JSONL ({"text": ...}) or .txt')
    p.add_argument("--qa", help='questions JSONL: {"kind", "images", "question", "expected", "rivals"}; '
                                'greedy answers scored per kind')
    p.set_defaults(run=evaluate)

    p = sub.add_parser("data", help="training data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("check", help="report samples, token lengths, image sizes and every problem (file:line)")
    p.add_argument("paths", nargs="+", help="conversation files (DeepSeek JSONL, LLaVA JSON, messages JSONL)")
    p.add_argument("--text", action="append", help="text-only data file (repeatable)")
    from .demo import DEMO_DIR

    p.add_argument("--model", default=str(DEMO_DIR), help="whose tokenizer counts tokens (default: the demo model)")
    p.add_argument("--max-length", type=int, help="longest sample allowed (default: the model's context)")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(run=data_check)

    args = parser.parse_args(argv)
    from .loading import LoadError

    try:
        return args.run(args)
    except (LoadError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
