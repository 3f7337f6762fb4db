"""Full-text search over message text (SQLite FTS5, see m002_fts)."""

from __future__ import annotations

from .db import Database


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


class Search(Database):
    def search(
        self, query: str, limit: int = 20, highlight: tuple[str, str] = ("[", "]"), owner: str | None = None
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
                WHERE messages_fts MATCH ? AND (? IS NULL OR c.owner = ?)
                ORDER BY messages_fts.rank, m.id DESC
                LIMIT ?
                """,
                [highlight[0], highlight[1], match, owner, owner, limit],
            )
