"""Chat sessions on the embedded demo model: cache reuse equals full recompute, stop, budget, sampling."""

import threading
import time

import pytest
from PIL import Image

from engine.chat import ASSISTANT, USER, ChatSession, ContextOverflow, Turn, _first_stop, _partial_stop
from conftest import TALKATIVE
from engine.generation import Detokenizer, SamplingParams
from engine.runtime import Runtime

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def runtime():
    return Runtime.load(TALKATIVE)


def picture(color, size=(320, 200)):
    return Image.new("RGB", size, color)


def fresh_answer(runtime, session: ChatSession) -> tuple[str, ChatSession]:
    """The same conversation computed from scratch by a new session."""
    other = ChatSession(runtime, session.system_prompt)
    other.images = dict(session.images)
    other.turns = [Turn(t.role, t.text, list(t.images)) for t in session.turns]
    return other.answer(GREEDY), other


def test_multi_turn_reuse_equals_full_recompute(runtime):
    session = ChatSession(runtime)
    colors = ["red", "green", "blue", "yellow"]
    for turn, color in enumerate(colors):
        session.add_user(f"What colour is picture {turn}?", [picture(color)])
        expected, _ = fresh_answer(runtime, session)
        assert session.answer(GREEDY) == expected
        stats = session.last_stats
        assert stats.new_images == 1  # only this turn's image was encoded
        if turn:
            assert stats.reused_tokens > 576 * turn  # earlier turns came from the KV cache
    assert [t.role for t in session.turns] == [USER, ASSISTANT] * len(colors)


def test_regenerate_rolls_back_instead_of_recomputing(runtime):
    session = ChatSession(runtime)
    session.add_user("Describe this.", [picture("purple")])
    first = session.answer(GREEDY)
    session.drop_last_answer()
    again = session.answer(GREEDY)
    assert again == first
    assert session.last_stats.reused_tokens == session.last_stats.prompt_tokens - 1
    assert session.last_stats.new_images == 0


def test_edit_last_turn_equals_fresh_session(runtime):
    session = ChatSession(runtime)
    session.add_user("First question", [picture("orange")])
    session.answer(GREEDY)
    session.add_user("Second question", [picture("cyan")])
    session.answer(GREEDY)
    session.edit_last_user("A different second question", [picture("black")])
    expected, _ = fresh_answer(runtime, session)
    assert session.answer(GREEDY) == expected
    assert session.last_stats.reused_tokens > 576  # the first turn was not recomputed


def test_same_picture_reuses_its_embedding(runtime):
    session = ChatSession(runtime)
    session.add_user("one", [picture("red")])
    session.answer(GREEDY)
    session.add_user("again", [picture("red")])
    session.answer(GREEDY)
    assert session.last_stats.new_images == 0


def test_stop_ends_generation_within_one_step(runtime):
    session = ChatSession(runtime)
    session.add_user("Tell me a very long story.")
    params = SamplingParams(temperature=0.0, max_new_tokens=3000)
    pieces = []
    stopper = None
    for piece in session.stream(params):
        pieces.append(piece)
        if stopper is None:
            stopper = threading.Thread(target=session.cancel)
            stopper.start()
            stopper.join()
    assert session.last_stats.finish == "cancelled"
    assert session.last_stats.tokens <= 3  # the token in flight, at most
    assert session.turns[-1].role == ASSISTANT and session.turns[-1].text == "".join(pieces).strip()
    # The session stays usable, and the partial answer is part of the history.
    session.add_user("continue")
    answer = session.answer(GREEDY)
    assert session.turns[-1].text == answer and session.last_stats.tokens >= 1
    assert session.last_stats.reused_tokens > 0  # the cache of the question and partial answer was kept


def test_stop_from_another_thread_frees_the_worker(runtime):
    session = ChatSession(runtime)
    session.add_user("Go on forever.")
    done = threading.Event()

    def worker():
        for _ in session.stream(SamplingParams(max_new_tokens=100_000)):
            pass
        done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    time.sleep(0.5)
    session.cancel()
    assert done.wait(5), "generation kept running after Stop"
    thread.join()


def test_overflow_is_refused_before_anything_changes(runtime):
    session = ChatSession(runtime, context_limit=1500)
    session.add_user("one", [picture("red")])
    session.answer(GREEDY)
    before = list(session.turns)
    with pytest.raises(ContextOverflow, match=r"context window is 1500"):
        session.add_user("two", [picture("green"), picture("blue")], reserve=64)
    assert session.turns == before


def test_drop_oldest_policy_drops_whole_turns(runtime):
    session = ChatSession(runtime, context_limit=1250, overflow="drop_oldest")
    session.add_user("one", [picture("red")])
    session.answer(GREEDY)
    session.add_user("two", [picture("green")], reserve=64)
    assert [t.text for t in session.turns] == ["two"]
    assert session.dropped_turns == 2
    # What is left answers exactly as a conversation that only ever had that turn.
    fresh = ChatSession(runtime, context_limit=1250)
    fresh.add_user("two", [picture("green")], reserve=64)
    assert session.answer(GREEDY.with_(max_new_tokens=8)) == fresh.answer(GREEDY.with_(max_new_tokens=8))


def test_a_single_turn_too_big_is_an_error_even_when_dropping(runtime):
    session = ChatSession(runtime, context_limit=1000, overflow="drop_oldest")
    with pytest.raises(ContextOverflow, match="2 image"):
        session.add_user("two pictures", [picture("red"), picture("blue")])


def test_budget_counts_images(runtime):
    session = ChatSession(runtime)
    empty = session.budget(reserve=100)
    session.add_user("hi", [picture("red"), picture("blue")])
    budget = session.budget(reserve=100)
    assert budget.used - empty.used >= 2 * 576
    assert budget.limit == runtime.config.max_context
    assert budget.images_left == budget.left // 576


def test_sampling_with_a_seed_is_reproducible(runtime):
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, repetition_penalty=1.1, max_new_tokens=10, seed=7)
    answers = []
    for _ in range(2):
        session = ChatSession(runtime)
        session.add_user("Say something.")
        answers.append(session.answer(params))
    assert answers[0] == answers[1]


def test_invalid_sampling_parameters():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_stop_strings_are_held_back_and_cut():
    stops = ["User:", "<｜end▁of▁sentence｜>"]

    def _safe_prefix(text, stops):
        return text[:len(text) - _partial_stop(text, stops)]

    assert _safe_prefix("Hello Us", stops) == "Hello "
    assert _safe_prefix("Hello", stops) == "Hello"
    assert _first_stop("Answer.\n\nUser: next", stops) == len("Answer.\n\n")
    # The longest partial match over all stop strings is held back, not the first one found.
    assert _partial_stop("well <｜end", ["User:", "<｜end▁of▁sentence｜>"]) == len("<｜end")
    assert _partial_stop("say ab", ["b!", "ab!"]) == 2
    assert _first_stop("User: hi. User:", stops, start=1) == len("User: hi. ")


UNICODE_TEXTS = [
    "Hello, world! Ünïcödé — 日本語のテキスト and an emoji 🎉 then a family 👩‍👩‍👧 done.",
    "🎉🎉🎉",  # nothing but multi-byte characters spread over byte tokens
    "  leading spaces, a tab\there, a new line\nand Ελληνικά, русский, עברית, العربية",
    "a . b , c ! ? (spaces before punctuation must survive)",
]


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_detokenizer_pieces_join_to_the_full_decode(runtime, text):
    tokenizer = runtime.processor.tokenizer
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = Detokenizer(tokenizer)
    pieces = [detokenizer.add(i) for i in ids] + [detokenizer.flush()]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any(p.endswith("\ufffd") for p in pieces)  # an emoji is handed out whole, never half
    assert len([p for p in pieces if p]) > 1  # streamed, not all at the end


def test_detokenizer_decodes_a_short_window_not_the_whole_answer(runtime):
    tokenizer = runtime.processor.tokenizer
    windows = []

    class Recording:  # the real tokenizer, noting how many ids each decode call is given
        def decode(self, ids, **kwargs):
            windows.append(len(ids))
            return tokenizer.decode(ids, **kwargs)

    text = " ".join(UNICODE_TEXTS * 5)
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = Detokenizer(Recording())
    assert "".join([detokenizer.add(i) for i in ids] + [detokenizer.flush()]) == text
    assert len(ids) > 400 and max(windows) <= 8  # a 4-byte character spans at most 4 byte tokens


def test_detokenizer_holds_an_unfinished_character_until_flush(runtime):
    tokenizer = runtime.processor.tokenizer
    ids = tokenizer.encode("ok 🎉", add_special_tokens=False)
    detokenizer = Detokenizer(tokenizer)
    text = "".join(detokenizer.add(i) for i in ids[:-1])  # the emoji's last byte never came
    assert text == "ok " and detokenizer.flush() == "\ufffd"


def test_streamed_pieces_join_to_the_session_answer(runtime):
    session = ChatSession(runtime)
    session.add_user("Say something long.")
    pieces = list(session.stream(SamplingParams(temperature=1.0, seed=7, max_new_tokens=80)))
    assert "".join(pieces).strip() == session.turns[-1].text
    assert all(pieces)


def test_caller_stop_strings_cut_the_answer(runtime):
    session = ChatSession(runtime)
    session.add_user("Say something long.")
    params = SamplingParams(temperature=1.0, seed=7, max_new_tokens=80)
    full = session.answer(params)
    stop = full.strip()[5:8]  # a piece from inside the answer: the answer must end just before it
    session.drop_last_answer()
    cut = session.answer(params, stop=[stop])
    assert session.last_stats.finish == "stop"
    assert cut == full[:full.find(stop)] and stop not in cut
