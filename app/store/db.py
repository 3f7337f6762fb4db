"""The SQLite connection, its transactions, and the schema's migrations.

Several processes may write to one data directory at the same time (two app
instances started on it, a command-line import while the app runs), so the
database runs in WAL mode with a busy timeout and every write is a short
``BEGIN IMMEDIATE`` transaction (taking the write lock up front means SQLite
can wait for it instead of failing with "database is locked" half-way
through). Within one process a single connection is shared by all threads
behind a lock.

Timestamps are UTC ISO 8601 strings with microseconds
(``2024-05-01T12:00:00.000000+00:00``), so they sort as text.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlite_utils

from .instances import InstanceLock, is_alive, live_instances

ROLES = ("user", "assistant")
STATUSES = ("complete", "streaming", "stopped", "failed")

BUSY_TIMEOUT_S = 5.0


class StoreError(Exception):
    """Bad input or an unknown id. Stored data is unchanged when this is raised."""


# --------------------------------------------------------------------------
# Migrations: plain functions, applied in order, each exactly once.
# Never edit one that has shipped; append a new one instead.


# The owner of conversations made by the person running the app (no login on this machine, or the first
# account): not a valid account name (see app.accounts), so no account can be mistaken for it.
LOCAL_OWNER = "@owner"


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


def m003_settings(db: sqlite_utils.Database) -> None:
    # The user's defaults (generation settings and the like): one JSON value per key.
    db.execute(
        """
        CREATE TABLE settings (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )
        """
    )


def m004_conversation_settings(db: sqlite_utils.Database) -> None:
    # The generation settings a conversation was last used with (JSON), so
    # opening it again restores them. NULL for conversations from before.
    db.execute("ALTER TABLE conversations ADD COLUMN settings TEXT")


def m005_message_owner(db: sqlite_utils.Database) -> None:
    # The instance (see instances.py) writing a 'streaming' answer, so a
    # restart marks stopped exactly the answers whose writer died. NULL for
    # rows from before: their writer is gone.
    db.execute("ALTER TABLE messages ADD COLUMN owner TEXT")


def m006_message_tree(db: sqlite_utils.Database) -> None:
    # Conversations become trees, so that Regenerate adds an answer beside the old one and editing a
    # question adds a version beside it, each keeping what followed it. parent_id: the message this one
    # follows (NULL for a first question). chosen: a counter per conversation; of a parent's children the
    # one chosen (added or picked) most recently is on the conversation's current path.
    db.execute("ALTER TABLE messages ADD COLUMN parent_id INTEGER REFERENCES messages(id)")
    db.execute("ALTER TABLE messages ADD COLUMN chosen INTEGER NOT NULL DEFAULT 0")
    # Conversations so far were lists: each message follows the one before it.
    db.execute(
        """
        UPDATE messages SET chosen = position, parent_id = (
            SELECT p.id FROM messages p
            WHERE p.conversation_id = messages.conversation_id AND p.position < messages.position
            ORDER BY p.position DESC LIMIT 1
        )
        """
    )
    db.execute("CREATE INDEX messages_parent ON messages(parent_id)")


def m007_training_runs(db: sqlite_utils.Database) -> None:
    # Training runs the app started (app.training_runs): pid and the process's start time tell whether
    # a 'running' row's process is still the one that was started, after the app itself restarted.
    db["training_runs"].create(
        {"id": str, "created_at": str, "updated_at": str, "status": str, "request": str, "out_dir": str,
         "pid": int, "process_started": float, "final": str, "error": str},
        pk="id", not_null={"created_at", "updated_at", "status", "request", "out_dir"},
    )


def m008_conversation_owner(db: sqlite_utils.Database) -> None:
    # The user a conversation belongs to (app.viewer): an account name, or LOCAL_OWNER for the person who runs
    # the app, whatever they log in as; conversations from before were theirs.
    db.execute(f"ALTER TABLE conversations ADD COLUMN owner TEXT NOT NULL DEFAULT '{LOCAL_OWNER}'")
    db.execute("CREATE INDEX conversations_owner ON conversations(owner, updated_at)")


MIGRATIONS = [m001_initial, m002_fts, m003_settings, m004_conversation_settings, m005_message_owner,
              m006_message_tree, m007_training_runs, m008_conversation_owner]


# --------------------------------------------------------------------------
# Small helpers shared by the store's modules


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def to_json(value: Any, what: str) -> str | None:
    """A dict (or None) as JSON text for a TEXT column."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise StoreError(f"{what} must be a dict or None")
    return dumps(value, what)


def dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise StoreError(f"{what} is not JSON-serializable: {e}") from None


def from_json(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def check_choice(value: Any, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise StoreError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")
    return value


# --------------------------------------------------------------------------


class Database:
    """The connection under ``data_dir`` and the transaction helpers the
    store's parts (conversations, attachments, search, export) build on."""

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
        # Held while this store is open; the answers it streams carry its id.
        self.instances_dir = self.data_dir / "instances"
        self._instance = InstanceLock(self.instances_dir)

    @property
    def instance_id(self) -> str:
        return self._instance.id

    def is_alive(self, instance_id: str | None) -> bool:
        """Whether the store instance ``instance_id`` (this one or another
        process's) still has the data directory open."""
        if instance_id == self._instance.id:
            return self._instance.held
        return is_alive(self.instances_dir, instance_id)

    def other_instances(self) -> list[dict]:
        """The other live instances on this data directory (``id``, ``pid``,
        ``started``): another app, or a command-line import, running now."""
        return [i for i in live_instances(self.instances_dir) if i["id"] != self._instance.id]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            self._instance.release()

    def __enter__(self):
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
                        [migration.__name__, utc_now()],
                    )
