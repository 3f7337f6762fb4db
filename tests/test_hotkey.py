"""The screenshot hotkey: shortcut parsing, the install token, the hand-over endpoint's refusals, a screenshot
waiting for its question, and end to end under Xvfb: run_app.py on a temporary data folder, `run_app.py hotkey`
beside it, a colour painted on the screen, the shortcut pressed with xdotool, and the new conversation found in
the SQLite file with the screen's size and colour; then the app restarts and the same listener still delivers.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.testclient import TestClient

from app import install_token
from app.chat_service import ChatService
from app.handover import ScreenshotHandover
from app.hotkey import (HANDOVER_PATH, AppClient, AppNotRunning, Shortcut, Trigger, ask_question, parse_monitor,
                        parse_shortcut, unsupported_session)
from app.models import ModelManager
from app.store import Store
from engine.demo import DEMO_DIR

from conftest import app_env, require, require_module, stop_process
from test_screen_capture import ensure_tool, set_root_colour, xvfb  # noqa: F401  (xvfb: a fixture)

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 180


def png(colour=(10, 200, 30), size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


# -- the shortcut and the session -----------------------------------------------------------


@pytest.mark.parametrize("text, modifiers, key, spelled", [
    ("ctrl+alt+s", ("ctrl", "alt"), "s", "<ctrl>+<alt>+s"),
    ("Alt + Control + S", ("ctrl", "alt"), "s", "<ctrl>+<alt>+s"),
    ("<ctrl>+<shift>+<f5>", ("ctrl", "shift"), "f5", "<ctrl>+<shift>+<f5>"),
    ("cmd+shift+2", ("shift", "cmd"), "2", "<shift>+<cmd>+2"),
    ("print", (), "print_screen", "<print_screen>"),
])
def test_shortcuts(text, modifiers, key, spelled):
    shortcut = parse_shortcut(text)
    assert shortcut == Shortcut(modifiers, key)
    assert shortcut.pynput == spelled
    assert parse_shortcut("ctrl+alt+s").label == "Ctrl+Alt+S"


@pytest.mark.parametrize("text, message", [
    ("", "is not a shortcut"),
    ("ctrl++s", "is not a shortcut"),
    ("ctrl+alt+ss", "'ss' in 'ctrl+alt+ss' is not a key"),
    ("ctrl+alt", "exactly one key"),
    ("ctrl+a+b", "exactly one key"),
    ("ctrl+ctrl+s", "names ctrl twice"),
    ("s", "would fire while you type"),
])
def test_bad_shortcuts_say_why(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_shortcut(text)


def test_bad_shortcut_flag_is_a_usage_error(capsys):
    import run_app

    for argv in (["hotkey", "--shortcut", "ctrl+alt+ss"], ["--hotkey", "--shortcut", "s"]):
        with pytest.raises(SystemExit) as exit_info:
            run_app.main(argv)
        assert exit_info.value.code == 2
        assert "argument --shortcut" in capsys.readouterr().err


def test_monitor_choice():
    assert parse_monitor("pointer") == "pointer"
    assert parse_monitor("all") == 0
    assert parse_monitor("2") == 2
    for bad in ("0", "-1", "left"):
        with pytest.raises(ValueError, match="not a monitor"):
            parse_monitor(bad)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Wayland and DISPLAY are Linux matters")
def test_wayland_is_refused_with_a_pointer_to_the_capture_button():
    message = unsupported_session({"WAYLAND_DISPLAY": "wayland-0", "DISPLAY": ":0"})
    assert "Wayland" in message and '"Capture screen" in the Screen capture panel' in message
    assert "DISPLAY is not set" in unsupported_session({})
    assert unsupported_session({"DISPLAY": ":0", "XDG_SESSION_TYPE": "x11"}) is None


def test_wayland_listener_exits_at_start_with_the_message(tmp_path):
    env = {**os.environ, "WAYLAND_DISPLAY": "wayland-0", "XDG_SESSION_TYPE": "wayland"}
    result = subprocess.run([sys.executable, "run_app.py", "hotkey", "--data-dir", str(tmp_path)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "Wayland does not let programs listen for global shortcuts" in result.stderr


# -- the install token ------------------------------------------------------------------------


def test_token_is_private_and_stable(tmp_path):
    token = install_token.load_or_create(tmp_path)
    path = install_token.token_path(tmp_path)
    assert len(token) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert install_token.load_or_create(tmp_path) == token == install_token.read(tmp_path)
    path.chmod(0o644)  # e.g. restored from a backup
    assert install_token.read(tmp_path) == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    other = tmp_path / "other"
    other.mkdir()
    assert install_token.load_or_create(other) != token  # one per install


def test_missing_token_says_to_start_the_app(tmp_path):
    with pytest.raises(install_token.TokenError, match="start the app once"):
        install_token.read(tmp_path)


def test_token_helpers():
    assert install_token.bearer("Bearer abc") == "abc" and install_token.bearer("bearer  abc ") == "abc"
    assert install_token.bearer("Basic abc") is None and install_token.bearer(None) is None
    assert install_token.matches("abc", "abc") and not install_token.matches("abd", "abc")
    assert not install_token.matches(None, "abc")
    for host in ("127.0.0.1", "127.8.9.1", "::1", "::ffff:127.0.0.1"):
        assert install_token.is_loopback(host), host
    for host in ("10.0.0.2", "192.168.1.5", "::ffff:10.0.0.2", "testclient", "localhost.evil.com", "", None):
        assert not install_token.is_loopback(host), host


# -- the hand-over endpoint ------------------------------------------------------------------


@pytest.fixture
def endpoint(tmp_path):
    """The endpoint on a real store; the model is not loaded (a screenshot without a question needs none)."""
    store = Store(tmp_path)
    chat = ChatService(store, ModelManager(DEMO_DIR))
    token = install_token.load_or_create(tmp_path)
    app = Starlette(routes=ScreenshotHandover(chat, token).routes())
    yield store, token, lambda host: TestClient(app, client=(host, 50000))
    store.close()


def post(client, token=None, body=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = body if body is not None else {"image": base64.b64encode(png()).decode()}
    return client.post(HANDOVER_PATH, json=body, headers=headers)


def test_endpoint_refuses_without_the_token(endpoint):
    store, _, client = endpoint
    answer = post(client("127.0.0.1"))
    assert answer.status_code == 401 and "missing install token" in answer.json()["error"]
    assert store.list_conversations() == []


def test_endpoint_refuses_a_wrong_token(endpoint):
    store, token, client = endpoint
    answer = post(client("127.0.0.1"), token=token[:-1] + ("x" if token[-1] != "x" else "y"))
    assert answer.status_code == 403 and answer.json()["error"] == "wrong install token"
    assert store.list_conversations() == []


@pytest.mark.parametrize("host", ["192.168.1.20", "::ffff:10.1.2.3", "testclient"])
def test_endpoint_refuses_other_machines_even_with_the_token(endpoint, host):
    store, token, client = endpoint
    answer = post(client(host), token=token)
    assert answer.status_code == 403 and "only accepted from this machine" in answer.json()["error"]
    assert store.list_conversations() == []


def test_endpoint_stores_the_screenshot_as_a_new_conversation(endpoint):
    store, token, client = endpoint
    answer = post(client("::1"), token=token)
    assert answer.status_code == 200
    conversation_id = answer.json()["conversation"]
    assert answer.json()["path"] == f"/?c={conversation_id}"
    [message] = store.get_conversation(conversation_id)["messages"]
    assert (message["role"], message["text"]) == ("user", "")
    [attachment] = message["attachments"]
    assert (attachment["width"], attachment["height"]) == (64, 48)
    assert Path(attachment["path"]).read_bytes() == png()


@pytest.mark.parametrize("body, message", [
    ({"image": "not base64!"}, "not valid base64"),
    ({"question": "hi"}, "expected"),
    ({"image": base64.b64encode(b"not an image").decode()}, "Image 1"),
])
def test_endpoint_says_what_is_wrong_with_a_body(endpoint, body, message):
    store, token, client = endpoint
    answer = post(client("127.0.0.1"), token=token, body=body)
    assert answer.status_code in (400, 422) and message in answer.json()["error"]
    assert store.list_conversations() == []


# -- a screenshot waiting for its question ---------------------------------------------------


def test_the_next_question_takes_the_waiting_screenshot(tmp_path, models):
    with Store(tmp_path) as store:
        chat = ChatService(store, models)
        conversation_id = chat.start_from_image(png(), name="screenshot.png")
        waiting = store.get_conversation(conversation_id)["messages"][0]
        events = list(chat.send(conversation_id, "What is on the screen?", settings={"max_new_tokens": 4}))
        assert events[-1].kind == "done", events[-1].text
        question, answer = store.get_conversation(conversation_id)["messages"]
        assert (question["role"], question["text"], answer["role"]) == ("user", "What is on the screen?",
                                                                         "assistant")
        assert [a["sha256"] for a in question["attachments"]] == [a["sha256"] for a in waiting["attachments"]]
        assert question["variant_count"] == 1  # the waiting message is gone, not an old version
        assert Path(question["attachments"][0]["path"]).is_file()
        assert store.get_conversation(conversation_id)["title"] == "What is on the screen?"


def test_a_question_with_the_screenshot_is_answered_at_once(tmp_path, models):
    with Store(tmp_path) as store:
        chat = ChatService(store, models)
        conversation_id = chat.start_from_image(png(), "Describe this.", settings={"max_new_tokens": 4})
        deadline = time.monotonic() + 120
        while chat.is_generating(conversation_id) and time.monotonic() < deadline:
            time.sleep(0.1)
        question, answer = store.get_conversation(conversation_id)["messages"]
        assert question["text"] == "Describe this." and len(question["attachments"]) == 1
        assert answer["role"] == "assistant" and answer["status"] == "complete"


# -- presses ---------------------------------------------------------------------------------


def test_a_press_while_busy_is_ignored_not_queued():
    release, runs, ignored = threading.Event(), [], []

    def action():
        runs.append(1)
        release.wait(10)

    trigger = Trigger(action, lambda: ignored.append(1))
    assert trigger.press()
    assert not trigger.press() and not trigger.press()
    release.set()
    deadline = time.monotonic() + 10
    while not trigger.press() and time.monotonic() < deadline:  # free again once the first one is done
        time.sleep(0.01)
    release.set()
    assert len(runs) == 2 and len(ignored) >= 2


def test_client_says_how_to_start_the_app(tmp_path):
    install_token.load_or_create(tmp_path)
    port = free_port()
    client = AppClient(tmp_path, f"http://127.0.0.1:{port}/")
    with pytest.raises(AppNotRunning, match=r"not running .*\n  python run_app.py --data-dir"):
        client.send(png())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Xvfb and xdotool are Linux tools")
def test_the_question_window_returns_what_was_typed(xvfb, monkeypatch):  # noqa: F811
    require_module("tkinter")
    xdotool, how = ensure_tool("xdotool", "xdotool")
    require(bool(xdotool), f"cannot type on the X screen: {how}")
    monkeypatch.setenv("DISPLAY", xvfb)
    for keys, expected in ([["type", "what is this"], ["key", "Return"]], "what is this"), ([["key", "Escape"]], None):
        answers = []
        thread = threading.Thread(target=lambda: answers.append(ask_question("Monitor 1")))
        thread.start()
        # --sync: wait for the window to map, then until it has the focus (no window manager gives it here).
        subprocess.run([xdotool, "search", "--sync", "--name", "Ask about this screenshot", "windowfocus", "--sync"],
                       check=True, timeout=20)
        for command in keys:
            subprocess.run([xdotool, *command], check=True, timeout=20)
        thread.join(20)
        assert answers == [expected]


# -- end to end under Xvfb --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(data_dir: Path, port: int, log_path: Path) -> subprocess.Popen:
    """run_app.py on the demo model, headless (the app needs no display; the listener does)."""
    env = app_env()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "run_app.py", "--no-browser", "--port", str(port),
                                 "--data-dir", str(data_dir)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_for(lambda: (data_dir / "app-address").is_file() and proc.poll() is None, proc, log_path,
             "run_app.py to start")
    return proc


def wait_for(condition, proc: subprocess.Popen, log_path: Path, what: str, timeout: float = STARTUP_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"{what}: the process exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)


def screenshots(db_path: Path) -> list[tuple[str, int, int, str]]:
    """(conversation id, width, height, sha256) of every stored attachment, oldest conversation first."""
    with sqlite3.connect(db_path) as db:
        return db.execute("""
            SELECT m.conversation_id, a.width, a.height, a.sha256 FROM messages m
            JOIN message_attachments ma ON ma.message_id = m.id JOIN attachments a ON a.sha256 = ma.sha256
            JOIN conversations c ON c.id = m.conversation_id ORDER BY c.created_at, c.rowid""").fetchall()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Xvfb and xdotool are Linux tools")
def test_pressing_the_shortcut_stores_the_screen_in_the_running_app(xvfb, tmp_path):  # noqa: F811
    xdotool, how = ensure_tool("xdotool", "xdotool")
    require(bool(xdotool), f"cannot press keys on the X screen: {how}")
    data_dir, app_log, hotkey_log = tmp_path / "data", tmp_path / "app.log", tmp_path / "hotkey.log"
    data_dir.mkdir()
    app = start_app(data_dir, free_port(), app_log)
    listener = None
    try:
        env = {**{k: v for k, v in os.environ.items() if k != "WAYLAND_DISPLAY"}, "DISPLAY": xvfb,
               "PYTHONUNBUFFERED": "1"}
        with open(hotkey_log, "ab") as log:
            listener = subprocess.Popen([sys.executable, "run_app.py", "hotkey", "--no-browser",
                                         "--data-dir", str(data_dir)], cwd=REPO, env=env, stdout=log,
                                        stderr=subprocess.STDOUT)
        wait_for(lambda: "Hotkey ready: press Ctrl+Alt+S" in hotkey_log.read_text(), listener, hotkey_log,
                 "the listener")
        db_path = data_dir / "history.db"

        def press_and_find(colour: str, rgb: tuple[int, int, int], count: int):
            set_root_colour(xvfb, colour)
            subprocess.run([xdotool, "key", "ctrl+alt+s"], env=env, check=True, timeout=20)
            wait_for(lambda: len(screenshots(db_path)) == count, listener, hotkey_log, "the screenshot", 60)
            conversation_id, width, height, sha = screenshots(db_path)[-1]
            assert (width, height) == (800, 600)  # the Xvfb screen
            image = Image.open(next((data_dir / "attachments" / sha[:2]).glob(f"{sha}.*")))
            assert image.size == (800, 600)
            assert {image.getpixel(p) for p in [(0, 0), (400, 300), (799, 599)]} == {rgb}
            wait_for(lambda: f"/?c={conversation_id}" in hotkey_log.read_text(), listener, hotkey_log,
                     "the listener to print the page")

        press_and_find("#c03080", (0xC0, 0x30, 0x80), 1)
        # The app restarts (on another port): the same listener finds it again on the next press.
        stop_process(app)
        app = start_app(data_dir, free_port(), app_log)
        press_and_find("#20a0f0", (0x20, 0xA0, 0xF0), 2)
        assert len({c for c, *_ in screenshots(db_path)}) == 2  # two conversations
    finally:
        if listener is not None:
            stop_process(listener)
        stop_process(app)


def test_an_app_that_asks_for_a_sign_in_counts_as_running(tmp_path):
    """The app's pages answer 401 to a caller without a session (app.gate): the listener must not take that for
    an app that is not running."""
    import http.server

    class SignInFirst(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), SignInFirst)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert AppClient(tmp_path, f"http://127.0.0.1:{server.server_port}/").reachable()
    finally:
        server.shutdown()
        server.server_close()
    assert not AppClient(tmp_path, f"http://127.0.0.1:{server.server_port}/").reachable()
