"""Crash recovery, deletes that are really gone, and a second app instance on the data folder, in a real browser
(`run_app.py` on the demo model + Playwright Chromium, as in test_ui_browser). This module runs its own server
so it can kill it (SIGKILL) and start it again; the server's system temp directory is a folder of the test's,
so "no copy anywhere" can be checked."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import time
from pathlib import Path

import pytest
from PIL import Image

from app.store import Store

from conftest import TALKATIVE, stop_process
from test_ui_browser import (CURSOR, TIMEOUT_MS, _free_port, attach, browser, expect_count,  # noqa: F401 (fixture)
                             find_conversation, last_answer, open_app, open_from_history, send, set_max_new_tokens,
                             start_server, wait_answer_finished)


class Server:
    def __init__(self, root: Path):
        self.data_dir, self.temp_dir = root / "data", root / "system-tmp"
        self.data_dir.mkdir()
        self.temp_dir.mkdir()
        self.log = root / "server.log"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.proc = None

    def start(self) -> None:
        # The talkative model: an answer still streams when the server is killed.
        self.proc = start_server(self.data_dir, self.port, self.log, TALKATIVE, TMPDIR=str(self.temp_dir))

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)  # no cleanup of any kind runs
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("recovery"))
    server.start()
    yield server
    stop_process(server.proc)


@pytest.fixture(scope="module")
def store(server):
    """This test process's view of the data folder: to the app, another live instance."""
    with Store(server.data_dir) as s:
        yield s


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    open_app(page, server.url)
    yield page
    context.close()


def wait_until(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def box_value(page) -> str:
    return page.locator("#chat-input textarea").input_value()


def copies(data: bytes, *roots: Path) -> list[Path]:
    """Files under `roots` holding these bytes, or named by their sha256."""
    sha = hashlib.sha256(data).hexdigest()
    return [p for root in roots for p in root.rglob("*")
            if p.is_file() and (sha in p.name or data in p.read_bytes())]


def test_killed_mid_answer_then_restarted_at_once(page, browser, server, store):
    idle = browser.new_page()  # a second tab, left alone while the server goes down and comes back
    idle.set_default_timeout(TIMEOUT_MS)
    open_app(idle, server.url)
    set_max_new_tokens(page, 3000)
    send(page, "A very long story about a kestrel")
    page.wait_for_function("""(cursor) => {
        const bots = document.querySelectorAll('#chatbot [data-testid=bot]');
        const text = bots.length ? bots[bots.length - 1].innerText : '';
        return text.includes(cursor) && text.replace(cursor, '').trim().length > 0;
    }""", arg=CURSOR)
    wait_until(lambda: find_conversation(store, "kestrel")["messages"][-1]["text"])  # part of it is saved
    server.kill()
    # Gradio reloads a page that lost its server once the server answers again; hold that back for now.
    for tab in (page, idle):
        tab.route("**/gradio_api/app_id", lambda route: route.abort())

    # The server is gone: the page says so, and a message typed now stays in the box.
    page.locator("#chat-input textarea").fill("Are you there, plover?")
    page.locator("#chat-input textarea").press("Enter")
    page.wait_for_selector(".toast-body:has-text('Connection')")
    assert box_value(page) == "Are you there, plover?"

    server.start()  # at once: recovery does not wait for the answer to look old
    answer = find_conversation(store, "kestrel")["messages"][-1]
    assert answer["status"] == "stopped" and answer["text"]
    # This test process holds the data folder too: the new server said so in the terminal.
    assert f"another instance of the app (pid {os.getpid()}" in server.log.read_text()

    # The idle tab did not notice: its message reaches a server that never saw the page, which says to
    # reload and keeps the message; nothing is stored.
    send(idle, "Hello again, avocet")
    idle.wait_for_selector("#notice:has-text('reload the page')")
    assert box_value(idle) == "Hello again, avocet"
    assert not [h for h in store.search("avocet") if h["role"] == "user"]
    idle.close()

    # Gradio's own reload: the message is still in the box.
    with page.expect_event("load", timeout=TIMEOUT_MS):
        page.unroute("**/gradio_api/app_id")
    page.wait_for_selector("#model-banner .status-dot.ready", timeout=60_000)
    page.wait_for_function("() => document.querySelector('#chat-input textarea')?.value === 'Are you there, plover?'")

    # The answer shows as stopped, without the streaming cursor, and search finds it.
    open_from_history(page, "kestrel")
    assert "(stopped)" in last_answer(page) and CURSOR not in last_answer(page)
    assert [h["message_id"] for h in store.search(answer["text"].split()[0]) if h["role"] == "assistant"]
    set_max_new_tokens(page, 16)
    page.locator("#chat-input textarea").press("Enter")
    assert CURSOR not in wait_answer_finished(page)
    conversation = find_conversation(store, "plover")
    assert conversation["id"] == find_conversation(store, "kestrel")["id"]
    assert [m["status"] for m in conversation["messages"]] == ["complete", "stopped", "complete", "complete"]


def test_deleted_conversation_leaves_no_copy_of_its_image(page, server, store, tmp_path):
    # Random pixels: the PNG's bytes occur nowhere else.
    rng = random.Random(9)
    image = Image.new("RGB", (48, 40))
    image.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(48 * 40)])
    path = tmp_path / "private.png"
    image.save(path)
    data = path.read_bytes()

    set_max_new_tokens(page, 16)
    attach(page, [path])
    send(page, "What does this egret picture show?")
    wait_answer_finished(page)
    conversation = find_conversation(store, "egret")
    page.click("#export-md-btn")  # a zip holding the image, handed to the browser
    page.locator("#export-file a[download]").wait_for()
    # Kept so far: the attachment, gradio's copy of the upload, and the export -- all in the data folder.
    assert len(copies(data, server.data_dir / "attachments")) == 1
    assert copies(data, server.data_dir / "tmp")
    assert copies(data, server.temp_dir) == []

    page.click("#delete-btn")
    page.click("#delete-yes-btn")
    page.wait_for_selector("#history-list label:has-text('egret')", state="detached")
    assert conversation["id"] not in {c["id"] for c in store.list_conversations(limit=1000)}
    assert copies(data, server.data_dir, server.temp_dir) == []


def test_an_answer_another_instance_writes_shows_as_it_arrives(page, store):
    cid = store.create_conversation()
    store.add_message(cid, "user", "Tell me about the dunlin")
    answer = store.add_message(cid, "assistant", "Dunlins are", status="streaming")
    open_app(page, page.url)  # the list now holds it
    open_from_history(page, "dunlin")
    page.wait_for_function("() => document.querySelector('#chatbot').innerText.includes('Dunlins are')")
    assert CURSOR in last_answer(page)

    store.update_message(answer, text="Dunlins are small sandpipers")
    page.wait_for_function("() => document.querySelector('#chatbot').innerText.includes('small sandpipers')")
    assert CURSOR in last_answer(page)
    store.update_message(answer, text="Dunlins are small sandpipers of the tideline.", status="complete")
    page.wait_for_function("() => document.querySelector('#chatbot').innerText.includes('of the tideline.')")
    expect_count(page, "#chatbot [data-testid=bot]", 1)
    assert CURSOR not in last_answer(page)
