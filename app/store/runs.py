"""Training runs started from the app: one row each (what was asked, where it writes, how it ended), so the
Training tab lists them and an app restarted while one runs finds it again."""

from __future__ import annotations

import uuid
from typing import Any

from .db import Database, StoreError, dumps, from_json, utc_now

RUN_STATUSES = ("running", "finished", "stopped", "failed")


class Runs(Database):
    def add_run(self, request: dict, out_dir: str, pid: int, started: float) -> str:
        run_id = uuid.uuid4().hex[:12]
        now = utc_now()
        with self._write():
            self.db["training_runs"].insert({
                "id": run_id, "created_at": now, "updated_at": now, "status": "running",
                "request": dumps(request, "training request"), "out_dir": out_dir, "pid": pid,
                "process_started": started, "final": None, "error": None})
        return run_id

    def update_run(self, run_id: str, **changes: Any) -> None:
        allowed = {"status", "pid", "process_started", "final", "error"}
        if set(changes) - allowed:
            raise StoreError(f"cannot change {sorted(set(changes) - allowed)} of a training run")
        if "status" in changes and changes["status"] not in RUN_STATUSES:
            raise StoreError(f"unknown training run status {changes['status']!r}")
        with self._write() as conn:
            self.get_run(run_id)
            sets = ", ".join(f"{key} = ?" for key in changes)
            conn.execute(f"UPDATE training_runs SET {sets}, updated_at = ? WHERE id = ?",
                         [*changes.values(), utc_now(), run_id])

    def get_run(self, run_id: str) -> dict:
        rows = self._rows("SELECT * FROM training_runs WHERE id = ?", [run_id])
        if not rows:
            raise StoreError(f"no training run {run_id!r}")
        return _decoded(rows[0])

    def list_runs(self, limit: int = 50) -> list[dict]:
        """Newest first."""
        return [_decoded(r) for r in self._rows(
            "SELECT * FROM training_runs ORDER BY created_at DESC, rowid DESC LIMIT ?", [limit])]


def _decoded(row: dict) -> dict:
    row["request"] = from_json(row["request"])
    return row
