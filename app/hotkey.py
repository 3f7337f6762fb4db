"""Screenshot-and-ask: a global shortcut that captures the screen and hands it to the running app.

`python run_app.py hotkey` runs the listener on its own; `run_app.py --hotkey` runs it beside the server. On a
press it captures the monitor under the mouse pointer (or a chosen one, or all), optionally asks for a question
in a small Tk window, and posts the image to the app's local endpoint (app.handover) with the install token; the
app stores a new conversation and the browser opens on it.

Each press looks the app up afresh (the address the app wrote into the data folder, and the token), so the
listener keeps working across restarts of the app; a press while one is still being handled is ignored.
pynput needs a display to even be imported on Linux, so it is imported only when listening starts.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import sys
import threading
import urllib.error
import urllib.request
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import install_token

log = logging.getLogger(__name__)

DEFAULT_SHORTCUT = "ctrl+alt+s"
ADDRESS_FILE = "app-address"  # the running app's URL, for the listener to find it
DEFAULT_URL = "http://127.0.0.1:7860/"
HANDOVER_PATH = "/hotkey/screenshot"  # served by app.handover
MODIFIERS = {"ctrl": "ctrl", "control": "ctrl", "alt": "alt", "option": "alt", "shift": "shift",
             "cmd": "cmd", "command": "cmd", "super": "cmd", "win": "cmd", "meta": "cmd"}
NAMED_KEYS = {"space", "tab", "enter", "esc", "backspace", "delete", "insert", "home", "end", "page_up",
              "page_down", "up", "down", "left", "right", "print_screen", "pause", "scroll_lock", "menu",
              *(f"f{n}" for n in range(1, 21))}
KEY_ALIASES = {"escape": "esc", "return": "enter", "del": "delete", "ins": "insert", "pgup": "page_up",
               "pgdn": "page_down", "print": "print_screen", "prtsc": "print_screen", "printscreen": "print_screen"}
# Keys that rarely do anything alone, so they may be a shortcut without a modifier.
LONE_KEYS = {"print_screen", "pause", "scroll_lock", *(f"f{n}" for n in range(13, 21))}


# ------------------------------------------------------------------ the shortcut
@dataclass(frozen=True)
class Shortcut:
    modifiers: tuple[str, ...]  # in the order ctrl, alt, shift, cmd
    key: str  # one character, or a name from NAMED_KEYS

    @property
    def label(self) -> str:
        """For people, e.g. "Ctrl+Alt+S"."""
        return "+".join([*(m.capitalize() for m in self.modifiers), self.key.upper() if len(self.key) == 1
                         else self.key.replace("_", " ").title()])

    @property
    def pynput(self) -> str:
        """pynput's GlobalHotKeys spelling, e.g. "<ctrl>+<alt>+s"."""
        key = self.key if len(self.key) == 1 else f"<{self.key}>"
        return "+".join([*(f"<{m}>" for m in self.modifiers), key])


def parse_shortcut(text: str) -> Shortcut:
    """"ctrl+alt+s", "<ctrl>+<shift>+<f5>", "Cmd+Shift+2"...; ValueError saying what is wrong."""
    parts = [p.strip().strip("<>").strip().lower() for p in (text or "").split("+")]
    if not text or not text.strip() or any(not p for p in parts):
        raise ValueError(f"{text!r} is not a shortcut; write it like {DEFAULT_SHORTCUT}")
    modifiers, keys = [], []
    for part in parts:
        if part in MODIFIERS:
            modifier = MODIFIERS[part]
            if modifier in modifiers:
                raise ValueError(f"{text!r} names {modifier} twice")
            modifiers.append(modifier)
            continue
        part = KEY_ALIASES.get(part, part)
        if not (part in NAMED_KEYS or (len(part) == 1 and part.isprintable() and not part.isspace())):
            raise ValueError(f"{part!r} in {text!r} is not a key; use a letter, digit or sign, or one of: "
                             + ", ".join(sorted(NAMED_KEYS - {f"f{n}" for n in range(2, 21)})) + " ... f20")
        keys.append(part)
    if len(keys) != 1:
        raise ValueError(f"{text!r} must have exactly one key besides ctrl, alt, shift and cmd "
                         f"(it has {len(keys)})")
    if not modifiers and keys[0] not in LONE_KEYS:
        raise ValueError(f"{text!r} has no ctrl, alt, shift or cmd: it would fire while you type")
    order = ["ctrl", "alt", "shift", "cmd"]
    return Shortcut(tuple(sorted(modifiers, key=order.index)), keys[0])


def parse_monitor(text: str) -> int | str:
    """"pointer" (the monitor under the mouse), "all" (0) or a monitor number (1..n)."""
    text = (text or "").strip().lower()
    if text in ("pointer", "mouse"):
        return "pointer"
    if text == "all":
        return 0
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError(f"{text!r} is not a monitor; use pointer, all, or a monitor number 1, 2, ...")


def unsupported_session(env: dict | os._Environ = os.environ) -> str | None:
    """Why the hotkey cannot work in this desktop session, worded for the user; None when it can."""
    if not sys.platform.startswith("linux"):
        return None
    if env.get("XDG_SESSION_TYPE") == "wayland" or env.get("WAYLAND_DISPLAY"):
        return ("This is a Wayland session: Wayland does not let programs listen for global shortcuts or capture "
                "the screen, so the hotkey cannot work here. In the app, use \"Capture screen\" in the Screen "
                "capture panel (beside the chat) instead, or log in to an X11 session.")
    if not env.get("DISPLAY"):
        return ("No display (DISPLAY is not set): the hotkey needs a desktop session. On a desktop, run it there; "
                "the app itself can run headless.")
    return None


# ------------------------------------------------------------------ finding the app
def write_address(data_dir: Path, url: str) -> None:
    (Path(data_dir) / ADDRESS_FILE).write_text(url + "\n")


def clear_address(data_dir: Path, url: str) -> None:
    """Forget the address on the way out, unless another instance has written its own since."""
    path = Path(data_dir) / ADDRESS_FILE
    try:
        if path.read_text().strip() == url:
            path.unlink()
    except OSError:
        pass


def loopback_url(host: str, port: int) -> str:
    """The address a local helper reaches the server at: the server's own when it listens on loopback, else
    127.0.0.1 (a server on 0.0.0.0 answers there too; the endpoint serves loopback callers only anyway)."""
    if host in ("127.0.0.1", "localhost"):
        return f"http://{host}:{port}/"
    if host == "::1":
        return f"http://[::1]:{port}/"
    return f"http://127.0.0.1:{port}/"


class AppNotRunning(RuntimeError):
    pass


class HandoverError(RuntimeError):
    pass


class AppClient:
    """Posts screenshots to the app on this data folder; looks it up on every call, so restarts do not matter."""

    def __init__(self, data_dir: Path, url: str | None = None, timeout: float = 60):
        self.data_dir = Path(data_dir)
        self.fixed_url = url
        self.timeout = timeout

    def base_url(self) -> str:
        if self.fixed_url:
            return self.fixed_url
        try:
            return (self.data_dir / ADDRESS_FILE).read_text().strip() or DEFAULT_URL
        except OSError:
            return DEFAULT_URL

    def how_to_start(self) -> str:
        return (f"The app is not running at {self.base_url()}: start it with\n"
                f"  python run_app.py --data-dir {self.data_dir}\n"
                f"(or `python run_app.py --hotkey` to run the app and this listener together).")

    def send(self, png: bytes, question: str | None = None) -> str:
        """The new conversation's page URL. AppNotRunning or HandoverError say what went wrong."""
        base = self.base_url()
        try:
            token = install_token.read(self.data_dir)
        except install_token.TokenError as e:
            raise AppNotRunning(f"{e}\n{self.how_to_start()}") from None
        body = json.dumps({"image": base64.b64encode(png).decode("ascii"), "question": question}).encode()
        request = urllib.request.Request(base.rstrip("/") + HANDOVER_PATH, data=body, method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as e:
            try:
                message = json.load(e).get("error") or e.reason
            except ValueError:
                message = e.reason
            raise HandoverError(f"the app refused the screenshot ({e.code}): {message}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            raise AppNotRunning(self.how_to_start()) from e
        # The page carries the token too: it signs the browser in (app.gate) if it has no session yet.
        return install_token.with_token(base.rstrip("/") + answer["path"], token)

    def reachable(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url(), timeout=5):
                return True
        except urllib.error.HTTPError:  # an answer, even "sign in first" (app.gate): the app is there
            return True
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            return False


# ------------------------------------------------------------------ a press
class Trigger:
    """Runs `action` in a thread of its own on a press; a press while it still runs is ignored (not queued, so
    an impatient double press does not make two conversations)."""

    def __init__(self, action: Callable[[], None], on_ignored: Callable[[], None] = lambda: None):
        self.action = action
        self.on_ignored = on_ignored
        self._busy = threading.Lock()

    def press(self) -> bool:
        if not self._busy.acquire(blocking=False):
            self.on_ignored()
            return False
        threading.Thread(target=self._run, name="hotkey-capture", daemon=True).start()
        return True

    def _run(self) -> None:
        try:
            self.action()
        except Exception:  # a bug in one press must not end the listener
            log.exception("the hotkey's capture failed")
        finally:
            self._busy.release()


def ask_question(shot_label: str) -> str | None:
    """A small window asking for a question: the text ("" to send the screenshot alone), or None when the user
    closed it (send nothing). Without Tk, says so and returns ""."""
    try:
        import tkinter as tk
    except ImportError:
        print("No Tk here (install python3-tk), so no question window: sending the screenshot alone.", flush=True)
        return ""
    try:
        root = tk.Tk()
    except tk.TclError as e:
        print(f"Cannot open the question window ({e}): sending the screenshot alone.", flush=True)
        return ""
    answer: list[str | None] = [None]
    root.title("Ask about this screenshot")
    root.attributes("-topmost", True)
    tk.Label(root, text=f"{shot_label} captured. Your question (Enter sends, empty: just the screenshot; "
                        "Esc cancels):").pack(padx=10, pady=(10, 4), anchor="w")
    entry = tk.Entry(root, width=70)
    entry.pack(padx=10, pady=(0, 10), fill="x")

    def send(_event=None):
        answer[0] = entry.get().strip()
        root.destroy()

    entry.bind("<Return>", send)
    root.bind("<Escape>", lambda _event: root.destroy())
    entry.focus_set()  # the entry takes the keys whenever the window has the focus
    root.after(50, entry.focus_force)  # and the window takes the focus from the app the user was in
    root.mainloop()
    return answer[0]


@dataclass
class Listener:
    client: AppClient
    shortcut: Shortcut
    monitor: int | str = "pointer"
    ask: bool = False
    open_page: Callable[[str], None] | None = webbrowser.open  # None: print the page's address only

    def capture(self) -> tuple[bytes, str]:
        """PNG bytes of the chosen monitor, and a label for it."""
        from .screen_capture import capture_png, monitor_at

        index = self.monitor
        if index == "pointer":
            from pynput.mouse import Controller

            index = monitor_at(*Controller().position)
        label = "All monitors" if index == 0 else f"Monitor {index}"
        return capture_png(index), label

    def handle_press(self) -> None:
        from .screen_capture import CaptureError

        try:
            png, label = self.capture()
        except CaptureError as e:
            print(f"Capture failed: {e}", flush=True)
            return
        question = ask_question(label) if self.ask else None
        if question is None and self.ask:
            print("Cancelled: nothing sent.", flush=True)
            return
        try:
            page = self.client.send(png, question or None)
        except (AppNotRunning, HandoverError) as e:
            print(e, flush=True)
            return
        print(f"{label} sent to the app: {page}", flush=True)
        if self.open_page:
            self.open_page(page)

    def run(self, stop: threading.Event | None = None) -> int:
        """Listen until Ctrl+C (or `stop` is set). Returns an exit status."""
        problem = unsupported_session()
        if problem:
            print(problem, file=sys.stderr, flush=True)
            return 2
        try:
            from pynput import keyboard
        except Exception as e:  # pynput raises whatever its backend raises when it cannot reach the desktop
            print(f"error: cannot listen for global shortcuts here: {e}", file=sys.stderr, flush=True)
            return 2
        trigger = Trigger(self.handle_press, lambda: print("Still handling the last press: ignored.", flush=True))
        stop = stop or threading.Event()
        with keyboard.GlobalHotKeys({self.shortcut.pynput: trigger.press}) as listener:
            where = "under the mouse pointer" if self.monitor == "pointer" else (
                "all monitors" if self.monitor == 0 else f"monitor {self.monitor}")
            print(f"Hotkey ready: press {self.shortcut.label} to send the screen ({where}) to the app.", flush=True)
            if sys.platform == "darwin":
                print("On macOS this needs the Accessibility and Screen Recording permissions for your terminal "
                      "(System Settings > Privacy & Security).", flush=True)
            if not self.client.reachable():
                print(self.client.how_to_start(), flush=True)
            try:
                while listener.is_alive() and not stop.wait(0.5):
                    pass
            except KeyboardInterrupt:
                pass
        return 0
