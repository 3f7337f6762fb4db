"""Tests for app.store, on real SQLite files in tmp_path."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
import threading
import zipfile
from pathlib import Path

import pytest
import sqlite_utils
from PIL import Image

from app.store import MIGRATIONS, Store, StoreError, db as store_db, fts_query

REPO = Path(__file__).resolve().parents[1]


def png(color: str, size: tuple[int, int] = (4, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def files(data_dir: Path) -> list[Path]:
    return sorted(p for p in (data_dir / "attachments").rglob("*") if p.is_file())


def snapshot(data_dir: Path) -> dict:
    """Every row of every table, and every attachment file: to prove nothing changed."""
    conn = sqlite3.connect(data_dir / "history.db")
    try:
        tables = [
            "conversations",
            "messages",
            "attachments",
            "message_attachments",
            "_migrations",
        ]
        state = {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables}
        state["fts"] = conn.execute(
            "SELECT rowid FROM messages_fts WHERE messages_fts MATCH 'hello'"
        ).fetchall()
    finally:
        conn.close()
    state["files"] = [(p.name, p.read_bytes()) for p in files(data_dir)]
    return state


def run_python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path)
    yield s
    s.close()


# -- opening and migrations ------------------------------------------------


def test_layout_and_pragmas(tmp_path, store):
    assert (tmp_path / "history.db").is_file()
    assert (tmp_path / "attachments").is_dir()
    conn = store._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    assert conn.execute("PRAGMA secure_delete").fetchone()[0] == 1
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_migrations_apply_once_and_reopen_cleanly(tmp_path, monkeypatch):
    names = [m.__name__ for m in MIGRATIONS]
    with Store(tmp_path) as s:
        cid = s.create_conversation("kept")
        s.add_message(cid, "user", "hello there")
    applied = sqlite3.connect(tmp_path / "history.db").execute(
        "SELECT name, applied_at FROM _migrations ORDER BY rowid"
    ).fetchall()
    assert [name for name, _ in applied] == names

    # Reopening changes nothing and keeps the data.
    with Store(tmp_path) as s:
        assert s.get_conversation(cid)["title"] == "kept"
        assert [h["message_id"] for h in s.search("hello")] == [1]
    again = sqlite3.connect(tmp_path / "history.db").execute(
        "SELECT name, applied_at FROM _migrations ORDER BY rowid"
    ).fetchall()
    assert again == applied

    # A new migration runs exactly once, on the next open.
    calls = []

    def m999_test(db):
        calls.append(1)
        db.execute("CREATE TABLE extra (x INTEGER)")

    monkeypatch.setattr(store_db, "MIGRATIONS", [*MIGRATIONS, m999_test])
    Store(tmp_path).close()
    Store(tmp_path).close()
    assert calls == [1]


def make_old_database(data_dir: Path) -> None:
    """A history.db as the store wrote it before m003/m004: only m001 and m002
    applied, with a conversation, an image and searchable text in it."""
    data_dir.mkdir()
    conn = sqlite3.connect(data_dir / "history.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    db = sqlite_utils.Database(conn, execute_plugins=False)
    for migration in (store_db.m001_initial, store_db.m002_fts):
        migration(db)
        conn.execute(
            "INSERT INTO _migrations VALUES (?, ?)",
            [migration.__name__, "2024-05-01T12:00:00.000000+00:00"],
        )
    # Shipped migrations must never change: this is the old schema.
    assert [c.name for c in db["conversations"].columns] == [
        "id", "title", "created_at", "updated_at", "model", "system_prompt"
    ]
    data = png("red")
    sha = hashlib.sha256(data).hexdigest()
    (data_dir / "attachments" / sha[:2]).mkdir(parents=True)
    (data_dir / "attachments" / sha[:2] / f"{sha}.png").write_bytes(data)
    t = "2024-05-01T12:00:00.000000+00:00"
    conn.execute("INSERT INTO conversations VALUES ('old', 'Old chat', ?, ?, 'm', NULL)", [t, t])
    conn.execute(
        "INSERT INTO messages (conversation_id, position, role, text, created_at, updated_at, settings)"
        " VALUES ('old', 0, 'user', 'an archaeopteryx picture', ?, ?, NULL),"
        "        ('old', 1, 'assistant', 'A bird.', ?, ?, '{\"temperature\": 0.5}')",
        [t, t, t, t],
    )
    conn.execute(
        "INSERT INTO attachments VALUES (?, 'image/png', ?, 4, 3, 'red.png', ?)", [sha, len(data), t]
    )
    conn.execute("INSERT INTO message_attachments VALUES (1, ?, 0)", [sha])
    conn.close()


def test_database_from_the_old_schema_is_migrated(tmp_path):
    data_dir = tmp_path / "old"
    make_old_database(data_dir)
    with Store(data_dir) as s:
        applied = [row[0] for row in s._conn.execute("SELECT name FROM _migrations ORDER BY rowid")]
        assert applied == [m.__name__ for m in MIGRATIONS]
        conv = s.get_conversation("old")
        assert conv["title"] == "Old chat" and conv["settings"] is None
        assert [m["text"] for m in conv["messages"]] == ["an archaeopteryx picture", "A bird."]
        assert conv["messages"][1]["settings"] == {"temperature": 0.5}
        (image,) = conv["messages"][0]["attachments"]
        assert Path(image["path"]).read_bytes() == png("red")
        assert [h["message_id"] for h in s.search("archaeopteryx")] == [1]
        assert s.list_conversations()[0]["settings"] is None
        # The new parts work on the migrated file.
        s.set_conversation_settings("old", {"temperature": 0.9})
        s.set_setting("generation", {"top_k": 5})
    with Store(data_dir) as s:
        assert s.get_conversation("old")["settings"] == {"temperature": 0.9}
        assert s.get_setting("generation") == {"top_k": 5}


# -- conversations and messages --------------------------------------------


def test_conversation_crud(store):
    cid = store.create_conversation("First", model="deepseek-vl-1.3b", system_prompt="Be brief.")
    conv = store.get_conversation(cid)
    assert conv["title"] == "First"
    assert conv["model"] == "deepseek-vl-1.3b"
    assert conv["system_prompt"] == "Be brief."
    assert conv["messages"] == []

    store.rename_conversation(cid, "  Renamed ")
    assert store.get_conversation(cid)["title"] == "Renamed"

    store.delete_conversation(cid)
    assert store.list_conversations() == []
    for call in (
        lambda: store.get_conversation(cid),
        lambda: store.rename_conversation(cid, "x"),
        lambda: store.delete_conversation(cid),
        lambda: store.add_message(cid, "user", "hi"),
    ):
        with pytest.raises(StoreError, match="unknown conversation"):
            call()


def test_messages_in_order_with_settings_and_timings(store):
    cid = store.create_conversation()
    u = store.add_message(cid, "user", "What is in this picture?")
    a = store.add_message(
        cid,
        "assistant",
        "",
        status="streaming",
        settings={"temperature": 0.2, "max_new_tokens": 512},
        model="deepseek-vl-7b",
    )
    store.update_message(a, text="A cat")
    store.update_message(
        a, text="A cat on a mat.", status="complete", timings={"ttft": 0.4, "tokens_per_s": 21.5}
    )

    messages = store.get_conversation(cid)["messages"]
    assert [(m["id"], m["role"], m["text"], m["status"]) for m in messages] == [
        (u, "user", "What is in this picture?", "complete"),
        (a, "assistant", "A cat on a mat.", "complete"),
    ]
    assert [m["position"] for m in messages] == [0, 1]
    assert messages[1]["settings"] == {"temperature": 0.2, "max_new_tokens": 512}
    assert messages[1]["timings"] == {"ttft": 0.4, "tokens_per_s": 21.5}
    assert messages[1]["model"] == "deepseek-vl-7b"

    store.update_message(a, status="failed", error="CUDA out of memory")
    failed = store.get_conversation(cid)["messages"][1]
    assert (failed["status"], failed["error"], failed["text"]) == (
        "failed",
        "CUDA out of memory",
        "A cat on a mat.",
    )


def test_bad_message_input_is_rejected(store):
    cid = store.create_conversation()
    mid = store.add_message(cid, "user", "hello")
    before = store.get_conversation(cid)
    with pytest.raises(StoreError, match="role"):
        store.add_message(cid, "system", "x")
    with pytest.raises(StoreError, match="status"):
        store.add_message(cid, "assistant", "x", status="done")
    with pytest.raises(StoreError, match="unknown attachment"):
        store.add_message(cid, "user", "x", attachments=["0" * 64])
    with pytest.raises(StoreError, match="sha256"):
        store.add_message(cid, "user", "x", attachments=["../../etc/passwd"])
    with pytest.raises(StoreError, match="settings"):
        store.add_message(cid, "assistant", "x", settings={"f": object()})
    with pytest.raises(StoreError, match="status"):
        store.update_message(mid, status="weird")
    with pytest.raises(StoreError, match="unknown message"):
        store.update_message(12345, text="x")
    with pytest.raises(StoreError, match="unknown message"):
        store.delete_message(12345)
    assert store.get_conversation(cid) == before


def test_auto_title_from_first_user_message(store):
    cid = store.create_conversation()
    store.add_message(cid, "assistant", "Hello! How can I help?")
    assert store.get_conversation(cid)["title"] is None
    long_text = "Describe   this\nchart " + "with many words " * 10
    store.add_message(cid, "user", long_text)
    title = store.get_conversation(cid)["title"]
    assert title.startswith("Describe this chart with many words")
    assert title.endswith("…") and len(title) <= 61
    store.add_message(cid, "user", "second question")
    assert store.get_conversation(cid)["title"] == title

    titled = store.create_conversation("Mine")
    store.add_message(titled, "user", "something else")
    assert store.get_conversation(titled)["title"] == "Mine"


def test_list_newest_first_and_paging(store):
    a = store.create_conversation("a")
    b = store.create_conversation("b")
    c = store.create_conversation("c")
    assert [x["id"] for x in store.list_conversations()] == [c, b, a]
    store.add_message(a, "user", "bump")
    listed = store.list_conversations()
    assert [x["id"] for x in listed] == [a, c, b]
    assert listed[0]["message_count"] == 1 and listed[1]["message_count"] == 0
    assert [x["id"] for x in store.list_conversations(limit=2)] == [a, c]
    assert [x["id"] for x in store.list_conversations(limit=2, offset=2)] == [b]


def test_delete_message_and_messages_from(store):
    cid = store.create_conversation()
    ids = [
        store.add_message(cid, role, f"turn{i} hello")
        for i, role in enumerate(["user", "assistant", "user", "assistant", "user"])
    ]
    store.delete_message(ids[1])
    assert [m["id"] for m in store.get_conversation(cid)["messages"]] == [ids[0], *ids[2:]]
    assert store.delete_messages_from(ids[3]) == 2
    assert [m["id"] for m in store.get_conversation(cid)["messages"]] == [ids[0], ids[2]]
    assert {h["message_id"] for h in store.search("hello")} == {ids[0], ids[2]}
    # New messages go after the survivors, and ids are never reused.
    new = store.add_message(cid, "assistant", "again")
    messages = store.get_conversation(cid)["messages"]
    assert messages[-1]["id"] == new and new > max(ids)
    assert [m["position"] for m in messages] == sorted(m["position"] for m in messages)


# -- conversation trees: versions of answers and questions -------------------


def path_of(store: Store, cid: str) -> list[tuple[str, str, int, int]]:
    """(role, text, variant index, variant count) of each message on the current path."""
    return [
        (m["role"], m["text"], m["variant_index"], m["variant_count"])
        for m in store.get_conversation(cid)["messages"]
    ]


def three_turns(store: Store) -> tuple[str, list[int]]:
    cid = store.create_conversation()
    ids = [
        store.add_message(cid, role, text)
        for role, text in [("user", "q1"), ("assistant", "a1"), ("user", "q2"),
                           ("assistant", "a2"), ("user", "q3"), ("assistant", "a3")]
    ]
    return cid, ids


def test_old_linear_conversation_becomes_a_path(tmp_path):
    data_dir = tmp_path / "old"
    make_old_database(data_dir)
    conn = sqlite3.connect(data_dir / "history.db")
    t = "2024-05-01T12:00:00.000000+00:00"
    conn.execute(
        "INSERT INTO messages (conversation_id, position, role, text, created_at, updated_at)"
        " VALUES ('old', 2, 'user', 'and its feathers?', ?, ?)",
        [t, t],
    )
    conn.commit()
    conn.close()
    with Store(data_dir) as s:
        messages = s.get_conversation("old")["messages"]
        assert [m["text"] for m in messages] == ["an archaeopteryx picture", "A bird.", "and its feathers?"]
        assert [m["parent_id"] for m in messages] == [None, messages[0]["id"], messages[1]["id"]]
        assert all((m["variant_index"], m["variant_count"]) == (1, 1) for m in messages)
        assert s.list_conversations()[0]["message_count"] == 3
        # It grows into a tree like any other: a second answer to the first question.
        again = s.add_message("old", "assistant", "An early bird.", parent_id=messages[0]["id"])
        assert [m["id"] for m in s.get_conversation("old")["messages"]] == [messages[0]["id"], again]


def test_regenerated_answers_are_versions_and_can_be_flipped(store):
    cid, (q1, a1, *_rest) = three_turns(store)
    q2 = _rest[0]
    # Two more answers to the first question: each goes on the path, which ends there (a new branch).
    b1 = store.add_message(cid, "assistant", "b1", parent_id=q1)
    c1 = store.add_message(cid, "assistant", "c1", parent_id=q1)
    assert path_of(store, cid) == [("user", "q1", 1, 1), ("assistant", "c1", 3, 3)]
    assert store.get_conversation(cid)["messages"][1]["variant_ids"] == [a1, b1, c1]
    assert store.list_conversations()[0]["message_count"] == 2
    # Back to the first answer: the turns that followed it come back with it.
    store.select_message(a1)
    assert [text for _, text, _, _ in path_of(store, cid)] == ["q1", "a1", "q2", "a2", "q3", "a3"]
    assert path_of(store, cid)[1] == ("assistant", "a1", 1, 3)
    # A new message continues the path shown.
    d2 = store.add_message(cid, "assistant", "d2", parent_id=q2)
    assert path_of(store, cid)[2:] == [("user", "q2", 1, 1), ("assistant", "d2", 2, 2)]
    more = store.add_message(cid, "user", "q3 after d2")
    assert store.get_conversation(cid)["messages"][-1]["parent_id"] == d2 and more
    # Each branch remembers where it was left: c1, then a1 again shows d2 and what followed it.
    store.select_message(c1)
    assert [text for _, text, _, _ in path_of(store, cid)] == ["q1", "c1"]
    store.select_message(a1)
    assert [text for _, text, _, _ in path_of(store, cid)] == ["q1", "a1", "q2", "d2", "q3 after d2"]
    # Selecting a message deep in another branch brings its whole branch.
    store.select_message(_rest[3])  # a3, under a2
    assert [text for _, text, _, _ in path_of(store, cid)] == ["q1", "a1", "q2", "a2", "q3", "a3"]


def test_an_edited_question_forks_and_the_old_branch_stays(store):
    cid, ids = three_turns(store)
    q1 = ids[0]
    edited = store.add_message(cid, "user", "q1, better", parent_id=None)
    answer = store.add_message(cid, "assistant", "a1 to the better q1", parent_id=edited)
    assert path_of(store, cid) == [("user", "q1, better", 2, 2), ("assistant", "a1 to the better q1", 1, 1)]
    assert store.get_conversation(cid)["messages"][0]["variant_ids"] == [q1, edited]
    # Both versions stay searchable; the old branch is one selection away.
    assert {h["message_id"] for h in store.search("q1")} == {q1, edited, answer}
    store.select_message(q1)
    assert [m["id"] for m in store.get_conversation(cid)["messages"]] == ids
    store.select_message(answer)
    assert [m["id"] for m in store.get_conversation(cid)["messages"]] == [edited, answer]


def test_tree_input_is_checked(store):
    cid, ids = three_turns(store)
    other = store.create_conversation()
    before = store.get_conversation(cid)
    with pytest.raises(StoreError, match="not in conversation"):
        store.add_message(other, "user", "x", parent_id=ids[0])
    with pytest.raises(StoreError, match="unknown message"):
        store.add_message(cid, "user", "x", parent_id=99999)
    with pytest.raises(StoreError, match="parent_id"):
        store.add_message(cid, "user", "x", parent_id="last")
    for call in (store.select_message, store.delete_turn, store.delete_messages_from, store.delete_message):
        with pytest.raises(StoreError, match="unknown message"):
            call(99999)
    assert store.get_conversation(cid) == before and store.get_conversation(other)["messages"] == []


def test_deleting_in_a_tree(tmp_path, store):
    cid, (q1, a1, q2, a2, q3, a3) = three_turns(store)
    sha = store.add_attachment(png("red"), "only-in-the-fork.png")
    fork = store.add_message(cid, "user", "q2, again", [sha], parent_id=a1)
    fork_answer = store.add_message(cid, "assistant", "fork answer", parent_id=fork)
    store.add_message(cid, "user", "fork q3")
    # Deleting from the fork's question takes its whole branch (and the image only it used);
    # the path falls back to the other version.
    assert store.delete_messages_from(fork) == 3
    assert files(tmp_path) == []
    assert [m["id"] for m in store.get_conversation(cid)["messages"]] == [q1, a1, q2, a2, q3, a3]
    assert {h["message_id"] for h in store.search("fork")} == set()

    # Deleting a turn takes every version of it; the turns after it follow the turn before.
    b2 = store.add_message(cid, "assistant", "b2", parent_id=q2)
    store.add_message(cid, "user", "q3 after b2")
    assert store.delete_turn(q2) == 3  # q2 with a2 and b2
    messages = store.get_conversation(cid)["messages"]
    assert [m["text"] for m in messages] == ["q1", "a1", "q3 after b2"]  # the branch shown stays shown
    assert messages[2]["parent_id"] == a1 and messages[2]["variant_count"] == 2
    store.select_message(q3)
    assert [m["text"] for m in store.get_conversation(cid)["messages"]] == ["q1", "a1", "q3", "a3"]
    # An answer's turn is all its versions; one message alone leaves the rest in place.
    store.add_message(cid, "assistant", "other a3", parent_id=q3)
    assert store.delete_turn(a3) == 2
    assert [m["text"] for m in store.get_conversation(cid)["messages"]] == ["q1", "a1", "q3"]
    store.delete_message(a1)
    messages = store.get_conversation(cid)["messages"]
    assert [m["text"] for m in messages] == ["q1", "q3"] and messages[1]["variant_count"] == 2
    assert store.list_conversations()[0]["message_count"] == 2


def test_export_holds_the_current_path_and_imports_as_one(store):
    cid, ids = three_turns(store)
    store.add_message(cid, "assistant", "a1, second version", parent_id=ids[0])
    store.select_message(ids[1])
    data = store.export_conversation(cid)
    assert [m["text"] for m in data["messages"]] == ["q1", "a1", "q2", "a2", "q3", "a3"]
    imported = store.get_conversation(store.import_conversation(data))["messages"]
    assert [m["text"] for m in imported] == ["q1", "a1", "q2", "a2", "q3", "a3"]
    assert [m["parent_id"] for m in imported] == [None] + [m["id"] for m in imported[:-1]]
    assert all(m["variant_count"] == 1 for m in imported)


def test_threads_share_one_store(store):
    cid = store.create_conversation()
    errors = []

    def work(n):
        try:
            for i in range(25):
                mid = store.add_message(cid, "assistant", "", status="streaming")
                store.update_message(mid, text=f"thread {n} message {i}", status="complete")
                store.list_conversations()
                store.search("thread")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    messages = store.get_conversation(cid)["messages"]
    assert len(messages) == 100
    assert sorted(m["position"] for m in messages) == list(range(100))


def test_conversation_settings(store):
    cid = store.create_conversation("Tuned")
    other = store.create_conversation("Other")
    assert store.get_conversation(cid)["settings"] is None
    order = [c["id"] for c in store.list_conversations()]
    store.set_conversation_settings(cid, {"temperature": 0.7, "seed": None, "system_prompt": "Be brief."})
    assert store.get_conversation(cid)["settings"] == {
        "temperature": 0.7, "seed": None, "system_prompt": "Be brief."
    }
    assert store.get_conversation(other)["settings"] is None
    listed = {c["id"]: c["settings"] for c in store.list_conversations()}
    assert listed == {cid: {"temperature": 0.7, "seed": None, "system_prompt": "Be brief."}, other: None}
    assert [c["id"] for c in store.list_conversations()] == order  # not bumped to the top
    store.set_conversation_settings(cid, None)
    assert store.get_conversation(cid)["settings"] is None

    before = store.get_conversation(cid)
    with pytest.raises(StoreError, match="settings must be a dict"):
        store.set_conversation_settings(cid, [1, 2])
    with pytest.raises(StoreError, match="not JSON-serializable"):
        store.set_conversation_settings(cid, {"x": float("nan")})
    with pytest.raises(StoreError, match="unknown conversation"):
        store.set_conversation_settings("nope", {"temperature": 1.0})
    assert store.get_conversation(cid) == before


def test_user_settings_persist_across_processes(tmp_path, store):
    assert store.get_setting("generation") is None
    assert store.get_setting("generation", {"temperature": 0.0}) == {"temperature": 0.0}
    store.set_setting("generation", {"temperature": 0.3, "max_new_tokens": 256})
    store.set_setting("generation", {"temperature": 0.4})  # replaces
    store.set_setting("theme", "dark")
    store.set_setting("count", 3)

    proc = run_python(
        "import sys, json\n"
        "from app.store import Store\n"
        "with Store(sys.argv[1]) as s:\n"
        "    print(json.dumps([s.get_setting('generation'), s.get_setting('theme'), s.get_setting('count')]))\n"
        "    s.set_setting('theme', None)\n",
        str(tmp_path),
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out) == [{"temperature": 0.4}, "dark", 3]
    assert store.get_setting("theme", "light") == "light"  # removed by the other process

    for key in ("", "  ", None, 5):
        with pytest.raises(StoreError, match="setting key"):
            store.set_setting(key, 1)
    with pytest.raises(StoreError, match="not JSON-serializable"):
        store.set_setting("bad", {"f": object()})
    assert store.get_setting("bad") is None


# -- attachments ------------------------------------------------------------


def test_attachment_dedup(tmp_path, store):
    data = png("red")
    sha1 = store.add_attachment(data, "cat.png", "image/png")
    sha2 = store.add_attachment(data, "same-cat-again.png")
    assert sha1 == sha2
    assert len(files(tmp_path)) == 1
    info = store.get_attachment(sha1)
    assert (info["mime"], info["name"], info["size"], info["width"], info["height"]) == (
        "image/png",
        "cat.png",
        len(data),
        4,
        3,
    )
    path = store.attachment_path(sha1)
    assert path == tmp_path / "attachments" / sha1[:2] / f"{sha1}.png"
    assert path.read_bytes() == data
    assert store._conn.execute("SELECT count(*) FROM attachments").fetchone()[0] == 1

    # Mime is sniffed when not given; directories in names are dropped.
    sha3 = store.add_attachment(png("blue"), "C:\\Users\\me\\shot.png")
    assert store.get_attachment(sha3)["mime"] == "image/png"
    assert store.get_attachment(sha3)["name"] == "shot.png"
    with pytest.raises(StoreError):
        store.add_attachment(b"")
    with pytest.raises(StoreError, match="mime"):
        store.add_attachment(b"abc", mime="not a mime")
    with pytest.raises(StoreError, match="unknown attachment"):
        store.attachment_path("f" * 64)


def test_attachment_files_removed_only_when_unreferenced(tmp_path, store):
    shared, only_b = png("red"), png("green")
    s_shared = store.add_attachment(shared, "shared.png")
    s_only_b = store.add_attachment(only_b, "b.png")
    a = store.create_conversation()
    b = store.create_conversation()
    store.add_message(a, "user", "look", attachments=[s_shared])
    b_msg = store.add_message(b, "user", "look too", attachments=[s_shared, s_only_b])
    store.add_message(b, "assistant", "nice")

    conv = store.get_conversation(b)
    assert [x["sha256"] for x in conv["messages"][0]["attachments"]] == [s_shared, s_only_b]
    assert Path(conv["messages"][0]["attachments"][1]["path"]).read_bytes() == only_b

    store.delete_messages_from(b_msg)
    assert store.attachment_path(s_shared).exists()
    assert not (tmp_path / "attachments" / s_only_b[:2] / f"{s_only_b}.png").exists()
    with pytest.raises(StoreError):
        store.get_attachment(s_only_b)

    store.delete_conversation(a)
    assert files(tmp_path) == []
    assert store._conn.execute("SELECT count(*) FROM attachments").fetchone()[0] == 0

    # The same bytes can be added again afterwards.
    again = store.add_attachment(shared, "shared.png")
    assert store.attachment_path(again).read_bytes() == shared


def test_collect_garbage(tmp_path, store):
    unused = store.add_attachment(png("red"), "unused.png")
    used = store.add_attachment(png("blue"), "used.png")
    store.add_message(store.create_conversation(), "user", "x", attachments=[used])
    stray = tmp_path / "attachments" / "ee" / ("e" * 64 + ".png")
    stray.parent.mkdir()
    stray.write_bytes(b"left over")

    assert store.collect_garbage() == 1  # the stray file; the fresh upload stays
    assert store.attachment_path(unused).exists()
    assert store.collect_garbage(min_age=0) == 1
    assert [p.name for p in files(tmp_path)] == [store.attachment_path(used).name]


# -- deletion really deletes --------------------------------------------------


def test_delete_removes_rows_fts_entries_and_bytes(tmp_path, store):
    keep = store.create_conversation("keep")
    store.add_message(keep, "user", "an ordinary message about cats")
    gone = store.create_conversation()
    store.add_message(gone, "user", "my secret is zqxjvelociraptor please forget it")
    store.add_message(gone, "assistant", "noted zqxjvelociraptor")
    assert len(store.search("zqxjvelociraptor")) == 2

    store.delete_conversation(gone)
    assert store.search("zqxjvelociraptor") == []
    assert store._conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 1
    assert store.search("cats")[0]["conversation_id"] == keep
    store.close()
    raw = b"".join(
        p.read_bytes() for p in tmp_path.glob("history.db*") if p.is_file()
    )
    assert b"zqxjvelociraptor" not in raw
    assert b"forget it" not in raw


# -- search -------------------------------------------------------------------


@pytest.fixture
def searchable(store):
    cid = store.create_conversation("Search me")
    store.add_message(cid, "user", 'He said "hello world" (twice) AND left.')
    store.add_message(cid, "assistant", "Café crème, naïve résumé. 日本語 テキスト. Emoji 🐱 cat")
    return store


@pytest.mark.parametrize(
    "query",
    [
        '"foo',
        '"hello',
        "AND (",
        "(",
        ")",
        "AND",
        "OR NOT",
        "NEAR(hello world)",
        "hello AND",
        "*",
        "hel*lo",
        "-hello",
        "^hello",
        "col:hello",
        "text:hello",
        "hello\x00world",
        "'; DROP TABLE messages; --",
        "🐱",
        "\\",
        '""""',
        "{hello}",
        "a" * 1000,
    ],
)
def test_search_never_raises(searchable, query):
    hits = searchable.search(query)
    assert isinstance(hits, list)
    assert searchable._conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 2


@pytest.mark.parametrize(
    "query, expected",
    [
        ("hello", 1),
        ('"hello', 1),
        ("hello world", 1),
        ('"hello world"', 1),
        ("(twice)", 1),
        ("and", 1),  # an ordinary word, not an operator
        ("HELLO", 1),
        ("cafe", 1),  # diacritics folded
        ("résumé", 1),
        ("日本語", 1),
        ("hel*", 1),  # prefix
        ("hel", 0),
        ("hello cat", 0),  # all words must match
        ("", 0),
        ("   ", 0),
        ("🐱", 0),
    ],
)
def test_search_matches(searchable, query, expected):
    assert len(searchable.search(query)) == expected


def test_search_hit_shape(searchable):
    (hit,) = searchable.search("crème", highlight=("<b>", "</b>"))
    assert hit["title"] == "Search me"
    assert hit["role"] == "assistant"
    assert "<b>crème</b>" in hit["snippet"]
    assert set(hit) == {"conversation_id", "title", "message_id", "role", "created_at", "snippet"}


def test_streaming_text_is_indexed_once_settled(store):
    cid = store.create_conversation()
    mid = store.add_message(cid, "assistant", "", status="streaming")
    store.update_message(mid, text="partial pterodactyl")
    assert store.search("pterodactyl") == []
    store.update_message(mid, text="partial pterodactyl done", status="stopped")
    assert [h["message_id"] for h in store.search("pterodactyl")] == [mid]
    store.update_message(mid, text="rewritten")
    assert store.search("pterodactyl") == []
    assert len(store.search("rewritten")) == 1
    # The index is consistent with the table.
    store._conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")


def test_fts_query_quotes_everything():
    assert fts_query('say "hi" AND (x)') == '"say" """hi""" "AND" "(x)"'
    assert fts_query("pre*") == '"pre"*'
    assert fts_query(" * \x00 ") == ""


# -- export / import ----------------------------------------------------------


def make_rich_conversation(store) -> str:
    cid = store.create_conversation(
        "Pictures", model="deepseek-vl-7b", system_prompt="You are helpful."
    )
    red, blue = png("red", (5, 7)), png("blue")
    s_red = store.add_attachment(red, "red.png")
    s_blue = store.add_attachment(blue, "blue [1].png")
    store.add_message(cid, "user", "Compare these *two* images", attachments=[s_red, s_blue])
    a = store.add_message(cid, "assistant", "", status="streaming", settings={"temperature": 0.7})
    store.update_message(
        a, text="The first is red, the second blue.", status="complete", timings={"ttft": 0.25}
    )
    store.add_message(cid, "user", "And this one?", attachments=[s_red])
    b = store.add_message(cid, "assistant", "It is red", status="streaming")
    store.update_message(b, status="stopped")
    return cid


def comparable(conv: dict, store: Store) -> list:
    return [
        (
            m["role"],
            m["text"],
            m["status"],
            m["settings"],
            m["timings"],
            m["created_at"],
            [(a["name"], a["mime"], Path(a["path"]).read_bytes()) for a in m["attachments"]],
        )
        for m in conv["messages"]
    ]


def test_export_import_round_trip(tmp_path, store):
    cid = make_rich_conversation(store)
    exported = store.export_conversation(cid)
    text = json.dumps(exported)  # JSON-serializable
    assert exported["format"] == "deepseek-vl-local/conversation"
    assert len(exported["attachments"]) == 2  # red is stored once

    # Into a fresh store (another machine), from the JSON text.
    with Store(tmp_path / "other") as other:
        new_id = other.import_conversation(text)
        assert new_id != cid
        original, imported = store.get_conversation(cid), other.get_conversation(new_id)
        assert comparable(imported, other) == comparable(original, store)
        for key in ("title", "model", "system_prompt", "created_at"):
            assert imported[key] == original[key]

    # Into the same store: attachments are shared, not duplicated.
    again = store.import_conversation(exported)
    assert comparable(store.get_conversation(again), store) == comparable(
        store.get_conversation(cid), store
    )
    assert len(files(tmp_path)) == 2
    store.delete_conversation(cid)
    assert len(files(tmp_path)) == 2  # still used by the imported copy


def test_export_markdown(store):
    cid = make_rich_conversation(store)
    md = store.export_markdown(cid)
    conv = store.get_conversation(cid)
    red = conv["messages"][0]["attachments"][0]
    assert md.startswith("# Pictures\n")
    assert "You are helpful." in md
    assert "## User" in md and "## Assistant" in md
    assert "Compare these *two* images" in md
    assert "The first is red, the second blue." in md
    assert f"![red.png]({red['sha256']}.png)" in md
    assert "![blue 1.png](" in md  # brackets can't break the link
    assert "_(stopped)_" in md
    assert md.index("Compare these") < md.index("The first is red") < md.index("And this one?")


def test_export_markdown_zip_carries_its_images(tmp_path, store):
    cid = make_rich_conversation(store)
    conv = store.get_conversation(cid)
    data = store.export_markdown_zip(cid)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        names = archive.namelist()
        assert names[0] == "conversation.md"
        md = archive.read("conversation.md").decode("utf-8")
        links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
        # Three images shown (red twice), two files: each stored once.
        assert len(links) == 3 and len(names) == 3
        wanted = [a for m in conv["messages"] for a in m["attachments"]]
        for link, attachment in zip(links, wanted):
            assert not link.startswith(("/", "\\")) and ".." not in link  # relative, inside the zip
            assert link in names
            assert archive.read(link) == Path(attachment["path"]).read_bytes()
        # Unpacked anywhere, the links resolve next to the .md file.
        archive.extractall(tmp_path / "unpacked")
    for link, attachment in zip(links, wanted):
        unpacked = (tmp_path / "unpacked" / link).read_bytes()
        assert unpacked == Path(attachment["path"]).read_bytes()
    # The text is the same Markdown as export_markdown, only the links differ.
    assert md.startswith("# Pictures\n") and "Compare these *two* images" in md and "_(stopped)_" in md
    assert md.replace("](images/", "](") == store.export_markdown(cid)
    assert store.export_markdown_zip(cid) == data  # same conversation, same bytes


def test_export_markdown_zip_without_images_and_with_a_missing_file(store):
    cid = store.create_conversation()
    store.add_message(cid, "user", "just text")
    with zipfile.ZipFile(io.BytesIO(store.export_markdown_zip(cid))) as archive:
        assert archive.namelist() == ["conversation.md"]
        assert "just text" in archive.read("conversation.md").decode()
    sha = store.add_attachment(png("red"), "red.png")
    store.add_message(cid, "user", "with image", attachments=[sha])
    store.attachment_path(sha).unlink()
    with pytest.raises(StoreError, match="attachment file missing"):
        store.export_markdown_zip(cid)
    with pytest.raises(StoreError, match="unknown conversation"):
        store.export_markdown_zip("nope")


def test_export_carries_conversation_settings(tmp_path, store):
    cid = make_rich_conversation(store)
    store.set_conversation_settings(cid, {"temperature": 0.6, "top_k": 12})
    exported = store.export_conversation(cid)
    assert exported["conversation"]["settings"] == {"temperature": 0.6, "top_k": 12}
    with Store(tmp_path / "other") as other:
        assert other.get_conversation(other.import_conversation(exported))["settings"] == {
            "temperature": 0.6, "top_k": 12
        }
        # An export from before conversations had settings still imports.
        del exported["conversation"]["settings"]
        assert other.get_conversation(other.import_conversation(exported))["settings"] is None


def corrupt_variants(good: dict):
    def variant(mutate):
        data = copy.deepcopy(good)
        mutate(data)
        return data

    sha = good["attachments"][0]["sha256"]
    yield "not json {", "JSON"
    yield "[1, 2]", "object"
    yield variant(lambda d: d.update(format="something-else")), "format"
    yield variant(lambda d: d.update(version=99)), "version"
    yield variant(lambda d: d.pop("messages")), "messages"
    yield variant(lambda d: d.update(messages="nope")), "messages"
    yield variant(lambda d: d["messages"].append("nope")), r"messages\[4\]"
    yield variant(lambda d: d["messages"][1].update(role="system")), "role"
    yield variant(lambda d: d["messages"][1].update(status="done")), "status"
    yield variant(lambda d: d["messages"][1].update(text=None)), "text"
    yield variant(lambda d: d["messages"][1].update(settings=[1])), "settings"
    yield variant(lambda d: d["messages"][1].update(created_at="yesterday")), "timestamp"
    yield variant(lambda d: d["messages"][2].update(attachments=["0" * 64])), "not in the file"
    yield variant(lambda d: d["conversation"].update(title=42)), "title"
    yield variant(lambda d: d["conversation"].update(settings="hot")), r"conversation\.settings"
    yield variant(lambda d: d.pop("conversation")), "conversation"
    yield variant(lambda d: d["attachments"][0].update(data="!!!not base64!!!")), "base64"
    yield variant(lambda d: d["attachments"][0].update(data="aGVsbG8=")), "sha256"
    yield variant(lambda d: d["attachments"][0].update(sha256="../../evil")), "sha256"
    yield variant(lambda d: d["attachments"][0].update(mime=None)), "mime"
    yield variant(lambda d: d.update(attachments={sha: 1})), "attachments"


def test_corrupt_imports_raise_and_change_nothing(tmp_path, store):
    cid = make_rich_conversation(store)
    good = store.export_conversation(cid)
    # An empty target directory for the attachments in the file, too.
    other_dir = tmp_path / "other"
    with Store(other_dir) as other:
        other.add_message(other.create_conversation(), "user", "hello existing")
        before = snapshot(other_dir), snapshot(tmp_path)
        for data, message in corrupt_variants(good):
            with pytest.raises(StoreError, match=message):
                other.import_conversation(data)
            with pytest.raises(StoreError, match=message):
                store.import_conversation(data)
        assert (snapshot(other_dir), snapshot(tmp_path)) == before


def test_import_failing_half_way_leaves_nothing(tmp_path, monkeypatch):
    with Store(tmp_path / "src") as src:
        good = src.export_conversation(make_rich_conversation(src))
    target = tmp_path / "dst"
    with Store(target) as store:
        store.add_message(store.create_conversation(), "user", "hello existing")
        before = snapshot(target)
        real = Store._insert_message
        calls = []

        def flaky(self, *args):
            calls.append(1)
            if len(calls) == 3:
                raise sqlite3.OperationalError("disk I/O error")
            return real(self, *args)

        monkeypatch.setattr(Store, "_insert_message", flaky)
        with pytest.raises(sqlite3.OperationalError):
            store.import_conversation(good)
        assert snapshot(target) == before
        assert files(target) == []
        monkeypatch.setattr(Store, "_insert_message", real)
        store.import_conversation(good)  # still works afterwards
        assert len(store.list_conversations()) == 2


# -- several processes ---------------------------------------------------------

WRITER = """
import sys, time
from pathlib import Path
from app.store import Store
data_dir, shared, name, go = sys.argv[1:5]
store = Store(Path(data_dir))
own = store.create_conversation(name)
sha = store.add_attachment(b"same bytes in both processes", "shared.bin")
while not Path(go).exists():
    time.sleep(0.01)
for i in range(200):
    store.add_message(own, "user", f"{name} own {i}")
    mid = store.add_message(shared, "assistant", "", status="streaming",
                            attachments=[sha] if i % 50 == 0 else [])
    store.update_message(mid, text=f"{name} shared {i}", status="complete")
print(own)
"""


def test_two_processes_write_concurrently(tmp_path):
    with Store(tmp_path) as store:
        shared = store.create_conversation("shared")
    go = tmp_path / "go"
    procs = [run_python(WRITER, str(tmp_path), shared, name, str(go)) for name in ("alpha", "beta")]
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert "locked" not in err
    own_ids = [out.strip() for out, _ in results]

    with Store(tmp_path) as store:
        for name, own in zip(("alpha", "beta"), own_ids):
            texts = [m["text"] for m in store.get_conversation(own)["messages"]]
            assert texts == [f"{name} own {i}" for i in range(200)]
        messages = store.get_conversation(shared)["messages"]
        assert len(messages) == 400
        assert [m["position"] for m in messages] == list(range(400))
        for name in ("alpha", "beta"):
            mine = [m["text"] for m in messages if m["text"].startswith(name)]
            assert mine == [f"{name} shared {i}" for i in range(200)]  # in order
        assert sum(len(m["attachments"]) for m in messages) == 8
        assert len(files(tmp_path)) == 1
        assert len(store.search("shared")) == 20  # limit
        assert len(store.search("shared", limit=1000)) == 400


KILLED = """
import sys, time
from pathlib import Path
from app.store import Store
store = Store(Path(sys.argv[1]))
cid = store.create_conversation()
user = store.add_message(cid, "user", "Tell me a long story")
answer = store.add_message(cid, "assistant", "", status="streaming")
text = ""
for word in ["Once", "upon", "a", "time"]:
    text += word + " "
    store.update_message(answer, text=text)
print(cid, user, answer, flush=True)
time.sleep(60)
"""


def test_process_killed_mid_answer_is_recovered(tmp_path):
    Store(tmp_path).close()
    proc = run_python(KILLED, str(tmp_path))
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
    finally:
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait(timeout=30)
    cid, user_id, answer_id = line.split()

    with Store(tmp_path) as store:
        assert store.get_conversation(cid)["messages"][1]["status"] == "streaming"
        assert store.recover_interrupted() == 1
        messages = store.get_conversation(cid)["messages"]
        assert [(m["id"], m["role"], m["text"], m["status"]) for m in messages] == [
            (int(user_id), "user", "Tell me a long story", "complete"),
            (int(answer_id), "assistant", "Once upon a time ", "stopped"),
        ]
        assert [h["message_id"] for h in store.search("upon")] == [int(answer_id)]
        assert store.recover_interrupted() == 0


LIVE = """
import sys, time
from pathlib import Path
from app.store import Store
store = Store(Path(sys.argv[1]))
cid = store.create_conversation()
answer = store.add_message(cid, "assistant", "still being written", status="streaming")
print(cid, answer, store.instance_id, flush=True)
time.sleep(60)
"""


def test_recovery_goes_by_owner_not_by_age(tmp_path):
    """A killed process's answer is recovered at once; a live process's answer never is, however old."""
    Store(tmp_path).close()
    killed, live = run_python(KILLED, str(tmp_path)), run_python(LIVE, str(tmp_path))
    try:
        killed_line, live_line = killed.stdout.readline(), live.stdout.readline()
        assert killed_line, killed.stderr.read()
        assert live_line, live.stderr.read()
        killed.kill()  # SIGKILL: its lock goes with it, nothing else runs
        killed.wait(timeout=30)
        killed_answer = int(killed_line.split()[2])
        live_cid, live_answer, live_owner = live_line.split()

        with Store(tmp_path) as store:
            assert [i["id"] for i in store.other_instances()] == [live_owner]
            assert store.other_instances()[0]["pid"] == live.pid
            assert store.is_alive(live_owner) and store.is_alive(store.instance_id)
            assert store.recover_interrupted() == 1
            statuses = {m["id"]: m["status"] for c in store.list_conversations()
                        for m in store.get_conversation(c["id"])["messages"] if m["role"] == "assistant"}
            assert statuses == {killed_answer: "stopped", int(live_answer): "streaming"}
            assert store.recover_interrupted() == 0

            live.kill()
            live.wait(timeout=30)
            assert not store.is_alive(live_owner) and store.other_instances() == []
            assert store.recover_interrupted() == 1
            assert store.get_conversation(live_cid)["messages"][0]["status"] == "stopped"
        assert list((tmp_path / "instances").iterdir()) == []  # no lock file outlives its instance
    finally:
        for proc in (killed, live):
            proc.kill()
            proc.wait(timeout=30)


def test_recovery_spares_another_store_in_this_process(tmp_path):
    with Store(tmp_path) as reader:
        writer = Store(tmp_path)
        cid = writer.create_conversation()
        answer = writer.add_message(cid, "assistant", "still going", status="streaming")
        assert reader.recover_interrupted() == 0
        assert writer.recover_interrupted() == 0  # its own answer is live too
        assert reader.get_conversation(cid)["messages"][0]["status"] == "streaming"
        writer.close()
        assert reader.recover_interrupted() == 1
        message = reader.get_conversation(cid)["messages"][0]
        assert (message["id"], message["status"], message["owner"]) == (answer, "stopped", None)


def test_answers_record_their_writer(store):
    cid = store.create_conversation()
    answer = store.add_message(cid, "assistant", "", status="streaming")
    assert store.get_conversation(cid)["messages"][0]["owner"] == store.instance_id
    store.update_message(answer, text="done", status="complete")
    assert store.get_conversation(cid)["messages"][0]["owner"] is None
    # Rows from before the owner column (NULL) have no live writer: recovered.
    store.update_message(answer, status="streaming")
    with store._write() as conn:
        conn.execute("UPDATE messages SET owner = NULL")
    assert store.recover_interrupted() == 1
