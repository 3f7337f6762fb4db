"""Conversation history: a SQLite file (through sqlite-utils) plus attachment files.

Layout of the data directory::

    history.db                    conversations, messages, attachment metadata,
                                  FTS index, the user's saved settings
    attachments/ab/abcdef….png    each distinct attachment once, named by its sha256
    instances/<id>.lock           one per open Store, locked while it is open (instances.py)
    tmp/<id>/                     that instance's scratch files (app.scratch), not the store's

One module per concern, each a part of :class:`Store`:

    db.py             the connection, transactions, migrations (m001_..., applied once each)
    attachments.py    content-addressed files and their garbage collection
    conversations.py  conversations and messages: a tree (versions of answers and questions), its current path
    search.py         full-text search
    export.py         JSON and Markdown export, checked import
    preferences.py    the user's defaults (get_setting / set_setting)
    runs.py           training runs started from the app
    instances.py      which instances have the directory open (locks that die with their process)
"""

from __future__ import annotations

from .conversations import PATH_END
from .db import BUSY_TIMEOUT_S, MIGRATIONS, ROLES, STATUSES, StoreError
from .export import EXPORT_FORMAT, EXPORT_VERSION, Export
from .preferences import Preferences
from .runs import Runs
from .search import Search, fts_query

__all__ = [
    "BUSY_TIMEOUT_S", "EXPORT_FORMAT", "EXPORT_VERSION", "MIGRATIONS", "PATH_END", "ROLES", "STATUSES",
    "Store", "StoreError", "fts_query",
]


class Store(Export, Search, Preferences, Runs):
    """Conversations, messages and attachments under ``data_dir``.

    Safe to share between threads; several processes may open the same
    directory at once. Export builds on Conversations, which builds on
    Attachments; all parts share one Database (connection and transactions).
    """
