"""Accounts for a server that others can reach (`--auth USER:PASS`, `--auth-file FILE`, or a generated password
for `--share`): names with scrypt-hashed passwords, and the limit on failed logins.

Passwords are hashed as soon as they are read and never kept (a salted scrypt digest per account). The first
account is the app's owner (app.viewer.OWNER: the Training tab, model switching, and the conversations made
without a login on this machine); every other account is a user with a history of their own.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from .viewer import OWNER

# Letters, digits and . _ - : no colon (USER:PASS), and never the store's special owners ("@owner", "@nobody").
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
GENERATED_USER = "owner"
# scrypt cost: about 50 ms and 16 MiB per check on one core; slow enough to make guessing expensive.
SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}


class AccountsError(ValueError):
    """A bad --auth value or --auth-file line; the message says which and why."""


def check_name(name: str, where: str = "") -> str:
    if not NAME_RE.fullmatch(name):
        raise AccountsError(f"{where}{name!r} is not a valid user name: use 1-64 letters, digits, '.', '_' or '-', "
                            "starting with a letter or digit")
    return name


def parse_pair(text: str, where: str = "") -> tuple[str, str]:
    """'user:password' -> (user, password); split at the first colon, so a password may contain colons."""
    user, sep, password = text.partition(":")
    if not sep or not password or not user.strip():
        raise AccountsError(f"{where}expected USER:PASS with a non-empty user name and password")
    return check_name(user.strip(), where), password


def read_auth_file(path: Path) -> list[tuple[str, str]]:
    """`user:password` lines; blank lines and lines starting with # are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AccountsError(f"cannot read the auth file {path}: {e}") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            pairs.append(parse_pair(line, f"{path}, line {number}: "))
    if not pairs:
        raise AccountsError(f"the auth file {path} has no 'user:password' line")
    return pairs


def generate_password() -> str:
    return secrets.token_urlsafe(12)


@dataclass(frozen=True)
class _Account:
    name: str
    salt: bytes
    digest: bytes


def _digest(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, maxmem=64 * 1024 * 1024, **SCRYPT)


class Accounts:
    def __init__(self, pairs: list[tuple[str, str]]):
        """(name, password) pairs, the owner first. A name given twice is an error (which password is meant?)."""
        if not pairs:
            raise AccountsError("no accounts given")
        self._accounts: dict[str, _Account] = {}
        for name, password in pairs:
            if name in self._accounts:
                raise AccountsError(f"the user name {name!r} is given twice")
            salt = secrets.token_bytes(16)
            self._accounts[name] = _Account(name, salt, _digest(password, salt))
        self.owner_name = pairs[0][0]
        self._dummy = _Account("", secrets.token_bytes(16), b"\0" * SCRYPT["dklen"])

    def check(self, name: str, password: str) -> str | None:
        """The signed-in user (OWNER for the first account, else the name), or None when the name or password
        is wrong. An unknown name costs the same scrypt as a known one, so timing tells nothing."""
        account = self._accounts.get(name)
        candidate = _digest(password, (account or self._dummy).salt)
        if account is None or not hmac.compare_digest(candidate, account.digest):
            return None
        return self.user_of(name)

    def has(self, user: str) -> bool:
        """Whether this signed-in user (OWNER or a name) is still an account."""
        return user == OWNER or (user in self._accounts and user != self.owner_name)

    def user_of(self, name: str) -> str:
        return OWNER if name == self.owner_name else name

    def display_name(self, user: str) -> str:
        return self.owner_name if user == OWNER else user


class LoginLimiter:
    """At most `per_name` failed logins per user name, and `overall` in all, within `window` seconds; past that,
    logins are refused until the oldest failure leaves the window. Counting by name and overall rather than by
    address: behind the share link every visitor comes from the tunnel's one address."""

    def __init__(self, per_name: int = 5, overall: int = 30, window: float = 15 * 60, clock=time.monotonic):
        self.per_name, self.overall, self.window, self.clock = per_name, overall, window, clock
        self._failures: deque[tuple[float, str]] = deque()
        self._lock = threading.Lock()

    def wait(self, name: str) -> float:
        """Seconds until `name` may try again (0: now)."""
        with self._lock:
            now = self.clock()
            while self._failures and self._failures[0][0] <= now - self.window:
                self._failures.popleft()
            mine = [t for t, n in self._failures if n == name]
            waits = []
            if len(mine) >= self.per_name:
                waits.append(mine[-self.per_name] + self.window - now)
            if len(self._failures) >= self.overall:
                waits.append(self._failures[-self.overall][0] + self.window - now)
            return max(waits, default=0.0)

    def failed(self, name: str) -> None:
        with self._lock:
            self._failures.append((self.clock(), name))
