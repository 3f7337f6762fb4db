"""Who the services act for: the signed-in user of the request being handled.

Every conversation belongs to one user (the store's ``owner`` column). The services ask :func:`current` who is
asking and show, change and delete only that user's conversations; training and model switching are for the
local owner only (:func:`require_owner`).

Who is asking comes from, in order: an explicit :func:`acting_as` (the API acts for its key's user); the front
end's resolver (:func:`resolve_with`: the web UI reads the user of the event it is handling, which the sign-in
gate put on the request); else the local owner — the person running the app, as for the hotkey, the command
line and the tests. A front end that cannot tell returns ``NOBODY``, who owns nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from .errors import ChatError
from .store.db import LOCAL_OWNER

OWNER = LOCAL_OWNER
NOBODY = "@nobody"  # a request without a user: owns nothing, sees nothing (not a valid account name either)

_acting: ContextVar[str | None] = ContextVar("dsvl_viewer", default=None)
_resolver: Callable[[], str | None] | None = None


class NotAllowed(ChatError):
    """The signed-in user may not do this (worded for them)."""


def resolve_with(resolver: Callable[[], str | None] | None) -> None:
    """Set how the front end finds the user of the request in hand (None from the resolver: no request)."""
    global _resolver
    _resolver = resolver


def current() -> str:
    user = _acting.get()
    if user is None and _resolver is not None:
        user = _resolver()
    return OWNER if user is None else user


def is_owner() -> bool:
    return current() == OWNER


def require_owner(action: str) -> None:
    if not is_owner():
        raise NotAllowed(f"Only the owner of this app can {action}.")


@contextlib.contextmanager
def acting_as(user: str) -> Iterator[None]:
    token = _acting.set(user)
    try:
        yield
    finally:
        _acting.reset(token)
