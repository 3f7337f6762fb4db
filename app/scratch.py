"""Scratch space: every temporary file the app writes, in one place inside the data directory.

    tmp/<instance id>/gradio/        gradio's upload and file cache (GRADIO_TEMP_DIR, set by run_app.py)
    tmp/<instance id>/files/<n>/     files handed to the browser: exports, rendered PDF pages, screenshots

Keeping it in the data directory (not the system temp directory) means the user's images are only where the
user put them, and a delete can find every copy: when attachments are deleted, `forget` removes each scratch
file holding their bytes, in any instance's folder. One folder per instance (the store's, see
app.store.instances) so two apps on one data directory never clean up each other's live files; a folder
whose instance is gone (exited or killed) is removed on the next start.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from . import viewer

log = logging.getLogger(__name__)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def user_folder(user: str) -> str:
    """A user's folder name: a digest, as account names need not be valid file names."""
    return hashlib.sha256(user.encode("utf-8")).hexdigest()[:16]


class Scratch:
    def __init__(self, root: Path, instance_id: str, is_alive: Callable[[str], bool]):
        self.root = Path(root)
        self.dir = self.root / instance_id
        self.gradio_dir = self.dir / "gradio"
        self.files_dir = self.dir / "files"
        self._instance_id = instance_id
        self._is_alive = is_alive
        self._lock = threading.Lock()
        # sha256 of a file we wrote -> the attachments it holds (an export zip or JSON): deleting one of those
        # deletes the file, and gradio's byte-identical copy of it.
        self._holds: dict[str, set[str]] = {}

    @classmethod
    def of(cls, store) -> Scratch:
        """The scratch space of this store's instance, in ``<data dir>/tmp``."""
        return cls(store.data_dir / "tmp", store.instance_id, store.is_alive)

    def start(self) -> int:
        """Remove what earlier (ended or killed) instances left, create this one's folders and remove them at
        exit. Returns how many leftover folders went."""
        removed = 0
        if self.root.is_dir():
            for entry in self.root.iterdir():
                if entry.name == self._instance_id or self._is_alive(entry.name):
                    continue
                _remove(entry)
                removed += 1
        self.gradio_dir.mkdir(parents=True, exist_ok=True)
        self.files_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.close)
        return removed

    def close(self) -> None:
        _remove(self.dir)

    def file(self, name: str) -> Path:
        """A fresh path ending in ``name`` (one folder per file keeps the name the user sees), inside the asking
        user's folder: the server hands a scratch file only to the user it was made for (see ``made_for``)."""
        folder = self.files_dir / user_folder(viewer.current()) / uuid.uuid4().hex
        folder.mkdir(parents=True)
        return folder / Path(name).name

    def made_for(self, path: Path, user: str) -> bool:
        """Whether ``path`` (resolved) is a file ``file`` made for ``user``."""
        return path.is_relative_to(self.files_dir.resolve() / user_folder(user))

    def write(self, name: str, data: bytes, holds: Iterable[str] = ()) -> Path:
        """Write ``data`` to a fresh scratch file; ``holds``: the attachments (sha256) it contains, e.g. an
        export's images, so that deleting any of them deletes this file too."""
        path = self.file(name)
        path.write_bytes(data)
        holds = set(holds)
        if holds:
            with self._lock:
                self._holds.setdefault(hashlib.sha256(data).hexdigest(), set()).update(holds)
        return path

    def forget(self, shas: Iterable[str]) -> int:
        """Remove every scratch file (gradio's cache included, every instance's) whose bytes are one of these
        attachments or hold one of them. Returns how many files went."""
        shas = set(shas)
        if not shas or not self.root.is_dir():
            return 0
        with self._lock:
            doomed = shas | {held for held, inside in self._holds.items() if inside & shas}
        removed = 0
        for path in [p for p in self.root.rglob("*") if p.is_file() and not p.is_symlink()]:
            try:
                if sha256_of(path) in doomed:
                    path.unlink()
                    removed += 1
            except OSError as e:  # vanished meanwhile, or open elsewhere on Windows
                log.warning("could not remove the scratch copy %s: %s", path, e)
        with self._lock:
            for held in doomed:
                self._holds.pop(held, None)
        return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()
