"""Tests for app.screen_capture.

The integration tests run against a real virtual X server (Xvfb). If Xvfb
is missing and we are root on a Debian/Ubuntu box, the fixture installs it
with apt-get (CI: `apt-get install -y xvfb x11-xserver-utils`); they skip,
with the reason, only when Xvfb can be neither found, installed nor started.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mss
import pytest

from app.screen_capture import CaptureError, Monitor, capture, list_monitors

from conftest import require, stop_process

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="X11 display handling is Linux-only")


# -- tool installation and the Xvfb fixture ----------------------------------------


def ensure_tool(binary: str, apt_package: str) -> tuple[str | None, str]:
    """Find `binary`, apt-installing `apt_package` if possible. Returns (path, how)."""
    found = shutil.which(binary)
    if found:
        return found, f"{binary} already installed at {found}"
    apt = shutil.which("apt-get")
    if not apt:
        return None, f"{binary} not found and apt-get is unavailable (install {apt_package} manually)"
    if os.geteuid() != 0:
        return None, f"{binary} not found and not root, cannot apt-get install {apt_package}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "--no-install-recommends", apt_package]
    log = ""
    # A fresh container may have no package lists yet: retry after an update.
    for attempt in ([install], [[apt, "update"], install]):
        try:
            for command in attempt:
                result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
                log = result.stderr[-500:]
            if shutil.which(binary):
                how = f"installed {apt_package} with `apt-get install -y {apt_package}`"
                print(how)
                return shutil.which(binary), how
        except (OSError, subprocess.TimeoutExpired) as exc:
            log = str(exc)
    return None, f"could not apt-get install {apt_package}: {log.strip()}"


@pytest.fixture(scope="module")
def xvfb(tmp_path_factory):
    """A private 800x600x24 Xvfb server; yields its display name, e.g. ":3"."""
    path, how = ensure_tool("Xvfb", "xvfb")
    require(bool(path), f"Xvfb unavailable: {how}")
    print(f"Xvfb: {how}")
    # -displayfd makes Xvfb pick a free display number itself and write it
    # to the pipe once it accepts connections: no port race, no sleep loop.
    read_fd, write_fd = os.pipe()
    log_path = tmp_path_factory.mktemp("xvfb") / "xvfb.log"  # a file, so a chatty server never blocks on a full pipe
    log = log_path.open("wb")
    process = subprocess.Popen(
        [path, "-displayfd", str(write_fd), "-screen", "0", "800x600x24", "-nolisten", "tcp",
         # -noreset: otherwise the server resets (wiping the screen) whenever
         # its last client, e.g. xsetroot, disconnects.
         "-noreset"],
        pass_fds=(write_fd,), stdout=subprocess.DEVNULL, stderr=log,
    )
    log.close()
    os.close(write_fd)
    try:
        number = _read_display_number(read_fd, process, timeout=20)
    finally:
        os.close(read_fd)
    if number is None:
        process.kill()
        process.wait()
        error = log_path.read_text(errors="replace")[-500:]
        require(False, f"Xvfb did not start: {error.strip() or 'no display number reported'}")
    try:
        yield f":{number}"
    finally:
        stop_process(process)


def _read_display_number(fd: int, process: subprocess.Popen, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n") and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 32)
            if not chunk:  # Xvfb exited and closed its end
                break
            data += chunk
        elif process.poll() is not None:
            break
    text = data.decode().strip()
    return text if text.isdigit() else None


@pytest.fixture
def display(xvfb, monkeypatch):
    """Point DISPLAY at the Xvfb server for one test."""
    monkeypatch.setenv("DISPLAY", xvfb)
    return xvfb


def set_root_colour(display_name: str, colour: str) -> None:
    path, how = ensure_tool("xsetroot", "x11-xserver-utils")
    require(bool(path), f"cannot paint the X screen: {how}")
    subprocess.run([path, "-display", display_name, "-solid", colour], check=True, timeout=20)


# -- against a real X server --------------------------------------------------------


@linux_only
def test_list_monitors_on_xvfb(display):
    monitors = list_monitors()
    assert monitors[0] == Monitor(0, 0, 0, 800, 600)  # all monitors combined
    assert monitors[1:] == [Monitor(1, 0, 0, 800, 600)]
    assert monitors[1].label == "Monitor 1 (800x600)"
    assert monitors[0].label == "All monitors (800x600)"


@linux_only
def test_capture_on_xvfb(display):
    for index in (1, 0):
        image = capture(index)
        assert image.mode == "RGB"
        assert image.size == (800, 600)


@linux_only
@pytest.mark.parametrize("colour, rgb", [("red", (255, 0, 0)), ("#0000ff", (0, 0, 255))])
def test_capture_sees_what_is_on_screen(display, colour, rgb):
    set_root_colour(display, colour)
    image = capture()
    for point in [(0, 0), (400, 300), (799, 599)]:
        assert image.getpixel(point) == rgb


@linux_only
def test_bad_monitor_index_on_xvfb(display):
    with pytest.raises(CaptureError, match="^monitor 3 does not exist; 1 monitor available$"):
        capture(3)
    with pytest.raises(CaptureError, match="monitor -1 does not exist"):
        capture(-1)


# -- no display ---------------------------------------------------------------------


@linux_only
def test_headless_without_display(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    expected = r"^No display available for screen capture: DISPLAY is not set \(running headless\?"
    with pytest.raises(CaptureError, match=expected):
        capture()
    with pytest.raises(CaptureError, match=expected):
        list_monitors()


@linux_only
def test_headless_wayland_hint(monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.setenv("WAYLAND_DISPLAY", "wayland-0")
    with pytest.raises(CaptureError, match="Wayland session without XWayland"):
        capture()


@linux_only
def test_display_that_does_not_exist(monkeypatch):
    sockets = Path("/tmp/.X11-unix")
    number = next(n for n in range(4242, 5000) if not (sockets / f"X{n}").exists())
    monkeypatch.setenv("DISPLAY", f":{number}")
    with pytest.raises(CaptureError, match=r"^No display available for screen capture: .*running headless\?"):
        capture()


# -- with a fake mss (no X server needed) ---------------------------------------------


class FakeShot:
    def __init__(self, width: int, height: int, bgra: bytes) -> None:
        self.size = (width, height)
        self.bgra = bgra


class FakeMSS:
    """Two side-by-side monitors; every pixel is B=10, G=20, R=30."""

    monitors = [
        {"left": 0, "top": 0, "width": 5, "height": 2},
        {"left": 0, "top": 0, "width": 3, "height": 2},
        {"left": 3, "top": 0, "width": 2, "height": 2},
    ]

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.close()

    def close(self):
        pass

    def grab(self, monitor):
        pixels = monitor["width"] * monitor["height"]
        return FakeShot(monitor["width"], monitor["height"], bytes([10, 20, 30, 255]) * pixels)


@pytest.fixture
def fake_mss(monkeypatch):
    monkeypatch.setenv("DISPLAY", ":fake")
    monkeypatch.setattr(mss, "MSS", FakeMSS, raising=False)


def test_bad_monitor_index(fake_mss):
    with pytest.raises(CaptureError, match="^monitor 3 does not exist; 2 monitors available$"):
        capture(3)


def test_fake_capture_converts_bgra_to_rgb(fake_mss):
    image = capture(2)
    assert image.mode == "RGB"
    assert image.size == (2, 2)
    assert image.getpixel((1, 1)) == (30, 20, 10)
    assert capture(0).size == (5, 2)
    assert [m.index for m in list_monitors()] == [0, 1, 2]
    assert list_monitors()[2] == Monitor(2, 3, 0, 2, 2)
