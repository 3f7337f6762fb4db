"""What the services hand to their callers (the UI now, the API later): small frozen records built from the
store's rows, so a view never depends on column names or on SQLite at all."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

UNTITLED = "Untitled conversation"


@dataclass(frozen=True)
class Attachment:
    sha256: str
    path: str  # the stored file (content-addressed, never changes)
    name: str | None  # the file name it was attached under, if any
    mime: str | None
    width: int | None
    height: int | None

    @classmethod
    def from_row(cls, row: dict) -> Attachment:
        return cls(row["sha256"], row["path"], row.get("name"), row.get("mime"), row.get("width"), row.get("height"))


@dataclass(frozen=True)
class Message:
    id: int
    role: str  # "user" or "assistant"
    text: str
    status: str  # "complete", "streaming", "stopped" or "failed"
    error: str | None
    attachments: tuple[Attachment, ...]
    settings: dict | None  # the generation settings an answer was made with
    timings: dict | None  # speed, token counts and backend of an answer
    created_at: str | None
    # Its versions (regenerated answers, edited questions), oldest first, this one among them; see app.store.
    variant_ids: tuple[int, ...] = ()

    @property
    def is_user(self) -> bool:
        return self.role == "user"

    @property
    def variant_count(self) -> int:
        return max(1, len(self.variant_ids))

    @property
    def variant_index(self) -> int:
        """1-based place among its versions."""
        return self.variant_ids.index(self.id) + 1 if self.id in self.variant_ids else 1

    def variant(self, step: int) -> int | None:
        """The id of the version `step` places away (-1: the one before), None past either end."""
        index = self.variant_index - 1 + step
        return self.variant_ids[index] if 0 <= index < len(self.variant_ids) else None

    @classmethod
    def from_row(cls, row: dict) -> Message:
        return cls(row["id"], row["role"], row.get("text") or "", row.get("status") or "complete", row.get("error"),
                   tuple(Attachment.from_row(a) for a in row.get("attachments") or ()), row.get("settings"),
                   row.get("timings"), row.get("created_at"), tuple(row.get("variant_ids") or ()))


@dataclass(frozen=True)
class Conversation:
    id: str
    title: str | None
    model: str | None
    system_prompt: str | None
    created_at: str | None
    updated_at: str | None
    messages: tuple[Message, ...]
    settings: dict | None  # the generation settings last used in it

    @property
    def display_title(self) -> str:
        return self.title or UNTITLED

    def message(self, message_id: int | None) -> Message | None:
        """The message with this id on the current path, if it is there."""
        return next((m for m in self.messages if m.id == message_id), None)

    def last_question(self) -> Message | None:
        """The last user message: what Edit changes and Regenerate answers again."""
        return next((m for m in reversed(self.messages) if m.is_user), None)

    def last_turn(self) -> Message | None:
        """The message that stands for the last turn: its question, or a lone last answer."""
        if not self.messages:
            return None
        last = self.messages[-1]
        if not last.is_user and len(self.messages) > 1 and self.messages[-2].is_user:
            return self.messages[-2]
        return last

    @classmethod
    def from_row(cls, row: dict) -> Conversation:
        return cls(row["id"], row.get("title"), row.get("model"), row.get("system_prompt"), row.get("created_at"),
                   row.get("updated_at"), tuple(Message.from_row(m) for m in row.get("messages") or ()),
                   row.get("settings"))


@dataclass(frozen=True)
class ConversationSummary:
    """A history-list entry (no messages)."""

    id: str
    title: str | None
    updated_at: str | None
    message_count: int

    @property
    def display_title(self) -> str:
        return self.title or UNTITLED

    @classmethod
    def from_row(cls, row: dict) -> ConversationSummary:
        return cls(row["id"], row.get("title"), row.get("updated_at"), int(row.get("message_count") or 0))


@dataclass(frozen=True)
class SearchHit:
    conversation_id: str
    message_id: int
    role: str
    title: str | None
    snippet: str  # matches wrapped in the highlight markers the caller asked for

    @property
    def display_title(self) -> str:
        return self.title or UNTITLED

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> SearchHit:
        return cls(row["conversation_id"], row["message_id"], row["role"], row.get("title"), row.get("snippet") or "")
