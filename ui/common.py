"""Small pieces every tab uses: showing a notice, turning errors into notices, reading the input box, and the
scratch folder for files handed to the browser."""

from __future__ import annotations

import functools
import inspect
import logging
from pathlib import Path
from typing import Any

import gradio as gr

from app.scratch import Scratch
from app.services import USER_ERRORS

from . import views

log = logging.getLogger(__name__)

EMPTY_INPUT = {"text": "", "files": []}
QUIET = {"show_progress": "hidden"}


def show(component: gr.components.Component, message: str, kind: str = "error") -> dict:
    return {component: gr.update(value=views.notice_html(message, kind), visible=True)}


def hide(component: gr.components.Component) -> dict:
    return {component: gr.update(value="", visible=False)}


def guard(notice: gr.components.Component):
    """Turn errors raised by a handler into a visible notice instead of gradio's generic error.

    Handlers return (or yield) dicts of updates, so an error can update just the notice. Expected errors
    show their own message; anything else is logged with its traceback and shown in one line.
    """

    def message(e: Exception) -> str:
        if isinstance(e, USER_ERRORS):
            return str(e) or type(e).__name__
        log.exception("unexpected error in the UI")
        return f"Unexpected error: {type(e).__name__}: {e}"

    def decorate(fn):
        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def gen(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - shown to the user, logged when unexpected
                    yield show(notice, message(e))
            return gen

        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                return show(notice, message(e))
        return call

    return decorate


def input_parts(value: Any) -> tuple[str, list[str]]:
    """(text, file paths) of a MultimodalTextbox value."""
    if not value:
        return "", []
    if isinstance(value, str):
        return value, []
    files = []
    for f in value.get("files") or []:
        path = f if isinstance(f, str) else (f.get("path") if isinstance(f, dict) else getattr(f, "path", None))
        if path:
            files.append(path)
    return value.get("text") or "", files


def with_files(value: Any, new_paths: list[str]) -> dict:
    """The input box's value with more files attached."""
    text, files = input_parts(value)
    return {"text": text, "files": files + new_paths}


_scratch: Scratch | None = None


def use_scratch(scratch: Scratch) -> None:
    """Put the files `scratch_file` makes in the app's scratch space (build_ui calls this)."""
    global _scratch
    _scratch = scratch


def scratch_file(name: str) -> Path:
    """A fresh path ending in `name` for a file handed to the browser (rendered PDF pages, screenshots), in
    the app's scratch space: removed at exit, and when the attachment made from it is deleted."""
    if _scratch is None:
        raise RuntimeError("no scratch space: build the UI with build_ui(services)")
    return _scratch.file(name)
