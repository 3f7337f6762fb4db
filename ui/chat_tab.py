"""The Chat tab: the transcript, the input box, the transcript actions (stop, regenerate, edit, delete turn),
the ‹ 2/3 › arrows that flip between the versions of a message, the context meter, the generation settings and
the attachment panels (PDF pages, screen capture).

Every read and write goes through `app` services (`services.chat`, `services.history`); this module only
shows their records and turns their errors into notices.
"""

from __future__ import annotations

import time

import gradio as gr

from app.examples import examples
from app.pdf_pages import PdfError, format_page_selection, parse_page_selection, preview, toggle_page
from app.records import Conversation
from app.screen_capture import CaptureError, list_monitors
from app.services import USER_ERRORS, Services

from . import views
from .common import EMPTY_INPUT, QUIET, guard, hide, input_parts, scratch_file, show, with_files
from .settings_panel import SettingsPanel
from .style import VARIANT_JS

STREAM_INTERVAL_S = 0.05  # at most ~20 transcript updates a second while an answer streams
# Pasting more than this into the input turns the text into a .txt attachment (a gradio feature); keep
# long text as text so the service can say how long is too long.
MAX_PLAIN_TEXT = 2_000_000
MAX_PDF_THUMBNAILS = 60
FOLLOW_INTERVAL_S = 1.0  # how often the page looks at an answer another app instance is writing
# A page whose server was restarted sends into a session the new server does not know.
STALE_PAGE = ("The app was restarted since this page was opened: reload the page to continue "
              "(your message is kept in the box).")


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def monitor_choices() -> tuple[list[tuple[str, int]], int, str]:
    """Dropdown choices for the screen capture, the default, and a note when there is no display."""
    try:
        monitors = list_monitors()
    except CaptureError as e:
        return [("Monitor 1", 1)], 1, str(e)
    return [(m.label, m.index) for m in monitors[1:]] + [(monitors[0].label, 0)], 1, ""


def edit_bar_shown(shown: bool) -> dict:
    """The edit bar's update. A class hides it and it stays mounted: gradio 6 removes a visible=False component
    and, mounting it again, can replay a stale visibility update (gradio#13494); CI once saw the bar stay on
    screen after the edited message was sent."""
    return gr.update(elem_classes=[] if shown else ["off"])


class ChatTab:
    """Builds the tab's widgets where it is created (inside a gr.Tab) and wires their events in `wire`."""

    def __init__(self, services: Services, conv: gr.State):
        self.chat, self.history, self.models = services.chat, services.history, services.models
        self.preferences = services.preferences
        self.conv = conv  # the open conversation's id; None: a new chat (created on the first send)
        self.ids = gr.State([])  # the message id behind each chatbot message
        self.selected = gr.State(None)  # message id picked in the transcript (target of Edit and Delete turn)
        self.editing = gr.State(None)  # the question being edited (its id): the next send adds a version of it
        self.pdf_path = gr.State(None)  # the uploaded PDF: {"path", "count", "thumbs"}
        self.checked = gr.State([])  # attached files already checked (checking decodes the whole image)
        # True once this server ran the page's load event; a new server starts every session at False.
        self.page_loaded = gr.State(False)
        # Ticks while the open conversation's answer is being written by another app instance.
        self.follow_timer = gr.Timer(FOLLOW_INTERVAL_S, active=False)
        self._build_transcript()

    def build_tools(self) -> None:
        """Settings, PDF pages and screen capture: in a side panel, so on a laptop screen they stay
        reachable beside a chat that fills the window."""
        with gr.Sidebar(label="Tools", position="right", open=True, width=300, elem_id="tools-panel"):
            self.settings = SettingsPanel()
            self.max_new = self.settings["max_new_tokens"]  # the context meter keeps its room
            self._build_pdf_panel()
            self._build_screen_panel()

    # ------------------------------------------------------------------ layout
    def _build_transcript(self) -> None:
        self.chatbot = gr.Chatbot(
            label="Conversation", elem_id="chatbot", height="calc(100dvh - 410px)", min_height=200,
            show_label=False, feedback_options=None, buttons=["copy", "copy_all"], layout="bubble",
            placeholder="Ask about an image: attach it (upload, paste or drag and drop) and type a question.",
            examples=examples() or None,
        )
        self.stats = gr.Markdown("", elem_id="gen-stats")
        # Clicks on the ‹ › arrows inside the transcript arrive as this (hidden) element's click events.
        self.variant_events = gr.HTML("", elem_id="variant-events", js_on_load=VARIANT_JS)
        with gr.Row(elem_id="edit-bar", elem_classes=["off"]) as self.edit_bar:
            self.edit_note = gr.Markdown("", elem_id="edit-note")
            self.cancel_edit_btn = gr.Button("Cancel edit", size="sm", scale=0, elem_id="cancel-edit-btn")
        self.notice = gr.HTML("", visible=False, elem_id="notice")
        self.input = gr.MultimodalTextbox(
            file_types=["image"], file_count="multiple", sources=["upload"], show_label=False,
            placeholder="Message DeepSeek-VL… (Enter sends; paste or drop images)",
            max_plain_text_length=MAX_PLAIN_TEXT, elem_id="chat-input", autofocus=True, lines=1, max_lines=8,
        )
        with gr.Row(elem_id="actions"):
            self.stop_btn = gr.Button("■ Stop", size="sm", variant="stop", elem_id="stop-btn", interactive=False,
                                      min_width=70)
            self.regenerate_btn = gr.Button("↻ Regenerate", size="sm", elem_id="regenerate-btn", interactive=False,
                                            min_width=70)
            self.edit_btn = gr.Button("✎ Edit message", size="sm", elem_id="edit-btn", interactive=False,
                                      min_width=70)
            self.delete_turn_btn = gr.Button("✕ Delete turn", size="sm", elem_id="delete-turn-btn",
                                             interactive=False, min_width=70)
        self.meter = gr.HTML(views.meter_html(None, self.models.status), elem_id="context-meter")

    def _build_screen_panel(self) -> None:
        with gr.Accordion("Screen capture", open=False, elem_id="screen-panel"):
            with gr.Row():
                self.monitor = gr.Dropdown(choices=[("Monitor 1", 1)], value=1, label="Monitor", elem_id="monitor",
                                           scale=2)
                self.capture_btn = gr.Button("Capture screen", elem_id="capture-btn", scale=1)
            self.screen_note = gr.Markdown("", elem_id="screen-note")

    def _build_pdf_panel(self) -> None:
        with gr.Accordion("PDF pages", open=False, elem_id="pdf-panel"):
            self.pdf_file = gr.File(label="PDF", file_types=[".pdf"], type="filepath", elem_id="pdf-upload", height=110)
            self.pdf_pages = gr.Gallery(label="Pages (click to add to the selection)", columns=5, height=220,
                                        allow_preview=False, object_fit="contain", interactive=False,
                                        elem_id="pdf-pages", visible=False)
            with gr.Row():
                self.pdf_selection = gr.Textbox(label="Pages to attach", placeholder="e.g. 1-3, 5",
                                                elem_id="pdf-selection", scale=3, max_lines=1)
                self.pdf_attach_btn = gr.Button("Attach pages", elem_id="pdf-attach-btn", scale=1, variant="primary")
            self.pdf_info = gr.Markdown("", elem_id="pdf-info")

    # ------------------------------------------------------------------ views of one conversation
    @property
    def action_buttons(self) -> list:
        """The outputs of `actions`."""
        return [self.stop_btn, self.regenerate_btn, self.edit_btn, self.delete_turn_btn, self.input]

    def actions(self, has_messages: bool, streaming: bool = False) -> dict:
        """Each transcript action enabled only when it can act: Stop while an answer streams, the others when
        there is a turn to act on and nothing is being written."""
        idle = has_messages and not streaming
        return {self.stop_btn: gr.update(interactive=streaming), self.regenerate_btn: gr.update(interactive=idle),
                self.edit_btn: gr.update(interactive=idle), self.delete_turn_btn: gr.update(interactive=idle),
                # The input's send arrow turns into a stop square while an answer streams.
                self.input: gr.update(submit_btn=not streaming, stop_btn=streaming)}

    @property
    def open_outputs(self) -> list:
        return [self.conv, self.chatbot, self.ids, self.selected, self.editing, self.edit_bar, self.stats, self.notice,
                *self.settings.inputs, *self.action_buttons, self.follow_timer]

    def open_updates(self, conversation: Conversation | None) -> dict:
        """Everything in this tab that changes when a conversation is opened (None: a fresh new chat)."""
        messages, message_ids = views.transcript(conversation)
        return {self.conv: conversation.id if conversation else None, self.chatbot: messages, self.ids: message_ids,
                self.selected: None, self.editing: None, self.edit_bar: edit_bar_shown(False), self.stats: "",
                **self.settings.show(self.preferences.settings_for(conversation.id if conversation else None)),
                **self.actions(bool(message_ids)), **hide(self.notice),
                self.follow_timer: gr.Timer(active=self.written_by_others(conversation and conversation.id))}

    def written_by_others(self, conversation_id: str | None) -> bool:
        """An answer is being written into this conversation, and not for this page: by another app instance,
        or by this one for another caller (another tab, a question sent with the screenshot hotkey). A page
        streaming its own answer turns its follow timer off (see _begin)."""
        if not conversation_id:
            return False
        return self.chat.is_generating(conversation_id) or self.history.written_elsewhere(conversation_id)

    def follow(self, conversation_id):
        """A tick while someone else writes this conversation's answer: show it as stored now, until it is done."""
        return {**self.transcript_updates(conversation_id),
                self.follow_timer: gr.Timer(active=self.written_by_others(conversation_id))}

    def transcript_updates(self, conversation_id: str | None) -> dict:
        """The transcript as saved, with the actions that fit it."""
        messages, message_ids = views.transcript(self.history.get(conversation_id))
        return {self.chatbot: messages, self.ids: message_ids, **self.actions(bool(message_ids))}

    def refresh_meter(self, conversation_id, value, max_new_tokens):
        text, files = input_parts(value)
        if len(text) > self.chat.max_text_chars:  # refused on send anyway; don't tokenize megabytes per key
            return views.notice_html(f"The message is {len(text):,} characters long; the limit is "
                                     f"{self.chat.max_text_chars:,}.", "warning")
        try:
            budget = self.chat.budget(conversation_id, text, len(files), int(max_new_tokens or 1))
        except USER_ERRORS:
            budget = None
        return views.meter_html(budget, self.models.status)

    @property
    def meter_inputs(self) -> list:
        return [self.conv, self.input, self.max_new]

    # ------------------------------------------------------------------ streaming answers
    def stream(self, events, conversation_id, settings, clear_input: bool):
        """Drive one of the service's event streams, updating the transcript as the answer grows."""
        messages: list[dict] = []
        answer, last = "", 0.0
        for event in events:
            if event.kind in ("error", "cancelled"):  # cancelled: stopped while waiting in line
                conversation_id = event.conversation_id or conversation_id
                update = show(self.notice, event.text, "error" if event.kind == "error" else "info")
                if self.history.get(conversation_id):
                    update.update({self.conv: conversation_id, **self.transcript_updates(conversation_id)})
                if event.user_message_id:  # the question is stored: an edit of it is done, answered or not
                    update.update({self.editing: None, self.edit_bar: edit_bar_shown(False)})
                yield update
                return
            if event.kind in ("queued", "started"):
                conversation_id = event.conversation_id
                place = f"⏳ {ordinal(event.position)} in line" if event.kind == "queued" else None
                messages, update = self._begin(conversation_id, event.message_id, place, clear_input)
                clear_input = False  # once: the user may type the next message while this one waits
                if event.kind == "started":
                    self.preferences.remember_settings(conversation_id, settings)  # for the next visit and new chats
                    last = time.monotonic()
                yield update
            elif event.kind == "delta":
                answer += event.text
                if time.monotonic() - last >= STREAM_INTERVAL_S:
                    last = time.monotonic()
                    messages[-1] = {"role": "assistant", "content": answer + views.STREAMING_CURSOR}
                    yield {self.chatbot: messages}
            elif event.kind == "done":
                yield {**self.transcript_updates(conversation_id), self.stats: views.stats_line(event.stats)}

    def _begin(self, conversation_id: str, answer_id: int | None, place: str | None, clear_input: bool):
        """The transcript with the stored question and a bubble for the answer: its place in line while it
        waits (`place`), the streaming cursor once it runs."""
        messages, message_ids = views.transcript(self.history.get(conversation_id), streaming_id=answer_id)
        if answer_id is None or not message_ids or message_ids[-1] != answer_id:  # not flushed yet: add it
            messages.append({"role": "assistant", "content": place or views.STREAMING_CURSOR})
            message_ids.append(answer_id)
        update = {self.conv: conversation_id, self.chatbot: messages, self.ids: message_ids, self.selected: None,
                  self.editing: None, self.edit_bar: edit_bar_shown(False), self.stats: "",
                  **self.actions(True, streaming=True), self.follow_timer: gr.Timer(active=False)}
        update.update(show(self.notice, f"{place}: the answer starts when the model is free; Stop leaves the line.",
                           "info") if place else hide(self.notice))
        if clear_input:
            update[self.input] = gr.update(value=EMPTY_INPUT, submit_btn=False, stop_btn=True)
        return messages, update

    @property
    def stream_outputs(self) -> list:
        return [self.conv, self.chatbot, self.ids, self.selected, self.editing, self.edit_bar, self.stats,
                self.notice, *self.action_buttons, self.follow_timer]

    @staticmethod
    def take_example(evt: gr.SelectData) -> dict:
        value = evt.value or {}
        files = [f["path"] if isinstance(f, dict) else f for f in value.get("files", [])]
        return {"text": value.get("text", ""), "files": files}

    def submit_checked(self, page_loaded, *args):
        """`submit`, unless the page belongs to a server that is gone: then say so and keep the message."""
        if not page_loaded:
            yield show(self.notice, STALE_PAGE, "warning")
            return
        yield from self.submit(*args)

    def submit(self, conversation_id, value, editing_id, *settings_values):
        text, files = input_parts(value)
        settings = self.settings.read(settings_values)
        if editing_id and conversation_id:
            if files:
                yield show(self.notice, "Editing keeps the message's images; remove the new attachments, "
                                        "or cancel the edit and send them as a new message.")
                return
            events = self.chat.edit(conversation_id, editing_id, text, settings)
        else:
            events = self.chat.send(conversation_id, text, files, settings)
        yield from self.stream(events, conversation_id, settings, clear_input=True)

    def regenerate(self, conversation_id, *settings_values):
        if not conversation_id:
            yield show(self.notice, "Nothing to regenerate yet: send a message first.", "info")
            return
        settings = self.settings.read(settings_values)
        yield from self.stream(self.chat.regenerate(conversation_id, settings), conversation_id, settings,
                               clear_input=False)

    def stop(self, conversation_id):
        if conversation_id and self.chat.stop(conversation_id):
            return hide(self.notice)
        return show(self.notice, "Nothing is being generated right now.", "info")

    # ------------------------------------------------------------------ transcript actions
    def start_edit(self, conversation_id, selected_id):
        """Put a question back into the input box: the selected one (or the question of a selected answer),
        else the last one. Sending it then adds a new version of that question (see submit)."""
        conversation = self.history.get(conversation_id)
        if conversation is None:
            return show(self.notice, "There is no message to edit yet.", "info")
        picked = conversation.message(selected_id)
        if picked is not None and not picked.is_user:
            index = conversation.messages.index(picked)
            picked = conversation.messages[index - 1] if index and conversation.messages[index - 1].is_user else None
        question = picked or conversation.last_question()
        if question is None:
            return show(self.notice, "There is no message to edit yet.", "info")
        number = conversation.messages.index(question) + 1
        which = "your last message" if question == conversation.last_question() else f"message {number}"
        note = (f"✎ **Editing {which}** — send to ask it this way and get a new answer; the earlier version stays "
                "(‹ › on the message flips between them). Its images stay.")
        return {self.input: {"text": question.text, "files": []}, self.editing: question.id,
                self.edit_note: note, self.edit_bar: edit_bar_shown(True), **hide(self.notice)}

    def cancel_edit(self):
        return {self.input: EMPTY_INPUT, self.editing: None, self.edit_bar: edit_bar_shown(False)}

    def show_variant(self, conversation_id, evt: gr.EventData):
        """An arrow ‹ › was clicked: show that version of the message (and the branch that follows it)."""
        message_id = (getattr(evt, "_data", None) or {}).get("message")
        if not conversation_id or not isinstance(message_id, int):
            return show(self.notice, "That version is no longer there; reload the page.", "info")
        self.chat.select_variant(conversation_id, message_id)
        return {**self.transcript_updates(conversation_id), self.selected: None, self.stats: "",
                self.editing: None, self.edit_bar: edit_bar_shown(False), **hide(self.notice)}

    def pick_message(self, message_ids, evt: gr.SelectData):
        index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if not isinstance(index, int) or not 0 <= index < len(message_ids):
            return {self.selected: None}
        return {self.selected: message_ids[index],
                **show(self.notice, f"Message {index + 1} selected: “Edit message” edits it (or its question), "
                                    "“Delete turn” deletes it in all its versions (a question goes with its "
                                    "answers).", "info")}

    def delete_turn(self, conversation_id, message_ids, selected_id):
        conversation = self.history.get(conversation_id)
        last = conversation.last_turn() if conversation else None
        if last is None:
            return show(self.notice, "There is no turn to delete.", "info")
        self.chat.delete_turn(conversation_id, selected_id if selected_id in message_ids else last.id)
        return {**self.transcript_updates(conversation_id), self.selected: None, self.stats: "", **hide(self.notice)}

    # ------------------------------------------------------------------ attachments: PDF pages, screen
    def check_attachments(self, value, checked):
        """Refuse a bad image as soon as it is attached: drop it from the box and say why."""
        text, files = input_parts(value)
        problems, kept = [], []
        for index, path in enumerate(files):
            if path not in checked:
                try:
                    self.chat.check_image(path, index)
                except USER_ERRORS as e:
                    problems.append(f"{e} It was removed from your message.")
                    continue
            kept.append(path)
        if not problems:
            return {self.checked: kept}
        return {self.input: {"text": text, "files": kept}, self.checked: kept,
                **show(self.notice, " ".join(problems))}

    def load_pdf(self, path):
        """Show the pages of an uploaded PDF; a bad file is refused at once and leaves the panel empty."""
        if not path:
            return self.clear_pdf()
        try:
            pdf = preview(path, MAX_PDF_THUMBNAILS)
        except USER_ERRORS as e:
            return {**self.clear_pdf(), self.pdf_file: None, **show(self.notice, f"{e}")}
        thumbs = []
        for index, (image, _) in enumerate(pdf.thumbnails):
            thumbs.append(str(scratch_file(f"page-{index + 1}.png")))
            image.save(thumbs[-1], format="PNG")
        state = {"path": path, "count": pdf.page_count, "thumbs": thumbs}
        selection = "1" if pdf.page_count == 1 else ""
        return {self.pdf_path: state, self.pdf_pages: gr.update(value=self.pages(state, selection), visible=True),
                self.pdf_info: pdf.note, self.pdf_selection: selection, **hide(self.notice)}

    @staticmethod
    def pages(state: dict | None, selection: str) -> list[tuple[str, str]]:
        """The gallery: every selected page marked with a tick."""
        if not state:
            return []
        try:
            chosen = set(parse_page_selection(selection, state["count"])) if (selection or "").strip() else set()
        except PdfError:
            chosen = set()
        return [(thumb, f"✓ Page {i + 1}" if i in chosen else f"Page {i + 1}") for i, thumb in enumerate(state["thumbs"])]

    def clear_pdf(self):
        return {self.pdf_path: None, self.pdf_pages: gr.update(value=None, visible=False), self.pdf_info: "",
                self.pdf_selection: ""}

    def toggle_page(self, state, text, evt: gr.SelectData):
        if not state or not isinstance(evt.index, int):
            return {}
        return {self.pdf_selection: toggle_page(text, evt.index, state["count"])}

    def mark_pages(self, state, text):
        return {self.pdf_pages: self.pages(state, text)} if state else {}

    def attach_pages(self, state, selection_text, value, conversation_id, max_new_tokens):
        if not state:
            return show(self.notice, "Upload a PDF first.", "info")
        text, files = input_parts(value)
        attached = self.chat.attach_pdf_pages(state["path"], selection_text or "", conversation_id=conversation_id,
                                              pending_text=text, pending_images=len(files),
                                              max_new_tokens=int(max_new_tokens or 1))
        paths = []
        for page, image in zip(attached.pages, attached.images):
            file = scratch_file(f"page-{page}.png")
            image.save(file, format="PNG")
            paths.append(str(file))
        size = f"{attached.images[0].width}×{attached.images[0].height} px" if attached.images else ""
        info = f"Attached page(s) {format_page_selection([p - 1 for p in attached.pages])} ({size}) to your next message."
        update = {self.input: with_files(value, paths), self.pdf_info: info}
        update.update(show(self.notice, attached.message, "warning") if attached.message else hide(self.notice))
        return update

    def capture(self, monitor_index, value):
        try:
            png = self.chat.capture_screen(int(monitor_index if monitor_index is not None else 1))
        except CaptureError as e:
            gr.Warning(str(e))
            return show(self.notice, str(e), "warning")
        file = scratch_file("screenshot.png")
        file.write_bytes(png)
        return {self.input: with_files(value, [str(file)]), **hide(self.notice)}

    def on_load(self, conversation_id):
        """A (re)loaded page: the monitors of this machine, and the settings the user left."""
        choices, default, note = monitor_choices()
        return {self.monitor: gr.update(choices=choices, value=default), self.screen_note: note, self.page_loaded: True,
                **self.settings.show(self.preferences.settings_for(conversation_id))}

    # ------------------------------------------------------------------ wiring
    def wire(self, after_change: list[tuple]) -> None:
        """Connect the events; `after_change` are (fn, inputs, outputs) run after anything that changes the
        conversation list (a send, a regenerate, a deleted turn), e.g. the history sidebar's refresh."""
        g = guard(self.notice)
        meter = (self.refresh_meter, self.meter_inputs, [self.meter])

        def then_refresh(event):
            for fn, inputs, outputs in [*after_change, meter]:
                event = event.then(fn, inputs, outputs, **QUIET)

        # concurrency_limit=None: gradio would otherwise run one send at a time across all tabs, and a waiting
        # tab would never hear its place in line; the app's scheduler is what lines requests up for the model.
        streaming = {"show_progress": "minimal", "concurrency_limit": None}
        sent = self.input.submit(g(self.submit_checked),
                                 [self.page_loaded, self.conv, self.input, self.editing, *self.settings.inputs],
                                 self.stream_outputs, **streaming)
        then_refresh(sent)
        # A clicked example is sent as if typed: its question and images go through the same path.
        example = self.chatbot.example_select(self.take_example, None, [self.input], **QUIET).then(
            g(self.submit_checked), [self.page_loaded, self.conv, self.input, self.editing, *self.settings.inputs],
            self.stream_outputs, **streaming)
        then_refresh(example)
        then_refresh(self.regenerate_btn.click(g(self.regenerate), [self.conv, *self.settings.inputs],
                                               self.stream_outputs, **streaming))
        for trigger in (self.stop_btn.click, self.input.stop):
            trigger(g(self.stop), [self.conv], [self.notice], queue=False, **QUIET)
        self.edit_btn.click(g(self.start_edit), [self.conv, self.selected],
                            [self.input, self.editing, self.edit_note, self.edit_bar, self.notice], **QUIET)
        self.cancel_edit_btn.click(self.cancel_edit, None, [self.input, self.editing, self.edit_bar], **QUIET)
        self.chatbot.select(g(self.pick_message), [self.ids], [self.selected, self.notice], **QUIET)
        then_refresh(self.variant_events.click(g(self.show_variant), [self.conv],
                                               [self.chatbot, self.ids, self.selected, self.stats, self.notice,
                                                self.editing, self.edit_bar, *self.action_buttons], **QUIET))
        then_refresh(self.delete_turn_btn.click(g(self.delete_turn), [self.conv, self.ids, self.selected],
                                                [self.chatbot, self.ids, self.selected, self.stats, self.notice,
                                                 *self.action_buttons], **QUIET))
        self.settings.wire(self.preferences)
        self.follow_timer.tick(g(self.follow), [self.conv], [self.chatbot, self.ids, *self.action_buttons,
                                                             self.follow_timer, self.notice], **QUIET)
        self.input.change(g(self.check_attachments), [self.input, self.checked], [self.input, self.checked, self.notice],
                          trigger_mode="always_last", **QUIET).then(*meter, **QUIET)
        self.max_new.release(*meter, **QUIET)

        pdf = [self.pdf_path, self.pdf_pages, self.pdf_info, self.pdf_selection]
        self.pdf_file.upload(g(self.load_pdf), [self.pdf_file], [*pdf, self.pdf_file, self.notice])
        self.pdf_file.clear(self.clear_pdf, None, pdf, **QUIET)
        self.pdf_pages.select(g(self.toggle_page), [self.pdf_path, self.pdf_selection],
                              [self.pdf_selection, self.notice], **QUIET)
        # Typed or clicked, every selected page gets its tick.
        self.pdf_selection.change(g(self.mark_pages), [self.pdf_path, self.pdf_selection],
                                  [self.pdf_pages, self.notice], trigger_mode="always_last", **QUIET)
        attach_inputs = [self.pdf_path, self.pdf_selection, self.input, self.conv, self.max_new]
        for trigger in (self.pdf_attach_btn.click, self.pdf_selection.submit):
            trigger(g(self.attach_pages), attach_inputs, [self.input, self.pdf_info, self.notice])
        self.capture_btn.click(g(self.capture), [self.monitor, self.input], [self.input, self.notice])
