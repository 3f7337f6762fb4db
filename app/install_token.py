"""The per-install secret, and the checks for endpoints only this machine's user may call.

The token lives in the data directory, readable by its owner only (0600), so another local user cannot read it
and a web page cannot know it: a caller that presents it is a program the user runs. Local helpers (the hotkey
listener) read it from the file; the server compares with `matches`, in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import stat
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

TOKEN_FILE = "install-token"
TOKEN_PARAM = "token"  # the query parameter of a page address that carries the token (app.gate)


class TokenError(RuntimeError):
    """The token file cannot be made or read; the message is worded for the user."""


def token_path(data_dir: Path | str) -> Path:
    return Path(data_dir) / TOKEN_FILE


def load_or_create(data_dir: Path | str) -> str:
    """The install's token, made on first use (0600, created atomically so two starts agree on one token)."""
    path = token_path(data_dir)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read(data_dir)
    except OSError as e:
        raise TokenError(f"cannot create the install token {path}: {e.strerror or e}") from None
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def read(data_dir: Path | str) -> str:
    """The existing token. A file that others can read is made private again first: the token is only a
    secret while no one else can read it (a copy restored from a backup may have lost its mode)."""
    path = token_path(data_dir)
    try:
        if os.name == "posix" and stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
        token = path.read_text().strip()
    except FileNotFoundError:
        raise TokenError(f"no install token at {path}: start the app once on this data folder") from None
    except OSError as e:
        raise TokenError(f"cannot read the install token {path}: {e.strerror or e}") from None
    if not token:
        raise TokenError(f"the install token file {path} is empty: delete it and start the app again")
    return token


def matches(presented: str | None, expected: str) -> bool:
    """Constant-time comparison, so the time a refusal takes tells nothing about the token."""
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    scheme, _, value = (authorization or "").partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for anything else, names included."""
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def with_token(url: str, token: str) -> str:
    """A page address that signs its opener in as the owner (the tab opened at start, the hotkey's page)."""
    parts = urlsplit(url)
    query = urlencode([*parse_qsl(parts.query), (TOKEN_PARAM, token)])
    return urlunsplit(parts._replace(query=query))
