"""The conversation history as a service: list, open, search, rename, export and import, returning records
(app.records) instead of store rows. The UI's history sidebar reads and writes only through this; deleting
goes through ChatService, which must first make sure no answer is being written into the conversation.

Each user sees only their own conversations (app.viewer): another user's is answered as if it did not exist."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from . import viewer
from .records import Conversation, ConversationSummary, SearchHit
from .store import Store, StoreError

MAX_IMPORT_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class ExportFile:
    name: str  # a file name made from the title, safe on every file system
    data: bytes
    holds: tuple[str, ...] = ()  # the attachments (sha256) inside it: deleting one should delete this file too


def file_name(title: str, suffix: str) -> str:
    stem = re.sub(r"[^\w\- ]+", "", title, flags=re.UNICODE).strip().replace(" ", "-")[:60] or "conversation"
    return f"{stem}{suffix}"


def _attachments(conversation: Conversation) -> tuple[str, ...]:
    return tuple(dict.fromkeys(a.sha256 for m in conversation.messages for a in m.attachments))


class HistoryService:
    def __init__(self, store: Store):
        self.store = store

    def list(self, limit: int = 200) -> list[ConversationSummary]:
        """Most recently updated first."""
        rows = self.store.list_conversations(limit=limit, owner=viewer.current())
        return [ConversationSummary.from_row(row) for row in rows]

    def get(self, conversation_id: str | None) -> Conversation | None:
        """The conversation, or None when there is none by that id (deleted meanwhile, in another tab)."""
        row = self._row(conversation_id)
        return Conversation.from_row(row) if row else None

    def _row(self, conversation_id: str | None) -> dict | None:
        """The store's conversation with its messages, when it exists and is the asking user's."""
        if not conversation_id:
            return None
        try:
            row = self.store.get_conversation(conversation_id)
        except StoreError:
            return None
        return row if row["owner"] == viewer.current() else None

    def is_mine(self, conversation_id: str | None) -> bool:
        """Whether this conversation exists and belongs to the user asking."""
        return bool(conversation_id) and self.store.conversation_owner(conversation_id) == viewer.current()

    def check_mine(self, conversation_id: str | None) -> str:
        """The id, when it is the asking user's conversation; else the store's error for an unknown id."""
        if not self.is_mine(conversation_id):
            raise StoreError(f"unknown conversation id: {conversation_id!r}")
        return conversation_id

    def search(self, query: str, limit: int = 20, highlight: tuple[str, str] = ("[", "]")) -> list[SearchHit]:
        if not (query or "").strip():
            return []
        rows = self.store.search(query, limit=limit, highlight=highlight, owner=viewer.current())
        return [SearchHit.from_row(row) for row in rows]

    def rename(self, conversation_id: str, title: str | None) -> None:
        self.store.rename_conversation(self.check_mine(conversation_id), title)

    def export_json(self, conversation_id: str) -> ExportFile:
        conversation = self._existing(conversation_id)
        data = json.dumps(self.store.export_conversation(conversation_id), ensure_ascii=False).encode("utf-8")
        return ExportFile(file_name(conversation.display_title, ".json"), data, _attachments(conversation))

    def export_markdown(self, conversation_id: str) -> ExportFile:
        """A zip of the Markdown and its images, so the export opens anywhere with its pictures."""
        conversation = self._existing(conversation_id)
        return ExportFile(file_name(conversation.display_title, ".zip"), self.store.export_markdown_zip(conversation_id),
                          _attachments(conversation))

    def import_(self, data: bytes) -> str:
        """A JSON export -> a new conversation's id; StoreError says what is wrong with the file."""
        if len(data) > MAX_IMPORT_BYTES:
            raise StoreError("That file is too large to be a conversation export.")
        return self.store.import_conversation(data, owner=viewer.current())

    def written_elsewhere(self, conversation_id: str | None) -> bool:
        """True while another app instance on this data folder is writing an answer in this conversation (the
        page follows it until it is done). An answer whose writer died meanwhile is marked stopped here."""
        row = self._row(conversation_id)
        messages = row["messages"] if row else []
        writers = {m["owner"] for m in messages if m["status"] == "streaming"} - {self.store.instance_id}
        live = {w for w in writers if self.store.is_alive(w)}
        if writers - live:
            self.store.recover_interrupted()
        return bool(live)

    def _existing(self, conversation_id: str | None) -> Conversation:
        conversation = self.get(conversation_id)
        if conversation is None:
            raise StoreError("Open a conversation to export it.")
        return conversation
