"""Training data: reading the supported formats into one sample form, checking it, and encoding it for the model.

Formats (one sample per JSONL line, or per element of a JSON array; image paths relative to the file):
- DeepSeek: `{"conversations": [{"role": "User", "content": "<image_placeholder>...", "images": ["a.png"]},
  {"role": "Assistant", "content": "..."}]}`
- LLaVA / ShareGPT: `{"image": "a.png" or [...], "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}]}`
- OpenAI-style messages: `{"messages": [{"role": "user", "content": "..." or [{"type": "text", "text": ...},
  {"type": "image_url", "image_url": {"url": "a.png"}}, {"type": "image", "image": "a.png"}]}, ...]}`
- Text only: JSONL `{"text": ...}`, or a `.txt` file (one sample per paragraph; paragraphs are separated by a
  blank line).

Every problem is reported with its file and line, all at once, before any training starts.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from ..processing import IMAGE_TOKEN, VLChatProcessor

LANGUAGE, MULTIMODAL = "language", "multimodal"
IGNORE = -100  # label of a position that is not supervised
USER, ASSISTANT, SYSTEM = "User", "Assistant", "System"
ROLE_NAMES = {"user": USER, "human": USER, "assistant": ASSISTANT, "gpt": ASSISTANT, "bot": ASSISTANT,
              "model": ASSISTANT, "system": SYSTEM}
LLAVA_IMAGE = "<image>"


class DataError(ValueError):
    """Data that cannot be trained on; the message is the full report."""


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


@dataclass
class Sample:
    """One training example. `messages` alternate User/Assistant (content with IMAGE_TOKEN placeholders), or
    `text` is set for raw language data."""

    source: str  # "file:line", for messages
    messages: list[dict] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    system: str | None = None  # None: the processor's default system prompt
    text: str | None = None

    @property
    def modality(self) -> str:
        return MULTIMODAL if self.images else LANGUAGE


# ------------------------------------------------------------------ reading
def read_records(path: Path) -> Iterable[tuple[int, Any, str | None]]:
    """(line, record, error) for each sample of a JSONL, JSON-array or .txt file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        yield from _paragraphs(text)
    elif path.suffix == ".json" and text.lstrip().startswith("["):
        yield from _json_array(text)
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield n, json.loads(line), None
                except json.JSONDecodeError as e:
                    yield n, None, f"malformed JSON ({e.msg} at column {e.colno})"


def _paragraphs(text: str):
    start, lines = None, []
    for n, line in enumerate(text.splitlines() + [""], 1):
        if line.strip():
            start = start or n
            lines.append(line)
        elif lines:
            yield start, {"text": "\n".join(lines)}, None
            start, lines = None, []


def _json_array(text: str):
    """Elements of a JSON array with the line each one starts on (LLaVA ships one big .json array)."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield line, None, f"malformed JSON ({e.msg} at line {e.lineno} column {e.colno}); the rest of the file is skipped"
            return
        yield line, record, None


def to_sample(record: Any, source: str) -> Sample:
    """Any supported record → Sample (image paths not yet resolved). Raises ValueError with the reason."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "text" in record and "conversations" not in record and "messages" not in record:
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise ValueError('"text" must be a non-empty string')
        return Sample(source, text=record["text"])
    if "messages" in record:
        turns, images = _openai_messages(record["messages"])
    elif "conversations" in record:
        convs = record["conversations"]
        if not isinstance(convs, list) or not convs:
            raise ValueError('"conversations" must be a non-empty list')
        if all(isinstance(m, dict) and "from" in m for m in convs):
            turns, images = _llava(convs, record.get("image", record.get("images")))
        else:
            turns, images = _deepseek(convs)
    else:
        raise ValueError('no "conversations", "messages" or "text" field')
    system = None
    if turns and turns[0]["role"] == SYSTEM:
        system = turns.pop(0)["content"]
    if any(t["role"] == SYSTEM for t in turns):
        raise ValueError("a system message is only allowed first")
    for i, t in enumerate(turns):
        expected = (USER, ASSISTANT)[i % 2]
        if t["role"] != expected:
            raise ValueError(f"turn {i + 1} is {t['role']}, expected {expected}: turns must alternate User, Assistant")
    if not any(t["role"] == ASSISTANT and t["content"].strip() for t in turns):
        raise ValueError("no Assistant answer to learn from")
    return Sample(source, messages=turns, images=images, system=system)


def _role(value: Any) -> str:
    role = ROLE_NAMES.get(str(value).lower())
    if role is None:
        raise ValueError(f"unknown role {value!r} (expected user/assistant/system, or human/gpt)")
    return role


def _deepseek(convs: list) -> tuple[list[dict], list[str]]:
    turns, images = [], []
    for m in convs:
        if not isinstance(m, dict) or "role" not in m or not isinstance(m.get("content", ""), str):
            raise ValueError('each conversation turn needs "role" and a string "content"')
        turns.append({"role": _role(m["role"]), "content": m.get("content", "")})
        images += _path_list(m.get("images", []))
    return turns, images


def _llava(convs: list, image_field: Any) -> tuple[list[dict], list[str]]:
    turns = []
    for m in convs:
        if not isinstance(m.get("value", ""), str):
            raise ValueError('each conversation turn needs a string "value"')
        turns.append({"role": _role(m["from"]), "content": m.get("value", "").replace(LLAVA_IMAGE, IMAGE_TOKEN)})
    return turns, _path_list(image_field or [])


def _openai_messages(messages: Any) -> tuple[list[dict], list[str]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    turns, images = [], []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError('each message needs a "role"')
        content = m.get("content", "")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = ""
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    text += part.get("text", "")
                elif kind in ("image_url", "image"):
                    url = part.get("image_url", {}).get("url") if kind == "image_url" else part.get("image")
                    if not isinstance(url, str):
                        raise ValueError(f"an {kind} part without a path")
                    images.append(url.removeprefix("file://"))
                    text += IMAGE_TOKEN
                else:
                    raise ValueError(f"unknown content part {part!r:.60}")
        else:
            raise ValueError('"content" must be a string or a list of parts')
        turns.append({"role": _role(m["role"]), "content": text})
    return turns, images


def _path_list(value: Any) -> list[str]:
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ValueError("images must be a path or a list of paths")
    return list(paths)


# ------------------------------------------------------------------ checking
@dataclass
class Report:
    """What `data check` prints; `samples` are the good ones."""

    samples: list[Sample] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    lengths: dict[str, list[int]] = field(default_factory=dict)  # modality → token lengths
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    max_length: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        out = {LANGUAGE: 0, MULTIMODAL: 0}
        for s in self.samples:
            out[s.modality] += 1
        return out

    def summary(self) -> dict:
        def dist(xs):
            if not xs:
                return None
            q = sorted(xs)
            return {"min": q[0], "median": int(statistics.median(q)), "p95": q[min(len(q) - 1, int(0.95 * len(q)))],
                    "max": q[-1], "mean": round(statistics.fmean(q), 1)}

        sizes = self.image_sizes
        return {
            "samples": self.counts(),
            "tokens": {m: dist(v) for m, v in self.lengths.items()},
            "images": {"count": len(sizes),
                       "width": dist([w for w, _ in sizes]), "height": dist([h for _, h in sizes])} if sizes else {"count": 0},
            "max_length": self.max_length,
            "problems": [str(p) for p in self.problems],
        }

    def format(self) -> str:
        s = self.summary()
        lines = [f"samples: {s['samples'][MULTIMODAL]} multimodal, {s['samples'][LANGUAGE]} language"]
        for modality, d in s["tokens"].items():
            if d:
                lines.append(f"tokens ({modality}): min {d['min']}, median {d['median']}, p95 {d['p95']}, max {d['max']}")
        if s["images"]["count"]:
            w, h = s["images"]["width"], s["images"]["height"]
            lines.append(f"images: {s['images']['count']}, width {w['min']}-{w['max']} (median {w['median']}), "
                         f"height {h['min']}-{h['max']} (median {h['median']})")
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  {p}" for p in self.problems]
        else:
            lines.append("no problems found")
        return "\n".join(lines)


def check(paths: Sequence[str | Path], text_paths: Sequence[str | Path] = (),
          processor: VLChatProcessor | None = None, max_length: int | None = None) -> Report:
    """Read and check every file. With a processor, token lengths are measured and samples longer than
    `max_length` (the model's context) are problems. Image headers are read (size), not decoded."""
    report = Report(max_length=max_length)
    for path, text_only in [(Path(p), False) for p in paths] + [(Path(p), True) for p in text_paths]:
        if not path.is_file():
            report.problems.append(Problem(str(path), 0, "no such file"))
            continue
        for line, record, error in read_records(path):
            source = f"{path}:{line}"
            problem = error or _check_record(record, path, source, text_only, processor, report)
            if problem:
                report.problems.append(Problem(str(path), line, problem))
    return report


def _check_record(record, path: Path, source: str, text_only: bool, processor, report: Report) -> str | None:
    try:
        sample = to_sample(record, source)
    except ValueError as e:
        return str(e)
    if text_only and sample.text is None:
        return 'text data needs {"text": ...} lines (conversations go in --data)'
    root = path.parent.resolve()
    resolved, sizes = [], []
    for image in sample.images:
        full = (root / image).resolve()
        if not full.is_relative_to(root):
            return f"image path {image!r} leaves the dataset directory {root}"
        if not full.is_file():
            return f"missing image {image!r}"
        try:
            with Image.open(full) as im:
                sizes.append(im.size)
        except (UnidentifiedImageError, OSError) as e:
            return f"image {image!r} is not readable ({e})"
        resolved.append(full)
    sample.images = resolved
    placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in sample.messages)
    if placeholders > len(resolved):
        return f"{placeholders} image placeholders but {len(resolved)} image(s)"
    if placeholders < len(resolved):
        return f"{len(resolved)} image(s) but only {placeholders} {IMAGE_TOKEN} placeholder(s)"
    if processor is not None:
        length = len(encode_tokens(sample, processor)[0])
        if report.max_length and length > report.max_length:
            return f"conversation is {length} tokens, longer than the sequence length {report.max_length}"
        report.lengths.setdefault(sample.modality, []).append(length)
    report.image_sizes += sizes
    report.samples.append(sample)
    return None


def load(paths: Sequence[str | Path], text_paths: Sequence[str | Path] = (), processor: VLChatProcessor | None = None,
         max_length: int | None = None, skip_bad: bool = False) -> Report:
    """`check`, then refuse bad data with the whole report unless skip_bad (bad samples are then left out)."""
    report = check(paths, text_paths, processor, max_length)
    if report.problems and not skip_bad:
        raise DataError(f"the training data has problems (use --skip-bad to leave those samples out):\n{report.format()}")
    if not report.samples:
        raise DataError(f"no usable training samples:\n{report.format()}")
    return report


# ------------------------------------------------------------------ encoding
@dataclass
class Encoded:
    """A sample as token ids with labels (IGNORE where not supervised) and its image paths."""

    input_ids: torch.Tensor  # [T]
    labels: torch.Tensor  # [T]; the loss at position t predicts labels[t + 1]
    images_seq_mask: torch.Tensor  # [T] bool
    images: list[Path]
    modality: str
    source: str

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_tokens(sample: Sample, processor: VLChatProcessor, answers_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (image placeholders expanded) and labels. `answers_only`: only Assistant answers and their
    end-of-sentence token are supervised (SFT); otherwise every text token is. Image tokens never are."""
    tok = processor.tokenizer
    if sample.text is not None:
        ids = torch.tensor(tok.encode(sample.text) + [tok.eos_token_id], dtype=torch.long)
        labels = ids.clone()
        labels[0] = IGNORE  # BOS is never predicted
        return ids, labels
    prompt, spans = _prompt_with_answer_spans(sample, processor)
    enc = tok(prompt, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    supervised = torch.ones(len(ids), dtype=torch.bool)
    if answers_only:
        # A token is an answer token when its characters overlap an answer span.
        supervised = torch.tensor([any(s < b and a < e for a, b in spans) and e > s
                                   for s, e in enc["offset_mapping"]], dtype=torch.bool)
    supervised[0] = False  # BOS
    supervised &= ids != processor.image_id
    labels = torch.where(supervised, ids, IGNORE)
    repeats = torch.where(ids == processor.image_id, processor.num_image_tokens, 1)
    return ids.repeat_interleave(repeats), labels.repeat_interleave(repeats)


def _prompt_with_answer_spans(sample: Sample, processor: VLChatProcessor) -> tuple[str, list[tuple[int, int]]]:
    """The processor's prompt for the conversation and the character spans of each answer + its EOS.

    Built piece by piece with the template's own rules, then checked against `processor.build_prompt`, so the
    spans always refer to exactly the prompt used at inference."""
    template = processor.template
    system = processor.system_prompt if sample.system is None else sample.system
    pairs = [(m["role"], m["content"].strip()) for m in sample.messages]
    text = template.system_template.format(system_message=system)
    text = text + template.sep if text else ""
    spans, seps = [], (template.sep, template.sep2)
    for i, (role, content) in enumerate(pairs):
        if role == ASSISTANT and content:
            # From just after "Assistant:" (inference prompts end there, so the model generates the space) to
            # the end of the separator, which is the EOS after every Assistant turn.
            start = len(text) + len(f"{role}:")
            text += f"{role}: {content}{seps[i % 2]}"
            spans.append((start, len(text)))
        else:
            text += f"{role}: {content}{seps[i % 2]}" if content else f"{role}:"
    lead = len(text) - len(text.lstrip())
    prompt = text.strip()
    spans = [(max(0, a - lead), min(len(prompt), b - lead)) for a, b in spans]
    expected = processor.build_prompt(sample.messages, system)
    if prompt != expected:  # the template changed under us: better to fail than to mask the wrong tokens
        raise RuntimeError("internal: training prompt differs from the inference prompt")
    return prompt, spans


def encode(sample: Sample, processor: VLChatProcessor, answers_only: bool = False) -> Encoded:
    ids, labels = encode_tokens(sample, processor, answers_only)
    return Encoded(ids, labels, ids == processor.image_id, list(sample.images), sample.modality, sample.source)


# ------------------------------------------------------------------ your own chats as data
def export_conversations(conversations: Sequence[dict | Sequence[dict]], directory: str | Path,
                         name: str = "data.jsonl") -> Path:
    """Write chats as a DeepSeek JSONL dataset; images are copied into `directory/images/` (named by content).

    Each conversation is a list of messages, or `{"messages": [...], "system": "..."}`; a message is
    `{"role": "user"|"assistant", "text": "...", "images": [path, ...]}` (`content` is accepted for `text`).
    A message's images go first as placeholders unless its text already holds them. Returns the JSONL path."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for conv in conversations:
        messages = conv.get("messages", []) if isinstance(conv, dict) else list(conv)
        system = conv.get("system") if isinstance(conv, dict) else None
        turns = [{"role": SYSTEM, "content": system}] if system else []
        for m in messages:
            text = m.get("text", m.get("content", "")) or ""
            images = [_copy_image(Path(p), directory / "images") for p in m.get("images", [])]
            if images and text.count(IMAGE_TOKEN) != len(images):
                text = IMAGE_TOKEN * len(images) + text
            turn = {"role": _role(m["role"]), "content": text}
            if images:
                turn["images"] = images
            turns.append(turn)
        # A trailing question without an answer teaches nothing; an interrupted chat often ends with one.
        while turns and turns[-1]["role"] == USER:
            turns.pop()
        if any(t["role"] == ASSISTANT for t in turns):
            lines.append(json.dumps({"conversations": turns}, ensure_ascii=False))
    out = directory / name
    out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return out


def _copy_image(source: Path, folder: Path) -> str:
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    target = folder / f"{digest}{source.suffix.lower() or '.png'}"
    if not target.exists():
        shutil.copyfile(source, target)
    return f"images/{target.name}"
