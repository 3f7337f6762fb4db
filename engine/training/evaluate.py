"""Evaluation the paper uses to watch training: multi-choice by perplexity, and text perplexity.

Multi-choice PPL (section 4): the prompt and images are fed with each candidate answer, and the candidate with
the lowest perplexity (mean negative log-likelihood of its tokens) is the model's choice. Lines of the file:
`{"images": ["a.png"], "question": "...", "options": ["...", "..."], "answer": 0}` (images relative to the file).
Text perplexity over language data (`{"text"}` JSONL or .txt) watches language retention during stage 2.
Answer accuracy (`answers`) asks each question through the chat path the app uses, greedily, and checks the
answer names the expected word and none of its rivals; lines `{"kind": "color", "images": [...], "question": "...",
"expected": "red", "rivals": ["blue", ...]}`, scored per kind.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..processing import IMAGE_TOKEN, VLChatProcessor
from .data import IGNORE, DataError, Encoded, Problem, Sample, encode, read_records, to_sample
from .loop import loss_sum
from .mixture import collate

QA_LINES = 'question lines need "question" and "expected"'
TEXT_LINES = 'text data needs {"text": ...} lines'


def read_mc(path: str | Path) -> list[tuple[Sample, int, int]]:
    """(one Sample per option, index of the option, correct answer) triples, grouped by item; checked with
    file:line messages."""
    path = Path(path)
    root = path.parent.resolve()
    items, problems = [], []
    for line, record, error in read_records(path):
        try:
            if error:
                raise ValueError(error)
            if not isinstance(record, dict) or not isinstance(record.get("question"), str):
                raise ValueError('needs a string "question"')
            options, answer = record.get("options"), record.get("answer")
            if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
                raise ValueError('"options" must be a list of at least two strings')
            if not isinstance(answer, int) or not 0 <= answer < len(options):
                raise ValueError(f'"answer" must be an option index 0..{len(options) - 1}')
            images = []
            for image in record.get("images", []):
                full = (root / image).resolve()
                if not full.is_relative_to(root) or not full.is_file():
                    raise ValueError(f"missing image {image!r} (or outside {root})")
                images.append(full)
            question = record["question"]
            if IMAGE_TOKEN not in question:
                question = IMAGE_TOKEN * len(images) + question
            item = []
            for i, option in enumerate(options):
                sample = to_sample({"conversations": [{"role": "User", "content": question},
                                                      {"role": "Assistant", "content": option}]}, f"{path}:{line}")
                sample.images = images
                item.append((sample, i, answer))
            items.append(item)
        except ValueError as e:
            problems.append(Problem(str(path), line, str(e)))
    if problems:
        raise DataError("the multi-choice file has problems:\n" + "\n".join(f"  {p}" for p in problems))
    return items


@torch.no_grad()
def nll(model, processor: VLChatProcessor, encoded: Encoded) -> tuple[float, int]:
    """Summed negative log-likelihood of a sample's supervised tokens, and their number."""
    rows = collate([encoded], processor.pad_id)
    total = loss_sum(model, rows, processor, model.device)
    return float(total), int((encoded.labels[1:] != IGNORE).sum())


def option_perplexities(model, processor: VLChatProcessor, item: list[tuple[Sample, int, int]]) -> list[float]:
    """Perplexity of each option's tokens after the prompt and images (its end-of-sentence token is left out:
    it would favour short options)."""
    scores = []
    for sample, _, _ in item:
        e = encode(sample, processor, answers_only=True)
        last = int((e.labels != IGNORE).nonzero()[-1])
        e.labels[last] = IGNORE
        total, n = nll(model, processor, e)
        scores.append(math.exp(total / max(1, n)))
    return scores


def multiple_choice(model, processor: VLChatProcessor, path: str | Path) -> dict:
    items = read_mc(path)
    correct = 0
    for item in items:
        scores = option_perplexities(model, processor, item)
        correct += int(min(range(len(scores)), key=scores.__getitem__) == item[0][2])
    return {"mc_accuracy": correct / len(items) if items else None, "mc_items": len(items)}


def text_perplexity(model, processor: VLChatProcessor, path: str | Path) -> dict:
    total, tokens, samples = 0.0, 0, 0
    for line, record, error in read_records(Path(path)):
        if error or not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{line}: {error or TEXT_LINES}")
        s, n = nll(model, processor, encode(Sample(f"{path}:{line}", text=record["text"]), processor))
        total, tokens, samples = total + s, tokens + n, samples + 1
    return {"text_ppl": math.exp(total / tokens) if tokens else None, "text_tokens": tokens, "text_samples": samples}


def names(text: str, word: str) -> bool:
    """Whether `text` has `word` as a whole word (or its plural: "circles" names "circle")."""
    found = "".join(c.lower() if c.isalnum() else " " for c in text).split()
    word = word.lower()
    return word in found or word + "s" in found


def is_right(reply: str, expected: str, rivals=()) -> bool:
    """An answer is right when it names the expected word and none of its rivals."""
    return names(reply, str(expected)) and not any(names(reply, r) for r in rivals)


def answers(runtime, path: str | Path, max_new_tokens: int = 48) -> dict:
    """Per-kind accuracy of generated answers: {"qa_accuracy": {kind: share}, "qa_items": n, "qa_failures": [...]}
    (the first few wrong answers, to read)."""
    from ..chat import ChatSession
    from ..generation import SamplingParams

    path = Path(path)
    root = path.parent.resolve()
    right, seen, failures = {}, {}, []
    params = SamplingParams(max_new_tokens=max_new_tokens)
    for line, record, error in read_records(path):
        if error or not isinstance(record, dict) or not {"question", "expected"} <= set(record):
            raise DataError(f"{path}:{line}: {error or QA_LINES}")
        images = [root / image for image in record.get("images", [])]
        question = record["question"].replace(IMAGE_TOKEN, "")  # the session places one per image, first
        session = ChatSession(runtime)
        session.add_user(question, [str(p) for p in images], reserve=max_new_tokens)
        reply = session.answer(params)
        kind = record.get("kind", "all")
        ok = is_right(reply, record["expected"], record.get("rivals", []))
        seen[kind] = seen.get(kind, 0) + 1
        right[kind] = right.get(kind, 0) + int(ok)
        if not ok and len(failures) < 20:
            failures.append({"line": line, "kind": kind, "question": question, "expected": record["expected"],
                             "answer": reply})
    return {"qa_accuracy": {k: round(right[k] / seen[k], 4) for k in seen}, "qa_items": sum(seen.values()),
            "qa_failures": failures}


def evaluate(model, processor: VLChatProcessor, mc: str | Path | None = None, text: str | Path | None = None) -> dict:
    """One flat dict: mc_accuracy, mc_items (with `mc`), text_ppl, text_tokens, text_samples (with `text`)."""
    was_training = model.training
    model.eval()
    result = {}
    if mc:
        result.update(multiple_choice(model, processor, mc))
    if text:
        result.update(text_perplexity(model, processor, text))
    model.train(was_training)
    return result
