"""The shapes world: generated images, questions and answers, language text and evaluation files that the demo
model is trained and measured on.

An image holds 1 to 5 non-overlapping shapes of one kind and one colour, and sometimes a word, on a white or
light-grey background, at any size from 64 to 1024 px a side and up to 4:1 either way. Every question has one
short answer sentence that contains the answer word or digit; `expected` keeps that word, and `options` its
rivals, so evaluation can check a generated answer (`engine eval --qa`).
Everything is drawn from a seeded `random.Random`, so a seed gives the same files on every machine.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WORDS_FILE = Path(__file__).resolve().parents[2] / "assets" / "demo-words.txt"
COLORS = {"red": (215, 35, 35), "green": (30, 150, 60), "blue": (35, 75, 215), "yellow": (235, 200, 25),
          "orange": (245, 135, 25), "purple": (135, 55, 180), "black": (25, 25, 25)}
SHAPES = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
SIDE = (64, 1024)  # px, each side
MAX_ASPECT = 4.0
FONT = (20, 60)  # px, text height
IMAGE = "<image_placeholder>"

# Question kinds and their wordings (the first is the one the issue names; the rest are paraphrases).
QUESTIONS = {
    "color": ["What color is the shape?", "What colour are the shapes?", "Which color do you see?"],
    "shape": ["What shape is it?", "What kind of shape is in the picture?", "Which shape is shown?"],
    "count": ["How many shapes are there?", "Count the shapes.", "How many shapes do you see?"],
    "word": ["What word is written?", "What does the text say?", "Read the word in the image."],
    "describe": ["Describe the image.", "What is in this picture?", "Tell me about this image."],
    "more": ["Which image has more shapes, the first or the second?"],
    "same_color": ["Are the two shapes the same color?", "Do the two images have the same colour?"],
}
SINGLE = ("color", "shape", "count", "word", "describe")
PAIR = ("more", "same_color")
# How often each kind opens a training dialogue. Colour and the description are learnt from a few thousand;
# shape and count need more: with every kind equally often the LLM answered shape near its prior ("They are
# squares.") though the tower's features tell shape apart (a linear probe reads it at 93 %). Word and same-colour
# questions twice as often too: a build with them at 1 lost the word answer's form and half its same-colour verdicts.
PRACTICE = {"color": 1, "shape": 3, "count": 2, "word": 2, "describe": 1, "more": 1, "same_color": 2}


def words() -> list[str]:
    return WORDS_FILE.read_text().split()


@dataclass
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    shape: str
    color: str
    boxes: list[tuple[int, int, int, int]]  # one (x0, y0, x1, y1) per shape
    word: str | None = None
    font_size: int = 0
    word_at: tuple[int, int] = (0, 0)

    @property
    def count(self) -> int:
        return len(self.boxes)


def _log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def _overlaps(a, b, gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def random_scene(rng: random.Random, vocabulary: list[str], word: bool | None = None, count: int | None = None,
                 color: str | None = None) -> Scene:
    """A scene that fits: sides log-uniform in SIDE, the word (if any) sized to fit, shapes placed without overlap
    (retried from scratch when they do not fit)."""
    word = rng.random() < 0.5 if word is None else word
    while True:
        # Long side log-uniform over SIDE, aspect ratio log-uniform up to MAX_ASPECT (short side at least SIDE[0]):
        # every size and shape of image, without making most of them thin strips where shapes shrink to a pixel.
        long = _log_uniform(rng, *SIDE)
        short = max(SIDE[0], long / _log_uniform(rng, 1.0, MAX_ASPECT))
        width, height = (round(long), round(short)) if rng.random() < 0.5 else (round(short), round(long))
        grey = rng.randint(222, 242)
        background = (255, 255, 255) if rng.random() < 0.5 else (grey, grey, grey)
        scene = Scene(width, height, background, rng.choice(SHAPES), color or rng.choice(list(COLORS)), [])
        taken = []
        if word:
            text = rng.choice(vocabulary)
            size = rng.randint(*FONT)
            x0, y0, x1, y1 = ImageFont.load_default(size).getbbox(text)
            if x1 + 8 > width or y1 + 8 > height:
                continue
            x, y = rng.randint(4, width - x1 - 4), rng.randint(4, height - y1 - 4)
            scene.word, scene.font_size, scene.word_at = text, size, (x, y)
            taken.append((x + x0, y + y0, x + x1, y + y1))
        n = count or rng.randint(1, 5)
        short = min(width, height)
        for _ in range(n):
            for _attempt in range(60):
                side = round(rng.uniform(0.12, 0.35) * short)
                side = max(side, 10)
                if side + 4 > short:
                    break
                x, y = rng.randint(2, width - side - 2), rng.randint(2, height - side - 2)
                box = (x, y, x + side, y + side)
                if not any(_overlaps(box, t, 3) for t in taken):
                    taken.append(box)
                    scene.boxes.append(box)
                    break
            else:
                break
        if len(scene.boxes) == n:
            return scene


def draw(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (scene.width, scene.height), scene.background)
    pen = ImageDraw.Draw(image)
    for box in scene.boxes:
        _shape(pen, scene.shape, box, COLORS[scene.color])
    if scene.word:
        pen.text(scene.word_at, scene.word, fill=(0, 0, 0), font=ImageFont.load_default(scene.font_size))
    return image


LABELS = ("background", *SHAPES, "word")  # the values of `label_map`


def label_map(scene: Scene) -> Image.Image:
    """What each pixel of `draw(scene)` shows, as an index into LABELS (in all three channels, so the image
    processor's geometry applies to it unchanged): the vision tower's pretraining learns to tell it per patch."""
    image = Image.new("RGB", (scene.width, scene.height), (0, 0, 0))
    pen = ImageDraw.Draw(image)
    pen.fontmode = "1"  # no anti-aliasing: its blends would be other labels' values
    value = LABELS.index(scene.shape)
    for box in scene.boxes:
        _shape(pen, scene.shape, box, (value,) * 3)
    if scene.word:
        word = LABELS.index("word")
        pen.text(scene.word_at, scene.word, fill=(word,) * 3, font=ImageFont.load_default(scene.font_size))
    return image


def _shape(pen: ImageDraw.ImageDraw, shape: str, box: tuple, fill: tuple) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


# ------------------------------------------------------------------ questions and answers
@dataclass
class QA:
    kind: str
    question: str
    answer: str
    expected: str  # the word or digit a correct answer contains
    options: list[str] = field(default_factory=list)  # every answer of this kind, for checking and for MC

    @property
    def rivals(self) -> list[str]:
        """The options that are not the answer: a right answer names none of them."""
        return [o for o in self.options if o != self.expected]


def _noun(scene: Scene) -> str:
    return scene.shape if scene.count == 1 else PLURAL[scene.shape]


def describe(scene: Scene) -> str:
    n = scene.count
    what = f"{'a' if n == 1 else NUMBER_WORDS[n]} {scene.color} {_noun(scene)}"
    place = "a white" if scene.background == (255, 255, 255) else "a light grey"
    text = f"{what[0].upper()}{what[1:]} on {place} background"
    return text + (f", and the word \"{scene.word}\"." if scene.word else ".")


def single_qa(kind: str, scene: Scene, rng: random.Random) -> QA:
    question = rng.choice(QUESTIONS[kind])
    n = scene.count
    if kind == "color":
        answer = f"The shape is {scene.color}." if n == 1 else f"The shapes are {scene.color}."
        return QA(kind, question, answer, scene.color, list(COLORS))
    if kind == "shape":
        answer = f"It is a {scene.shape}." if n == 1 else f"They are {PLURAL[scene.shape]}."
        return QA(kind, question, answer, scene.shape, list(SHAPES))
    if kind == "count":
        answer = "There is 1 shape." if n == 1 else f"There are {n} shapes."
        return QA(kind, question, answer, str(n), [str(i) for i in range(1, 6)])
    if kind == "word":
        if scene.word:
            return QA(kind, question, f"The word is \"{scene.word}\".", scene.word)
        return QA(kind, question, "There is no word in the image.", "no")
    if kind == "describe":
        return QA(kind, question, describe(scene), scene.color, list(COLORS))
    raise ValueError(f"unknown question kind {kind!r}")


def pair_qa(kind: str, first: Scene, second: Scene, rng: random.Random) -> QA:
    question = rng.choice(QUESTIONS[kind])
    if kind == "more":
        which = "first" if first.count > second.count else "second"
        return QA(kind, question, f"The {which} image has more shapes ({first.count} and {second.count}).", which,
                  ["first", "second"])
    if kind == "same_color":
        # The colours first, then the verdict: a small model that had to say yes or no first said "No, the
        # first is green and the second is green." (the words before the verdict are what it reasons with).
        if first.color == second.color:
            return QA(kind, question, f"The first is {first.color} and the second is {second.color} too, so yes.",
                      "yes", ["yes", "no"])
        return QA(kind, question, f"The first is {first.color} and the second is {second.color}, so no.", "no",
                  ["yes", "no"])
    raise ValueError(f"unknown question kind {kind!r}")


def pair_scenes(kind: str, rng: random.Random, vocabulary: list[str]) -> tuple[Scene, Scene]:
    """Two scenes that make the question fair: different counts for "more", same colour half the time."""
    first = random_scene(rng, vocabulary, word=False)
    if kind == "more":
        count = rng.choice([c for c in range(1, 6) if c != first.count])
        return first, random_scene(rng, vocabulary, word=False, count=count)
    color = first.color if rng.random() < 0.5 else rng.choice([c for c in COLORS if c != first.color])
    return first, random_scene(rng, vocabulary, word=False, color=color)


# ------------------------------------------------------------------ language data
FACTS = [
    "A triangle has 3 sides.", "A square has 4 sides.", "A circle is round and has no corners.",
    "A square has 4 corners.", "A triangle has 3 corners.", "Red and yellow make orange.",
    "Red and blue make purple.", "Blue and yellow make green.", "The sky is blue.", "Grass is green.",
    "A lemon is yellow.", "Snow is white.", "Coal is black.", "An orange is orange.", "A tomato is red.",
]


def notes(rng: random.Random, vocabulary: list[str]) -> str:
    """Short notes, then a sentence that says them again: the copying a pretrained LLM brings to a VLM (the
    adaptor's image tokens are notes of this kind, and the answer repeats what they say)."""
    n, color, shape = rng.randint(1, 5), rng.choice(list(COLORS)), rng.choice(SHAPES)
    word = rng.choice(vocabulary) if rng.random() < 0.5 else None
    listed = [color, shape, str(n)] + ([word] if word else [])
    rng.shuffle(listed)
    noun = shape if n == 1 else PLURAL[shape]
    said = rng.choice([f"There {'is' if n == 1 else 'are'} {n} {color} {noun}.", f"The shapes are {color}.",
                       f"They are {PLURAL[shape]}.", f"I count {n}."] + ([f"The word is \"{word}\"."] if word else []))
    return f"{' '.join(listed)}: {said}"


def sentence(rng: random.Random, vocabulary: list[str]) -> str:
    """One simple English sentence about the shapes world, arithmetic or the words."""
    pick = rng.random()
    if pick < 0.3:
        return notes(rng, vocabulary)
    pick = rng.random()
    if pick < 0.25:
        return rng.choice(FACTS)
    if pick < 0.45:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return rng.choice([f"{a} + {b} = {a + b}.", f"{a} plus {b} is {a + b}.", f"{max(a, b)} - {min(a, b)} = {max(a, b) - min(a, b)}."])
    if pick < 0.7:
        n, color, shape = rng.randint(1, 5), rng.choice(list(COLORS)), rng.choice(SHAPES)
        noun = shape if n == 1 else PLURAL[shape]
        return rng.choice([f"There {'is' if n == 1 else 'are'} {n} {color} {noun} on the page.",
                           f"I drew {NUMBER_WORDS[n]} {color} {noun}.", f"The {color} {shape} is next to the {rng.choice(list(COLORS))} {rng.choice(SHAPES)}."])
    w = rng.choice(vocabulary)
    return rng.choice([f"The word \"{w}\" is written in black.", f"\"{w}\" is a common word.",
                       f"I can read the word {w}.", f"She wrote \"{w}\" on the card."])


def paragraph(rng: random.Random, vocabulary: list[str]) -> str:
    return " ".join(sentence(rng, vocabulary) for _ in range(rng.randint(2, 6)))


def text_qa(rng: random.Random, vocabulary: list[str]) -> tuple[str, str]:
    """A text-only question and answer, so the demo also chats without an image."""
    pick = rng.random()
    if pick < 0.35:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return rng.choice([f"What is {a} + {b}?", f"What is {a} plus {b}?"]), f"{a} + {b} = {a + b}."
    if pick < 0.6:
        shape = rng.choice(SHAPES)
        sides = {"triangle": "A triangle has 3 sides.", "square": "A square has 4 sides.",
                 "circle": "A circle has no sides; it is round."}[shape]
        return f"How many sides does a {shape} have?", sides
    if pick < 0.8:
        return (rng.choice(["Hello!", "Hi", "Who are you?", "What can you do?"]),
                "Hello! I am a small demo model. Show me an image and ask about its shapes, colors, counts or words.")
    w = rng.choice(vocabulary)
    return f"Spell the word {w}.", f"{w} is spelled {'-'.join(w)}."


# ------------------------------------------------------------------ files
class Writer:
    """Writes images into `directory/images/` and returns their paths relative to `directory`. The names start with
    the file's own name (`captions-000001.png`): several files share a directory, and numbering from 1 alone let
    each overwrite the images of the one written before it."""

    def __init__(self, directory: Path, file: str):
        self.directory, self.stem = Path(directory), Path(file).stem
        (self.directory / "images").mkdir(parents=True, exist_ok=True)
        self.n = 0

    def image(self, scene: Scene) -> str:
        self.n += 1
        name = f"images/{self.stem}-{self.n:06d}.png"
        draw(scene).save(self.directory / name, optimize=False, compress_level=1)
        return name


def _jsonl(path: Path, records) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def _turn(role: str, content: str, images: list[str] = ()) -> dict:
    turn = {"role": role, "content": content}
    if images:
        turn["images"] = list(images)
    return turn


def dialogues(rng: random.Random, vocabulary: list[str], n: int, kinds=SINGLE + PAIR, max_turns: int = 3):
    """`n` dialogues as (scenes, [(question, answer), ...]); the scenes go with the first question. One scene and
    1..max_turns questions about it, or two scenes and one comparison; the first question's kind drawn from `kinds`
    as often as PRACTICE says."""
    weights = [PRACTICE[k] for k in kinds]
    for _ in range(n):
        kind = rng.choices(kinds, weights)[0]
        if kind in PAIR:
            a, b = pair_scenes(kind, rng, vocabulary)
            qa = pair_qa(kind, a, b, rng)
            yield (a, b), [(qa.question, qa.answer)]
            continue
        scene = random_scene(rng, vocabulary, word=True if kind == "word" and rng.random() < 0.9 else None)
        asked = [kind] + rng.sample([k for k in SINGLE if k != kind], rng.randint(0, max_turns - 1))
        yield (scene,), [(qa.question, qa.answer) for qa in (single_qa(k, scene, rng) for k in asked)]


def conversations(directory: Path, n: int, seed: int, kinds=SINGLE + PAIR, max_turns: int = 3,
                  name: str = "conversations.jsonl") -> Path:
    """`n` DeepSeek-format conversations of `dialogues`, their images written beside the file."""
    rng, vocabulary, out = random.Random(seed), words(), Writer(directory, name)

    def records():
        for scenes, qas in dialogues(rng, vocabulary, n, kinds, max_turns):
            turns = []
            for i, (question, answer) in enumerate(qas):
                images = [out.image(s) for s in scenes] if i == 0 else []
                turns += [_turn("User", IMAGE * len(images) + question, images), _turn("Assistant", answer)]
            yield {"conversations": turns}

    return _jsonl(directory / name, records())


def scene_notes(scene: Scene) -> str:
    """A scene named in words: "red circle 3 apple" (and "grey" on a grey background)."""
    grey = " grey" if scene.background != (255, 255, 255) else ""
    return f"{scene.color} {scene.shape} {scene.count}{grey}" + (f" {scene.word}" if scene.word else "")


def described(n: int, seed: int) -> list[list[dict]]:
    """Dialogues with each image replaced by its notes in brackets, as chat messages: text for the LLM's
    pretraining, so that it has read conversations that name a thing and then talk about it (as a real LLM has
    read countless), and so can use image tokens that name it."""
    rng, vocabulary = random.Random(seed), words()
    out = []
    for scenes, qas in dialogues(rng, vocabulary, n):
        messages = []
        for i, (question, answer) in enumerate(qas):
            shown = "".join(f"[{scene_notes(s)}] " for s in scenes) if i == 0 else ""
            messages += [{"role": "User", "content": shown + question}, {"role": "Assistant", "content": answer}]
        out.append(messages)
    return out


def captions(directory: Path, n: int, seed: int, name: str = "captions.jsonl") -> Path:
    """Image-caption pairs for stage 1 (the adaptor learns to map image features to the words that name them)."""
    rng, vocabulary, out = random.Random(seed), words(), Writer(directory, name)
    return _jsonl(directory / name, ({"conversations": [
        _turn("User", f"{IMAGE}Describe the image.", [out.image(scene)]), _turn("Assistant", describe(scene))]}
        for scene in (random_scene(rng, vocabulary) for _ in range(n))))


def text_corpus(path: Path, n: int, seed: int) -> Path:
    rng, vocabulary = random.Random(seed), words()
    return _jsonl(path, ({"text": paragraph(rng, vocabulary)} for _ in range(n)))


def text_conversations(path: Path, n: int, seed: int) -> Path:
    rng, vocabulary = random.Random(seed), words()
    return _jsonl(path, ({"conversations": [_turn("User", q), _turn("Assistant", a)]}
                         for q, a in (text_qa(rng, vocabulary) for _ in range(n))))


def questions(directory: Path, n_per_kind: int, seed: int, name: str = "questions.jsonl") -> Path:
    """Held-out evaluation questions: `{"kind", "images", "question", "expected"}` per line, `n_per_kind` of every
    kind (word questions always have a word)."""
    rng, vocabulary, out = random.Random(seed), words(), Writer(directory, name)

    def records():
        for kind in SINGLE + PAIR:
            for _ in range(n_per_kind):
                if kind in PAIR:
                    a, b = pair_scenes(kind, rng, vocabulary)
                    qa, images = pair_qa(kind, a, b, rng), [out.image(a), out.image(b)]
                else:
                    scene = random_scene(rng, vocabulary, word=True if kind == "word" else None)
                    qa, images = single_qa(kind, scene, rng), [out.image(scene)]
                yield {"kind": kind, "images": images, "question": IMAGE * len(images) + qa.question,
                       "expected": qa.expected, "rivals": qa.rivals,
                       "answer": qa.answer}

    return _jsonl(directory / name, records())


def multiple_choice(directory: Path, n: int, seed: int, name: str = "mc.jsonl") -> Path:
    """The paper's multi-choice PPL files: colour, shape and count questions with every answer sentence as an
    option (`engine eval --mc`)."""
    rng, vocabulary, out = random.Random(seed), words(), Writer(directory, name)

    def records():
        for i in range(n):
            kind = ("color", "shape", "count")[i % 3]
            scene = random_scene(rng, vocabulary, word=False)
            qa = single_qa(kind, scene, rng)
            options = []
            for value in qa.options:
                other = Scene(**{**scene.__dict__, **_set(kind, value, scene)})
                options.append(single_qa(kind, other, random.Random(0)).answer)
            yield {"images": [out.image(scene)], "question": IMAGE + qa.question, "options": options,
                   "answer": qa.options.index(qa.expected)}

    return _jsonl(directory / name, records())


def _set(kind: str, value: str, scene: Scene) -> dict:
    if kind == "color":
        return {"color": value}
    if kind == "shape":
        return {"shape": value}
    return {"boxes": scene.boxes[:1] * int(value)}  # only the count matters to the answer sentence
