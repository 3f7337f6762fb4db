"""ChatService and ModelManager on the real embedded demo model and a real Store in tmp_path."""

import io
import os
import threading
import types

import pytest
from PIL import Image

from app.chat_service import STOPPED_IN_LINE, ChatError, ChatService, ModelManager, StreamEvent
from app.scheduler import Scheduler
from app.settings import GenerationSettings
from app.store import Store, StoreError
from engine.chat import ASSISTANT, USER, ChatSession, Turn
from conftest import TALKATIVE
from engine.demo import DEMO_NAME
from engine.generation import SamplingParams

GREEDY = {"temperature": 0.0, "max_new_tokens": 6}


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "data") as s:
        yield s


@pytest.fixture
def service(store, models):
    return ChatService(store, models)


def png(color, size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def run(events):
    """Consume a stream: (events, the final event)."""
    events = list(events)
    return events, events[-1]


def ask(service, conversation_id, text, images=(), settings=GREEDY):
    events, last = run(service.send(conversation_id, text, images, settings))
    assert last.kind == "done", last.text
    return last


def fresh_answers(runtime, questions, params=SamplingParams(max_new_tokens=6)):
    """The answers a brand-new ChatSession computes for these (text, images) questions."""
    session = ChatSession(runtime)
    answers = []
    for text, images in questions:
        session.add_user(text, images)
        answers.append(session.answer(params))
    return answers


# ---------------------------------------------------------------------- model manager
def test_model_manager_loads_in_background_and_labels_the_demo(demo_models):
    models = demo_models
    assert models.status == "ready" and models.error is None
    assert models.progress.fraction == 1.0
    banner = models.banner()
    assert banner["demo"] and banner["model"] == DEMO_NAME
    assert "--model deepseek-ai/deepseek-vl-7b-chat --load-4bit" in banner["hint"]
    assert banner["device"] == "cpu" and banner["dtype"] == "float32" and banner["quantization"] == "none"
    assert banner["memory"].endswith("MiB") and banner["image_size"] == 256
    assert "small demo model, trained by this project's recipe on simple pictures of shapes, colours" in banner["text"]
    assert "Training tab" in banner["hint"]


def test_model_manager_reports_a_clear_load_error(tmp_path):
    manager = ModelManager(tmp_path / "missing").start()
    assert not manager.wait(30)
    assert manager.status == "failed" and "no such directory" in manager.error
    with pytest.raises(ChatError, match="failed to load"):
        manager.require()
    assert "failed to load" in manager.banner()["text"]


def test_model_manager_cancel():
    started, release = threading.Event(), threading.Event()

    def slow_loader(source, *, cancel, progress, **_):
        progress("weights", 1, 4)
        started.set()
        release.wait(10)
        from engine.loading import LoadCancelled
        if cancel.is_set():
            raise LoadCancelled("cancelled")

    manager = ModelManager(TALKATIVE, loader=slow_loader).start()
    assert started.wait(10)
    assert manager.status == "loading" and manager.progress.fraction == 0.25
    with pytest.raises(ChatError, match="still loading"):
        manager.require()
    manager.cancel()
    release.set()
    assert not manager.wait(10)
    assert manager.status == "failed" and "cancelled" in manager.error


# ---------------------------------------------------------------------- send
def test_send_streams_and_stores_text_with_two_images(service, store, tmp_path):
    path = tmp_path / "blue.png"
    path.write_bytes(png("blue"))
    events = list(service.send(None, "Compare these two pictures.", [png("red"), str(path)], GREEDY))
    kinds = [e.kind for e in events]
    assert kinds[0] == "started" and kinds[-1] == "done" and "delta" in kinds
    done = events[-1]
    assert "".join(e.text for e in events if e.kind == "delta").strip() == done.text
    assert done.stats["finish"] == "length" and done.stats["tokens"] == 6 and done.stats["new_images"] == 2

    conversation = store.get_conversation(done.conversation_id)
    user, answer = conversation["messages"]
    assert user["id"] == events[0].user_message_id and user["text"] == "Compare these two pictures."
    assert len(user["attachments"]) == 2 and user["attachments"][1]["name"] == "blue.png"
    assert answer["id"] == done.message_id and answer["status"] == "complete" and answer["text"] == done.text
    assert answer["settings"]["max_new_tokens"] == 6 and answer["timings"]["tokens"] == 6
    assert conversation["title"] == "Compare these two pictures."


def test_stop_mid_answer_keeps_the_partial_text(service, store):
    first_delta, finished = threading.Event(), threading.Event()
    events = []

    def reader():
        for event in service.send(None, "Tell me a very long story.", [], {"max_new_tokens": 100_000}):
            events.append(event)
            if event.kind == "delta":
                first_delta.set()
        finished.set()

    thread = threading.Thread(target=reader)
    thread.start()
    assert first_delta.wait(60)
    conversation_id = events[0].conversation_id
    assert service.is_generating(conversation_id)
    assert service.stop(conversation_id)
    assert finished.wait(10), "generation kept running after Stop"
    thread.join()
    done = events[-1]
    assert done.kind == "done" and done.stats["finish"] == "cancelled" and done.stats["tokens"] < 100_000
    answer = store.get_conversation(conversation_id)["messages"][-1]
    assert answer["status"] == "stopped" and answer["text"] == done.text
    assert not service.is_generating(conversation_id) and not service.stop(conversation_id)


def test_second_send_while_streaming_is_refused(service, store):
    stream = service.send(None, "first", [], {"max_new_tokens": 50})
    started = next(stream)
    cid = started.conversation_id
    events, last = run(service.send(cid, "second", [], GREEDY))
    assert len(events) == 1 and last.kind == "error" and "still being generated" in last.text
    assert service.stop(cid)
    assert list(stream)[-1].kind == "done"
    assert len(store.get_conversation(cid)["messages"]) == 2  # "second" was never stored


def test_closing_the_stream_early_stores_a_stopped_answer(service, store):
    stream = service.send(None, "Talk for a long time.", [], {"max_new_tokens": 5000})
    started = next(stream)
    next(stream)  # one delta
    stream.close()  # the browser tab went away
    answer = store.get_conversation(started.conversation_id)["messages"][-1]
    assert answer["status"] == "stopped"
    assert not service.is_generating(started.conversation_id)


# ---------------------------------------------------------------------- the queue (one answer at a time)
@pytest.fixture
def model_use(monkeypatch):
    """Watches the model (without changing what it does): which questions it answers, in order, and the most
    answers it ran at once."""
    original = ChatSession.stream
    use = types.SimpleNamespace(questions=[], running=0, peak=0, lock=threading.Lock())

    def watched_stream(session, *args, **kwargs):
        with use.lock:
            use.questions.append(session.turns[-1].text)
            use.running += 1
            use.peak = max(use.peak, use.running)
        try:
            yield from original(session, *args, **kwargs)
        finally:
            with use.lock:
                use.running -= 1

    monkeypatch.setattr(ChatSession, "stream", watched_stream)
    return use


def until_delta(stream):
    """Read a stream up to its first delta (the model is then busy with it); returns the events read."""
    events = []
    for event in stream:
        events.append(event)
        if event.kind == "delta":
            return events
    raise AssertionError(f"the stream ended without a delta: {events[-1]}")


def alone(models, question):
    """The answer a brand-new session gives this question, as the service stores it (stripped)."""
    return fresh_answers(models.runtime, [(question, [])])[0].strip()


LONG = {"max_new_tokens": 100_000}  # runs until stopped: it holds the model while the test looks around


def test_a_second_conversation_waits_its_turn(service, store, model_use):
    first = service.send(None, "Tell me a very long story.", [], LONG)
    first_id = until_delta(first)[0].conversation_id
    second = service.send(None, "second question", [], GREEDY)
    queued = next(second)
    assert queued.kind == "queued" and queued.position == 1 and queued.message_id is None
    second_id = queued.conversation_id
    assert service.queue_position(second_id) == 1 and service.is_generating(second_id)
    assert service.queue_position(first_id) is None  # running, not waiting
    # The question is stored and shown at once; its answer row only comes when its turn does.
    messages = store.get_conversation(second_id)["messages"]
    assert [(m["role"], m["text"], m["id"]) for m in messages] == [("user", "second question", queued.user_message_id)]

    assert service.stop(first_id)
    assert list(first)[-1].stats["finish"] == "cancelled"
    rest = list(second)
    assert [e.kind for e in rest][0] == "started" and rest[-1].kind == "done"
    assert model_use.questions == ["Tell me a very long story.", "second question"] and model_use.peak == 1
    assert service.scheduler.running == 0 and not service.is_generating(second_id)


def test_stopping_a_queued_request_removes_it_and_the_others_run_untouched(service, store, models, model_use):
    other_caller = service.scheduler.submit(owner="api", label="another caller")  # holds the model for now
    assert other_caller.running
    streams = [service.send(None, text, [], GREEDY) for text in ("first question", "second question", "third one")]
    queued = [next(stream) for stream in streams]
    assert [(e.kind, e.position) for e in queued] == [("queued", 1), ("queued", 2), ("queued", 3)]
    first_id, second_id, third_id = (e.conversation_id for e in queued)

    assert service.stop(second_id)
    assert list(streams[1]) == [StreamEvent("cancelled", second_id, text=STOPPED_IN_LINE,
                                            user_message_id=queued[1].user_message_id)]
    moved = next(streams[2])  # told of its new place
    assert (moved.kind, moved.position) == ("queued", 2)
    assert service.queue_position(first_id) == 1 and service.queue_position(third_id) == 2
    assert not service.is_generating(second_id) and not service.stop(second_id)
    assert [m["role"] for m in store.get_conversation(second_id)["messages"]] == ["user"]  # no empty answer

    other_caller.release()
    first_events, third_events = list(streams[0]), list(streams[2])
    assert [e.kind for e in first_events][0] == "started" and first_events[-1].kind == "done"
    # Whether it saw itself next while the first ran depends on thread timing; never a place it did not have.
    assert [e.position for e in third_events if e.kind == "queued"] in ([], [1])
    assert third_events[-1].kind == "done"
    assert model_use.questions == ["first question", "third one"] and model_use.peak == 1
    expected = [alone(models, "first question"), alone(models, "third one")]
    assert [first_events[-1].text, third_events[-1].text] == expected  # as if each had run alone

    # The stopped question stays; the conversation goes on (Regenerate answers it).
    events, again = run(service.regenerate(second_id, GREEDY))
    assert again.kind == "done" and again.text == alone(models, "second question")


def test_a_crash_in_one_answer_frees_the_model_for_the_next(service, store, models, monkeypatch):
    watched = ChatSession.stream

    def stream(session, *args, **kwargs):
        if session.turns[-1].text == "crash please":
            raise RuntimeError("the model fell over")
        return watched(session, *args, **kwargs)

    monkeypatch.setattr(ChatSession, "stream", stream)
    other_caller = service.scheduler.submit(label="another caller")
    crashing, next_one = service.send(None, "crash please", [], GREEDY), service.send(None, "hello", [], GREEDY)
    crash_id = next(crashing).conversation_id
    next(next_one)  # the second request is queued behind the crashing one
    other_caller.release()
    crash_events = list(crashing)
    assert crash_events[-1].kind == "error" and "the model fell over" in crash_events[-1].text
    assert store.get_conversation(crash_id)["messages"][-1]["status"] == "failed"
    done = list(next_one)[-1]
    assert done.kind == "done" and done.text == alone(models, "hello")
    assert service.scheduler.running == 0 and service.scheduler.waiting == 0


def test_a_reader_gone_while_queued_leaves_the_line(service, store):
    other_caller = service.scheduler.submit(label="another caller")
    stream = service.send(None, "never mind", [], GREEDY)
    queued = next(stream)
    assert queued.kind == "queued" and service.scheduler.waiting == 1
    stream.close()  # the browser tab went away
    assert service.scheduler.waiting == 0 and not service.is_generating(queued.conversation_id)
    assert [m["role"] for m in store.get_conversation(queued.conversation_id)["messages"]] == ["user"]
    other_caller.release()
    assert next(service.send(None, "next", [], GREEDY)).kind == "started"  # nobody ahead of it


def test_a_reader_gone_while_running_frees_the_model(service, store):
    running = service.send(None, "Talk for a long time.", [], LONG)
    running_id = until_delta(running)[0].conversation_id
    waiting = service.send(None, "my turn?", [], GREEDY)
    assert next(waiting).kind == "queued"
    running.close()
    assert store.get_conversation(running_id)["messages"][-1]["status"] == "stopped"
    events = list(waiting)
    assert events[0].kind == "started" and events[-1].kind == "done"


def test_several_slots_answer_that_many_at_once(store, models, model_use):
    service = ChatService(store, models, Scheduler(slots=2))
    streams = [service.send(None, f"long story {i}", [], LONG) for i in range(2)]
    ids = [until_delta(stream)[0].conversation_id for stream in streams]  # both started, none queued
    assert service.scheduler.running == 2 and model_use.running == 2
    third = service.send(None, "third", [], GREEDY)
    assert (next(third).kind, service.scheduler.waiting) == ("queued", 1)
    for conversation_id, stream in zip(ids, streams):
        service.stop(conversation_id)
        assert list(stream)[-1].stats["finish"] == "cancelled"
    assert list(third)[-1].kind == "done" and model_use.peak == 2


def test_a_regenerate_stopped_in_line_keeps_the_old_answer(service, store):
    first = ask(service, None, "Describe the weather.")
    cid = first.conversation_id
    before = store.get_conversation(cid)["messages"]
    other_caller = service.scheduler.submit(label="another caller")
    regenerating = service.regenerate(cid, GREEDY)
    assert next(regenerating).kind == "queued"
    assert store.get_conversation(cid)["messages"] == before  # replaced only once the new answer starts
    service.stop(cid)
    assert list(regenerating)[-1].kind == "cancelled"
    assert store.get_conversation(cid)["messages"] == before
    other_caller.release()
    events, again = run(service.regenerate(cid, GREEDY))
    assert again.text == first.text and [m["id"] for m in store.get_conversation(cid)["messages"]][-1] == \
        again.message_id != first.message_id


def test_an_edit_in_line_is_stored_at_once_without_its_old_answer(service, store):
    first = ask(service, None, "Old question")
    cid = first.conversation_id
    other_caller = service.scheduler.submit(label="another caller")
    editing = service.edit_last(cid, "New question", GREEDY)
    assert next(editing).kind == "queued"
    assert [(m["role"], m["text"]) for m in store.get_conversation(cid)["messages"]] == [("user", "New question")]
    other_caller.release()
    assert list(editing)[-1].kind == "done"



def test_an_answer_that_cannot_be_saved_names_the_stored_question(service, store, monkeypatch):
    """The edited question is stored, then the answer's row cannot be: the error says which question is kept,
    so the UI ends the edit (the new version exists) instead of offering to send it again."""
    cid = ask(service, None, "Old question").conversation_id
    add = store.add_message

    def add_message(conversation_id, role, *args, **kwargs):
        if role == "assistant":
            raise StoreError("disk full")
        return add(conversation_id, role, *args, **kwargs)

    monkeypatch.setattr(store, "add_message", add_message)
    events = list(service.edit_last(cid, "New question", GREEDY))
    stored = store.get_conversation(cid)["messages"]
    assert [(m["role"], m["text"]) for m in stored] == [("user", "New question")]
    assert [(e.kind, e.user_message_id) for e in events] == [("error", stored[0]["id"])]
    assert "Could not save the answer: disk full" in events[0].text


# ---------------------------------------------------------------------- regenerate, edit, delete
def test_regenerate_shows_the_new_answer_keeps_the_old_and_reuses_the_cache(service, store):
    first = ask(service, None, "Describe this.", [png("purple")])
    cid = first.conversation_id
    events, again = run(service.regenerate(cid, GREEDY))
    assert again.kind == "done" and again.text == first.text  # greedy: same answer
    assert again.stats["reused_tokens"] == again.stats["prompt_tokens"] - 1 and again.stats["new_images"] == 0
    messages = store.get_conversation(cid)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["id"] == again.message_id != first.message_id
    # The old answer is kept as the first version.
    assert (messages[1]["variant_index"], messages[1]["variant_count"]) == (2, 2)
    assert messages[1]["variant_ids"] == [first.message_id, again.message_id]


def test_regenerate_twice_then_flip_back_to_the_first_answer(service, store, models):
    sampled = [{"temperature": 1.0, "seed": seed, "max_new_tokens": 6} for seed in (1, 2, 3)]
    first = ask(service, None, "Tell me a story.", settings=sampled[0])
    cid = first.conversation_id
    answers = [first] + [run(service.regenerate(cid, settings))[1] for settings in sampled[1:]]
    assert [a.kind for a in answers] == ["done"] * 3
    assert answers[0].text != answers[2].text  # seeded: three different answers to tell apart
    assert all(a.stats["reused_tokens"] == a.stats["prompt_tokens"] - 1 for a in answers[1:])
    last = store.get_conversation(cid)["messages"][-1]
    assert last["variant_ids"] == [a.message_id for a in answers] and last["variant_index"] == 3
    assert last["text"] == answers[2].text

    service.select_variant(cid, answers[0].message_id)
    shown = store.get_conversation(cid)["messages"][-1]
    assert (shown["id"], shown["text"], shown["variant_index"], shown["variant_count"]) == \
        (answers[0].message_id, first.text, 1, 3)
    # The conversation goes on from the answer shown: the model sees that answer (the prompt is the same as a
    # fresh session's for these turns) and only what follows the question is computed again.
    nxt = ask(service, cid, "And then?")
    assert nxt.stats["reused_tokens"] > 0
    expected = ChatSession(models.runtime)
    expected.turns = [Turn(USER, "Tell me a story."), Turn(ASSISTANT, first.text)]
    expected.add_user("And then?")
    assert nxt.text == expected.answer(SamplingParams(max_new_tokens=6))
    assert [m["text"] for m in store.get_conversation(cid)["messages"]] == \
        ["Tell me a story.", first.text, "And then?", nxt.text]
    # Flipping to the third answer leaves that branch's later turn behind (still one flip away).
    service.select_variant(cid, answers[2].message_id)
    assert [m["id"] for m in store.get_conversation(cid)["messages"]][1:] == [answers[2].message_id]
    again = run(service.regenerate(cid, GREEDY))[1]
    assert again.stats["reused_tokens"] == again.stats["prompt_tokens"] - 1
    with pytest.raises(ChatError, match="not a version"):
        service.select_variant(cid, nxt.message_id)  # not on the path any more, nor beside a message on it


def test_edit_the_first_question_forks_and_the_old_branch_stays(service, store, models):
    first = ask(service, None, "First question")
    cid = first.conversation_id
    ask(service, cid, "Second question")
    ask(service, cid, "Third question")
    old_path = store.get_conversation(cid)["messages"]
    events, edited = run(service.edit(cid, old_path[0]["id"], "A new first question", GREEDY))
    assert edited.kind == "done"
    messages = store.get_conversation(cid)["messages"]
    assert [m["text"] for m in messages] == ["A new first question", edited.text]
    assert edited.text == fresh_answers(models.runtime, [("A new first question", [])])[0]
    assert messages[0]["variant_ids"] == [old_path[0]["id"], messages[0]["id"]]
    assert store.list_conversations()[0]["message_count"] == 2
    # The old branch, all three turns, is one flip away; the conversation goes on from it as before.
    service.select_variant(cid, old_path[0]["id"])
    back = store.get_conversation(cid)["messages"]
    assert [(m["id"], m["text"]) for m in back] == [(m["id"], m["text"]) for m in old_path]
    assert (back[0]["variant_index"], back[0]["variant_count"]) == (1, 2)
    more = ask(service, cid, "Fourth question")
    assert more.stats["reused_tokens"] > 0
    assert [m["text"] for m in store.get_conversation(cid)["messages"]][-2:] == ["Fourth question", more.text]
    with pytest.raises(ChatError, match="not a version"):
        service.select_variant(cid, 10**9)


def test_edit_refuses_an_answer_and_a_stranger(service, store):
    first = ask(service, None, "Only question")
    cid = first.conversation_id
    before = store.get_conversation(cid)
    for message_id, message in [(first.message_id, "Only your own messages"), (10**9, "not in this conversation")]:
        events, last = run(service.edit(cid, message_id, "changed", GREEDY))
        assert last.kind == "error" and message in last.text
    assert store.get_conversation(cid) == before


def test_edit_last_equals_a_fresh_session(service, store, models):
    first = ask(service, None, "First question")
    cid = first.conversation_id
    ask(service, cid, "Second question")
    events, edited = run(service.edit_last(cid, "A different second question", GREEDY))
    assert edited.kind == "done"
    texts = [m["text"] for m in store.get_conversation(cid)["messages"]]
    assert texts == ["First question", first.text, "A different second question", edited.text]
    expected = fresh_answers(models.runtime, [("First question", []), ("A different second question", [])])
    assert [first.text, edited.text] == expected


def test_delete_turn_removes_question_and_answer(service, store):
    first = ask(service, None, "one")
    cid = first.conversation_id
    second = ask(service, cid, "two")
    messages = store.get_conversation(cid)["messages"]
    assert service.delete_turn(cid, messages[0]["id"]) == 2
    assert [m["text"] for m in store.get_conversation(cid)["messages"]] == ["two", second.text]
    with pytest.raises(ChatError, match="not in this conversation"):
        service.delete_turn(cid, messages[0]["id"])
    ask(service, cid, "three")  # still a well-formed conversation


# ---------------------------------------------------------------------- validation: nothing stored
def test_bad_image_is_refused_and_nothing_is_stored(service, store, tmp_path):
    events, last = run(service.send(None, "look", [png("red"), b"not an image"], GREEDY))
    assert len(events) == 1 and last.kind == "error" and last.text.startswith("Image 2:")
    assert store.list_conversations() == []

    cid = ask(service, None, "hello").conversation_id
    broken = tmp_path / "holiday.jpg"
    broken.write_bytes(png("red")[:40])  # truncated
    events, last = run(service.send(cid, "and this?", [str(broken)], GREEDY))
    assert last.kind == "error" and "holiday.jpg" in last.text
    assert len(store.get_conversation(cid)["messages"]) == 2
    assert not [p for p in store.attachments_dir.rglob("*") if p.is_file()]
    assert not service.is_generating(cid)


def test_context_overflow_is_refused_and_nothing_is_stored(service, store):
    cid = ask(service, None, "hello").conversation_id
    before = store.get_conversation(cid)["messages"]
    too_many = [Image.new("RGB", (32, 32), (i * 30, 0, 0)) for i in range(7)]  # 7 × 576 > 4096
    events, last = run(service.send(cid, "all of these", too_many, GREEDY))
    assert last.kind == "error" and "context window is 4096" in last.text
    assert store.get_conversation(cid)["messages"] == before
    assert not [p for p in store.attachments_dir.rglob("*") if p.is_file()]


@pytest.mark.parametrize("text, images, settings, message", [
    ("", [], GREEDY, "Type a message"),
    ("   ", [], GREEDY, "Type a message"),
    ("x" * 100_001, [], GREEDY, "limit is 100,000"),
    ("hi", [], {"top_p": 0}, "top_p"),
    ("hi", [], {"temperature": "hot"}, "temperature must be a number"),
    ("hi", [], {"max_new_tokens": 2.5}, "whole number"),
    ("hi", [], {"tempreature": 1}, "Unknown setting"),
    ("hi", [object()], GREEDY, "cannot attach a object"),
])
def test_invalid_input_is_refused_and_nothing_is_stored(service, store, text, images, settings, message):
    events, last = run(service.send(None, text, images, settings))
    assert len(events) == 1 and last.kind == "error" and message in last.text
    assert store.list_conversations() == []


def test_settings_may_be_a_generation_settings(service, store):
    settings = GenerationSettings(max_new_tokens=4, seed=5, temperature=0.8, system_prompt="Be terse.")
    done = ask(service, None, "Hello", settings=settings)
    answer = store.get_conversation(done.conversation_id)["messages"][1]
    assert answer["settings"] == settings.to_dict() and done.stats["tokens"] == 4
    again = ask(service, done.conversation_id, "Hello again", settings=GenerationSettings.from_dict(answer["settings"]))
    assert store.get_conversation(again.conversation_id)["messages"][3]["settings"] == settings.to_dict()


# ---------------------------------------------------------------------- restart
def test_restart_continues_like_a_fresh_session(store, models, tmp_path):
    data_dir = store.data_dir
    first = ask(ChatService(store, models), None, "What is in this picture?", [png("green")])
    store.close()
    with Store(data_dir) as reopened:
        second = ask(ChatService(reopened, models), first.conversation_id, "And what colour is it?")
        assert second.stats["new_images"] == 1  # the stored image was read back from its file
        assert len(reopened.get_conversation(first.conversation_id)["messages"]) == 4
    green = Image.open(io.BytesIO(png("green")))
    expected = fresh_answers(models.runtime, [("What is in this picture?", [green]), ("And what colour is it?", [])])
    assert [first.text, second.text] == expected


# ---------------------------------------------------------------------- budget, PDF, screen
def test_budget_counts_pending_images_and_warns(service):
    empty = service.budget(None, max_new_tokens=512)
    assert empty.limit == 4096 and empty.image_tokens == 576 and empty.warning is None
    assert empty.images_left == (4096 - empty.used - 512) // 576
    two = service.budget(None, "hi", pending_images=2, max_new_tokens=512)
    assert two.used - empty.used >= 2 * 576 and two.images_left == empty.images_left - 2
    assert "does not fit" in service.budget(None, pending_images=7).warning
    assert "cut to about" in service.budget(None, pending_images=6, max_new_tokens=1024).warning
    cid = ask(service, None, "hello", [png("red")]).conversation_id
    assert service.budget(cid).used > empty.used + 576


def test_budget_is_none_while_loading(store):
    manager = ModelManager(TALKATIVE)  # never started
    assert ChatService(store, manager).budget(None) is None
    events, last = run(ChatService(store, manager).send(None, "hi"))
    assert last.kind == "error" and "not been loaded" in last.text


def make_pdf(pages: int) -> bytes:
    import pymupdf

    doc = pymupdf.open()
    for i in range(pages):
        doc.new_page(width=595, height=842).insert_text((72, 72), f"Page {i + 1}")
    data = doc.tobytes()
    doc.close()
    return data


def test_attach_pdf_pages_at_native_size_within_the_budget(service):
    pdf = make_pdf(3)
    result = service.attach_pdf_pages(pdf, "1-2")
    assert result.pages == [1, 2] and result.message is None
    assert [max(im.size) for im in result.images] == [384, 384]
    room = service.budget(None).images_left
    squeezed = service.attach_pdf_pages(pdf, "all", pending_images=room - 1)
    assert squeezed.pages == [1] and "Only 1 page fits" in squeezed.message


@pytest.mark.skipif(bool(os.environ.get("DISPLAY")), reason="needs a headless session")
def test_capture_screen_headless_is_a_clear_error(service):
    from app.screen_capture import CaptureError

    with pytest.raises(CaptureError, match="No display"):
        service.capture_screen(1)
