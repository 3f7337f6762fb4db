"""The web UI in a real browser: `run_app.py` serves the embedded demo model on a free port, Chromium
(Playwright, sync API) drives it, and the store in the data directory is checked from this process.

One server and one browser for the module; each test opens a fresh page (a fresh gradio session). Skipped
only when Chromium or Playwright is not available.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image

from app.install_token import with_token
from app.store import Store

from conftest import app_env, require, require_module, stop_process

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("DSVL_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
STARTUP_TIMEOUT_S = 120
TIMEOUT_MS = 30_000
CURSOR = "▍"

playwright_api = require_module("playwright.sync_api")


# ---------------------------------------------------------------------- fixtures
TOKENS: dict[str, str] = {}  # host:port -> the install token of the app start_server started there


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, port: int, log_path: Path, model: Path | None = None, flags: tuple[str, ...] = (),
                 **env_vars: str) -> subprocess.Popen:
    """run_app.py on `model` (default: the embedded demo) with more `flags`, headless (no DISPLAY), answering at
    http://127.0.0.1:<port>/ on return, its start-up message printed."""
    env = app_env(**env_vars)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "run_app.py", "--no-browser", "--port", str(port), "--data-dir", str(data_dir),
             *(["--model", str(model)] if model else []), *flags],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"run_app.py exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:  # the install token is made at start; with it, the page answers 200
                token = (data_dir / "install-token").read_text().strip()
                request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
                with urllib.request.urlopen(request, timeout=2) as response:
                    if response.status == 200 and "Press Ctrl+C" in log_path.read_text():  # and said so
                        TOKENS[urlsplit(url).netloc] = token
                        return proc
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"run_app.py did not answer within {STARTUP_TIMEOUT_S} s:\n"
                            f"{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
    except BaseException:
        stop_process(proc)
        raise


@pytest.fixture(scope="module")
def server(tmp_path_factory, talkative_model):
    """The app on the talkative model: its long answers are what Stop, the queue and streaming are tested on
    (the demo model's own browser test is in test_ui_demo.py)."""
    data_dir = tmp_path_factory.mktemp("ui-data")
    log_path = data_dir.parent / "server.log"
    port = _free_port()
    proc = start_server(data_dir, port, log_path, talkative_model)
    try:
        yield {"url": f"http://127.0.0.1:{port}/", "data_dir": data_dir, "log": log_path, "model": talkative_model}
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def store(server):
    with Store(server["data_dir"]) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    require(Path(CHROMIUM).exists() or bool(shutil.which(CHROMIUM)),
            f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)")
    try:
        manager = playwright_api.sync_playwright().start()
    except Exception as e:  # noqa: BLE001
        require(False, f"Playwright cannot start: {e}")
    try:
        browser = manager.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    except Exception as e:  # noqa: BLE001
        manager.stop()
        require(False, f"Chromium cannot be launched: {e}")
    yield browser
    browser.close()
    manager.stop()


@pytest.fixture(scope="module")
def shared_page(browser, server):
    """One tab for the module (loading the gradio page costs seconds); see `page` for the reset."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.js_errors = []
    page.on("pageerror", lambda e: page.js_errors.append(str(e)))
    open_app(page, server["url"])
    yield page
    context.close()


@pytest.fixture
def page(shared_page):
    """The shared tab, back on an empty new chat with no search and no notice."""
    page = shared_page
    page.js_errors.clear()
    if page.locator("#history-search input").input_value():
        page.fill("#history-search input", "")
    page.click("#new-chat-btn")
    expect_count(page, "#chatbot [data-testid=user]", 0)
    page.wait_for_selector("#notice", state="hidden")
    yield page
    assert not page.js_errors, f"JavaScript errors on the page: {page.js_errors}"


# ---------------------------------------------------------------------- helpers
def open_app(page, url: str) -> None:
    """Open the app as its owner: the address carries the install token, as the tab run_app.py opens does."""
    page.goto(with_token(url, TOKENS[urlsplit(url).netloc]))
    page.wait_for_selector("#chat-input textarea")
    # The demo model loads in a second or two; the banner turns ready and the meter fills in.
    page.wait_for_selector("#model-banner .status-dot.ready", timeout=60_000)


def open_tab(browser, server, width: int, height: int):
    """A second browser context (its own gradio session) on the app: (context, page); close the context."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    open_app(page, server["url"])
    return context, page


def make_png(path: Path, color: tuple[int, int, int], size=(64, 48)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def attach(page, paths: list[Path]) -> None:
    before = page.locator("#chat-input .thumbnail-item").count()
    page.set_input_files("#chat-input input[type=file]", [str(p) for p in paths])
    expect_count(page, "#chat-input .thumbnail-item", before + len(paths))


def expect_count(page, selector: str, count: int, timeout_ms: int = TIMEOUT_MS) -> None:
    page.wait_for_function("([s, n]) => document.querySelectorAll(s).length === n", arg=[selector, count],
                           timeout=timeout_ms)


def send(page, text: str) -> None:
    box = page.locator("#chat-input textarea")
    box.fill(text)
    box.press("Enter")


def record_answer_lengths(page) -> None:
    """Log the length of the last assistant bubble on every DOM change (to see it grow while streaming)."""
    page.evaluate("""() => {
        window.__answerLengths = [];
        const chat = document.querySelector('#chatbot');
        new MutationObserver(() => {
            const bots = chat.querySelectorAll('[data-testid=bot]');
            if (bots.length) window.__answerLengths.push(bots[bots.length - 1].innerText.length);
        }).observe(chat, {subtree: true, childList: true, characterData: true});
    }""")


def last_answer(page) -> str:
    bots = page.locator("#chatbot [data-testid=bot]")
    return bots.nth(bots.count() - 1).inner_text() if bots.count() else ""


def wait_answer_finished(page, timeout_ms: int = 60_000) -> str:
    """Wait for the streaming cursor to go and the event to finish; returns the final answer text."""
    page.wait_for_function(
        """(cursor) => {
            const bots = document.querySelectorAll('#chatbot [data-testid=bot]');
            return bots.length > 0 && !bots[bots.length - 1].innerText.includes(cursor);
        }""", arg=CURSOR, timeout=timeout_ms)
    page.wait_for_selector("#gen-stats:has-text('tokens')", timeout=timeout_ms)
    return last_answer(page)


def wait_hidden(page, selector: str) -> None:
    """Wait for `selector` to leave the screen; if it stays, the failure quotes the notice (a run's only clue)."""
    try:
        page.wait_for_selector(selector, state="hidden")
    except playwright_api.TimeoutError:
        pytest.fail(f"{selector} is still shown; the notice says: {page.locator('#notice').inner_text()!r}")


def find_conversation(store: Store, word: str) -> dict:
    hits = [h for h in store.search(word) if h["role"] == "user"]
    assert hits, f"no stored user message contains {word!r}"
    return store.get_conversation(hits[0]["conversation_id"])


def words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z0-9]{3,}", text))


def user_images(page, row: int = -1) -> list:
    rows = page.locator("#chatbot .user-row")
    index = rows.count() - 1 if row < 0 else row
    return rows.nth(index).locator("img").all()


def wait_images_loaded(page, selector: str) -> None:
    """Every matching <img> has been fetched and decoded (a broken link never gets a natural width)."""
    page.wait_for_function("""(s) => [...document.querySelectorAll(s)]
        .every(img => img.complete && img.naturalWidth > 0)""", arg=selector)


def open_accordion(page, elem_id: str) -> None:
    content = page.locator(f"#{elem_id} [data-testid=accordion-content]")
    if not content.is_visible():
        page.click(f"#{elem_id} .label-wrap")
        content.wait_for(state="visible")


def open_from_history(page, word: str) -> None:
    item = page.locator("#history-list label", has_text=word).first
    item.click()
    page.wait_for_function("(w) => document.querySelector('#chatbot').innerText.includes(w)", arg=word)


def set_max_new_tokens(page, value: int) -> None:
    """Type the value, and again if an update still on its way (a New chat restoring the saved settings)
    overwrote it: it must hold for half a second."""
    open_accordion(page, "settings-panel")
    number = page.locator("#max-new-tokens input[type=number]")
    for _ in range(10):
        number.fill(str(value))
        number.press("Tab")
        page.wait_for_timeout(500)
        if number.input_value() == str(value):
            return
    raise AssertionError(f"max new tokens did not stay at {value}")


def upload_pdf(page, path: Path) -> None:
    open_accordion(page, "pdf-panel")
    clear = page.locator("#pdf-upload button[aria-label='Clear']")
    if clear.count():  # a PDF from an earlier test is still loaded
        clear.click()
    page.set_input_files("#pdf-upload input[type=file]", str(path))


FIRST_WORD = "zebrafinch"


def ensure_first_conversation(page, store: Store, tmp_path: Path) -> dict:
    """The conversation test_send_two_images creates; made here too when that test was deselected."""
    if not [h for h in store.search(FIRST_WORD) if h["role"] == "user"]:
        set_max_new_tokens(page, 96)
        attach(page, [make_png(tmp_path / "a.png", (220, 30, 30)), make_png(tmp_path / "b.png", (30, 30, 220))])
        send(page, f"What colours are these {FIRST_WORD} pictures?")
        wait_answer_finished(page)
        open_app(page, page.url)
    return find_conversation(store, FIRST_WORD)


# ---------------------------------------------------------------------- tests
def test_send_two_images_streams_an_answer(page, store, tmp_path):
    red = make_png(tmp_path / "red.png", (220, 30, 30))
    blue = make_png(tmp_path / "blue.png", (30, 30, 220), size=(40, 64))
    set_max_new_tokens(page, 96)
    attach(page, [red, blue])
    record_answer_lengths(page)
    send(page, f"What colours are these {FIRST_WORD} pictures?")

    # The question shows at once with both images as thumbnails, the input is cleared.
    page.wait_for_function("(w) => document.querySelector('#chatbot .user-row')?.innerText.includes(w)",
                           arg=FIRST_WORD)
    expect_count(page, "#chatbot .user-row img", 2)
    assert page.locator("#chat-input textarea").input_value() == ""
    expect_count(page, "#chat-input .thumbnail-item", 0)

    final = wait_answer_finished(page)
    lengths = page.evaluate("window.__answerLengths")
    growing = sorted(set(n for n in lengths if n > 0))
    assert len(growing) >= 3, f"the answer did not stream (lengths seen: {lengths[:20]})"
    assert final.strip()

    conversation = find_conversation(store, FIRST_WORD)
    question, answer = conversation["messages"]
    assert question["role"] == "user" and len(question["attachments"]) == 2
    assert [a["width"] for a in question["attachments"]] == [64, 40]
    assert answer["role"] == "assistant" and answer["status"] == "complete" and answer["text"].strip()
    # The bubble shows the stored answer (compared by words: markdown rendering may eat some symbols).
    stored = words(answer["text"])
    assert not stored or len(stored & words(final)) >= 0.6 * len(stored)
    # Thumbnails come from the store's attachment files and actually load.
    wait_images_loaded(page, "#chatbot .user-row img")
    srcs = [img.get_attribute("src") for img in user_images(page)]
    assert all(a["sha256"] in src for a, src in zip(question["attachments"], srcs)), srcs
    # The conversation appears at the top of the history list, titled after the question.
    page.wait_for_selector(f"#history-list label:has-text('{FIRST_WORD}')")
    assert FIRST_WORD in page.locator("#history-list label").first.inner_text()
    assert "tokens left" in page.locator("#context-meter").inner_text()


def test_stop_mid_answer(page, store):
    set_max_new_tokens(page, 2000)
    record_answer_lengths(page)
    send(page, "Tell me a very long story about a kestrel")
    page.wait_for_function("""(cursor) => {
        const bots = document.querySelectorAll('#chatbot [data-testid=bot]');
        const text = bots.length ? bots[bots.length - 1].innerText : '';
        return text.includes(cursor) && text.replace(cursor, '').trim().length > 0;
    }""", arg=CURSOR)
    page.click("#stop-btn")
    final = wait_answer_finished(page)
    assert "(stopped)" in final
    length = len(last_answer(page))
    page.wait_for_timeout(1000)
    assert len(last_answer(page)) == length, "the answer kept growing after Stop"

    answer = find_conversation(store, "kestrel")["messages"][-1]
    assert answer["status"] == "stopped"
    assert answer["settings"]["max_new_tokens"] == 2000
    assert 0 < answer["timings"]["tokens"] < 2000


def test_reload_and_open_from_history(page, store, server, tmp_path):
    conversation = ensure_first_conversation(page, store, tmp_path)
    open_app(page, server["url"])  # a reload
    assert page.locator("#chatbot [data-testid=bot]").count() == 0  # a fresh page starts a new chat
    open_from_history(page, FIRST_WORD)
    expect_count(page, "#chatbot .user-row img", 2)
    wait_images_loaded(page, "#chatbot .user-row img")
    answer = conversation["messages"][1]["text"]
    assert len(words(answer) & words(last_answer(page))) >= 0.6 * len(words(answer))
    assert page.locator("#rename-box input").input_value() == conversation["title"]


def test_search_finds_the_conversation(page, store, tmp_path):
    ensure_first_conversation(page, store, tmp_path)
    page.fill("#history-search input", FIRST_WORD)
    hit = page.locator("#search-results .search-hit").first
    hit.wait_for()
    assert page.locator("#search-results mark", has_text=FIRST_WORD).count() >= 1
    hit.click()
    page.wait_for_function("(w) => document.querySelector('#chatbot').innerText.includes(w)", arg=FIRST_WORD)
    expect_count(page, "#chatbot .user-row img", 2)
    # The history list marks it as the open conversation.
    assert FIRST_WORD in page.locator("#history-list label:has(input:checked)").inner_text()

    page.fill("#history-search input", "nosuchwordanywhere")
    page.wait_for_selector("#search-results .search-empty")


def test_export_json_then_import(page, store, tmp_path):
    original = ensure_first_conversation(page, store, tmp_path)
    open_from_history(page, FIRST_WORD)
    page.click("#export-json-btn")
    link = page.locator("#export-file a[download]")
    link.wait_for()
    with page.expect_download() as download:
        link.click()
    exported = tmp_path / "export.json"
    download.value.save_as(exported)
    data = json.loads(exported.read_text())
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]
    assert len(data["attachments"]) == 2
    decoded = Image.open(io.BytesIO(base64.b64decode(data["attachments"][0]["data"])))
    assert decoded.size == (64, 48)

    before = {c["id"] for c in store.list_conversations(limit=1000)}
    page.set_input_files("#history-sidebar input[type=file][accept='.json']", str(exported))
    page.wait_for_selector("#history-notice:has-text('Imported')")
    new = [c for c in store.list_conversations(limit=1000) if c["id"] not in before]
    assert len(new) == 1
    imported = store.get_conversation(new[0]["id"])

    def shape(conversation):
        return [(m["role"], m["text"], m["status"], [a["sha256"] for a in m["attachments"]])
                for m in conversation["messages"]]

    assert shape(imported) == shape(original)
    assert imported["title"] == original["title"]
    # The imported copy is open, and the list now holds both.
    expect_count(page, "#chatbot .user-row img", 2)
    assert page.locator("#history-list label", has_text=FIRST_WORD).count() == 2


def test_pdf_pages_attach_the_chosen_pages(page, store, tmp_path):
    pymupdf = require_module("pymupdf")
    colors = [(1, 0, 0), (0, 0.8, 0), (0, 0, 1), (1, 0.85, 0)]  # red, green, blue, yellow
    doc = pymupdf.open()
    for color in colors:
        p = doc.new_page(width=300, height=400)
        p.draw_rect(p.rect, color=color, fill=color)
    pdf = tmp_path / "colours.pdf"
    doc.save(pdf)
    doc.close()

    set_max_new_tokens(page, 16)
    upload_pdf(page, pdf)
    expect_count(page, "#pdf-pages img", 4)
    page.wait_for_selector("#pdf-info:has-text('4 pages')")
    page.locator("#pdf-pages img").nth(2).click()  # a click adds page 3; typing replaces the selection
    page.wait_for_function("() => document.querySelector('#pdf-pages').innerText.includes('✓ Page 3')")
    page.fill("#pdf-selection textarea, #pdf-selection input", "2,4")
    page.wait_for_function("""() => {
        const text = document.querySelector('#pdf-pages').innerText;
        return text.includes('✓ Page 2') && text.includes('✓ Page 4') && !text.includes('✓ Page 3');
    }""")
    page.click("#pdf-attach-btn")
    page.wait_for_selector("#pdf-info:has-text('Attached page(s) 2, 4')")
    expect_count(page, "#chat-input .thumbnail-item", 2)

    send(page, "Which colours do the pdfpages show?")
    wait_answer_finished(page)
    expect_count(page, "#chatbot .user-row img", 2)
    question = find_conversation(store, "pdfpages")["messages"][0]
    assert [a["name"] for a in question["attachments"]] == ["page-2.png", "page-4.png"]
    expected = [(0, 204, 0), (255, 217, 0)]
    for attachment, rgb in zip(question["attachments"], expected):
        with Image.open(store.attachment_path(attachment["sha256"])) as im:
            assert max(im.size) == 384  # the demo model's native input size
            pixel = im.convert("RGB").getpixel((im.width // 2, im.height // 2))
        assert all(abs(a - b) <= 12 for a, b in zip(pixel, rgb)), (attachment["name"], pixel)

    # A page that does not exist is refused with the page count.
    page.fill("#pdf-selection textarea, #pdf-selection input", "7")
    page.click("#pdf-attach-btn")
    page.wait_for_selector("#notice:has-text('the PDF has 4 pages')")


def test_bad_image_is_refused_when_attached(page, store, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("just some text, not a picture")
    conversations = len(store.list_conversations(limit=1000))
    page.locator("#chat-input textarea").fill("Describe this ibisword image")
    page.set_input_files("#chat-input input[type=file]", [str(make_png(tmp_path / "good.png", (0, 90, 0))), str(fake)])
    notice = page.locator("#notice")
    notice.wait_for(state="visible")
    text = notice.inner_text()
    assert "notes.png" in text and "image" in text.lower() and "removed" in text
    assert "Traceback" not in text
    # The bad file left the box at once; the good one and the typed text stay, and nothing was stored.
    expect_count(page, "#chat-input .thumbnail-item", 1)
    assert page.locator("#chat-input textarea").input_value() == "Describe this ibisword image"
    assert len(store.list_conversations(limit=1000)) == conversations
    assert store.search("ibisword") == []
    assert page.locator("#chatbot [data-testid=user]").count() == 0


def test_other_input_errors_are_shown(page, store, tmp_path):
    conversations = len(store.list_conversations(limit=1000))
    # Screen capture on a machine without a display (this test server has no DISPLAY).
    open_accordion(page, "screen-panel")
    page.click("#capture-btn")
    page.wait_for_selector("#notice:has-text('No display available')")
    # An empty message, then a 1 MB one.
    box = page.locator("#chat-input textarea")
    box.press("Enter")
    page.wait_for_selector("#notice:has-text('Type a message')")
    box.fill("x" * 1_000_000)
    box.press("Enter")
    page.wait_for_selector("#notice:has-text('1,000,000 characters')")
    assert len(box.input_value()) == 1_000_000  # kept, to be shortened
    # A password-protected PDF.
    pymupdf = require_module("pymupdf")
    doc = pymupdf.open()
    doc.new_page()
    locked = tmp_path / "locked.pdf"
    doc.save(locked, encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="secret", owner_pw="owner")
    doc.close()
    upload_pdf(page, locked)
    page.wait_for_selector("#notice:has-text('password-protected')")
    assert "Traceback" not in page.locator("#notice").inner_text()
    assert str(tmp_path) not in page.locator("#notice").inner_text()  # no server paths in messages
    # The refused file is gone from the panel, so the panel and the notice agree.
    page.wait_for_function("() => !document.querySelector('#pdf-upload').innerText.includes('locked.pdf')")
    page.click("#pdf-attach-btn")
    page.wait_for_selector("#notice:has-text('Upload a PDF first')")
    assert len(store.list_conversations(limit=1000)) == conversations



def test_edit_regenerate_delete_rename(page, store):
    set_max_new_tokens(page, 24)
    send(page, "First draft about an osprey")
    wait_answer_finished(page)
    conversation_id = find_conversation(store, "osprey")["id"]

    # Edit message (none selected: the last): the text comes back into the box; sending shows the new
    # question and its answer in place of the old ones (which stay as version 1/2, see the fork test below).
    page.click("#edit-btn")
    page.wait_for_selector("#edit-bar", state="visible")
    box = page.locator("#chat-input textarea")
    assert box.input_value() == "First draft about an osprey"
    box.fill("Second draft about a heron")
    box.press("Enter")
    page.wait_for_function("() => document.querySelector('#chatbot').innerText.includes('heron')")
    wait_answer_finished(page)
    wait_hidden(page, "#edit-bar")
    messages = store.get_conversation(conversation_id)["messages"]
    assert [(m["role"], m["text"]) for m in messages][0] == ("user", "Second draft about a heron")
    assert len(messages) == 2 and "osprey" not in page.locator("#chatbot").inner_text()

    # Regenerate shows a new answer (the old one is kept as version 1/2).
    old_answer = messages[1]["id"]
    page.click("#regenerate-btn")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        messages = store.get_conversation(conversation_id)["messages"]
        if len(messages) == 2 and messages[1]["id"] != old_answer and messages[1]["status"] == "complete":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"regenerate did not show a new answer: {messages}")
    wait_answer_finished(page)
    assert messages[1]["variant_ids"] == [old_answer, messages[1]["id"]]
    wait_versions(page, "#chatbot [data-testid=bot]", "2/2")

    # Rename, then Delete turn empties the transcript.
    page.fill("#rename-box input", "Bird notes")
    page.click("#rename-btn")
    page.wait_for_selector("#history-list label:has-text('Bird notes')")
    assert store.get_conversation(conversation_id)["title"] == "Bird notes"
    page.click("#delete-turn-btn")
    expect_count(page, "#chatbot [data-testid=user]", 0)
    assert store.get_conversation(conversation_id)["messages"] == []

    # Delete the conversation: asks first, Cancel keeps it, Delete removes it.
    page.click("#delete-btn")
    page.wait_for_selector("#delete-confirm", state="visible")
    assert "Bird notes" in page.locator("#delete-confirm").inner_text()
    page.click("#delete-no-btn")
    page.wait_for_selector("#delete-confirm", state="hidden")
    assert store.get_conversation(conversation_id)
    page.click("#delete-btn")
    page.click("#delete-yes-btn")
    page.wait_for_selector("#history-list label:has-text('Bird notes')", state="detached")
    assert conversation_id not in {c["id"] for c in store.list_conversations(limit=1000)}


def versions_shown(page, selector: str) -> str:
    """The "‹ i/n ›" text under the last message matching `selector` ("" when it has no other versions)."""
    bubbles = page.locator(selector)
    nav = bubbles.nth(bubbles.count() - 1).locator(".variants")
    return nav.inner_text().replace("\u2039", "").replace("\u203a", "").strip() if nav.count() else ""


def wait_versions(page, selector: str, text: str) -> None:
    page.wait_for_function("""([s, t]) => { const b = document.querySelectorAll(s);
        const nav = b.length ? b[b.length - 1].querySelector('.variants') : null;
        return nav !== null && nav.innerText.includes(t); }""", arg=[selector, text])


def test_regenerate_twice_and_flip_back_to_the_first_answer(page, store):
    set_max_new_tokens(page, 12)
    send(page, "Tell me about a kingfisher")
    first_text = wait_answer_finished(page)
    conversation = find_conversation(store, "kingfisher")
    first_id = conversation["messages"][1]["id"]
    for count in (2, 3):
        page.click("#regenerate-btn")
        wait_versions(page, "#chatbot [data-testid=bot]", f"{count}/{count}")
        wait_answer_finished(page)
    path = store.get_conversation(conversation["id"])["messages"]
    assert len(path) == 2 and path[1]["variant_count"] == 3 and path[1]["variant_ids"][0] == first_id
    assert "1/3" not in page.locator("#chatbot").inner_text()

    # ‹ twice: back to the first answer, in the transcript and in the store (what the next message follows).
    for shown in ("2/3", "1/3"):
        page.locator("#chatbot [data-testid=bot] .variants button[title='Previous version']").last.click()
        wait_versions(page, "#chatbot [data-testid=bot]", shown)
    assert versions_shown(page, "#chatbot [data-testid=bot]") == "1/3"
    assert last_answer(page).startswith(first_text.strip())
    assert store.get_conversation(conversation["id"])["messages"][1]["id"] == first_id
    assert page.locator("#chatbot [data-testid=bot] .variants .variant-end").count() == 1  # no ‹ before 1/3
    page.wait_for_selector("#notice", state="hidden")


def test_edit_the_first_message_of_a_three_turn_conversation_and_see_the_fork(page, store):
    set_max_new_tokens(page, 8)
    questions = ["Three turns about a puffin", "Second turn", "Third turn"]
    for question in questions:
        send(page, question)
        page.wait_for_function("(q) => document.querySelector('#chatbot').innerText.includes(q)", arg=question)
        wait_answer_finished(page)
        expect_count(page, "#chatbot [data-testid=bot]", questions.index(question) + 1)
    conversation_id = find_conversation(store, "puffin")["id"]
    old_path = [m["id"] for m in store.get_conversation(conversation_id)["messages"]]
    assert len(old_path) == 6

    # Select the first question, Edit message: it comes back into the box; send it changed.
    page.locator("#chatbot [data-testid=user]").first.click()
    page.wait_for_selector("#notice:has-text('Message 1 selected')")
    page.click("#edit-btn")
    page.wait_for_selector("#edit-bar:has-text('Editing message 1')")
    box = page.locator("#chat-input textarea")
    assert box.input_value() == questions[0]
    box.fill("One turn about an auk")
    box.press("Enter")
    page.wait_for_function("() => document.querySelector('#chatbot').innerText.includes('auk')")
    wait_answer_finished(page)
    expect_count(page, "#chatbot [data-testid=user]", 1)
    assert versions_shown(page, "#chatbot [data-testid=user]") == "2/2"
    assert "puffin" not in page.locator("#chatbot").inner_text()
    messages = store.get_conversation(conversation_id)["messages"]
    assert [m["text"] for m in messages][0] == "One turn about an auk" and len(messages) == 2

    # ‹ on the question: the old branch is back, all three turns of it.
    page.locator("#chatbot [data-testid=user] .variants button[title='Previous version']").click()
    expect_count(page, "#chatbot [data-testid=user]", 3)
    assert "puffin" in page.locator("#chatbot").inner_text() and "auk" not in page.locator("#chatbot").inner_text()
    assert [m["id"] for m in store.get_conversation(conversation_id)["messages"]] == old_path
    page.wait_for_selector("#history-list label:has-text('6 msg')")


def test_laptop_screen_keeps_input_and_tools_in_view(browser, server, store):
    """1280×800: the input box, the transcript actions and the tools are visible without scrolling; Send turns
    into Stop while an answer streams; actions are enabled only when they can act."""
    context, page = open_tab(browser, server, 1280, 800)
    try:
        page.click("#new-chat-btn")
        expect_count(page, "#chatbot [data-testid=user]", 0)
        for selector in ("#chat-input textarea", "#actions", "#context-meter", "#settings-panel", "#pdf-panel",
                         "#screen-panel"):
            box = page.locator(selector).first.bounding_box()
            assert box and box["y"] >= 0 and box["y"] + box["height"] <= 800, (selector, box)
        assert page.evaluate("document.scrollingElement.scrollHeight") <= 800
        disabled = "(ids) => ids.map(i => document.getElementById(i).disabled)"
        actions = ["stop-btn", "regenerate-btn", "edit-btn", "delete-turn-btn"]
        page.wait_for_function(f"() => ({disabled})({json.dumps(actions)}).every(d => d)")

        set_max_new_tokens(page, 3000)
        send(page, "A long story about a lapwing")
        page.wait_for_selector("#chat-input button.stop-button")  # the send arrow became a stop square
        assert page.evaluate(disabled, actions) == [False, True, True, True]
        page.click("#chat-input button.stop-button")
        assert "(stopped)" in wait_answer_finished(page)
        page.wait_for_selector("#chat-input button.submit-button")
        page.wait_for_function(f"() => ({disabled})({json.dumps(actions)}).join() === 'true,false,false,false'")
        assert find_conversation(store, "lapwing")["messages"][-1]["status"] == "stopped"
    finally:
        set_max_new_tokens(page, 512)  # the settings are kept for the next chats of this module
        context.close()


def test_second_tab_waits_in_line_and_sees_its_place(browser, server, store, shared_page):
    """One model, two tabs: the second tab's question is stored and shown at once with its place in line;
    it is answered when the first tab's answer ends."""
    first = shared_page
    first.click("#new-chat-btn")
    set_max_new_tokens(first, 3000)
    context, second = open_tab(browser, server, 1400, 1000)
    try:
        second.click("#new-chat-btn")
        set_max_new_tokens(second, 8)
        send(first, "A very long story about a godwit")
        first.wait_for_selector("#chat-input button.stop-button")
        send(second, "Short question about a plover")
        second.wait_for_selector("#notice:has-text('1st in line')")
        second.wait_for_selector("#chatbot [data-testid=bot]:has-text('1st in line')")
        assert "plover" in second.locator("#chatbot [data-testid=user]").last.inner_text()
        question = find_conversation(store, "plover")["messages"]
        assert [m["role"] for m in question] == ["user"]  # stored while waiting; no answer row yet
        assert find_conversation(store, "godwit")["messages"][-1]["status"] == "streaming"

        first.click("#stop-btn")
        assert "(stopped)" in wait_answer_finished(first)
        wait_answer_finished(second)
        answer = find_conversation(store, "plover")["messages"][-1]
        assert answer["role"] == "assistant" and answer["status"] == "complete"
        second.wait_for_selector("#notice", state="hidden")
    finally:
        set_max_new_tokens(first, 512)
        context.close()


def test_switch_models_from_the_model_tab(page, store, server, tmp_path):
    from engine.tiny import build_tiny

    other = build_tiny(tmp_path / "second-model", seed=3)
    page.click("button[role=tab]:has-text('Model')")
    page.fill("#model-source input, #model-source textarea", str(tmp_path / "missing"))
    page.click("#model-load-btn")
    page.wait_for_selector("#model-notice:has-text('No such checkpoint directory')")
    page.fill("#model-source input, #model-source textarea", str(other))
    page.click("#model-load-btn")
    page.wait_for_selector("#model-banner .model-name:has-text('second-model')", timeout=60_000)
    page.wait_for_selector("#model-banner .status-dot.ready")
    page.click("button[role=tab]:has-text('Chat')")
    send(page, "Hello to the second falconmodel")
    wait_answer_finished(page)
    answer = find_conversation(store, "falconmodel")["messages"][-1]
    assert answer["status"] == "complete" and answer["model"] == "second-model"

    # Back to the first model through the list of recent models (the rest of this module chats with it).
    page.click("button[role=tab]:has-text('Model')")
    page.fill("#model-source input, #model-source textarea", str(server["model"]))
    page.click("#model-load-btn")
    page.wait_for_selector("#model-banner .model-name:has-text('talkative')", timeout=60_000)
    page.wait_for_selector("#model-banner .status-dot.ready")
    page.click("#recent-models input")
    page.wait_for_selector("[role=option]:has-text('second-model')")
    page.keyboard.press("Escape")
    page.click("button[role=tab]:has-text('Chat')")


def test_an_extreme_strip_stays_visible_in_the_transcript(page, tmp_path):
    strip = make_png(tmp_path / "strip.png", (200, 30, 30), size=(30000, 10))
    set_max_new_tokens(page, 4)
    attach(page, [strip])
    send(page, "What is this long strip?")
    wait_answer_finished(page)
    image = page.locator("#chatbot [data-testid=user] img").last
    box = image.bounding_box()
    assert box and box["height"] >= 20 and box["width"] >= 20, box


def hand_over(server, question: str | None = None, color=(200, 40, 90)) -> dict:
    """What the screenshot hotkey does: POST a PNG to the app's local endpoint with the install token."""
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), color).save(buffer, format="PNG")
    token = (server["data_dir"] / "install-token").read_text().strip()
    body = json.dumps({"image": base64.b64encode(buffer.getvalue()).decode(), "question": question}).encode()
    request = urllib.request.Request(server["url"] + "hotkey/screenshot", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def test_a_hotkey_screenshot_opens_by_address_and_takes_the_next_question(page, store, server):
    handed = hand_over(server)
    try:
        open_app(page, server["url"].rstrip("/") + handed["path"])
        expect_count(page, "#chatbot [data-testid=user]", 1)
        wait_images_loaded(page, "#chatbot .user-row img")
        assert len(user_images(page)) == 1
        assert page.evaluate("document.activeElement === document.querySelector('#chat-input textarea')")
        assert page.locator("#history-list input:checked").count() == 1  # selected in the history
        send(page, "Which colour fills this screenshot?")
        wait_answer_finished(page)
        [question, answer] = store.get_conversation(handed["conversation"])["messages"]
        assert question["text"] == "Which colour fills this screenshot?" and len(question["attachments"]) == 1
        assert answer["status"] == "complete"
        # One question showing the screenshot and the text (a question with an image shows as two parts).
        expect_count(page, "#chatbot .user-row img", 1)
        expect_count(page, "#chatbot [data-testid=bot]", 1)
        assert "Which colour fills this screenshot?" in page.locator("#chatbot").inner_text()
    finally:
        open_app(page, server["url"])  # the other tests start from the plain address


def test_a_question_sent_with_the_screenshot_is_followed_on_the_page(page, store, server):
    handed = hand_over(server, question="Answer at once please", color=(20, 90, 200))
    try:
        open_app(page, server["url"].rstrip("/") + handed["path"])
        expect_count(page, "#chatbot .user-row img", 1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            messages = store.get_conversation(handed["conversation"])["messages"]
            if messages[-1]["role"] == "assistant" and messages[-1]["status"] == "complete":
                break
            time.sleep(0.2)
        answer = store.get_conversation(handed["conversation"])["messages"][-1]
        assert answer["status"] == "complete" and answer["text"]
        # The page shows the finished answer without a reload (followed while it was written, or loaded whole).
        page.wait_for_function(
            """(cursor) => {
                const bots = document.querySelectorAll('#chatbot [data-testid=bot]');
                return bots.length === 1 && bots[0].innerText.trim() && !bots[0].innerText.includes(cursor);
            }""", arg=CURSOR, timeout=30_000)
        stored = words(answer["text"])
        assert not stored or len(stored & words(last_answer(page))) >= 0.6 * len(stored)
    finally:
        open_app(page, server["url"])


def test_training_tab_runs_stops_resumes_and_chats(page, tmp_path):
    """A tiny stage-3 run from the Training tab: the plan, live progress and plot, Stop, Resume to the end,
    then "Chat with this checkpoint" loads it in the Chat tab, where it answers. (Last in the module: it
    switches the model, and switches back.)"""
    from engine.demo import DEMO_DIR

    from training_fixtures import conversations, tiny_model

    model, data = tiny_model(tmp_path / "model"), conversations(tmp_path / "set")
    page.click("button[role=tab]:has-text('Training')")
    page.fill("#train-model input, #train-model textarea", str(model))
    page.fill("#train-data textarea", str(data))
    for stage in ("1 · adaptor warm-up", "2 · joint VL pretraining"):
        page.locator("#train-stages label", has_text=stage).click()
    # Enough steps that Stop comes while it runs (a step of this tiny model takes ~30 ms on an idle machine).
    page.fill("#train-steps input", "600")
    page.fill("#train-save-every input", "50")
    page.click("#train-check-btn")
    page.wait_for_selector("#train-plan:has-text('supervised fine-tuning')")
    page.wait_for_selector("#train-plan:has-text('8 multimodal and 2 text-only')")

    page.click("#train-start-btn")
    page.wait_for_selector("#train-status:has-text('Running')")
    step_text = "#train-status:has-text('Stage 3: step')"
    page.wait_for_selector(step_text, timeout=240_000)
    first = page.locator("#train-status").inner_text()
    page.wait_for_function("(t) => document.querySelector('#train-status').innerText !== t", arg=first,
                           timeout=120_000)  # the progress moves
    assert page.locator("#train-plot canvas, #train-plot svg").count() > 0
    page.click("#train-stop-btn")
    page.wait_for_selector("#train-status:has-text('Stopped')", timeout=120_000)
    page.click("#train-resume-btn")
    page.wait_for_selector("#train-status:has-text('Finished')", timeout=400_000)

    page.click("#train-chat-btn")
    page.wait_for_selector("#chat-input textarea", state="visible")  # the Chat tab is shown
    page.wait_for_selector("#model-banner .model-name:has-text('final')", timeout=120_000)
    page.wait_for_selector("#model-banner .status-dot.ready")
    page.click("#new-chat-btn")
    set_max_new_tokens(page, 4)
    send(page, "What is two plus two? trainedmodel")
    assert wait_answer_finished(page).strip()

    page.click("button[role=tab]:has-text('Model')")
    page.fill("#model-source input, #model-source textarea", str(DEMO_DIR))
    page.click("#model-load-btn")
    page.wait_for_selector("#model-banner .model-name:has-text('demo')", timeout=60_000)
    page.wait_for_selector("#model-banner .status-dot.ready")
    page.click("button[role=tab]:has-text('Chat')")
