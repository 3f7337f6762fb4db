"""The demo model's card: what it is, how it was made, and every figure the build measured (written by the build,
never by hand)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from . import DEMO_ABOUT, DEMO_NEXT, world

TARGETS = {"color": 0.95, "shape": 0.95, "count": 0.80, "word": 0.80, "more": 0.80, "same_color": 0.80}
KIND_NAMES = {"color": "colour", "shape": "shape", "count": "count", "word": "word", "describe": "describe (names the colour)",
              "more": "two images: which has more", "same_color": "two images: same colour?"}


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _num(x, digits=2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def write_card(path: Path, budget, seed: int, result: dict, ablations: list[dict], metrics: Path,
               pretraining: list[dict], minutes: float) -> None:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    config = json.loads((path.parent / "config.json").read_text())
    lines = [
        "# DeepSeek-VL demo model", "",
        DEMO_ABOUT + " It was made from nothing by this project's own recipe (`python -m engine make-demo`), "
        "in the official checkpoint layout, so the app answers out of the box. " + DEMO_NEXT, "",
        "## Architecture", "",
        f"- Vision: SigLIP-style ViT (the 1.3B's SigLIP-only layout), {config['vision_config']['params']['image_size']} px, "
        f"patch {config['vision_config']['params']['patch_size']}, width {config['vision_config']['params']['width']}, "
        f"{config['vision_config']['params']['layers']} layers: "
        f"{(config['vision_config']['params']['image_size'] // config['vision_config']['params']['patch_size']) ** 2} "
        "tokens per image.",
        f"- Adaptor: MLP (mlp_gelu, depth 2).",
        f"- Language model: LLaMA, hidden {config['language_config']['hidden_size']}, "
        f"{config['language_config']['num_hidden_layers']} layers, vocabulary {config['language_config']['vocab_size']} "
        "(byte-level BPE trained on the generated text, DeepSeek's special tokens and chat template).",
        "- Weights stored in bfloat16, as the official checkpoints are.", "",
        "## How it was made", "",
        f"Seed {seed}; the whole build took {minutes:.0f} minutes on the machine in `build.log`. Budget: "
        f"`{json.dumps(asdict(budget))}`.", "",
        "1. Data: the shapes world (`engine/demo/world.py`): 1–5 shapes of one kind and colour, sometimes a word, on "
        "white or light grey, 64–1024 px a side, up to 4:1; questions about colour, shape, count, the word, a description, "
        "and two-image comparisons; a text corpus and text-only question/answer pairs. A training dialogue's first "
        "question is of each kind as often as `world.PRACTICE` says ("
        + ", ".join(f"{KIND_NAMES[k].split(' (')[0]} {w}" for k, w in world.PRACTICE.items()) + ").",
        "2. Pretraining (the paper starts from a pretrained SigLIP and LLM; so does the demo): the vision tower "
        "predicts, per patch, what covers it and whether a shape's centre lies in it, and per image the colour, "
        "shape, count and word through attention-pooling heads; the heads are then dropped. The LLM learns "
        "next-token prediction on the text corpus and on chats that name the images in words.",
        "3. The paper's three stages through `python -m engine train --config run.json`: stage 1 trains the adaptor "
        "only, stage 2 the adaptor and LLM with 70 % language steps after a modality warm-up, one modality per "
        "step, text packed; stage 3 (SFT) everything"
        + (f" (the vision tower at {budget.vision_lr_ratio:g} of the rate, so as not to unlearn its pretraining)"
           if budget.vision_lr_ratio != 1 else "")
        + ", loss on answers only. Learning rates are raised from "
        "Table 4's (a 1.3B that is already trained needs 3e-5; this model starts nearly from scratch): "
        f"{', '.join(f'stage {i + 1}: {lr:g}' for i, lr in enumerate(budget.lrs))}.", "",
    ]
    vision = [r for r in pretraining if r["type"] == "pretrain_vision"]
    language = [r for r in pretraining if r["type"] == "pretrain_language"]
    if vision and language:
        v, l = vision[-1], language[-1]
        lines += [f"Pretraining ended with vision accuracy (last batch) colour {_pct(v['acc_color'])}, shape "
                  f"{_pct(v['acc_shape'])}, count {_pct(v['acc_count'])}, word {_pct(v['acc_word'])}; language loss "
                  f"{l['loss']:.3f}.", ""]
    lines += ["| stage | steps | first loss | last loss (mean of last 10) | tokens/s (median) |", "|---|---|---|---|---|"]
    for stage in (1, 2, 3):
        steps = [r for r in records if r.get("type") == "step" and r.get("stage") == stage]
        if steps:
            tail = steps[-10:]
            speeds = sorted(r["tokens_per_s"] for r in steps)
            lines.append(f"| {stage} | {len(steps)} | {steps[0]['loss']:.3f} | {sum(r['loss'] for r in tail) / len(tail):.3f} "
                         f"| {speeds[len(speeds) // 2]:.0f} |")
    lines += ["", "## Evaluation (held-out generated images, greedy answers)", "",
              "`python -m engine eval --model assets/demo-model --qa questions.jsonl --mc mc.jsonl --text text.jsonl`: "
              "an answer is right when it names the expected word or digit and no rival.", "",
              "| question kind | accuracy | target | met |", "|---|---|---|---|"]
    for kind, accuracy in result.get("qa_accuracy", {}).items():
        target = TARGETS.get(kind)
        met = "–" if target is None else ("yes" if accuracy >= target else "**no**")
        lines.append(f"| {KIND_NAMES.get(kind, kind)} | {_pct(accuracy)} | {_pct(target) if target else '–'} | {met} |")
    lines += ["", f"Multi-choice PPL accuracy (the paper's metric; colour, shape and count, every answer sentence an "
                  f"option): {_pct(result.get('mc_accuracy'))} over {result.get('mc_items')} items. Text perplexity on "
                  f"held-out text: {_num(result.get('text_ppl'))}.", ""]
    failures = result.get("qa_failures", [])[:8]
    if failures:
        lines += ["Some wrong answers, to read:", ""]
        lines += [f"- {f['kind']}: “{f['question']}” expected *{f['expected']}*, said “{f['answer'].strip()}”"
                  for f in failures]
        lines.append("")
    lines += ["## The paper's stage-2 findings at this scale", "",
              "Stage 2 rerun from the same stage-1 checkpoint, once per setting, same steps and data. Text perplexity "
              "on held-out text after it (the paper: without language data, language ability collapses), "
              "multi-choice accuracy, and step time (the paper: modality-grouped steps are faster than mixed ones).", "",
              "| stage 2 setting | steps | language steps | mixed steps | text perplexity | multi-choice | s/step | tokens/s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in ablations:
        lines.append(f"| {r['setting']} | {r['steps']} | {r['language_steps']} | {r['mixed_steps']} | "
                     f"{_num(r['text_ppl'])} | {_pct(r['mc_accuracy'])} | {r['s_per_step']:.3f} | {r['tokens_per_s']:.0f} |")
    lines += ["", "These are short runs of a tiny model on two shared CPU cores: read differences smaller than the "
              "run-to-run noise (a few per cent in step time) as no difference.", "",
              "## Files", "", "`build.log` (the build's log), `metrics.jsonl` (every optimizer step and evaluation of "
              "the recipe run), `pretrain.jsonl` (pretraining), `eval.json` (every figure above, with the wrong "
              "answers).", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
