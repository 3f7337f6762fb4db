"""Screenshots for the chat, via `mss`.

Monitor numbering follows mss: index 0 is the bounding box of all
monitors together, 1..n are the individual monitors. Every failure is a
`CaptureError` whose message can be shown to the user as is; the most
common one is running headless (a server, SSH, a container) where there
is no screen to capture.
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass

import mss
from PIL import Image

_HEADLESS_HINT = "running headless? start the app on a desktop or set DISPLAY"


class CaptureError(RuntimeError):
    """Screen capture failed; the message is worded for the user."""


@dataclass(frozen=True)
class Monitor:
    index: int
    left: int
    top: int
    width: int
    height: int

    @property
    def label(self) -> str:
        """A name for a monitor picker, e.g. "Monitor 1 (1920x1080)"."""
        name = "All monitors" if self.index == 0 else f"Monitor {self.index}"
        return f"{name} ({self.width}x{self.height})"


def list_monitors() -> list[Monitor]:
    """All monitors as mss numbers them: [combined, monitor 1, ..., monitor n]."""
    with _open() as sct:
        return [_to_monitor(i, m) for i, m in enumerate(_monitors(sct))]


def monitor_at(x: int, y: int) -> int:
    """The number of the monitor holding the point (x, y) in desktop coordinates; 1 when none does (the
    pointer just left the screens, or the desktop has gaps between monitors)."""
    with _open() as sct:
        monitors = _monitors(sct)
    for index, m in enumerate(monitors[1:], start=1):
        if m["left"] <= x < m["left"] + m["width"] and m["top"] <= y < m["top"] + m["height"]:
            return index
    return 1


def capture(monitor: int = 1) -> Image.Image:
    """Grab one monitor (or 0 for all of them) as an RGB image."""
    with _open() as sct:
        monitors = _monitors(sct)
        count = len(monitors) - 1  # index 0 is the combined area
        if not isinstance(monitor, int) or not 0 <= monitor <= count:
            noun = "monitor" if count == 1 else "monitors"
            raise CaptureError(f"monitor {monitor} does not exist; {count} {noun} available")
        try:
            shot = sct.grab(monitors[monitor])
        except mss.ScreenShotError as exc:
            raise CaptureError(f"screen capture failed: {exc}") from exc
    # mss hands back BGRA rows; let PIL's raw decoder reorder them to RGB.
    return Image.frombytes("RGB", shot.size, shot.bgra, "raw", "BGRX")


def capture_png(monitor: int = 1) -> bytes:
    """`capture` as PNG bytes, ready to store or send."""
    buffer = io.BytesIO()
    capture(monitor).save(buffer, format="PNG", compress_level=3)  # screens are big: favour speed
    return buffer.getvalue()


def _open():
    """Connect to the display, turning "no display" into a helpful error."""
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        # Without DISPLAY mss can only fail; say why before it tries.
        reason = "DISPLAY is not set"
        if os.environ.get("WAYLAND_DISPLAY"):
            reason += " (a Wayland session without XWayland cannot be captured)"
        raise CaptureError(f"No display available for screen capture: {reason} ({_HEADLESS_HINT})")
    # mss >= 10.2 deprecates the mss.mss() factory in favour of the MSS class.
    factory = getattr(mss, "MSS", None) or mss.mss
    try:
        return factory()
    except mss.ScreenShotError as exc:
        raise CaptureError(f"No display available for screen capture: {exc} ({_HEADLESS_HINT})") from exc


def _monitors(sct) -> list[dict]:
    try:
        monitors = list(sct.monitors)
    except mss.ScreenShotError as exc:
        raise CaptureError(f"could not list monitors: {exc}") from exc
    if len(monitors) < 2:
        raise CaptureError(f"No display available for screen capture: no monitors found ({_HEADLESS_HINT})")
    return monitors


def _to_monitor(index: int, raw: dict) -> Monitor:
    return Monitor(index, raw["left"], raw["top"], raw["width"], raw["height"])
