"""`run_app.py --api-save`: the API's conversations kept in the app's history, where the chat shows them.

The API key is the local owner's, so its conversations are the owner's, like the chat's own. An OpenAI client
resends the whole conversation each turn; a request whose messages continue a conversation saved here (its
stored messages, current path, are a prefix of the request's, and the system prompt is the same) adds its new
messages and the answer to that conversation, anything else starts a new one. Which conversations the API
saved is remembered in memory only, per key, so after a restart a continued conversation is saved anew.

Only answered requests are saved, once the answer is complete: a request refused, stopped or failed leaves the
history as it was.
"""

from __future__ import annotations

import threading

from engine.chat import ASSISTANT, USER

from .store import Store, StoreError
from .viewer import OWNER

REMEMBERED = 32  # conversations per key that a request may continue: those most recently saved


class ApiHistory:
    def __init__(self, store: Store):
        self.store = store
        self._lock = threading.Lock()  # one save at a time: a request continues what the one before stored
        self._saved: dict[str, list[str]] = {}  # API key's owner -> conversation ids, most recent last

    def save(self, owner: str, system_prompt: str | None, turns: list, images: dict[str, bytes], answer: str, *,
             model: str | None, settings: dict, timings: dict) -> str:
        """Store a request's turns (api.TurnSpec: role, text, image sha256s) not stored yet and its answer;
        returns the conversation's id."""
        with self._lock:
            conversation_id, parent_id, stored = self._continued(owner, system_prompt, turns)
            if conversation_id is None:
                conversation_id = self._create(model, system_prompt or None)
            for role, text, shas in turns[stored:]:
                # As the chat stores an image: the bytes as sent, so the sha256 is the request's.
                attachments = [self.store.add_attachment(images[sha]) for sha in shas]
                parent_id = self.store.add_message(conversation_id, "user" if role == USER else "assistant", text,
                                                   attachments, parent_id=parent_id)
            message_id = self.store.add_message(conversation_id, "assistant", answer, settings=settings, model=model,
                                                parent_id=parent_id)
            self.store.update_message(message_id, timings=timings)
            saved = [c for c in self._saved.get(owner, []) if c != conversation_id] + [conversation_id]
            self._saved[owner] = saved[-REMEMBERED:]
            return conversation_id

    def _create(self, model: str | None, system_prompt: str | None) -> str:
        """A new conversation; the one place the API creates one. The API key is the local owner's (app.viewer)."""
        return self.store.create_conversation(model=model, system_prompt=system_prompt, owner=OWNER)

    def _continued(self, owner: str, system_prompt: str | None, turns: list) -> tuple[str | None, int | None, int]:
        """(conversation id, its last message's id, how many of `turns` it holds) for the saved conversation
        that `turns` continues the furthest; (None, None, 0) when none does."""
        best: tuple[str | None, int | None, int] = (None, None, 0)
        for conversation_id in self._saved.get(owner, []):
            try:
                conversation = self.store.get_conversation(conversation_id)
            except StoreError:  # deleted since
                continue
            messages = conversation["messages"]
            spec = [(USER if m["role"] == "user" else ASSISTANT, m["text"],
                     tuple(a["sha256"] for a in m["attachments"])) for m in messages]
            if (conversation["system_prompt"] or None) == (system_prompt or None) and best[2] < len(spec) < len(turns) \
                    and turns[:len(spec)] == spec:
                best = (conversation_id, messages[-1]["id"], len(spec))
        return best
