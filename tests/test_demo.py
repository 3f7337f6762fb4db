"""The embedded demo model: the shapes world it is trained on, the rebuild command end to end (tiny budget), and
the shipped model answering freshly generated questions through `engine ask` and through the app's service."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import ImageFont

from engine.demo import DEMO_DIR, EXAMPLES_DIR, world
from engine.training.evaluate import is_right, names

ROOT = Path(__file__).resolve().parents[1]


def test_scenes_follow_the_rules():
    rng, vocabulary = random.Random(1), world.words()
    assert len(vocabulary) >= 300 and all(w.islower() for w in vocabulary)
    for _ in range(300):
        s = world.random_scene(rng, vocabulary)
        assert world.SIDE[0] <= s.width <= world.SIDE[1] and world.SIDE[0] <= s.height <= world.SIDE[1]
        assert 1 <= s.count <= 5 and s.color in world.COLORS and s.shape in world.SHAPES
        for i, a in enumerate(s.boxes):
            assert 0 <= a[0] < a[2] <= s.width and 0 <= a[1] < a[3] <= s.height
            assert not any(world._overlaps(a, b, 0) for b in s.boxes[i + 1:])
        if s.word:
            assert world.FONT[0] <= s.font_size <= world.FONT[1] and s.word in vocabulary
            x0, y0, x1, y1 = ImageFont.load_default(s.font_size).getbbox(s.word)
            box = (s.word_at[0] + x0, s.word_at[1] + y0, s.word_at[0] + x1, s.word_at[1] + y1)
            assert box[2] <= s.width and box[3] <= s.height
            assert not any(world._overlaps(box, b, 0) for b in s.boxes)
    again = random.Random(1)
    assert world.random_scene(again, vocabulary) == world.random_scene(random.Random(1), vocabulary)


def test_drawn_image_shows_the_scene():
    scene = world.random_scene(random.Random(3), world.words(), word=False, count=2, color="blue")
    image = world.draw(scene)
    assert image.size == (scene.width, scene.height)
    for x0, y0, x1, y1 in scene.boxes:  # the centre of each shape has its colour
        assert image.getpixel(((x0 + x1) // 2, (y0 + y1 * 3) // 4)) == world.COLORS["blue"]


def test_patch_targets_mark_each_shape_where_the_processed_image_shows_it():
    """The vision pretraining's per-patch targets: fractions per patch, one centre per shape (in the patch of the
    processed image that shows it), the word's pixels as word, nothing of another shape."""
    import torch

    from PIL import Image

    from engine.demo.build import PATCH as patch
    from engine.demo.pretrain import patch_targets
    from engine.processing import VLChatProcessor

    images = VLChatProcessor.from_pretrained(DEMO_DIR).image_processor
    size = images.config.image_size
    rng, vocabulary = random.Random(4), world.words()
    for _ in range(20):
        scene = world.random_scene(rng, vocabulary, word=True)
        cover, centre = patch_targets(scene, images, patch)
        assert cover.shape == ((size // patch) ** 2, len(world.LABELS))
        assert torch.allclose(cover.sum(1), torch.ones(len(cover)))
        own = world.LABELS.index(scene.shape)
        assert all(cover[:, i].sum() == 0 for i in range(1, 1 + len(world.SHAPES)) if i != own)
        assert cover[:, own].sum() > 0 and cover[:, world.LABELS.index("word")].sum() > 0
        # Two centres can fall in one patch: then one mark stands for both.
        assert 1 <= int((centre > 0).sum()) <= scene.count and set(centre.unique().tolist()) <= {0, own}
        marked = images.to_tensor(images.square(world.draw(scene)))  # the mark sits where the shape's colour is
        rows = (centre > 0).nonzero().flatten().tolist()
        grid = size // patch
        for r in rows:
            tile = marked[:, (r // grid) * patch:(r // grid + 1) * patch, (r % grid) * patch:(r % grid + 1) * patch]
            colour = images.to_tensor(Image.new("RGB", (1, 1), world.COLORS[scene.color]))
            assert ((tile - colour).abs().amax(0) < 0.05).any(), (scene, r)


def test_every_answer_names_its_answer_and_no_rival():
    rng, vocabulary = random.Random(2), world.words()
    for _ in range(50):
        scene = world.random_scene(rng, vocabulary)
        for kind in world.SINGLE:
            qa = world.single_qa(kind, scene, rng)
            assert names(qa.answer, qa.expected), qa
            assert not any(names(qa.answer, o) for o in qa.rivals), qa
        for kind in world.PAIR:
            a, b = world.pair_scenes(kind, rng, vocabulary)
            qa = world.pair_qa(kind, a, b, rng)
            assert names(qa.answer, qa.expected), qa
            assert a.count != b.count or kind != "more", (a, b)


def test_dialogues_open_with_each_kind_as_often_as_practice_says():
    """Shape and count questions open more training dialogues than colour ones (world.PRACTICE)."""
    from collections import Counter

    rng, vocabulary, n = random.Random(11), world.words(), 3000
    opening = {question: kind for kind, questions in world.QUESTIONS.items() for question in questions}
    seen = Counter(opening[qas[0][0]] for _, qas in world.dialogues(rng, vocabulary, n))
    total = sum(world.PRACTICE.values())
    for kind, weight in world.PRACTICE.items():
        assert abs(seen[kind] / n - weight / total) < 0.03, (kind, seen)
    assert seen["shape"] > 2 * seen["color"]


def test_two_image_answers_name_what_they_compare_before_the_verdict():
    rng, vocabulary = random.Random(12), world.words()
    for _ in range(40):
        a, b = world.pair_scenes("same_color", rng, vocabulary)
        qa = world.pair_qa("same_color", a, b, rng)
        assert qa.answer.index(a.color) < qa.answer.rindex(b.color) < qa.answer.rindex(qa.expected), qa


def test_generated_files_are_valid_training_and_eval_data(tmp_path):
    from engine.processing import VLChatProcessor
    from engine.training.data import check
    from engine.training.evaluate import read_mc

    processor = VLChatProcessor.from_pretrained(DEMO_DIR)
    conv = world.conversations(tmp_path / "train", 30, seed=5)
    caps = world.captions(tmp_path / "train", 10, seed=6)
    text = world.text_corpus(tmp_path / "text.jsonl", 10, seed=7)
    sft = world.text_conversations(tmp_path / "sft.jsonl", 10, seed=8)
    report = check([conv, caps, sft], [text], processor)
    assert report.ok, report.format()
    assert report.counts() == {"multimodal": 40, "language": 20}
    items = read_mc(world.multiple_choice(tmp_path / "eval", 6, seed=9))
    assert len(items) == 6 and all(len(item) in (3, 5, 7) for item in items)
    questions = [json.loads(line) for line in world.questions(tmp_path / "eval", 1, seed=10).read_text().splitlines()]
    assert sorted(q["kind"] for q in questions) == sorted(world.SINGLE + world.PAIR)
    assert all(names(q["answer"], q["expected"]) for q in questions)


def test_files_sharing_a_directory_keep_their_own_images(tmp_path):
    """Captions and conversations share train/ (and questions and multi-choice eval/): each file's images must be
    those it was written with, not the next file's written over them."""
    def images_of(path):
        return [i for line in path.read_text().splitlines() for t in json.loads(line)["conversations"]
                for i in t.get("images", [])]

    caps = world.captions(tmp_path / "shared", 5, seed=6)
    world.conversations(tmp_path / "shared", 8, seed=5)
    world.multiple_choice(tmp_path / "shared", 4, seed=9)
    alone = world.captions(tmp_path / "alone", 5, seed=6)
    assert images_of(caps) == images_of(alone)
    for name in images_of(caps):
        assert (tmp_path / "shared" / name).read_bytes() == (tmp_path / "alone" / name).read_bytes(), name


def test_make_demo_smoke_builds_a_model_that_loads(tmp_path):
    """The rebuild command end to end on a tiny budget: data, tokenizer, pretraining, stages 1-3 through
    `engine train`, evaluation, ablations, card, examples."""
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "engine", "make-demo", str(out), "--smoke"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    model = out / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "README.md"):
        assert (model / name).is_file(), name
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in steps if r.get("type") == "step"} == {1, 2, 3}
    card = (model / "README.md").read_text()
    assert "| colour |" in card and "language 0 %" in card and "mixed batches" in card
    result = json.loads((out / "eval.json").read_text())
    assert set(result["final"]["qa_accuracy"]) == set(world.SINGLE + world.PAIR)
    assert len(result["ablations"]) == 4
    assert (out / "examples" / "examples.json").is_file()
    asked = subprocess.run([sys.executable, "-m", "engine", "ask", "--model", str(model), "--max-new-tokens", "4",
                            "Hello"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert asked.returncode == 0, asked.stderr


# ------------------------------------------------------------------ the shipped model
def fresh(kind: str, n: int, seed: int, directory: Path) -> list[tuple[list[str], str, world.QA]]:
    """n freshly drawn questions of `kind`: (image paths, question, its QA: expected word and rivals)."""
    rng, vocabulary, out = random.Random(seed), world.words(), []
    for i in range(n):
        scene = world.random_scene(rng, vocabulary, word=kind == "word")
        qa = world.single_qa(kind, scene, rng)
        path = directory / f"{kind}-{i}.png"
        world.draw(scene).save(path)
        out.append(([str(path)], world.QUESTIONS[kind][0], qa))
    return out


def ask(images: list[str], question: str) -> str:
    args = [a for image in images for a in ("--image", image)]
    run = subprocess.run([sys.executable, "-m", "engine", "ask", *args, question], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout


# What the shipped model does, held to it: colour answers and descriptions right (100 % held out), shapes and the
# two-image comparisons mostly right (87-98 %); the word is where it falls short (the card has the figures): a word
# answer must be well formed, naming one word in quotes. When a rebuild reads words, `RIGHT` should take "word" too.
RIGHT = ("color", "describe")


def judged(kind: str, answer: str, qa: world.QA) -> bool:
    if kind in RIGHT:
        return is_right(answer, qa.expected, qa.rivals)
    assert kind == "word"
    return answer.strip().startswith("The word is") and answer.count('"') == 2


@pytest.mark.parametrize("kind", ["color", "describe", "word"])
def test_shipped_demo_answers_fresh_questions_through_ask(kind, tmp_path):
    for images, question, qa in fresh(kind, 3, seed=2026, directory=tmp_path):
        answer = ask(images, question)
        assert judged(kind, answer, qa), f"{question} -> {answer!r} (expected {qa.expected})"


def test_shipped_demo_names_the_shape_of_fresh_images_through_ask(tmp_path):
    """98 % right held out (35 % before dialogues opened with shape questions more often), so at least 4 of 5."""
    wrong = []
    for images, question, qa in fresh("shape", 5, seed=2029, directory=tmp_path):
        answer = ask(images, question)
        if not is_right(answer, qa.expected, qa.rivals):
            wrong.append((qa.expected, answer))
    assert len(wrong) <= 1, wrong


@pytest.mark.parametrize("kind", world.PAIR)
def test_shipped_demo_compares_two_fresh_images_through_ask(kind, tmp_path):
    """Which of two images has more shapes, and are they the same colour: 95 % and 87 % right held out, so at least
    4 of 5 fresh pairs."""
    rng, vocabulary, wrong = random.Random(2028), world.words(), []
    for i in range(5):
        first, second = world.pair_scenes(kind, rng, vocabulary)
        paths = [str(tmp_path / f"{i}-{n}.png") for n in (1, 2)]
        world.draw(first).save(paths[0])
        world.draw(second).save(paths[1])
        qa = world.pair_qa(kind, first, second, rng)
        answer = ask(paths, world.QUESTIONS[kind][0])
        if not is_right(answer, qa.expected, qa.rivals):
            wrong.append((qa.answer, answer))
    assert len(wrong) <= 1, wrong


@pytest.mark.parametrize("kind", ["color", "word"])
def test_shipped_demo_answers_through_the_app_service(kind, demo_models, tmp_path):
    """The app's own path (ChatService on a real SQLite file) answers a fresh question, and stores it."""
    from app.chat_service import ChatService
    from app.store import Store

    from test_chat_service import ask as send

    (images, question, qa), = fresh(kind, 1, seed=77, directory=tmp_path)
    with Store(tmp_path / "data") as store:
        last = send(ChatService(store, demo_models), None, question, images, {"temperature": 0.0, "max_new_tokens": 32})
        stored = store.get_conversation(last.conversation_id)["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"] and stored[-1]["text"] == last.text
    assert judged(kind, last.text, qa), f"{question} -> {last.text!r} (expected {qa.expected})"


def test_examples_are_answered_right(demo_models):
    """The chat's examples are ones the build saw answered right (the first right one of up to 10 fresh scenes
    per kind, every try in build.log): the shipped files and the app's inference path still agree."""
    models = demo_models
    from engine.chat import ChatSession
    from engine.generation import SamplingParams

    listed = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    assert len(listed) >= 3
    for item in listed:
        session = ChatSession(models.runtime)
        session.add_user(item["question"], [str(EXAMPLES_DIR / p) for p in item["images"]], reserve=48)
        answer = session.answer(SamplingParams(max_new_tokens=48))
        assert names(answer, item["expected"]), (item, answer)
