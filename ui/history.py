"""The history sidebar: new chat, search, the conversation list, rename, delete, export and import.

Reads and writes go through `services.history` (and `services.chat` for deleting, which must not pull a
conversation from under an answer being written). Opening a conversation shows it in the Chat tab, through
the tab's own `open_updates`.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from app.services import Services

from . import views
from .chat_tab import ChatTab
from .common import EMPTY_INPUT, QUIET, guard, hide, show
from .style import SEARCH_JS

HISTORY_LIMIT = 200
SEARCH_LIMIT = 20


class HistoryPanel:
    def __init__(self, services: Services, conv: gr.State):
        self.history, self.chat, self.scratch = services.history, services.chat, services.scratch
        self.conv = conv
        with gr.Sidebar(label="History", open=True, width=290, elem_id="history-sidebar"):
            self.new_chat_btn = gr.Button("+ New chat", variant="primary", elem_id="new-chat-btn")
            self.search_box = gr.Textbox(placeholder="Search all messages…", show_label=False, container=False,
                                         elem_id="history-search", max_lines=1)
            self.search_results = gr.HTML("", elem_id="search-results", js_on_load=SEARCH_JS)
            self.list = gr.Radio(choices=[], label="Conversations", elem_id="history-list")
            self.rename_box = gr.Textbox(label="Title of the open conversation", placeholder="Untitled conversation",
                                         max_lines=1, elem_id="rename-box")
            with gr.Row():
                self.rename_btn = gr.Button("Rename", size="sm", min_width=60, elem_id="rename-btn")
                self.delete_btn = gr.Button("Delete…", size="sm", variant="stop", min_width=60, elem_id="delete-btn")
            with gr.Column(visible=False, elem_id="delete-confirm") as self.delete_confirm:
                self.delete_question = gr.Markdown("")
                with gr.Row():
                    self.delete_yes = gr.Button("Delete", size="sm", variant="stop", elem_id="delete-yes-btn")
                    self.delete_no = gr.Button("Cancel", size="sm", elem_id="delete-no-btn")
            with gr.Row():
                self.export_json_btn = gr.Button("Export JSON", size="sm", min_width=60, elem_id="export-json-btn")
                self.export_md_btn = gr.Button("Export Markdown", size="sm", min_width=60, elem_id="export-md-btn")
            self.export_file = gr.File(label="Download", visible=False, interactive=False, elem_id="export-file")
            self.import_btn = gr.UploadButton("Import JSON…", file_types=[".json"], size="sm", elem_id="import-btn")
            self.notice = gr.HTML("", visible=False, elem_id="history-notice")

    # ------------------------------------------------------------------ views
    def refresh(self, conversation_id: str | None) -> dict:
        """The list, with the open conversation selected, and its title in the rename box."""
        choices = views.history_choices(self.history.list(limit=HISTORY_LIMIT))
        known = {value for _, value in choices}
        conversation = self.history.get(conversation_id) if conversation_id in known else None
        return {self.list: gr.update(choices=choices, value=conversation.id if conversation else None),
                self.rename_box: conversation.display_title if conversation else ""}

    def opened(self, conversation_id: str | None) -> dict:
        """The Chat tab and this panel showing a conversation (None: a fresh new chat)."""
        conversation = self.history.get(conversation_id)
        return {**self.tab.open_updates(conversation), self.delete_confirm: gr.update(visible=False),
                self.list: gr.update(value=conversation.id if conversation else None),
                self.rename_box: conversation.display_title if conversation else "", **hide(self.notice)}

    # ------------------------------------------------------------------ actions
    def new_chat(self):
        return {**self.opened(None), self.tab.input: EMPTY_INPUT}

    def open(self, conversation_id):
        if conversation_id and not self.history.get(conversation_id):
            return {**show(self.notice, "That conversation no longer exists."), **self.refresh(None)}
        return self.opened(conversation_id)

    def search(self, query):
        query = query or ""
        hits = self.history.search(query, limit=SEARCH_LIMIT, highlight=views.HIGHLIGHT)
        return {self.search_results: views.search_results_html(query, hits)}

    def open_hit(self, evt: gr.EventData):
        data = getattr(evt, "_data", None) or {}
        conversation_id = data.get("conversation") if isinstance(data, dict) else None
        return self.open(conversation_id) if conversation_id else {}

    def rename(self, conversation_id, title):
        if not conversation_id:
            return show(self.notice, "Open a conversation first (or send a message to start one).", "info")
        self.history.rename(conversation_id, title)
        return {**self.refresh(conversation_id), **hide(self.notice)}

    def ask_delete(self, conversation_id):
        conversation = self.history.get(conversation_id)
        if not conversation:
            return show(self.notice, "Open the conversation you want to delete first.", "info")
        return {self.delete_confirm: gr.update(visible=True),
                self.delete_question: f"Delete **{conversation.display_title}** ({len(conversation.messages)} "
                                      "messages) and its images? This cannot be undone.",
                **hide(self.notice)}

    def confirm_delete(self, conversation_id):
        if conversation_id:
            self.chat.delete_conversation(conversation_id)
        return {**self.opened(None), **self.refresh(None)}

    def cancel_delete(self):
        return {self.delete_confirm: gr.update(visible=False)}

    def export(self, conversation_id, kind: str):
        if not self.history.get(conversation_id):
            return show(self.notice, "Open a conversation to export it.", "info")
        exported = self.history.export_json(conversation_id) if kind == "json" \
            else self.history.export_markdown(conversation_id)
        path = self.scratch.write(exported.name, exported.data, holds=exported.holds)
        return {self.export_file: gr.update(value=str(path), visible=True), **hide(self.notice)}

    def import_file(self, upload):
        path = upload if isinstance(upload, str) else getattr(upload, "name", None)
        if not path:
            return {}
        conversation_id = self.history.import_(Path(path).read_bytes())
        return {**self.opened(conversation_id), **self.refresh(conversation_id),
                **show(self.notice, "Imported as a new conversation.", "info")}

    # ------------------------------------------------------------------ wiring
    def wire(self, tab: ChatTab) -> None:
        self.tab = tab
        g = guard(self.notice)
        opens = [*tab.open_outputs, self.delete_confirm, self.list, self.rename_box, self.notice]
        meter = (tab.refresh_meter, tab.meter_inputs, [tab.meter])
        for clear in (self.new_chat_btn.click, tab.chatbot.clear):  # the transcript's clear icon starts a new chat
            clear(g(self.new_chat), None, [*opens, tab.input], **QUIET).then(*meter, **QUIET)
        self.list.input(g(self.open), [self.list], opens, **QUIET).then(*meter, **QUIET)
        self.search_box.change(g(self.search), [self.search_box], [self.search_results, self.notice],
                               trigger_mode="always_last", **QUIET)
        self.search_results.click(g(self.open_hit), None, opens, **QUIET).then(*meter, **QUIET)
        for trigger in (self.rename_btn.click, self.rename_box.submit):
            trigger(g(self.rename), [self.conv, self.rename_box], [self.list, self.rename_box, self.notice], **QUIET)
        self.delete_btn.click(g(self.ask_delete), [self.conv], [self.delete_confirm, self.delete_question,
                                                                self.notice], **QUIET)
        self.delete_no.click(self.cancel_delete, None, [self.delete_confirm], **QUIET)
        self.delete_yes.click(g(self.confirm_delete), [self.conv], opens, **QUIET).then(*meter, **QUIET)
        self.export_json_btn.click(g(lambda c: self.export(c, "json")), [self.conv], [self.export_file, self.notice])
        self.export_md_btn.click(g(lambda c: self.export(c, "md")), [self.conv], [self.export_file, self.notice])
        self.import_btn.upload(g(self.import_file), [self.import_btn], opens).then(*meter, **QUIET)
