"""`python -m engine make-demo`: the demo model rebuilt from nothing with fixed seeds.

1. Generate the shapes world: captions, conversations, text, text-only SFT, held-out questions and multi-choice.
2. Train the byte-level BPE tokenizer on that text (DeepSeek's special tokens and template).
3. Pretrain the tiny SigLIP tower and the tiny LLM (`pretrain.py`): the parts the paper starts from.
4. Run the paper's stages 1, 2 and 3 through `python -m engine train` (one run, each stage from the last).
5. Evaluate `final/` (answer accuracy per question kind, multi-choice PPL, text perplexity) and run the paper's
   stage-2 ablations at this scale (language share 0 % vs 70 %, modality warm-up, grouped vs mixed steps).
6. Write the model card, and the log and metrics beside it, into the output directory.

`Budget` sizes everything; FULL made the committed model, SMOKE proves the path end to end in CI in a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..loading import save_pretrained
from ..model.config import VLConfig
from ..model.vlm import DeepSeekVL
from ..processing import DEFAULT_SYSTEM_PROMPT, VLChatProcessor, build_byte_level_tokenizer
from . import DEMO_DIR, EXAMPLES_DIR, pretrain, world

VOCAB_SIZE = 1536
IMAGE_SIZE, PATCH = 256, 32  # 8 x 8 = 64 image tokens: cheap enough to train on two cores


def demo_config(vocab_size: int = VOCAB_SIZE) -> dict:
    """The official config.json layout (SigLIP-only, like the 1.3B) at demo width."""
    return {
        "model_type": "multi_modality",
        "architectures": ["MultiModalityCausalLM"],
        "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision", "params": {
            "model_name": "siglip_large_patch16_384", "image_size": IMAGE_SIZE, "patch_size": PATCH,
            "select_feature": "same", "select_layer": -1, "width": 128, "layers": 4, "heads": 4, "mlp_ratio": 4}},
        "aligner_config": {"cls": "MlpProjector", "model_type": "aligner",
                           "params": {"projector_type": "mlp_gelu", "depth": 2, "input_dim": 128, "n_embed": 192}},
        "language_config": {"model_type": "llama", "hidden_size": 192, "intermediate_size": 512,
                            "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 4,
                            "vocab_size": vocab_size, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
                            "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    }


PREPROCESSOR = {"image_size": IMAGE_SIZE, "min_size": 14, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                "do_normalize": True, "image_processor_type": "VLMImageProcessor"}


def initial_model(seed: int) -> DeepSeekVL:
    """The demo's architecture before any training: matrices, position embeddings and latents N(0, 0.02)."""
    torch.manual_seed(seed)
    model = DeepSeekVL(VLConfig.from_official(demo_config()))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith(("pos_embed", "latent")):
                p.normal_(0.0, 0.02)
    return model


@dataclass(frozen=True)
class Budget:
    captions: int = 3000
    conversations: int = 24000
    text: int = 3000
    text_sft: int = 1000
    eval_per_kind: int = 100
    mc: int = 60
    vision_steps: int = 9000
    vision_batch: int = 32
    described: int = 12000  # conversations with the images in words, for the LLM's pretraining
    lm_steps: int = 800
    lm_batch: int = 16
    lm_length: int = 128
    steps: tuple[int, int, int] = (400, 500, 1600)  # stages 1, 2, 3
    lrs: tuple[float, float, float] = (2e-3, 5e-4, 5e-4)
    # Stage 3 trains the tower too, at the LLM's rate here: it unlearns some shape (a linear probe on its features
    # read it at 0.96 before stage 3, 0.89 after, in build B), but build E at a tenth of the rate made the same 20
    # mistakes in 280 held-out questions (shape 92.5 % vs 87.5, count 75 vs 77.5), so the shipped model keeps 1.
    vision_lr_ratio: float = 1.0
    batch: int = 16
    micro_batch: int = 16
    ablation_steps: int = 100


FULL = Budget()
SMOKE = Budget(captions=24, conversations=48, text=40, text_sft=16, eval_per_kind=2, mc=6, vision_steps=3,
               vision_batch=4, described=20, lm_steps=3, lm_batch=4, lm_length=32, steps=(2, 3, 3), batch=4, micro_batch=4,
               ablation_steps=2)
TRAIN_ENV = {"OMP_NUM_THREADS": str(os.cpu_count() or 2)}


class Log:
    """Prints and appends to OUT/build.log, each line with the minutes since the start."""

    def __init__(self, path: Path):
        self.path, self.t0 = path, time.perf_counter()

    def __call__(self, message: str) -> None:
        line = f"[{(time.perf_counter() - self.t0) / 60:6.1f} min] {message}"
        print(line, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def generate(data: Path, budget: Budget, seed: int) -> dict[str, Path]:
    """The data files; every kind from its own seed so the held-out sets never share a scene with training."""
    data.mkdir(parents=True, exist_ok=True)
    return {
        "captions": world.captions(data / "train", budget.captions, seed + 1),
        "conversations": world.conversations(data / "train", budget.conversations, seed + 2),
        "text": world.text_corpus(data / "text.jsonl", budget.text, seed + 3),
        "text_sft": world.text_conversations(data / "text-sft.jsonl", budget.text_sft, seed + 4),
        "heldout_text": world.text_corpus(data / "heldout-text.jsonl", max(8, budget.text // 20), seed + 5),
        "questions": world.questions(data / "eval", budget.eval_per_kind, seed + 6),
        "mc": world.multiple_choice(data / "eval", budget.mc, seed + 7),
    }


def tokenizer_corpus(files: dict[str, Path]) -> list[str]:
    lines = [DEFAULT_SYSTEM_PROMPT, "User: Assistant:", *world.words()]
    for key in ("captions", "conversations", "text", "text_sft"):
        for raw in files[key].read_text(encoding="utf-8").splitlines():
            record = json.loads(raw)
            lines += [t["content"].replace(world.IMAGE, " ") for t in record.get("conversations", [])]
            if "text" in record:
                lines.append(record["text"])
    return lines


def base_model(directory: Path, files: dict[str, Path], budget: Budget, seed: int, log: Log) -> list[dict]:
    """Tokenizer, config, random init, then the vision and language pretraining; saved as an official checkpoint
    with a random adaptor (stage 1 trains it)."""
    directory.mkdir(parents=True, exist_ok=True)
    build_byte_level_tokenizer(tokenizer_corpus(files), VOCAB_SIZE, directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=1))
    model = initial_model(seed)
    processor = VLChatProcessor.from_pretrained(directory, num_image_tokens=model.config.num_image_tokens)
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters; tokenizer {len(processor.tokenizer)} tokens")
    log("pretraining the vision tower (attribute prediction)")
    records = pretrain.pretrain_vision(model, processor, budget.vision_steps, budget.vision_batch, seed, log)
    log("pretraining the language model (next token on the text corpus, text-only chats, and chats with the "
        "images in words)")
    texts = [json.loads(line)["text"] for line in files["text"].read_text().splitlines()]
    chats = [json.loads(line)["conversations"] for line in files["text_sft"].read_text().splitlines()]
    chats += world.described(budget.described, seed + 8)
    texts += [processor.build_prompt(messages) for messages in chats]
    records += pretrain.pretrain_language(model, processor, texts, budget.lm_steps, budget.lm_batch,
                                          budget.lm_length, seed, log)
    save_pretrained(model, directory)
    return records


def run_config(base: Path, out: Path, files: dict[str, Path], budget: Budget, seed: int, stages=(1, 2, 3),
               stage_overrides: dict | None = None) -> dict:
    """The `--config run.yaml` of the recipe run: Table 4's stages with the demo's step counts and learning rates
    (Table 4's 3e-5 / 2e-5 are for a 1.3B that is already trained; a tiny model from scratch needs larger steps)."""
    per_stage = {f"stage_{s}": {"steps": budget.steps[s - 1], "lr": budget.lrs[s - 1],
                                "vision_lr_ratio": budget.vision_lr_ratio, **(stage_overrides or {}).get(s, {})}
                 for s in stages}
    return {"model": str(base), "out": str(out), "stages": list(stages), "seed": seed,
            "data": [str(files["captions"]), str(files["conversations"]), str(files["text_sft"])],
            "text_data": [str(files["text"])], "eval_mc": str(files["mc"]), "eval_text": str(files["heldout_text"]),
            "batch_size": budget.batch, "micro_batch_size": budget.micro_batch, "save_every": 100,
            "keep_checkpoints": 1, **per_stage}


def engine_cli(args: list[str], log: Log) -> str:
    """`python -m engine ARGS` as a separate process (the same entry point a user runs); its output is logged."""
    log("$ python -m engine " + " ".join(args))
    env = {**os.environ, **TRAIN_ENV, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "engine", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=Path(__file__).resolve().parents[2])
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if not line.startswith("{"):  # metrics lines go to metrics.jsonl; the log keeps the words
            log("  " + line.rstrip())
    if proc.wait():
        raise RuntimeError(f"python -m engine {args[0]} failed ({proc.returncode}):\n" + "\n".join(lines[-20:]))
    return "\n".join(lines)


def train(config: dict, path: Path, log: Log) -> Path:
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML: `--config` reads either
    engine_cli(["train", "--config", str(path)], log)
    return Path(config["out"])


def evaluate(model: Path, files: dict[str, Path], log: Log) -> dict:
    output = engine_cli(["eval", "--model", str(model), "--qa", str(files["questions"]), "--mc", str(files["mc"]),
                         "--text", str(files["heldout_text"])], log)
    result = json.loads(output.strip().splitlines()[-1])
    log(json.dumps({k: v for k, v in result.items() if k != "qa_failures"}))
    return result


def steps_of(metrics: Path, stage: int) -> list[dict]:
    return [r for r in map(json.loads, metrics.read_text().splitlines())
            if r.get("type") == "step" and r.get("stage") == stage]


def evals_of(metrics: Path, stage: int) -> list[dict]:
    return [r for r in map(json.loads, metrics.read_text().splitlines())
            if r.get("type") == "eval" and r.get("stage") == stage]


ABLATIONS = {  # name: stage-2 overrides
    "language 70 %, warm-up, grouped (the paper)": {},
    "language 0 %": {"language_ratio": 0.0, "modality_warmup_steps": 0},
    "no modality warm-up": {"modality_warmup_steps": 0},
    "mixed batches (not grouped)": {"grouped": False},
}


def ablations(stage1: Path, work: Path, files: dict[str, Path], budget: Budget, seed: int, log: Log) -> list[dict]:
    """Stage 2 from the same stage-1 checkpoint, once per setting: text perplexity after it, multi-choice accuracy,
    and step time."""
    rows = []
    for i, (name, overrides) in enumerate(ABLATIONS.items()):
        out = work / f"ablation-{i}"
        config = run_config(stage1, out, files, budget, seed, stages=(2,),
                            stage_overrides={2: {"steps": budget.ablation_steps, **overrides}})
        train(config, work / f"ablation-{i}.json", log)
        steps, evals = steps_of(out / "metrics.jsonl", 2), evals_of(out / "metrics.jsonl", 2)
        timed = steps[1:] or steps  # the first step pays for warming up
        rows.append({"setting": name, "steps": len(steps), "text_ppl": evals[-1].get("text_ppl"),
                     "mc_accuracy": evals[-1].get("mc_accuracy"),
                     "s_per_step": round(sum(s["seconds"] for s in timed) / len(timed), 3),
                     "tokens_per_s": round(sum(s["tokens"] for s in timed) / sum(s["seconds"] for s in timed), 1),
                     "language_steps": sum(s["modality"] == "language" for s in steps),
                     "mixed_steps": sum(s["modality"] == "mixed" for s in steps)})
        log(json.dumps(rows[-1]))
    return rows


def make_demo(out: Path, budget: Budget = FULL, seed: int = 0, work: Path | None = None, install: bool = False) -> Path:
    """Build into `out` (model, card, log, metrics); `work` keeps the data and intermediate runs (default:
    out/../demo-work). With `install`, the result replaces assets/demo-model/."""
    out = Path(out)
    work = Path(work) if work else out.parent / f"{out.name}-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "build.log").unlink(missing_ok=True)
    log = Log(out / "build.log")
    log(f"make-demo: seed {seed}, budget {json.dumps(asdict(budget))}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPU(s)")
    started = time.perf_counter()
    files = generate(work / "data", budget, seed)
    log(f"data: {', '.join(f'{k} {sum(1 for _ in open(v))}' for k, v in files.items())} lines")
    pretraining = base_model(work / "base", files, budget, seed, log)
    run = train(run_config(work / "base", work / "run", files, budget, seed), work / "run.json", log)
    result = evaluate(run / "final", files, log)
    rows = ablations(run / "stage-1", work, files, budget, seed, log)
    minutes = (time.perf_counter() - started) / 60
    from .card import write_card

    model_dir = out / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    shutil.copytree(run / "final", model_dir)
    _bf16(model_dir)
    shutil.copy(run / "metrics.jsonl", out / "metrics.jsonl")
    (out / "pretrain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pretraining))
    (out / "eval.json").write_text(json.dumps({"final": result, "ablations": rows}, indent=1))
    write_card(model_dir / "README.md", budget, seed, result, rows, run / "metrics.jsonl", pretraining, minutes)
    write_examples(model_dir, out / "examples", seed, log)
    log(f"done in {minutes:.1f} min: {model_dir}")
    if install:
        install_demo(out)
        log(f"installed into {DEMO_DIR} and {EXAMPLES_DIR}")
    return model_dir


EXAMPLE_KINDS = ("describe", "same_color", "more", "color", "count")  # what the demo does best first


def write_examples(model: Path, directory: Path, seed: int, log: Log) -> list[dict]:
    """The app's clickable examples: for each kind, fresh scenes of moderate size until the model answers one
    right (at most 10 tries), greedily through the chat path; saved as directory/*.png + examples.json."""
    import random

    from ..chat import ChatSession
    from ..generation import SamplingParams
    from ..runtime import Runtime
    from ..training.evaluate import is_right

    runtime = Runtime.load(model)
    rng, vocabulary = random.Random(seed + 99), world.words()
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    kept = []
    for kind in EXAMPLE_KINDS:
        for attempt in range(10):
            if kind in world.PAIR:
                scenes = world.pair_scenes(kind, rng, vocabulary)
                qa = world.pair_qa(kind, *scenes, rng)
            else:
                scene = world.random_scene(rng, vocabulary, word=kind == "word")
                scenes, qa = (scene,), world.single_qa(kind, scene, rng)
            question = world.QUESTIONS[kind][0]
            names_ = [f"{kind}-{i + 1}.png" for i in range(len(scenes))]
            for scene, name in zip(scenes, names_):
                world.draw(scene).save(directory / name)
            session = ChatSession(runtime)
            session.add_user(question, [str(directory / n) for n in names_], reserve=64)
            reply = session.answer(SamplingParams(max_new_tokens=48))
            right = is_right(reply, qa.expected, qa.rivals)
            log(f"example {kind} try {attempt + 1}: {question!r} -> {reply.strip()!r} ({'right' if right else 'wrong'})")
            if right:
                kept.append({"kind": kind, "question": question, "images": names_, "expected": qa.expected})
                break
            for name in names_:
                (directory / name).unlink()
    (directory / "examples.json").write_text(json.dumps(kept, indent=1))
    return kept


def _bf16(directory: Path) -> None:
    """Store the weights in bfloat16, as the official checkpoints are: half the size, same answers."""
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    weights = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(path).items()}
    save_file(weights, path, metadata={"format": "pt"})


def install_demo(out: Path) -> None:
    """Make a build the embedded demo: its model (with card, log and metrics) and its examples."""
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    shutil.copytree(out / "model", DEMO_DIR)
    for name in ("build.log", "metrics.jsonl", "pretrain.jsonl", "eval.json"):
        shutil.copy(out / name, DEMO_DIR / name)
    shutil.rmtree(EXAMPLES_DIR, ignore_errors=True)
    shutil.copytree(out / "examples", EXAMPLES_DIR)
