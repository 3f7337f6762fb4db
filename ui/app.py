"""The web UI: gradio widgets and their event wiring. Every decision about data is made by the service
(app.chat_service), the store (app.store) and the PDF / screen helpers; this module only shows their
results and turns their errors into visible notices.

`build_ui(service, models, store)` returns the Blocks; `run_app.py` queues and launches it.

Stable element ids (for the browser tests and for custom CSS):

    model-banner        model name, dtype, quantization, device, memory; load progress or failure
    chatbot             the transcript; user turns show their images as thumbnails
    chat-input          text + images (upload, paste, drag and drop); Enter sends
    notice              errors and hints for the chat (bad image, overflow, model still loading, ...)
    gen-stats           speed and token counts of the last answer
    stop-btn regenerate-btn edit-btn delete-turn-btn      transcript actions
    edit-bar cancel-edit-btn                              shown while editing the last message
    context-meter       tokens and image slots left, overflow warning
    settings-panel      temperature top-p top-k max-new-tokens repetition-penalty seed system-prompt
    screen-panel        monitor capture-btn
    pdf-panel           pdf-upload pdf-pages pdf-selection pdf-attach-btn pdf-info
    history-sidebar     new-chat-btn history-search search-results history-list rename-box rename-btn
                        delete-btn delete-confirm delete-yes-btn delete-no-btn export-json-btn
                        export-md-btn export-file import-btn history-notice
"""

from __future__ import annotations

import atexit
import functools
import inspect
import io
import logging
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from app.chat_service import ChatError, ChatService, ModelManager
from app.pdf_pages import PdfError, RenderCancelled, format_page_selection, open_pdf, parse_page_selection
from app.screen_capture import CaptureError, list_monitors
from app.store import Store, StoreError
from engine.generation import SamplingParams

from . import views
from .style import CSS, SEARCH_JS, theme

log = logging.getLogger(__name__)

TITLE = "DeepSeek-VL local"
HISTORY_LIMIT = 200
SEARCH_LIMIT = 20
MAX_PDF_THUMBNAILS = 60
STREAM_INTERVAL_S = 0.05  # at most ~20 transcript updates a second while an answer streams
# Pasting more than this into the input turns the text into a .txt attachment (a gradio feature); keep
# long text as text so the service can say how long is too long.
MAX_PLAIN_TEXT = 2_000_000
EMPTY_INPUT = {"text": "", "files": []}

# Errors whose message is written for the user; anything else is logged and shown as "unexpected".
USER_ERRORS = (ChatError, StoreError, PdfError, CaptureError, RenderCancelled, ValueError, OSError)


class ChatApp(gr.Blocks):
    """Blocks that bring their own theme, CSS and file access to `launch()`, so the launcher needs none
    of gradio 6's launch-time styling arguments."""

    def launch(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        kwargs.setdefault("theme", theme())
        kwargs.setdefault("css", CSS)
        kwargs.setdefault("footer_links", ["settings"])
        # Gradio's own run history would copy every message (images included) into the browser's
        # localStorage: a second, unencrypted history, and slow once a big message was sent.
        kwargs.setdefault("run_history", False)
        # Exports and rendered attachments are written to the temp dir (allowed by default); stored
        # images are static files (see build_ui).
        return super().launch(*args, **kwargs)


# ---------------------------------------------------------------------- small helpers
_scratch_dir: Path | None = None


def _scratch() -> Path:
    """A private temp folder for files handed to the browser (exports, rendered PDF pages, screenshots)."""
    global _scratch_dir
    if _scratch_dir is None or not _scratch_dir.exists():
        _scratch_dir = Path(tempfile.mkdtemp(prefix="dsvl-ui-"))
        atexit.register(shutil.rmtree, _scratch_dir, True)
    return _scratch_dir


def _scratch_file(name: str) -> Path:
    """A fresh path ending in `name` (one folder per file keeps the name the user sees)."""
    folder = _scratch() / uuid.uuid4().hex
    folder.mkdir()
    return folder / name


def _safe_name(title: str, suffix: str) -> str:
    stem = re.sub(r"[^\w\- ]+", "", title, flags=re.UNICODE).strip().replace(" ", "-")[:60] or "conversation"
    return f"{stem}{suffix}"


def _input_parts(value: Any) -> tuple[str, list[str]]:
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


def _show(component: gr.components.Component, message: str, kind: str = "error") -> dict:
    return {component: gr.update(value=views.notice_html(message, kind), visible=True)}


def _hide(component: gr.components.Component) -> dict:
    return {component: gr.update(value="", visible=False)}


def _guard(notice: gr.components.Component):
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
                    yield _show(notice, message(e))
            return gen

        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                return _show(notice, message(e))
        return call

    return decorate


def _monitor_choices() -> tuple[list[tuple[str, int]], int, str]:
    """Dropdown choices for the screen capture, the default, and a note when there is no display."""
    try:
        monitors = list_monitors()
    except CaptureError as e:
        return [("Monitor 1", 1)], 1, str(e)
    choices = [(m.label, m.index) for m in monitors[1:]] + [(monitors[0].label, 0)]
    return choices, 1, ""


# ---------------------------------------------------------------------- the UI
def build_ui(service: ChatService, models: ModelManager, store: Store) -> gr.Blocks:
    # Stored attachments are content-addressed and never change: serve them straight from the data
    # directory instead of copying every thumbnail into gradio's cache on each transcript update.
    gr.set_static_paths([store.attachments_dir])
    defaults = SamplingParams()

    with ChatApp(title=TITLE, fill_width=True) as demo:
        conv = gr.State(None)  # the open conversation's id; None: a new chat (created on the first send)
        ids = gr.State([])  # the store's message id behind each chatbot message
        selected = gr.State(None)  # message id picked in the transcript (target of Delete turn)
        editing = gr.State(False)  # the next send replaces the last question
        pdf_path = gr.State(None)
        search_ids = gr.State([])

        # ------------------------------------------------------------ history sidebar
        with gr.Sidebar(label="History", open=True, width=330, elem_id="history-sidebar"):
            new_chat_btn = gr.Button("+ New chat", variant="primary", elem_id="new-chat-btn")
            search_box = gr.Textbox(placeholder="Search all messages…", show_label=False, container=False,
                                    elem_id="history-search", max_lines=1)
            search_results = gr.HTML("", elem_id="search-results", js_on_load=SEARCH_JS)
            history = gr.Radio(choices=[], label="Conversations", elem_id="history-list")
            rename_box = gr.Textbox(placeholder="Title of the open conversation", show_label=False,
                                    container=False, max_lines=1, elem_id="rename-box")
            with gr.Row():
                rename_btn = gr.Button("Rename", size="sm", min_width=60, elem_id="rename-btn")
                delete_btn = gr.Button("Delete…", size="sm", variant="stop", min_width=60, elem_id="delete-btn")
            with gr.Column(visible=False, elem_id="delete-confirm") as delete_confirm:
                delete_question = gr.Markdown("")
                with gr.Row():
                    delete_yes = gr.Button("Delete", size="sm", variant="stop", elem_id="delete-yes-btn")
                    delete_no = gr.Button("Cancel", size="sm", elem_id="delete-no-btn")
            with gr.Row():
                export_json_btn = gr.Button("Export JSON", size="sm", min_width=60, elem_id="export-json-btn")
                export_md_btn = gr.Button("Export Markdown", size="sm", min_width=60, elem_id="export-md-btn")
            export_file = gr.File(label="Download", visible=False, interactive=False, elem_id="export-file")
            import_btn = gr.UploadButton("Import JSON…", file_types=[".json"], size="sm", elem_id="import-btn")
            history_notice = gr.HTML("", visible=False, elem_id="history-notice")

        # ------------------------------------------------------------ main area
        banner = gr.HTML(views.banner_html(models.banner()), elem_id="model-banner")
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Chat", id="chat", elem_id="chat-tab"):
                chatbot = gr.Chatbot(
                    label="Conversation", elem_id="chatbot", height=520, show_label=False,
                    placeholder="Ask about an image: attach it (upload, paste or drag and drop) and type a question.",
                    feedback_options=None, buttons=["copy", "copy_all"], layout="bubble",
                )
                stats = gr.Markdown("", elem_id="gen-stats")
                with gr.Row(visible=False, elem_id="edit-bar") as edit_bar:
                    gr.Markdown("✎ **Editing your last message** — send to replace it and get a new answer "
                                "(its images stay).")
                    cancel_edit_btn = gr.Button("Cancel edit", size="sm", scale=0, elem_id="cancel-edit-btn")
                notice = gr.HTML("", visible=False, elem_id="notice")
                chat_input = gr.MultimodalTextbox(
                    file_types=["image"], file_count="multiple", sources=["upload"], show_label=False,
                    placeholder="Message DeepSeek-VL… (Enter sends, Shift+Enter for a new line; "
                                "paste or drop images here)",
                    max_plain_text_length=MAX_PLAIN_TEXT, elem_id="chat-input", autofocus=True, lines=1,
                    max_lines=12,
                )
                with gr.Row():
                    stop_btn = gr.Button("■ Stop", size="sm", variant="stop", elem_id="stop-btn")
                    regenerate_btn = gr.Button("↻ Regenerate", size="sm", elem_id="regenerate-btn")
                    edit_btn = gr.Button("✎ Edit last message", size="sm", elem_id="edit-btn")
                    delete_turn_btn = gr.Button("✕ Delete turn", size="sm", elem_id="delete-turn-btn")
                meter = gr.HTML(views.meter_html(None, models.status), elem_id="context-meter")
                with gr.Row(equal_height=False):
                    with gr.Column():
                        with gr.Accordion("Generation settings", open=False, elem_id="settings-panel"):
                            temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05,
                                                    label="Temperature", info="0 = greedy (deterministic)",
                                                    elem_id="temperature")
                            top_p = gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.01, label="Top-p",
                                              elem_id="top-p")
                            top_k = gr.Slider(0, 200, value=defaults.top_k, step=1, label="Top-k",
                                              info="0 = no limit", elem_id="top-k")
                            max_new = gr.Slider(1, 4096, value=defaults.max_new_tokens, step=1,
                                                label="Max new tokens", elem_id="max-new-tokens")
                            repetition = gr.Slider(0.8, 2.0, value=defaults.repetition_penalty, step=0.01,
                                                   label="Repetition penalty", elem_id="repetition-penalty")
                            seed = gr.Number(value=-1, precision=0, minimum=-1, label="Seed",
                                             info="-1 = random (only matters when temperature > 0)",
                                             elem_id="seed")
                            system_prompt = gr.Textbox(
                                label="System prompt", lines=3, elem_id="system-prompt",
                                placeholder="Empty = the model's default system prompt (or the one this "
                                            "conversation was started with)")
                        with gr.Accordion("Screen capture", open=False, elem_id="screen-panel"):
                            with gr.Row():
                                monitor = gr.Dropdown(choices=[("Monitor 1", 1)], value=1, label="Monitor",
                                                      elem_id="monitor", scale=2)
                                capture_btn = gr.Button("Capture screen", elem_id="capture-btn", scale=1)
                            screen_note = gr.Markdown("", elem_id="screen-note")
                    with gr.Column():
                        with gr.Accordion("PDF pages", open=False, elem_id="pdf-panel"):
                            pdf_file = gr.File(label="PDF", file_types=[".pdf"], type="filepath",
                                               elem_id="pdf-upload", height=110)
                            pdf_pages = gr.Gallery(label="Pages (click to add to the selection)", columns=5,
                                                   height=220, allow_preview=False, object_fit="contain",
                                                   interactive=False, elem_id="pdf-pages", visible=False)
                            with gr.Row():
                                pdf_selection = gr.Textbox(label="Pages to attach", placeholder="e.g. 1-3, 5",
                                                           elem_id="pdf-selection", scale=3, max_lines=1)
                                pdf_attach_btn = gr.Button("Attach pages", elem_id="pdf-attach-btn", scale=1,
                                                           variant="primary")
                            pdf_info = gr.Markdown("", elem_id="pdf-info")
            with gr.Tab("Model", id="model", elem_id="model-tab"):
                model_details = gr.Markdown(elem_id="model-details")
        timer = gr.Timer(1.0, active=models.status in ("idle", "loading"))

        settings_inputs = [temperature, top_p, top_k, max_new, repetition, seed, system_prompt]

        def settings_of(values: tuple) -> dict:
            keys = ("temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty", "seed", "system_prompt")
            settings = dict(zip(keys, values))
            if settings["seed"] is None or settings["seed"] < 0:
                settings.pop("seed")  # a fresh random seed for every answer
            return settings

        # ------------------------------------------------------------ views of one conversation
        def conversation_or_none(conversation_id: str | None) -> dict | None:
            if not conversation_id:
                return None
            try:
                return store.get_conversation(conversation_id)
            except StoreError:
                return None  # deleted meanwhile (another tab, the hotkey helper)

        def open_updates(conversation_id: str | None) -> dict:
            """Everything that changes when a conversation is opened (None: a fresh new chat)."""
            conversation = conversation_or_none(conversation_id)
            messages, message_ids = views.transcript(conversation)
            return {
                conv: conversation["id"] if conversation else None,
                chatbot: messages,
                ids: message_ids,
                selected: None,
                editing: False,
                edit_bar: gr.update(visible=False),
                rename_box: views.title_of(conversation) if conversation else "",
                history: gr.update(value=conversation["id"] if conversation else None),
                delete_confirm: gr.update(visible=False),
                stats: "",
                **_hide(notice),
            }

        open_outputs = [conv, chatbot, ids, selected, editing, edit_bar, rename_box, history, delete_confirm,
                        stats, notice]

        def history_update(conversation_id: str | None) -> dict:
            choices = views.history_choices(store.list_conversations(limit=HISTORY_LIMIT))
            known = {value for _, value in choices}
            return {history: gr.update(choices=choices, value=conversation_id if conversation_id in known else None)}

        def refresh_history(conversation_id):
            return history_update(conversation_id)

        def refresh_meter(conversation_id, value, max_new_tokens):
            text, files = _input_parts(value)
            if len(text) > service.max_text_chars:  # refused on send anyway; don't tokenize megabytes per key
                return views.notice_html(f"The message is {len(text):,} characters long; the limit is "
                                         f"{service.max_text_chars:,}.", "warning")
            try:
                budget = service.budget(conversation_id, text, len(files), int(max_new_tokens or 1))
            except (ChatError, StoreError, ValueError):
                budget = None
            return views.meter_html(budget, models.status)

        def poll_model(conversation_id, value, max_new_tokens):
            info = models.banner()
            done = info["status"] in ("ready", "failed")
            return {
                banner: views.banner_html(info),
                model_details: model_markdown(info),
                meter: refresh_meter(conversation_id, value, max_new_tokens) if done else gr.skip(),
                timer: gr.Timer(active=not done),
            }

        def model_markdown(info: dict) -> str:
            rows = [("Model", info.get("model")), ("Status", info.get("status")),
                    ("Device", info.get("device")), ("Dtype", info.get("dtype")),
                    ("Quantization", info.get("quantization")), ("Memory", info.get("memory")),
                    ("Context window", f"{info['context']} tokens" if info.get("context") else None),
                    ("Image input size", f"{info['image_size']} px" if info.get("image_size") else None)]
            table = "\n".join(f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows if v is not None)
            parts = ["### Model", "", "| | |", "|---|---|", table, ""]
            if info.get("error"):
                parts += [f"**Load error:** {info['error']}", ""]
            if info.get("hint"):
                parts += [info["hint"], ""]
            parts += ["### Tips", "",
                      "- Attach several images to one message: upload, paste (Ctrl+V) or drag and drop them "
                      "onto the input box.",
                      "- Click a message in the transcript, then **Delete turn**, to delete that turn; "
                      "without a selection the last turn goes.",
                      "- **PDF pages** renders the chosen pages at the model's input size and attaches them "
                      "to your next message."]
            return "\n".join(parts)

        # ------------------------------------------------------------ streaming answers
        def stream(events, conversation_id, clear_input: bool):
            """Drive one of the service's event streams, updating the transcript as the answer grows."""
            messages: list[dict] = []
            message_ids: list[int] = []
            answer = ""
            last = 0.0

            for event in events:
                if event.kind == "error":
                    conversation_id = event.conversation_id or conversation_id
                    update = _show(notice, event.text)
                    if conversation_id and conversation_or_none(conversation_id):
                        messages, message_ids = views.transcript(store.get_conversation(conversation_id))
                        update.update({conv: conversation_id, chatbot: messages, ids: message_ids})
                    yield update
                    return
                if event.kind == "started":
                    conversation_id = event.conversation_id
                    conversation = store.get_conversation(conversation_id)
                    messages, message_ids = views.transcript(conversation, streaming_id=event.message_id)
                    if not message_ids or message_ids[-1] != event.message_id:  # not flushed yet: add it
                        messages.append({"role": "assistant", "content": views.STREAMING_CURSOR})
                        message_ids.append(event.message_id)
                    update = {conv: conversation_id, chatbot: messages, ids: message_ids, selected: None,
                              editing: False, edit_bar: gr.update(visible=False), stats: "",
                              rename_box: views.title_of(conversation), **_hide(notice)}
                    if clear_input:
                        update[chat_input] = EMPTY_INPUT
                    last = time.monotonic()
                    yield update
                elif event.kind == "delta":
                    answer += event.text
                    now = time.monotonic()
                    if now - last >= STREAM_INTERVAL_S:
                        last = now
                        messages[-1] = {"role": "assistant", "content": answer + views.STREAMING_CURSOR}
                        yield {chatbot: messages}
                elif event.kind == "done":
                    messages, message_ids = views.transcript(store.get_conversation(conversation_id))
                    yield {chatbot: messages, ids: message_ids, stats: views.stats_line(event.stats)}

        stream_outputs = [conv, chatbot, ids, selected, editing, edit_bar, stats, notice, chat_input, rename_box]

        @_guard(notice)
        def submit(conversation_id, value, is_editing, *settings_values):
            text, files = _input_parts(value)
            settings = settings_of(settings_values)
            if is_editing and conversation_id:
                if files:
                    yield _show(notice, "Editing keeps the message's images; remove the new attachments, "
                                        "or cancel the edit and send them as a new message.")
                    return
                events = service.edit_last(conversation_id, text, settings)
            else:
                events = service.send(conversation_id, text, files, settings)
            yield from stream(events, conversation_id, clear_input=True)

        @_guard(notice)
        def regenerate(conversation_id, *settings_values):
            if not conversation_id:
                yield _show(notice, "Nothing to regenerate yet: send a message first.", "info")
                return
            yield from stream(service.regenerate(conversation_id, settings_of(settings_values)), conversation_id,
                              clear_input=False)

        @_guard(notice)
        def stop(conversation_id):
            if conversation_id and service.stop(conversation_id):
                return _hide(notice)
            return _show(notice, "Nothing is being generated right now.", "info")

        # ------------------------------------------------------------ transcript actions
        @_guard(notice)
        def start_edit(conversation_id):
            conversation = conversation_or_none(conversation_id)
            question = next((m for m in reversed(conversation["messages"]) if m["role"] == "user"), None) \
                if conversation else None
            if question is None:
                return _show(notice, "There is no message to edit yet.", "info")
            return {chat_input: {"text": question["text"], "files": []}, editing: True,
                    edit_bar: gr.update(visible=True), **_hide(notice)}

        def cancel_edit():
            return {chat_input: EMPTY_INPUT, editing: False, edit_bar: gr.update(visible=False)}

        @_guard(notice)
        def pick_message(message_ids, evt: gr.SelectData):
            index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
            if not isinstance(index, int) or not 0 <= index < len(message_ids):
                return {selected: None}
            return {selected: message_ids[index],
                    **_show(notice, f"Message {index + 1} selected: “Delete turn” deletes it"
                                    " (a question goes with its answer).", "info")}

        @_guard(notice)
        def delete_turn(conversation_id, message_ids, selected_id):
            conversation = conversation_or_none(conversation_id)
            if not conversation or not conversation["messages"]:
                return _show(notice, "There is no turn to delete.", "info")
            target = selected_id if selected_id in message_ids else None
            if target is None:  # the last turn: its question (or a lone answer)
                messages = conversation["messages"]
                last = messages[-1]
                if last["role"] == "assistant" and len(messages) > 1 and messages[-2]["role"] == "user":
                    last = messages[-2]
                target = last["id"]
            service.delete_turn(conversation_id, target)
            messages, message_ids = views.transcript(store.get_conversation(conversation_id))
            return {chatbot: messages, ids: message_ids, selected: None, stats: "", **_hide(notice)}

        # ------------------------------------------------------------ history actions
        @_guard(history_notice)
        def new_chat():
            return {**open_updates(None), chat_input: EMPTY_INPUT, **_hide(history_notice)}

        @_guard(history_notice)
        def open_conversation(conversation_id):
            if conversation_id and not conversation_or_none(conversation_id):
                return {**_show(history_notice, "That conversation no longer exists."),
                        **history_update(None)}
            return {**open_updates(conversation_id), **_hide(history_notice)}

        @_guard(history_notice)
        def search(query):
            query = query or ""
            hits = store.search(query, limit=SEARCH_LIMIT, highlight=views.HIGHLIGHT) if query.strip() else []
            return {search_results: views.search_results_html(query, hits)}

        @_guard(history_notice)
        def open_hit(evt: gr.EventData):
            data = getattr(evt, "_data", None) or {}
            conversation_id = data.get("conversation") if isinstance(data, dict) else None
            if not conversation_id:
                return {}
            return open_conversation(conversation_id)

        @_guard(history_notice)
        def rename(conversation_id, title):
            if not conversation_id:
                return _show(history_notice, "Open a conversation first (or send a message to start one).", "info")
            store.rename_conversation(conversation_id, title)
            return {**history_update(conversation_id), **_hide(history_notice)}

        @_guard(history_notice)
        def ask_delete(conversation_id):
            conversation = conversation_or_none(conversation_id)
            if not conversation:
                return _show(history_notice, "Open the conversation you want to delete first.", "info")
            count = len(conversation["messages"])
            return {delete_confirm: gr.update(visible=True),
                    delete_question: f"Delete **{views.title_of(conversation)}** ({count} messages) and its "
                                     "images? This cannot be undone.",
                    **_hide(history_notice)}

        @_guard(history_notice)
        def confirm_delete(conversation_id):
            if conversation_id:
                service.delete_conversation(conversation_id)
            return {**open_updates(None), **history_update(None), **_hide(history_notice)}

        def cancel_delete():
            return {delete_confirm: gr.update(visible=False)}

        @_guard(history_notice)
        def export(conversation_id, kind):
            conversation = conversation_or_none(conversation_id)
            if not conversation:
                return _show(history_notice, "Open a conversation to export it.", "info")
            title = views.title_of(conversation)
            if kind == "json":
                import json

                path = _scratch_file(_safe_name(title, ".json"))
                path.write_text(json.dumps(store.export_conversation(conversation_id), ensure_ascii=False),
                                encoding="utf-8")
            else:
                path = _scratch_file(_safe_name(title, ".md"))
                path.write_text(store.export_markdown(conversation_id), encoding="utf-8")
            return {export_file: gr.update(value=str(path), visible=True), **_hide(history_notice)}

        @_guard(history_notice)
        def import_file(upload):
            path = upload if isinstance(upload, str) else getattr(upload, "name", None)
            if not path:
                return {}
            data = Path(path).read_bytes()
            if len(data) > 512 * 1024 * 1024:
                return _show(history_notice, "That file is too large to be a conversation export.")
            conversation_id = store.import_conversation(data)
            return {**open_updates(conversation_id), **history_update(conversation_id),
                    **_show(history_notice, "Imported as a new conversation.", "info")}

        # ------------------------------------------------------------ attachments: PDF pages, screen
        def append_files(value, new_paths: list[str]) -> dict:
            text, files = _input_parts(value)
            return {"text": text, "files": files + new_paths}

        @_guard(notice)
        def load_pdf(path):
            if not path:
                return {pdf_path: None, pdf_pages: gr.update(value=None, visible=False), pdf_info: "",
                        pdf_selection: ""}
            with open_pdf(path) as doc:
                count = doc.page_count
                shown = min(count, MAX_PDF_THUMBNAILS)
                thumbs = [(Image.open(io.BytesIO(doc.thumbnail(i))), f"Page {i + 1}") for i in range(shown)]
            pages = "page" if count == 1 else "pages"
            info = f"{count} {pages}. Type pages like `1-3, 5` or click thumbnails, then **Attach pages**."
            if shown < count:
                info += f" (Thumbnails of the first {shown} pages shown; any page can be typed.)"
            return {pdf_path: path, pdf_pages: gr.update(value=thumbs, visible=True), pdf_info: info,
                    pdf_selection: "1" if count == 1 else "", **_hide(notice)}

        def clear_pdf():
            return {pdf_path: None, pdf_pages: gr.update(value=None, visible=False), pdf_info: "",
                    pdf_selection: ""}

        @_guard(notice)
        def toggle_page(path, text, evt: gr.SelectData):
            if not path or not isinstance(evt.index, int):
                return {}
            with open_pdf(path) as doc:
                count = doc.page_count
            try:
                chosen = parse_page_selection(text, count) if (text or "").strip() else []
            except PdfError:
                return {pdf_selection: f"{text}, {evt.index + 1}"}
            chosen = [i for i in chosen if i != evt.index] if evt.index in chosen else sorted(chosen + [evt.index])
            return {pdf_selection: format_page_selection(chosen)}

        @_guard(notice)
        def attach_pages(path, selection_text, value, conversation_id, max_new_tokens):
            if not path:
                return _show(notice, "Upload a PDF first.", "info")
            text, files = _input_parts(value)
            attached = service.attach_pdf_pages(path, selection_text or "", conversation_id=conversation_id,
                                                pending_text=text, pending_images=len(files),
                                                max_new_tokens=int(max_new_tokens or 1))
            paths = []
            for page, image in zip(attached.pages, attached.images):
                file = _scratch_file(f"page-{page}.png")
                image.save(file, format="PNG")
                paths.append(str(file))
            pages = format_page_selection([p - 1 for p in attached.pages])
            size = f"{attached.images[0].width}×{attached.images[0].height} px" if attached.images else ""
            info = f"Attached page(s) {pages} ({size}) to your next message."
            update = {chat_input: append_files(value, paths), pdf_info: info}
            if attached.message:
                update.update(_show(notice, attached.message, "warning"))
            else:
                update.update(_hide(notice))
            return update

        @_guard(notice)
        def capture(monitor_index, value):
            try:
                png = service.capture_screen(int(monitor_index if monitor_index is not None else 1))
            except CaptureError as e:
                gr.Warning(str(e))
                return _show(notice, str(e), "warning")
            file = _scratch_file("screenshot.png")
            file.write_bytes(png)
            return {chat_input: append_files(value, [str(file)]), **_hide(notice)}

        # ------------------------------------------------------------ page load
        def on_load(conversation_id, value, max_new_tokens):
            choices, default, note = _monitor_choices()
            info = models.banner()
            return {
                **history_update(conversation_id),
                banner: views.banner_html(info),
                model_details: model_markdown(info),
                meter: refresh_meter(conversation_id, value, max_new_tokens),
                monitor: gr.update(choices=choices, value=default),
                screen_note: note,
            }

        # ------------------------------------------------------------ wiring
        quiet = {"show_progress": "hidden"}
        meter_inputs = [conv, chat_input, max_new]
        demo.load(on_load, meter_inputs, [history, banner, model_details, meter, monitor, screen_note], **quiet)
        timer.tick(poll_model, meter_inputs, [banner, model_details, meter, timer], **quiet)

        sent = chat_input.submit(submit, [conv, chat_input, editing, *settings_inputs], stream_outputs,
                                 show_progress="minimal")
        sent.then(refresh_history, [conv], [history], **quiet).then(refresh_meter, meter_inputs, [meter], **quiet)
        regenerated = regenerate_btn.click(regenerate, [conv, *settings_inputs], stream_outputs,
                                           show_progress="minimal")
        regenerated.then(refresh_history, [conv], [history], **quiet) \
            .then(refresh_meter, meter_inputs, [meter], **quiet)
        stop_btn.click(stop, [conv], [notice], queue=False, **quiet)

        edit_btn.click(start_edit, [conv], [chat_input, editing, edit_bar, notice], **quiet)
        cancel_edit_btn.click(cancel_edit, None, [chat_input, editing, edit_bar], **quiet)
        chatbot.select(pick_message, [ids], [selected, notice], **quiet)
        delete_turn_btn.click(delete_turn, [conv, ids, selected], [chatbot, ids, selected, stats, notice], **quiet) \
            .then(refresh_history, [conv], [history], **quiet).then(refresh_meter, meter_inputs, [meter], **quiet)

        chat_input.change(refresh_meter, meter_inputs, [meter], trigger_mode="always_last", **quiet)
        max_new.release(refresh_meter, meter_inputs, [meter], **quiet)

        for clear in (new_chat_btn.click, chatbot.clear):  # the transcript's own clear icon starts a new chat too
            clear(new_chat, None, [*open_outputs, chat_input, history_notice], **quiet) \
                .then(refresh_meter, meter_inputs, [meter], **quiet)
        history.input(open_conversation, [history], [*open_outputs, history_notice], **quiet) \
            .then(refresh_meter, meter_inputs, [meter], **quiet)
        search_box.change(search, [search_box], [search_results, history_notice], trigger_mode="always_last",
                          **quiet)
        search_results.click(open_hit, None, [*open_outputs, history_notice], **quiet) \
            .then(refresh_meter, meter_inputs, [meter], **quiet)
        rename_btn.click(rename, [conv, rename_box], [history, history_notice], **quiet)
        rename_box.submit(rename, [conv, rename_box], [history, history_notice], **quiet)
        delete_btn.click(ask_delete, [conv], [delete_confirm, delete_question, history_notice], **quiet)
        delete_no.click(cancel_delete, None, [delete_confirm], **quiet)
        delete_yes.click(confirm_delete, [conv], [*open_outputs, history_notice], **quiet) \
            .then(refresh_meter, meter_inputs, [meter], **quiet)
        export_json_btn.click(lambda c: export(c, "json"), [conv], [export_file, history_notice])
        export_md_btn.click(lambda c: export(c, "md"), [conv], [export_file, history_notice])
        import_btn.upload(import_file, [import_btn], [*open_outputs, history_notice]) \
            .then(refresh_meter, meter_inputs, [meter], **quiet)

        pdf_file.upload(load_pdf, [pdf_file], [pdf_path, pdf_pages, pdf_info, pdf_selection, notice])
        pdf_file.clear(clear_pdf, None, [pdf_path, pdf_pages, pdf_info, pdf_selection], **quiet)
        pdf_pages.select(toggle_page, [pdf_path, pdf_selection], [pdf_selection, notice], **quiet)
        pdf_attach_btn.click(attach_pages, [pdf_path, pdf_selection, chat_input, conv, max_new],
                             [chat_input, pdf_info, notice])
        pdf_selection.submit(attach_pages, [pdf_path, pdf_selection, chat_input, conv, max_new],
                             [chat_input, pdf_info, notice])
        capture_btn.click(capture, [monitor, chat_input], [chat_input, notice])

    return demo
