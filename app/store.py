"""Conversation history: a SQLite file (through sqlite-utils) plus attachment files.

Layout of the data directory::

    history.db                    conversations, messages, attachment metadata, FTS index
    attachments/ab/abcdef….png    each distinct attachment once, named by its sha256

The web server and the hotkey helper are separate processes that may write at
the same time, so the database runs in WAL mode with a busy timeout and every
write is a short ``BEGIN IMMEDIATE`` transaction (taking the write lock up
front means SQLite can wait for it instead of failing with "database is
locked" half-way through).  Within one process a single connection is shared
by all threads behind a lock.

Timestamps are UTC ISO 8601 strings with microseconds
(``2024-05-01T12:00:00.000000+00:00``), so they sort as text.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import json
import logging
import mimetypes
import os
import re
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import sqlite_utils

log = logging.getLogger(__name__)

ROLES = ("user", "assistant")
STATUSES = ("complete", "streaming", "stopped", "failed")

EXPORT_FORMAT = "deepseek-vl-local/conversation"
EXPORT_VERSION = 1

BUSY_TIMEOUT_S = 5.0
TITLE_LENGTH = 60

# File extensions are derived from the mime type with a fixed table (not the
# platform's mimetypes registry, which differs between machines) so every
# process computes the same path for the same attachment.
_EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/gif": "gif",
    "image/webp": "webp",
    "image/bmp": "bmp",
    "image/tiff": "tiff",
    "application/pdf": "pdf",
    "text/plain": "txt",
}
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_MIME_RE = re.compile(r"[a-z0-9][a-z0-9.+-]*/[a-z0-9][a-z0-9.+-]*")


class StoreError(Exception):
    """Bad input or an unknown id. Stored data is unchanged when this is raised."""


# --------------------------------------------------------------------------
# Migrations: plain functions, applied in order, each exactly once.
# Never edit one that has shipped; append a new one instead.


def m001_initial(db: sqlite_utils.Database) -> None:
    db.execute(
        """
        CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            title TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            model TEXT,
            system_prompt TEXT
        )
        """
    )
    db.execute("CREATE INDEX conversations_updated_at ON conversations(updated_at)")
    # INTEGER PRIMARY KEY so the id doubles as the FTS rowid (a plain rowid
    # may be renumbered by VACUUM); AUTOINCREMENT so a deleted message's id is
    # never reused, and a stale id held by the UI can't hit another message.
    db.execute(
        f"""
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id TEXT NOT NULL
                REFERENCES conversations(id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            role TEXT NOT NULL CHECK (role IN {ROLES!r}),
            text TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL DEFAULT 'complete' CHECK (status IN {STATUSES!r}),
            error TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            model TEXT,
            settings TEXT,
            timings TEXT,
            UNIQUE (conversation_id, position)
        )
        """
    )
    db.execute(
        "CREATE INDEX messages_streaming ON messages(status) WHERE status = 'streaming'"
    )
    db.execute(
        """
        CREATE TABLE attachments (
            sha256 TEXT PRIMARY KEY,
            mime TEXT NOT NULL,
            size INTEGER NOT NULL,
            width INTEGER,
            height INTEGER,
            name TEXT,
            created_at TEXT NOT NULL
        )
        """
    )
    db.execute(
        """
        CREATE TABLE message_attachments (
            message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            sha256 TEXT NOT NULL REFERENCES attachments(sha256),
            position INTEGER NOT NULL,
            PRIMARY KEY (message_id, position)
        )
        """
    )
    db.execute("CREATE INDEX message_attachments_sha256 ON message_attachments(sha256)")


def m002_fts(db: sqlite_utils.Database) -> None:
    # External-content FTS5 index over messages.text. Our own triggers rather
    # than enable_fts(create_triggers=True) because a message that is still
    # streaming is rewritten every few tokens: it is left out of the index
    # until it settles, so those updates cost no FTS work at all.
    db.execute(
        """
        CREATE VIRTUAL TABLE messages_fts USING fts5(
            text, content='messages', content_rowid='id',
            tokenize='unicode61 remove_diacritics 2'
        )
        """
    )
    db.execute(
        """
        CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages
        WHEN new.status <> 'streaming' BEGIN
            INSERT INTO messages_fts(rowid, text) VALUES (new.id, new.text);
        END
        """
    )
    db.execute(
        """
        CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages
        WHEN old.status <> 'streaming' BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, text)
            VALUES ('delete', old.id, old.text);
        END
        """
    )
    db.execute(
        """
        CREATE TRIGGER messages_fts_update AFTER UPDATE OF text, status ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, text)
            SELECT 'delete', old.id, old.text WHERE old.status <> 'streaming';
            INSERT INTO messages_fts(rowid, text)
            SELECT new.id, new.text WHERE new.status <> 'streaming';
        END
        """
    )
    db.execute("INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')")


MIGRATIONS = [m001_initial, m002_fts]


# --------------------------------------------------------------------------
# Small helpers


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _timestamp(value: Any, where: str) -> str:
    """Normalise an imported timestamp to our UTC format."""
    if not isinstance(value, str):
        raise StoreError(f"{where}: timestamp must be a string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise StoreError(f"{where}: not an ISO 8601 timestamp: {value[:40]!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _to_json(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise StoreError(f"{what} must be a dict or None")
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise StoreError(f"{what} is not JSON-serializable: {e}") from None


def _from_json(value: str | None) -> dict | None:
    return None if value is None else json.loads(value)


def _check_choice(value: Any, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise StoreError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _check_sha(sha: Any) -> str:
    if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
        raise StoreError(f"not a sha256 hex digest: {str(sha)[:80]!r}")
    return sha


def _extension(mime: str) -> str:
    return _EXTENSIONS.get(mime, "bin")


def _title_from(text: str) -> str | None:
    words = " ".join(text.split())
    if not words:
        return None
    if len(words) <= TITLE_LENGTH:
        return words
    cut = words[:TITLE_LENGTH].rsplit(" ", 1)[0] or words[:TITLE_LENGTH]
    return cut + "…"


def _image_info(data: bytes) -> tuple[int | None, int | None, str | None]:
    """(width, height, mime) when Pillow recognises the bytes as an image."""
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return im.width, im.height, Image.MIME.get(im.format or "")
    except Exception:  # not an image, truncated, decompression bomb, ...
        return None, None, None


def fts_query(text: str) -> str:
    """Turn what a user typed into a safe FTS5 MATCH expression.

    Every word becomes a quoted string, so quotes, brackets and the operators
    AND/OR/NOT/NEAR lose their meaning and can't cause a syntax error; all
    words must match. A trailing ``*`` keeps its prefix meaning. Returns ""
    when nothing is left to search for.
    """
    parts = []
    for word in text.replace("\x00", " ").split():
        prefix = word.endswith("*")
        word = word.rstrip("*")
        if word:
            parts.append('"' + word.replace('"', '""') + '"' + ("*" if prefix else ""))
    return " ".join(parts)


# --------------------------------------------------------------------------


class Store:
    """Conversations, messages and attachments under ``data_dir``.

    Safe to share between threads; several processes may open the same
    directory at once.
    """

    def __init__(self, data_dir: Path | str):
        self.data_dir = Path(data_dir)
        self.attachments_dir = self.data_dir / "attachments"
        self.attachments_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.data_dir / "history.db"
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (see _write).
        self._conn = sqlite3.connect(
            self.db_path,
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,
            check_same_thread=False,
        )
        self._lock = threading.RLock()
        self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        self._conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL is safe in WAL mode (a crash can't corrupt, at worst a power
        # cut loses the last commits) and makes the frequent streaming updates
        # cheap: no fsync per commit.
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        # Zero out deleted content so deleted conversations are really gone.
        self._conn.execute("PRAGMA secure_delete = ON")
        self.db = sqlite_utils.Database(self._conn, execute_plugins=False)
        self._migrate()

    # -- plumbing ----------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding SQLite's write lock from the start."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            else:
                try:
                    self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """Several SELECTs that must see one consistent snapshot."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")

    def _rows(self, sql: str, params: Iterable[Any] | dict = ()) -> list[dict]:
        cursor = self._conn.execute(sql, params)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor]

    def _migrate(self) -> None:
        with self._write() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS _migrations "
                "(name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
        for migration in MIGRATIONS:
            # Check again inside the transaction: another process opening the
            # store at the same moment may have just applied it.
            with self._write() as conn:
                done = conn.execute(
                    "SELECT 1 FROM _migrations WHERE name = ?", [migration.__name__]
                ).fetchone()
                if not done:
                    migration(self.db)
                    conn.execute(
                        "INSERT INTO _migrations (name, applied_at) VALUES (?, ?)",
                        [migration.__name__, _now()],
                    )

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
        now = _now()
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
            return self._rows(
                """
                SELECT c.*, (SELECT count(*) FROM messages m
                             WHERE m.conversation_id = c.id) AS message_count
                FROM conversations c
                ORDER BY c.updated_at DESC, c.rowid DESC
                LIMIT ? OFFSET ?
                """,
                [limit, offset],
            )

    def get_conversation(self, conversation_id: str) -> dict:
        """The conversation with its messages in order, each with its attachments."""
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
            message["settings"] = _from_json(message["settings"])
            message["timings"] = _from_json(message["timings"])
            message["attachments"] = by_message.get(message["id"], [])
        conversation["messages"] = messages
        return conversation

    def rename_conversation(self, conversation_id: str, title: str | None) -> None:
        title = (title or "").strip() or None  # blank means untitled
        with self._write() as conn:
            self._conversation_row(conversation_id)
            conn.execute(
                "UPDATE conversations SET title = ? WHERE id = ?", [title, conversation_id]
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
        _check_choice(role, ROLES, "role")
        _check_choice(status, STATUSES, "status")
        if not isinstance(text, str):
            raise StoreError("message text must be a string")
        shas = [_check_sha(sha) for sha in attachments]
        settings_json = _to_json(settings, "settings")
        now = _now()
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
                },
                shas,
            )
            title = conversation["title"]
            if title is None and role == "user":
                title = _title_from(text)
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
            changes["status"] = _check_choice(status, STATUSES, "status")
        if error is not None:
            changes["error"] = str(error)
        if timings is not None:
            changes["timings"] = _to_json(timings, "timings")
        changes["updated_at"] = _now()
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

    def recover_interrupted(self, idle_for: float = 0.0) -> int:
        """Mark messages left 'streaming' by a killed process as 'stopped'
        (their partial text is kept). Call at startup; returns how many.

        A process that starts while another one may be streaming should pass
        ``idle_for`` (seconds without an update) so live answers are left alone.
        """
        cutoff = (datetime.now(timezone.utc) - timedelta(seconds=idle_for)).isoformat(
            timespec="microseconds"
        )
        with self._write() as conn:
            return conn.execute(
                "UPDATE messages SET status = 'stopped', updated_at = ? "
                "WHERE status = 'streaming' AND updated_at <= ?",
                [_now(), cutoff],
            ).rowcount

    # -- attachments -------------------------------------------------------

    def add_attachment(
        self, data: bytes, name: str | None = None, mime: str | None = None
    ) -> str:
        """Store bytes once, keyed by their sha256 (returned).

        ``mime`` is sniffed (Pillow, then the file name) when not given.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise StoreError("attachment data must be bytes")
        data = bytes(data)
        if not data:
            raise StoreError("attachment is empty")
        sha = hashlib.sha256(data).hexdigest()
        with self._write():
            self._put_attachment(sha, data, name, mime)
        return sha

    def _put_attachment(
        self, sha: str, data: bytes, name: str | None, mime: str | None
    ) -> Path | None:
        """Row + file for one attachment (inside a write transaction, so no
        concurrent garbage collection can remove the file under us). Returns
        the file's path if this call wrote it."""
        width, height, sniffed = _image_info(data)
        if name is not None:
            # Keep only a base name: it is display text, never a path we open.
            name = os.path.basename(str(name).replace("\\", "/"))[:255] or None
        if mime is None:
            mime = sniffed or (name and mimetypes.guess_type(name)[0])
            mime = mime or "application/octet-stream"
        mime = str(mime).strip().lower()
        if not _MIME_RE.fullmatch(mime):
            raise StoreError(f"not a mime type: {mime[:80]!r}")
        row = self._rows("SELECT mime FROM attachments WHERE sha256 = ?", [sha])
        if row:
            mime = row[0]["mime"]  # first upload wins; the path depends on it
        else:
            self.db["attachments"].insert(
                {
                    "sha256": sha,
                    "mime": mime,
                    "size": len(data),
                    "width": width,
                    "height": height,
                    "name": name,
                    "created_at": _now(),
                }
            )
        path = self._file_path(sha, mime)
        if path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == sha:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write aside then rename: readers never see a half-written file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return path

    def _file_path(self, sha: str, mime: str) -> Path:
        return self.attachments_dir / sha[:2] / f"{sha}.{_extension(mime)}"

    def attachment_path(self, sha: str) -> Path:
        _check_sha(sha)
        with self._lock:
            rows = self._rows("SELECT mime FROM attachments WHERE sha256 = ?", [sha])
        if not rows:
            raise StoreError(f"unknown attachment: {sha}")
        return self._file_path(sha, rows[0]["mime"])

    def get_attachment(self, sha: str) -> dict:
        """Metadata row of one attachment, plus its ``path``."""
        _check_sha(sha)
        with self._lock:
            rows = self._rows("SELECT * FROM attachments WHERE sha256 = ?", [sha])
        if not rows:
            raise StoreError(f"unknown attachment: {sha}")
        rows[0]["path"] = str(self._file_path(sha, rows[0]["mime"]))
        return rows[0]

    def _forget_unreferenced(self, shas: Iterable[str]) -> list[str]:
        """Drop attachment rows no message refers to any more (inside a
        transaction); returns their shas so the files can go after commit."""
        gone = []
        for sha in sorted(set(shas)):
            used = self._conn.execute(
                "SELECT 1 FROM message_attachments WHERE sha256 = ? LIMIT 1", [sha]
            ).fetchone()
            if not used:
                self._conn.execute("DELETE FROM attachments WHERE sha256 = ?", [sha])
                gone.append(sha)
        return gone

    def _remove_files(self, shas: Iterable[str] | None) -> int:
        """Delete attachment files that have no row (all of them when
        ``shas`` is None). Files are only touched after the rows' deletion is
        committed, and under the write lock so a concurrent add_attachment of
        the same bytes can't lose its file."""
        removed = 0
        with self._write() as conn:
            known = {row[0] for row in conn.execute("SELECT sha256 FROM attachments")}
            if shas is None:
                candidates = [p for p in self.attachments_dir.glob("*/*") if p.is_file()]
            else:
                candidates = [
                    p
                    for sha in shas
                    for p in (self.attachments_dir / sha[:2]).glob(f"{sha}.*")
                ]
            for path in candidates:
                try:
                    if path.name.startswith(".tmp-"):
                        # Left by a crash mid-write; a young one may be in flight.
                        if time.time() - path.stat().st_mtime < 3600:
                            continue
                    elif path.name.split(".")[0] in known:
                        continue
                    path.unlink()
                    removed += 1
                    with contextlib.suppress(OSError):  # only if now empty
                        path.parent.rmdir()
                except OSError as e:  # e.g. open in another program on Windows, or gone
                    log.warning("could not remove %s: %s", path, e)
        return removed

    def _after_delete(self, gone_shas: list[str]) -> None:
        with self._lock:
            try:
                self._remove_files(gone_shas)
                # FTS5 deletes only add tombstones; merging the index drops
                # the deleted words for real (and secure_delete zeroes the
                # freed pages). Then fold the WAL, which still holds old page
                # images, back into the database and truncate it.
                with self._write() as conn:
                    conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('optimize')")
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.OperationalError as e:  # busy: best effort only
                log.warning("could not purge deleted data yet: %s", e)

    def collect_garbage(self, min_age: float = 3600.0) -> int:
        """Remove attachments no message uses (uploaded at least ``min_age``
        seconds ago, so one about to be attached is left alone) and stray
        files. Cheap to call at startup; returns the number of files removed."""
        cutoff = (datetime.now(timezone.utc) - timedelta(seconds=min_age)).isoformat(
            timespec="microseconds"
        )
        with self._write() as conn:
            conn.execute(
                "DELETE FROM attachments WHERE created_at <= ? AND sha256 NOT IN "
                "(SELECT sha256 FROM message_attachments)",
                [cutoff],
            )
        return self._remove_files(None)

    # -- search ------------------------------------------------------------

    def search(
        self, query: str, limit: int = 20, highlight: tuple[str, str] = ("[", "]")
    ) -> list[dict]:
        """Full-text search over message text, best match first.

        Any input is accepted (see :func:`fts_query`). Each hit has
        conversation_id, title, message_id, role, created_at and a snippet
        with matches wrapped in ``highlight``. Messages still streaming are
        not indexed yet.
        """
        match = fts_query(query or "")
        if not match:
            return []
        with self._lock:
            return self._rows(
                """
                SELECT m.conversation_id, c.title, m.id AS message_id, m.role,
                       m.created_at,
                       snippet(messages_fts, 0, ?, ?, '…', 12) AS snippet
                FROM messages_fts
                JOIN messages m ON m.id = messages_fts.rowid
                JOIN conversations c ON c.id = m.conversation_id
                WHERE messages_fts MATCH ?
                ORDER BY messages_fts.rank, m.id DESC
                LIMIT ?
                """,
                [highlight[0], highlight[1], match, limit],
            )

    # -- export / import ---------------------------------------------------

    def export_conversation(self, conversation_id: str) -> dict:
        """A JSON-serializable dict with every image embedded (base64)."""
        conversation = self.get_conversation(conversation_id)
        attachments: dict[str, dict] = {}
        messages = []
        for m in conversation["messages"]:
            for a in m["attachments"]:
                if a["sha256"] not in attachments:
                    try:
                        data = Path(a["path"]).read_bytes()
                    except OSError as e:
                        raise StoreError(f"attachment file missing: {a['sha256']} ({e})")
                    attachments[a["sha256"]] = {
                        "sha256": a["sha256"],
                        "mime": a["mime"],
                        "name": a["name"],
                        "data": base64.b64encode(data).decode("ascii"),
                    }
            messages.append(
                {
                    "role": m["role"],
                    "text": m["text"],
                    "status": m["status"],
                    "error": m["error"],
                    "created_at": m["created_at"],
                    "updated_at": m["updated_at"],
                    "model": m["model"],
                    "settings": m["settings"],
                    "timings": m["timings"],
                    "attachments": [a["sha256"] for a in m["attachments"]],
                }
            )
        return {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "exported_at": _now(),
            "conversation": {
                key: conversation[key]
                for key in ("id", "title", "created_at", "updated_at", "model", "system_prompt")
            },
            "messages": messages,
            "attachments": list(attachments.values()),
        }

    def export_markdown(self, conversation_id: str) -> str:
        """Readable Markdown; images are linked by their stored file name."""
        conversation = self.get_conversation(conversation_id)
        lines = [f"# {conversation['title'] or 'Untitled conversation'}", ""]
        facts = [f"Created {conversation['created_at']}"]
        if conversation["model"]:
            facts.append(f"model {conversation['model']}")
        lines += ["_" + ", ".join(facts) + "_", ""]
        if conversation["system_prompt"]:
            lines += ["## System prompt", "", conversation["system_prompt"], ""]
        for m in conversation["messages"]:
            lines += [f"## {m['role'].capitalize()}", ""]
            for a in m["attachments"]:
                alt = re.sub(r"[\[\]\\]", "", a["name"] or "image")
                lines += [f"![{alt}]({Path(a['path']).name})", ""]
            if m["text"]:
                lines += [m["text"], ""]
            if m["status"] != "complete":
                note = f"_({m['status']}"
                note += f": {m['error']})_" if m["error"] else ")_"
                lines += [note, ""]
        return "\n".join(lines)

    def import_conversation(self, data: dict | str | bytes) -> str:
        """Add a conversation from :meth:`export_conversation` output (a dict
        or its JSON text) as a new conversation; returns its id.

        Everything is checked before anything is written, and the writes are
        one transaction: bad input raises StoreError and changes nothing.
        """
        conversation, messages, blobs = _validate_export(data)
        conversation_id = str(uuid.uuid4())
        written: list[Path] = []
        with self._write():
            try:
                self.db["conversations"].insert({"id": conversation_id, **conversation})
                for sha, (blob, name, mime) in blobs.items():
                    path = self._put_attachment(sha, blob, name, mime)
                    if path:
                        written.append(path)
                for message, shas in messages:
                    self._insert_message(conversation_id, message, shas)
            except BaseException:
                # Still holding the write lock: nobody else can have started
                # using these files, so removing them is safe.
                for path in written:
                    with contextlib.suppress(OSError):
                        path.unlink()
                raise
        return conversation_id


def _validate_export(
    data: Any,
) -> tuple[dict, list[tuple[dict, list[str]]], dict[str, tuple[bytes, str | None, str]]]:
    """Check an export fully; returns (conversation row, [(message row,
    shas)], {sha: (bytes, name, mime)}) ready to insert."""
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except ValueError as e:
            raise StoreError(f"import is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise StoreError("import must be a JSON object")
    if data.get("format") != EXPORT_FORMAT:
        raise StoreError(f"not a conversation export (format must be {EXPORT_FORMAT!r})")
    if data.get("version") != EXPORT_VERSION:
        raise StoreError(f"unsupported export version: {data.get('version')!r}")

    def optional_str(obj: dict, key: str, where: str) -> str | None:
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise StoreError(f"{where}.{key} must be a string or null")
        return value

    def json_field(obj: dict, key: str, where: str) -> str | None:
        return _to_json(obj.get(key), f"{where}.{key}")

    blobs: dict[str, tuple[bytes, str | None, str]] = {}
    attachments = data.get("attachments", [])
    if not isinstance(attachments, list):
        raise StoreError("attachments must be a list")
    for i, a in enumerate(attachments):
        where = f"attachments[{i}]"
        if not isinstance(a, dict):
            raise StoreError(f"{where} must be an object")
        sha = a.get("sha256")
        if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
            raise StoreError(f"{where}.sha256 is not a sha256 hex digest")
        mime = a.get("mime")
        if not isinstance(mime, str) or not _MIME_RE.fullmatch(mime.strip().lower()):
            raise StoreError(f"{where}.mime is not a mime type")
        if not isinstance(a.get("data"), str):
            raise StoreError(f"{where}.data must be a base64 string")
        try:
            blob = base64.b64decode(a["data"], validate=True)
        except (binascii.Error, ValueError):
            raise StoreError(f"{where}.data is not valid base64") from None
        if not blob:
            raise StoreError(f"{where}.data is empty")
        if hashlib.sha256(blob).hexdigest() != sha:
            raise StoreError(f"{where}: data does not match its sha256 {sha}")
        blobs[sha] = (blob, optional_str(a, "name", where), mime)

    c = data.get("conversation")
    if not isinstance(c, dict):
        raise StoreError("conversation must be an object")
    now = _now()
    conversation = {
        "title": optional_str(c, "title", "conversation"),
        "model": optional_str(c, "model", "conversation"),
        "system_prompt": optional_str(c, "system_prompt", "conversation"),
        "created_at": _timestamp(c.get("created_at", now), "conversation.created_at"),
        "updated_at": _timestamp(c.get("updated_at", now), "conversation.updated_at"),
    }

    raw_messages = data.get("messages")
    if not isinstance(raw_messages, list):
        raise StoreError("messages must be a list")
    messages = []
    used: set[str] = set()
    for i, m in enumerate(raw_messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise StoreError(f"{where} must be an object")
        _check_choice(m.get("role"), ROLES, f"{where}.role")
        status = _check_choice(m.get("status", "complete"), STATUSES, f"{where}.status")
        if not isinstance(m.get("text"), str):
            raise StoreError(f"{where}.text must be a string")
        shas = m.get("attachments", [])
        if not isinstance(shas, list):
            raise StoreError(f"{where}.attachments must be a list of sha256s")
        for sha in shas:
            if sha not in blobs:
                raise StoreError(
                    f"{where} refers to an attachment not in the file: {str(sha)[:80]!r}"
                )
        used.update(shas)
        messages.append(
            (
                {
                    "role": m["role"],
                    "text": m["text"],
                    # Nothing is generating an imported answer any more.
                    "status": "stopped" if status == "streaming" else status,
                    "error": optional_str(m, "error", where),
                    "created_at": _timestamp(m.get("created_at", now), f"{where}.created_at"),
                    "updated_at": _timestamp(m.get("updated_at", now), f"{where}.updated_at"),
                    "model": optional_str(m, "model", where),
                    "settings": json_field(m, "settings", where),
                    "timings": json_field(m, "timings", where),
                },
                list(shas),
            )
        )
    # Images no message refers to would only be garbage: skip them.
    blobs = {sha: blob for sha, blob in blobs.items() if sha in used}
    return conversation, messages, blobs
