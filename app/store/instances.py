"""Which app instances have a data directory open.

Each open Store holds an OS lock on its own file ``instances/<id>.lock``. The
operating system drops that lock when the process ends, however it ends
(Ctrl+C, kill -9, a crash, a power cut), so "is instance <id> alive?" is "is
its lock still held?": no clock, no pid reuse, no lease to renew. The store
writes its id into every answer it streams (``messages.owner``), which is how
a restarted app tells an interrupted answer from one another live instance is
still writing.

``flock`` locks belong to one open file, so two Stores in one process are two
instances too (as they must be: either may be closed while the other runs).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path

if os.name == "nt":
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False


SUFFIX = ".lock"


class InstanceLock:
    """This instance's lock, held until :meth:`release` (or the process's end)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            self.id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
            self.path = self.directory / f"{self.id}{SUFFIX}"
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            # A checker that found the file before we locked it takes it for a
            # dead instance's and unlinks it: then ours is not the file at the
            # path any more, and we start again under a new id.
            if _try_lock(fd) and _same_file(fd, self.path):
                break
            os.close(fd)
        else:  # pragma: no cover - would take 100 lost races in a row
            raise OSError(f"could not take an instance lock in {self.directory}")
        self._fd: int | None = fd
        info = {"pid": os.getpid(), "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        # Written after the first byte (Windows locks byte 0 and would refuse writes there).
        os.lseek(fd, 1, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if os.name == "nt":  # an open file cannot be deleted there
            os.close(fd)
            with contextlib.suppress(OSError):
                self.path.unlink()
        else:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def is_alive(directory: Path, instance_id: str | None) -> bool:
    """True while the instance ``instance_id`` still holds its lock. A dead
    instance's leftover file is removed on the way."""
    if not instance_id or "/" in instance_id or "\\" in instance_id:
        return False
    path = Path(directory) / f"{instance_id}{SUFFIX}"
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:  # no such file: never existed, or released
        return False
    try:
        if not _try_lock(fd):
            return True
        if os.name != "nt":  # unlink while holding the lock (see InstanceLock)
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        os.close(fd)
    if os.name == "nt":
        with contextlib.suppress(OSError):
            path.unlink()
    return False


def live_instances(directory: Path) -> list[dict]:
    """``{"id", "pid", "started"}`` of every instance holding a lock in ``directory``."""
    found = []
    for path in sorted(Path(directory).glob(f"*{SUFFIX}")):
        instance_id = path.name[: -len(SUFFIX)]
        if not is_alive(directory, instance_id):
            continue
        info: dict = {}
        with contextlib.suppress(OSError, ValueError), open(path, "rb") as f:
            f.seek(1)  # past the locked byte
            info = json.loads(f.read() or b"{}")
        found.append({"id": instance_id, "pid": info.get("pid"), "started": info.get("started")})
    return found
