"""Conversations and their messages (each message with its attachments).

A conversation is a tree of messages: each message follows its ``parent_id`` (None for a first question).
Regenerate adds an answer beside the old one; editing a question adds a new version of it beside the old
one, which keeps everything that followed it. Of a parent's children the one chosen most recently (added,
or picked with :meth:`select_message`) is on the *current path*: what :meth:`get_conversation` returns,
what the model is shown, what export writes and what a new message follows. Each message on the path says
which versions it has (``variant_ids``: the messages of its role with the same parent, oldest first).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Final

from .attachments import Attachments, check_sha
from .db import LOCAL_OWNER, ROLES, STATUSES, StoreError, check_choice, from_json, to_json, utc_now

TITLE_LENGTH = 60

# add_message's default parent: the last message of the current path (a new message continues it).
PATH_END: Final = "path end"

# The current path's message ids, first question first, for every conversation at once in SQL: from the
# most recently chosen first question, each step the most recently chosen child.
PATH_CTE = """
    WITH RECURSIVE path(id) AS (
        SELECT (SELECT r.id FROM messages r WHERE r.conversation_id = c.id AND r.parent_id IS NULL
                ORDER BY r.chosen DESC, r.id DESC LIMIT 1)
        UNION ALL
        SELECT (SELECT k.id FROM messages k WHERE k.parent_id = path.id
                ORDER BY k.chosen DESC, k.id DESC LIMIT 1)
        FROM path WHERE path.id IS NOT NULL
    )
"""


def title_from(text: str) -> str | None:
    """An untitled conversation's title: its first question, shortened at a word."""
    words = " ".join(text.split())
    if not words:
        return None
    if len(words) <= TITLE_LENGTH:
        return words
    cut = words[:TITLE_LENGTH].rsplit(" ", 1)[0] or words[:TITLE_LENGTH]
    return cut + "…"


def children_of(messages: Iterable[dict]) -> dict[int | None, list[dict]]:
    """Message rows grouped by parent id, each group oldest first."""
    children: dict[int | None, list[dict]] = {}
    for m in sorted(messages, key=lambda m: m["id"]):
        children.setdefault(m["parent_id"], []).append(m)
    return children


def current_path(children: dict[int | None, list[dict]]) -> list[dict]:
    """From the first question on, each parent's most recently chosen child (see the module doc)."""
    path: list[dict] = []
    parent = None
    while kids := children.get(parent):
        chosen = max(kids, key=lambda m: (m["chosen"], m["id"]))
        path.append(chosen)
        parent = chosen["id"]
    return path


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
        owner: str = LOCAL_OWNER,
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
                    "owner": owner,
                }
            )
        return conversation_id

    def list_conversations(self, limit: int = 50, offset: int = 0, owner: str | None = None) -> list[dict]:
        """Most recently updated first, without messages; ``message_count``
        counts the messages of the current path (other versions aside).
        ``owner``: only that user's (None: everyone's)."""
        if limit < 0 or offset < 0:
            raise StoreError("limit and offset must not be negative")
        with self._lock:
            rows = self._rows(
                f"""
                SELECT c.*, ({PATH_CTE} SELECT count(id) FROM path) AS message_count
                FROM conversations c
                WHERE ? IS NULL OR c.owner = ?
                ORDER BY c.updated_at DESC, c.rowid DESC
                LIMIT ? OFFSET ?
                """,
                [owner, owner, limit, offset],
            )
        for row in rows:
            row["settings"] = from_json(row["settings"])
        return rows

    def get_conversation(self, conversation_id: str) -> dict:
        """The conversation with the messages of its current path in order,
        each with its attachments and its versions (``variant_ids``, and
        ``variant_index`` / ``variant_count``, 1-based); ``settings`` is what
        :meth:`set_conversation_settings` last saved (None if never)."""
        with self._read():
            conversation = self._conversation_row(conversation_id)
            rows = self._rows(
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
        children = children_of(rows)
        messages = current_path(children)
        for message in messages:
            del message["chosen"]  # bookkeeping of the path, not part of the message
            message["settings"] = from_json(message["settings"])
            message["timings"] = from_json(message["timings"])
            message["attachments"] = by_message.get(message["id"], [])
            versions = [m["id"] for m in children[message["parent_id"]] if m["role"] == message["role"]]
            message["variant_ids"] = versions
            message["variant_index"] = versions.index(message["id"]) + 1
            message["variant_count"] = len(versions)
        conversation["settings"] = from_json(conversation["settings"])
        conversation["messages"] = messages
        return conversation

    def conversation_owner(self, conversation_id: str) -> str | None:
        """Whose conversation this is; None when there is none by that id."""
        with self._lock:
            rows = self._rows("SELECT owner FROM conversations WHERE id = ?", [conversation_id])
        return rows[0]["owner"] if rows else None

    def owns_attachment(self, owner: str, sha: str) -> bool:
        """Whether a message of one of ``owner``'s conversations holds this attachment (files are shared by
        content between users, so a file is theirs to see when any of their messages refers to it)."""
        with self._lock:
            return bool(self._rows(
            """
            SELECT 1 FROM message_attachments ma
            JOIN messages m ON m.id = ma.message_id
            JOIN conversations c ON c.id = m.conversation_id
            WHERE ma.sha256 = ? AND c.owner = ? LIMIT 1
            """,
            [sha, owner],
        ))

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
        parent_id: int | None | str = PATH_END,
    ) -> int:
        """Add a message; returns its id. It goes on the current path.

        By default it follows the last message of the current path; pass
        ``parent_id`` to add it after another message of this conversation
        (None: a first question), beside that message's other children: a
        new answer to a question, a new version of a question. ``attachments``
        are sha256s from :meth:`add_attachment`. The first user message names
        an untitled conversation.
        """
        check_choice(role, ROLES, "role")
        check_choice(status, STATUSES, "status")
        if not isinstance(text, str):
            raise StoreError("message text must be a string")
        if parent_id is not PATH_END and parent_id is not None and not isinstance(parent_id, int):
            raise StoreError(f"parent_id must be a message id or None; got {parent_id!r}")
        shas = [check_sha(sha) for sha in attachments]
        settings_json = to_json(settings, "settings")
        now = utc_now()
        with self._write() as conn:
            conversation = self._conversation_row(conversation_id)
            if parent_id is PATH_END:
                path = current_path(self._tree(conversation_id))
                parent_id = path[-1]["id"] if path else None
            elif parent_id is not None and self._message_row(parent_id)["conversation_id"] != conversation_id:
                raise StoreError(f"message {parent_id} is not in conversation {conversation_id}")
            message_id = self._insert_message(
                conversation_id,
                {
                    "parent_id": parent_id,
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
        """Insert one message (inside a transaction): last in insertion order
        (``position``) and chosen, so it is on the current path."""
        for sha in shas:
            if not self._conn.execute(
                "SELECT 1 FROM attachments WHERE sha256 = ?", [sha]
            ).fetchone():
                raise StoreError(f"unknown attachment: {sha}")
        # Safe against other writers: we hold the write lock (BEGIN IMMEDIATE).
        position, chosen = self._conn.execute(
            "SELECT coalesce(max(position) + 1, 0), coalesce(max(chosen) + 1, 0)"
            " FROM messages WHERE conversation_id = ?",
            [conversation_id],
        ).fetchone()
        message_id = (
            self.db["messages"]
            .insert(
                {"conversation_id": conversation_id, "position": position, "chosen": chosen, **row}
            )
            .last_pk
        )
        self._conn.executemany(
            "INSERT INTO message_attachments (message_id, sha256, position) VALUES (?, ?, ?)",
            [(message_id, sha, i) for i, sha in enumerate(shas)],
        )
        return message_id

    def _tree(self, conversation_id: str) -> dict[int | None, list[dict]]:
        """The conversation's messages (id, parent, role, chosen only) by parent."""
        return children_of(
            self._rows(
                "SELECT id, parent_id, role, chosen FROM messages WHERE conversation_id = ?",
                [conversation_id],
            )
        )

    def _choose(self, conversation_id: str, message_ids: Iterable[int]) -> None:
        """Make these messages their parents' chosen children (inside a transaction)."""
        ids = list(message_ids)
        if ids:
            (chosen,) = self._conn.execute(
                "SELECT max(chosen) + 1 FROM messages WHERE conversation_id = ?", [conversation_id]
            ).fetchone()
            self._conn.execute(
                f"UPDATE messages SET chosen = ? WHERE id IN ({', '.join('?' * len(ids))})",
                [chosen, *ids],
            )

    def select_message(self, message_id: int) -> None:
        """Switch the conversation's current path to go through this message
        (a version of a question or answer); below it the path continues the
        way it went when this branch was last shown (at first: its latest
        messages)."""
        with self._write():
            message = self._message_row(message_id)
            parents = {
                m["id"]: m["parent_id"]
                for kids in self._tree(message["conversation_id"]).values()
                for m in kids
            }
            chain = [message_id]
            while parents[chain[-1]] is not None:
                chain.append(parents[chain[-1]])
            self._choose(message["conversation_id"], chain)

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
        """Delete this one message; what followed it now follows its parent."""
        self._delete(message_id, lambda message, tree: ({message_id}, message["parent_id"]))

    def delete_messages_from(self, message_id: int) -> int:
        """Delete this message and everything that followed it, in every
        branch under it (for a conversation without versions: this message
        and every later one). Returns how many were deleted.

        Attachments only these messages used are deleted too: to edit a turn
        but keep its images, update the user message's text and delete from
        the message after it.
        """

        def subtree(message: dict, tree: dict) -> tuple[set[int], None]:
            doomed, todo = set(), [message_id]
            while todo:
                doomed.add(todo[-1])
                todo.extend(m["id"] for m in tree.get(todo.pop(), ()))
            return doomed, None  # nothing is left to move

        return self._delete(message_id, subtree)

    def delete_turn(self, message_id: int) -> int:
        """Delete a turn in all its versions: for a question, it and its other
        versions with all their answers; for an answer, it and the other
        answers to its question. The turns that followed stay: they now follow
        what came before the deleted turn. Returns how many messages went."""

        def turn(message: dict, tree: dict) -> tuple[set[int], int | None]:
            versions = [m["id"] for m in tree[message["parent_id"]] if m["role"] == message["role"]]
            doomed = set(versions)
            if message["role"] == "user":
                doomed.update(m["id"] for v in versions for m in tree.get(v, ()) if m["role"] == "assistant")
            return doomed, message["parent_id"]

        return self._delete(message_id, turn)

    def _delete(self, message_id: int, pick: Callable[[dict, dict], tuple[set[int], int | None]]) -> int:
        """Delete the messages ``pick(message, tree)`` names, with the parent
        that the messages following them (and not deleted) move under; the one
        of those on the current path stays on it. Returns how many went."""
        with self._write() as conn:
            message = self._message_row(message_id)
            conversation_id = message["conversation_id"]
            tree = self._tree(conversation_id)
            doomed, new_parent = pick(message, tree)
            survivors = [m["id"] for d in doomed for m in tree.get(d, ()) if m["id"] not in doomed]
            if survivors:
                conn.execute(
                    f"UPDATE messages SET parent_id = ? WHERE id IN ({', '.join('?' * len(survivors))})",
                    [new_parent, *survivors],
                )
                on_path = {m["id"] for m in current_path(tree)}
                self._choose(conversation_id, on_path.intersection(survivors))
            marks = ", ".join("?" * len(doomed))
            shas = [
                row[0]
                for row in conn.execute(
                    f"SELECT sha256 FROM message_attachments WHERE message_id IN ({marks})", [*doomed]
                )
            ]
            count = conn.execute(f"DELETE FROM messages WHERE id IN ({marks})", [*doomed]).rowcount
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
