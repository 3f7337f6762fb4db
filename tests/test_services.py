"""What the UI does, done through the app services alone (no Gradio): the Chat tab's and the history
sidebar's calls on a real demo model and a real SQLite file, returning records."""

import io
import json

import pytest
from PIL import Image

from app.models import ModelManager
from app.records import Conversation, SearchHit
from app.services import Services
from app.store import Store, StoreError
from conftest import TALKATIVE

GREEDY = {"temperature": 0.0, "max_new_tokens": 6}


@pytest.fixture
def services(tmp_path, models):
    with Store(tmp_path / "data") as store:
        yield Services.build(store, models)


def png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buffer, "PNG")
    return buffer.getvalue()


def answer(services, conversation_id, text, images=()):
    events = list(services.chat.send(conversation_id, text, images, GREEDY))
    assert [e.kind for e in events][0] == "started" and events[-1].kind == "done", events[-1].text
    return events[-1]


def test_a_chat_as_the_ui_makes_it(services):
    done = answer(services, None, "What is this?", [png("red")])
    cid = done.conversation_id
    second = answer(services, cid, "And now?")

    conversation = services.history.get(cid)
    assert isinstance(conversation, Conversation)
    assert [m.role for m in conversation.messages] == ["user", "assistant", "user", "assistant"]
    assert conversation.messages[1].text == done.text and conversation.messages[3].text == second.text
    first = conversation.messages[0]
    assert first.is_user and len(first.attachments) == 1 and (first.attachments[0].width, first.attachments[0].height) == (40, 30)
    assert conversation.last_question().text == "And now?"
    assert conversation.last_turn().id == conversation.messages[2].id
    assert conversation.messages[3].settings["max_new_tokens"] == 6 and conversation.messages[3].status == "complete"

    [summary] = services.history.list()
    assert (summary.id, summary.message_count, summary.display_title) == (cid, 4, conversation.display_title)


def test_versions_as_the_ui_shows_and_flips_them(services):
    from ui import views

    done = answer(services, None, "Which bird is this?", [png("blue")])
    cid = done.conversation_id
    again = list(services.chat.regenerate(cid, GREEDY))[-1]
    question, shown = services.history.get(cid).messages
    assert (shown.id, shown.variant_index, shown.variant_count) == (again.message_id, 2, 2)
    assert (shown.variant(-1), shown.variant(1), question.variant(-1)) == (done.message_id, None, None)
    messages, _ = views.transcript(services.history.get(cid))
    assert f'class="variant-nav variant-{done.message_id}"' in messages[1]["content"]  # ‹ goes to the first
    assert "2/2" in messages[1]["content"] and "variants" not in str(messages[0]["content"])

    edited = list(services.chat.edit(cid, question.id, "Which fish is this?", GREEDY))[-1]
    new_question = services.history.get(cid).messages[0]
    assert new_question.text == "Which fish is this?" and new_question.attachments == question.attachments
    assert new_question.variant(-1) == question.id and edited.kind == "done"
    services.chat.select_variant(cid, question.id)
    assert [m.id for m in services.history.get(cid).messages] == [question.id, again.message_id]


def test_history_actions(services):
    cid = answer(services, None, "zebra crossing question").conversation_id
    hits = services.history.search("zebra", highlight=("<", ">"))
    assert hits and isinstance(hits[0], SearchHit) and hits[0].conversation_id == cid and "<zebra>" in hits[0].snippet
    assert services.history.search("   ") == []

    services.history.rename(cid, "Animals")
    assert services.history.get(cid).display_title == "Animals"
    services.history.rename(cid, "  ")
    assert services.history.get(cid).title is None  # blank means untitled

    exported = services.history.export_json(cid)
    assert exported.name == "Untitled-conversation.json"
    copy = services.history.import_(exported.data)
    assert copy != cid
    assert [m.text for m in services.history.get(copy).messages] == [m.text for m in services.history.get(cid).messages]
    assert json.loads(exported.data)["messages"][0]["text"] == "zebra crossing question"

    services.chat.delete_conversation(cid)
    assert services.history.get(cid) is None
    assert [c.id for c in services.history.list()] == [copy]
    with pytest.raises(StoreError, match="Open a conversation"):
        services.history.export_json(cid)


def test_import_refuses_a_bad_file_and_keeps_history(services):
    cid = answer(services, None, "keep me").conversation_id
    with pytest.raises(StoreError):
        services.history.import_(b"{not json")
    assert [c.id for c in services.history.list()] == [cid]


def test_settings_are_kept_for_new_chats_and_per_conversation(services):
    from app.settings import GenerationSettings

    assert services.preferences.settings_for(None) == GenerationSettings()
    hot = GenerationSettings(temperature=1.3, seed=7, max_new_tokens=6)
    cid = answer(services, None, "first").conversation_id
    services.preferences.remember_settings(cid, hot)
    services.preferences.remember_settings(None, GenerationSettings(temperature=0.2))  # later, in a new chat
    assert services.preferences.settings_for(cid) == hot  # the conversation keeps its own
    assert services.preferences.settings_for(None).temperature == 0.2  # a new chat starts from the last used
    assert services.preferences.settings_for("no-such-id").temperature == 0.2


def test_markdown_export_is_a_zip_with_its_images(services):
    import zipfile

    cid = answer(services, None, "What is this?", [png("blue")]).conversation_id
    exported = services.history.export_markdown(cid)
    assert exported.name.endswith(".zip")
    with zipfile.ZipFile(io.BytesIO(exported.data)) as z:
        [md] = [n for n in z.namelist() if n.endswith(".md")]
        [image] = [n for n in z.namelist() if not n.endswith(".md")]
        assert f"]({image})" in z.read(md).decode()
        assert Image.open(io.BytesIO(z.read(image))).getpixel((0, 0)) == (0, 0, 255)


def test_switching_models_without_a_restart(tmp_path):
    """A fresh manager (the module's shared one must stay on the demo): switch, chat with the new model,
    switch back; a bad source is refused before anything is unloaded; a switch waits for the running answer."""
    from app.errors import ChatError
    from engine.tiny import build_tiny

    other = build_tiny(tmp_path / "other-model", seed=1)
    manager = ModelManager(TALKATIVE).start()
    assert manager.wait(120), manager.error
    with Store(tmp_path / "data") as store:
        services = Services.build(store, manager)
        first = answer(services, None, "hello")
        demo_runtime = manager.runtime

        for bad, message in [("", "Give a checkpoint"), (str(tmp_path), "no config.json"),
                             ("/no/such/dir", "No such checkpoint directory")]:
            with pytest.raises(ChatError, match=message):
                services.chat.switch_model(bad)
        assert manager.status == "ready" and manager.runtime is demo_runtime

        # A switch takes its place in line: it waits for the model's current holder, then cancel keeps the old one.
        holder = services.chat.scheduler.submit(label="an answer in progress")
        services.chat.switch_model(str(other))
        assert manager.status == "loading" and manager.runtime is demo_runtime
        manager.cancel()
        holder.release()
        assert manager.wait(60) and manager.runtime is demo_runtime and manager.source == TALKATIVE

        services.chat.switch_model(str(other), "8bit")
        assert manager.wait(120), manager.error
        assert manager.runtime is not demo_runtime and manager.runtime.directory == other
        assert manager.banner()["quantization"] != "none" and manager.model_name == "other-model"
        assert not services.chat._sessions  # the old model's sessions (and KV caches) were let go
        second = answer(services, first.conversation_id, "hello again")
        assert second.text and services.history.get(first.conversation_id).messages[-1].status == "complete"

        services.preferences.remember_model(str(other), "8bit")
        services.preferences.remember_model(str(TALKATIVE), None)
        assert [m.label for m in services.preferences.recent_models()] == [str(TALKATIVE), f"{other} (8bit)"]


@pytest.mark.parametrize("native", ["0", None])
def test_banner_and_answers_name_the_backends(services, monkeypatch, native):
    """The Model tab's per-operation list and each stored answer say what ran, with DSVL_NATIVE=0 and without."""
    from engine.kernels import native as native_kernels

    if native is None:
        monkeypatch.delenv("DSVL_NATIVE", raising=False)
    else:
        monkeypatch.setenv("DSVL_NATIVE", native)
    native_kernels.reset()
    try:
        info = services.models.banner()
        rows = info["backends"]
        assert set(rows) >= {"attention (decode)", "rmsnorm (decode)", "rotary (decode)"}
        if native == "0":
            assert all("native" not in how for how in rows.values()) and "DSVL_NATIVE=0" in rows["attention (decode)"]
        elif native_kernels.status() == "loaded":
            assert rows["attention (decode)"].startswith("native AVX2")
        assert ("decoding", info["backend"]) in info["facts"]
        done = answer(services, None, "which kernels?")
        stored = services.history.get(done.conversation_id).messages[-1]
        assert stored.timings["backend"] == info["backend"] == done.stats["backend"]
    finally:
        monkeypatch.undo()
        native_kernels.reset()
