"""Conversations and their messages (each message with its attachments)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from typing import Any

from .attachments import Attachments, check_sha
from .db import ROLES, STATUSES, StoreError, check_choice, from_json, to_json, utc_now

TITLE_LENGTH = 60


def title_from(text: str) -> str | None:
    """An untitled conversation's title: its first question, shortened at a word."""
    words = " ".join(text.split())
    if not words:
        return None
    if len(words) <= TITLE_LENGTH:
        return words
    cut = words[:TITLE_LENGTH].rsplit(" ", 1)[0] or words[:TITLE_LENGTH]
    return cut + "…"


class Conversations(Attachments):
    """Built on Attachments: messages refer to attachments, and deleting a
    message deletes the files only it used."""

    def _conversation_row(self, conversation_id: str) -> dict:
        rows = self._rows("SELECT * FROM conversations WHERE id = ?", [conversation_id])
        if not rows:
            raise StoreError(f"unknown conversation id: {conversation_id!r}")
        return rows[0]

    def _message_row(self, message_id: int) -> dict:
        rows = self._rows("SELECT * FROM messages WHERE id = ?", [message_id])
        if not rows:
            raise StoreError(f"unknown message id: {message_id!r}")
        return rows[0]

    # -- conversations -----------------------------------------------------

    def create_conversation(
        self,
        title: str | None = None,
        model: str | None = None,
        system_prompt: str | None = None,
    ) -> str:
        conversation_id = str(uuid.uuid4())
        now = utc_now()
        with self._write():
            self.db["conversations"].insert(
                {
                    "id": conversation_id,
                    "title": title,
                    "created_at": now,
                    "updated_at": now,
                    "model": model,
                    "system_prompt": system_prompt,
                }
            )
        return conversation_id

    def list_conversations(self, limit: int = 50, offset: int = 0) -> list[dict]:
        """Most recently updated first, without messages."""
        if limit < 0 or offset < 0:
            raise StoreError("limit and offset must not be negative")
        with self._lock:
            rows = self._rows(
                """
                SELECT c.*, (SELECT count(*) FROM messages m
                             WHERE m.conversation_id = c.id) AS message_count
                FROM conversations c
                ORDER BY c.updated_at DESC, c.rowid DESC
                LIMIT ? OFFSET ?
                """,
                [limit, offset],
            )
        for row in rows:
            row["settings"] = from_json(row["settings"])
        return rows

    def get_conversation(self, conversation_id: str) -> dict:
        """The conversation with its messages in order, each with its
        attachments; ``settings`` is what :meth:`set_conversation_settings`
        last saved (None if never)."""
        with self._read():
            conversation = self._conversation_row(conversation_id)
            messages = self._rows(
                "SELECT * FROM messages WHERE conversation_id = ? ORDER BY position",
                [conversation_id],
            )
            links = self._rows(
                """
                SELECT ma.message_id, a.* FROM message_attachments ma
                JOIN attachments a ON a.sha256 = ma.sha256
                JOIN messages m ON m.id = ma.message_id
                WHERE m.conversation_id = ?
                ORDER BY ma.message_id, ma.position
                """,
                [conversation_id],
            )
        by_message: dict[int, list[dict]] = {}
        for link in links:
            message_id = link.pop("message_id")
            link["path"] = str(self._file_path(link["sha256"], link["mime"]))
            by_message.setdefault(message_id, []).append(link)
        for message in messages:
            message["settings"] = from_json(message["settings"])
            message["timings"] = from_json(message["timings"])
            message["attachments"] = by_message.get(message["id"], [])
        conversation["settings"] = from_json(conversation["settings"])
        conversation["messages"] = messages
        return conversation

    def rename_conversation(self, conversation_id: str, title: str | None) -> None:
        title = (title or "").strip() or None  # blank means untitled
        with self._write() as conn:
            self._conversation_row(conversation_id)
            conn.execute(
                "UPDATE conversations SET title = ? WHERE id = ?", [title, conversation_id]
            )

    def set_conversation_settings(self, conversation_id: str, settings: dict | None) -> None:
        """Remember the generation settings this conversation uses (a
        JSON-serializable dict, None to forget them). Leaves updated_at alone:
        moving a slider doesn't make a conversation recent."""
        settings_json = to_json(settings, "settings")
        with self._write() as conn:
            self._conversation_row(conversation_id)
            conn.execute(
                "UPDATE conversations SET settings = ? WHERE id = ?",
                [settings_json, conversation_id],
            )

    def delete_conversation(self, conversation_id: str) -> None:
        with self._write() as conn:
            self._conversation_row(conversation_id)
            shas = [
                row[0]
                for row in conn.execute(
                    """
                    SELECT ma.sha256 FROM message_attachments ma
                    JOIN messages m ON m.id = ma.message_id
                    WHERE m.conversation_id = ?
                    """,
                    [conversation_id],
                )
            ]
            # Messages and their attachment links go by ON DELETE CASCADE;
            # the FTS delete trigger fires for each cascaded message.
            conn.execute("DELETE FROM conversations WHERE id = ?", [conversation_id])
            gone = self._forget_unreferenced(shas)
        self._after_delete(gone)

    # -- messages ----------------------------------------------------------

    def add_message(
        self,
        conversation_id: str,
        role: str,
        text: str,
        attachments: Iterable[str] = (),
        status: str = "complete",
        settings: dict | None = None,
        model: str | None = None,
    ) -> int:
        """Append a message; returns its id.

        ``attachments`` are sha256s from :meth:`add_attachment`. The first
        user message names an untitled conversation.
        """
        check_choice(role, ROLES, "role")
        check_choice(status, STATUSES, "status")
        if not isinstance(text, str):
            raise StoreError("message text must be a string")
        shas = [check_sha(sha) for sha in attachments]
        settings_json = to_json(settings, "settings")
        now = utc_now()
        with self._write() as conn:
            conversation = self._conversation_row(conversation_id)
            message_id = self._insert_message(
                conversation_id,
                {
                    "role": role,
                    "text": text,
                    "status": status,
                    "created_at": now,
                    "updated_at": now,
                    "model": model,
                    "settings": settings_json,
                    "owner": self.instance_id if status == "streaming" else None,
                },
                shas,
            )
            title = conversation["title"]
            if title is None and role == "user":
                title = title_from(text)
            conn.execute(
                "UPDATE conversations SET updated_at = ?, title = ? WHERE id = ?",
                [now, title, conversation_id],
            )
        return message_id

    def _insert_message(self, conversation_id: str, row: dict, shas: list[str]) -> int:
        """Insert one message at the end of a conversation (inside a transaction)."""
        for sha in shas:
            if not self._conn.execute(
                "SELECT 1 FROM attachments WHERE sha256 = ?", [sha]
            ).fetchone():
                raise StoreError(f"unknown attachment: {sha}")
        # Safe against other writers: we hold the write lock (BEGIN IMMEDIATE).
        (position,) = self._conn.execute(
            "SELECT coalesce(max(position) + 1, 0) FROM messages WHERE conversation_id = ?",
            [conversation_id],
        ).fetchone()
        message_id = (
            self.db["messages"]
            .insert({"conversation_id": conversation_id, "position": position, **row})
            .last_pk
        )
        self._conn.executemany(
            "INSERT INTO message_attachments (message_id, sha256, position) VALUES (?, ?, ?)",
            [(message_id, sha, i) for i, sha in enumerate(shas)],
        )
        return message_id

    def update_message(
        self,
        message_id: int,
        text: str | None = None,
        status: str | None = None,
        error: str | None = None,
        timings: dict | None = None,
    ) -> None:
        """Change the given fields (None = leave as is).

        Called every few tokens while streaming, so it is one UPDATE of only
        the given columns; a streaming message isn't re-indexed for search.
        """
        changes: dict[str, Any] = {}
        if text is not None:
            if not isinstance(text, str):
                raise StoreError("message text must be a string")
            changes["text"] = text
        if status is not None:
            changes["status"] = check_choice(status, STATUSES, "status")
            changes["owner"] = self.instance_id if status == "streaming" else None
        if error is not None:
            changes["error"] = str(error)
        if timings is not None:
            changes["timings"] = to_json(timings, "timings")
        changes["updated_at"] = utc_now()
        assignments = ", ".join(f"{column} = ?" for column in changes)
        with self._write() as conn:
            cursor = conn.execute(
                f"UPDATE messages SET {assignments} WHERE id = ?",
                [*changes.values(), message_id],
            )
            if cursor.rowcount == 0:
                raise StoreError(f"unknown message id: {message_id!r}")

    def delete_message(self, message_id: int) -> None:
        self._delete_messages(message_id, and_later=False)

    def delete_messages_from(self, message_id: int) -> int:
        """Delete this message and every later one in its conversation
        (regenerate, edit the last turn). Returns how many were deleted.

        Attachments only these messages used are deleted too: to edit a turn
        but keep its images, update the user message's text and delete from
        the message after it.
        """
        return self._delete_messages(message_id, and_later=True)

    def _delete_messages(self, message_id: int, and_later: bool) -> int:
        with self._write() as conn:
            message = self._message_row(message_id)
            where = "conversation_id = ? AND position >= ?" if and_later else "id = ?"
            params = (
                [message["conversation_id"], message["position"]]
                if and_later
                else [message_id]
            )
            shas = [
                row[0]
                for row in conn.execute(
                    "SELECT sha256 FROM message_attachments WHERE message_id IN "
                    f"(SELECT id FROM messages WHERE {where})",
                    params,
                )
            ]
            count = conn.execute(f"DELETE FROM messages WHERE {where}", params).rowcount
            gone = self._forget_unreferenced(shas)
        self._after_delete(gone)
        return count

    def recover_interrupted(self) -> int:
        """Mark answers left 'streaming' by an instance that is gone (killed,
        crashed) as 'stopped', keeping their partial text; returns how many.

        Answers another live instance is still writing are left alone (see
        instances.py), so this is right however soon after a crash it runs:
        call it at start, and whenever a 'streaming' answer looks stuck.
        """
        with self._lock:
            owners = [row[0] for row in self._conn.execute(
                "SELECT DISTINCT owner FROM messages WHERE status = 'streaming'")]
        dead = [owner for owner in owners if owner is None or not self.is_alive(owner)]
        if not dead:
            return 0
        # A dead instance stays dead and writes no new rows, so checking
        # outside the transaction is safe.
        with self._write() as conn:
            return conn.execute(
                "UPDATE messages SET status = 'stopped', owner = NULL, updated_at = ? "
                "WHERE status = 'streaming' AND (owner IS NULL OR owner IN "
                "(SELECT value FROM json_each(?)))",
                [utc_now(), json.dumps([o for o in dead if o is not None])],
            ).rowcount
