"""The user's defaults (for example the generation settings a new chat starts
with): small JSON values by key, shared by every process on the data directory."""

from __future__ import annotations

from typing import Any

from .db import Database, StoreError, dumps, from_json, utc_now


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not key.strip():
        raise StoreError(f"setting key must be a non-empty string, got {key!r}")
    return key


class Preferences(Database):
    def get_setting(self, key: str, default: Any = None) -> Any:
        """The value saved under ``key``, or ``default`` when there is none."""
        _check_key(key)
        with self._lock:
            row = self._conn.execute("SELECT value FROM settings WHERE key = ?", [key]).fetchone()
        return default if row is None else from_json(row[0])

    def set_setting(self, key: str, value: Any) -> None:
        """Save any JSON-serializable value under ``key``; None removes it."""
        _check_key(key)
        value_json = None if value is None else dumps(value, f"setting {key!r}")
        with self._write() as conn:
            if value_json is None:
                conn.execute("DELETE FROM settings WHERE key = ?", [key])
            else:
                conn.execute(
                    "INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value, "
                    "updated_at = excluded.updated_at",
                    [key, value_json, utc_now()],
                )
