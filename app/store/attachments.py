"""Attachment files: each distinct file stored once, named by its sha256, and
removed when no message uses it any more."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import mimetypes
import os
import re
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path

from .db import Database, StoreError, utc_now

log = logging.getLogger(__name__)

# File extensions are derived from the mime type with a fixed table (not the
# platform's mimetypes registry, which differs between machines) so every
# process computes the same path for the same attachment.
EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/gif": "gif",
    "image/webp": "webp",
    "image/bmp": "bmp",
    "image/tiff": "tiff",
    "application/pdf": "pdf",
    "text/plain": "txt",
}
SHA_RE = re.compile(r"[0-9a-f]{64}")
MIME_RE = re.compile(r"[a-z0-9][a-z0-9.+-]*/[a-z0-9][a-z0-9.+-]*")


def check_sha(sha: object) -> str:
    if not isinstance(sha, str) or not SHA_RE.fullmatch(sha):
        raise StoreError(f"not a sha256 hex digest: {str(sha)[:80]!r}")
    return sha


def file_name(sha: str, mime: str) -> str:
    """The stored file's name: ``<sha256>.<extension>``."""
    return f"{sha}.{EXTENSIONS.get(mime, 'bin')}"


def _image_info(data: bytes) -> tuple[int | None, int | None, str | None]:
    """(width, height, mime) when Pillow recognises the bytes as an image."""
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return im.width, im.height, Image.MIME.get(im.format or "")
    except Exception:  # not an image, truncated, decompression bomb, ...
        return None, None, None


class Attachments(Database):
    """``attachments/ab/abcdef….png``: content-addressed files plus their rows."""

    def __init__(self, data_dir: Path | str):
        self._deleted_listeners: list[Callable[[list[str]], None]] = []
        super().__init__(data_dir)

    def on_attachments_deleted(self, callback: Callable[[list[str]], None]) -> None:
        """Call ``callback(shas)`` after attachments were deleted with the
        last message that used them, so copies kept elsewhere (app.scratch)
        can go too. Called outside the store's lock; errors are logged."""
        self._deleted_listeners.append(callback)

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
        if not MIME_RE.fullmatch(mime):
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
                    "created_at": utc_now(),
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
        return self.attachments_dir / sha[:2] / file_name(sha, mime)

    def attachment_path(self, sha: str) -> Path:
        check_sha(sha)
        with self._lock:
            rows = self._rows("SELECT mime FROM attachments WHERE sha256 = ?", [sha])
        if not rows:
            raise StoreError(f"unknown attachment: {sha}")
        return self._file_path(sha, rows[0]["mime"])

    def get_attachment(self, sha: str) -> dict:
        """Metadata row of one attachment, plus its ``path``."""
        check_sha(sha)
        with self._lock:
            rows = self._rows("SELECT * FROM attachments WHERE sha256 = ?", [sha])
        if not rows:
            raise StoreError(f"unknown attachment: {sha}")
        rows[0]["path"] = str(self._file_path(sha, rows[0]["mime"]))
        return rows[0]

    # -- removal -----------------------------------------------------------

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
        for callback in self._deleted_listeners if gone_shas else ():
            try:
                callback(list(gone_shas))
            except Exception:  # the delete itself is done; a copy left behind is logged
                log.exception("could not remove copies of deleted attachments")

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
