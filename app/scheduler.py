"""The one door to a loaded model: generations take turns in a FIFO line across every conversation and caller.

Two answers decoded at once on the same CPU cores both slow down, so by default one runs at a time (`slots=1`);
a GPU with room for more can take several. Whoever must wait learns their place in line and is told again as it
changes.

    ticket = scheduler.submit(owner="ada", label="chat 1f2e…", cancel=stop_flag)
    with ticket:                      # leaves the line, or frees the model, however the block ends
        for place in ticket.places():  # 1 = next; only while waiting
            show(f"{place} in line")
        if ticket.running:
            generate(cancel=ticket.cancel_event)

A place is counted among waiting requests only: 1 is next to get the model, whatever is running now.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator

WAITING, RUNNING, FINISHED, WITHDRAWN = "waiting", "running", "finished", "withdrawn"


class Ticket:
    """One request's claim on the model: waiting in line, then running, then finished (or withdrawn unrun)."""

    def __init__(self, scheduler: "Scheduler", owner: str | None, label: str, cancel_event: threading.Event):
        self.owner = owner  # who asked (a user, an API key): for per-owner limits and listings
        self.label = label  # what it is, for logs and listings
        self.cancel_event = cancel_event  # set when a running request must stop; pass it to the model
        self._scheduler = scheduler
        self._state = WAITING

    @property
    def state(self) -> str:
        """"waiting", "running", "finished" (ran and was released) or "withdrawn" (left the line unrun)."""
        return self._state

    @property
    def running(self) -> bool:
        return self._state == RUNNING

    @property
    def position(self) -> int | None:
        """Place in line, 1 = next; None once it is no longer waiting."""
        return self._scheduler._position(self)

    def places(self) -> Iterator[int]:
        """Yield the place in line now and whenever it changes; end once the ticket runs or is withdrawn.
        Yields nothing when the model was free at once."""
        last = 0  # no place yet (places start at 1; None means the wait is over)
        while True:
            with self._scheduler._changed:
                self._scheduler._changed.wait_for(lambda: self._position_or_end() != last)
                place = self._position_or_end()
            if place is None:
                return
            last = place
            yield place

    def _position_or_end(self) -> int | None:
        return self._scheduler._position(self) if self._state == WAITING else None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the ticket runs (True), or it is withdrawn or the timeout passes (False)."""
        with self._scheduler._changed:
            self._scheduler._changed.wait_for(lambda: self._state != WAITING, timeout)
            return self._state == RUNNING

    def cancel(self) -> None:
        """Stop: a waiting request leaves the line; a running one has its cancel_event set (its generation
        ends within a step and then releases the ticket)."""
        self._scheduler._cancel(self)

    def release(self) -> None:
        """Done with the model: frees the slot (or leaves the line). Safe to call more than once."""
        self._scheduler._release(self)

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Ticket({self.label!r}, owner={self.owner!r}, {self._state})"


class Scheduler:
    """FIFO admission to one loaded model, `slots` generations at a time."""

    def __init__(self, slots: int = 1):
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be a whole number ≥ 1, got {slots!r}")
        self.slots = slots
        self._changed = threading.Condition()  # guards the two collections; notified on every change
        self._waiting: deque[Ticket] = deque()
        self._running: list[Ticket] = []

    def submit(self, owner: str | None = None, label: str = "", cancel: threading.Event | None = None) -> Ticket:
        """Join the line; the ticket runs at once when a slot is free. A `cancel` flag already set (Stop pressed
        before the request got here) gives a withdrawn ticket."""
        ticket = Ticket(self, owner, label, cancel or threading.Event())
        with self._changed:
            # Per-owner limits on waiting requests belong here: count self._waiting by owner, refuse past it.
            if ticket.cancel_event.is_set():
                ticket._state = WITHDRAWN
                return ticket
            self._waiting.append(ticket)
            self._admit()
        return ticket

    @property
    def running(self) -> int:
        """How many generations hold a slot now."""
        with self._changed:
            return len(self._running)

    @property
    def waiting(self) -> int:
        """How many requests are in line."""
        with self._changed:
            return len(self._waiting)

    # ------------------------------------------------------------------ called by tickets
    def _admit(self) -> None:
        """Hand free slots to the head of the line and wake everyone (places may have moved). Lock held."""
        while self._waiting and len(self._running) < self.slots:
            ticket = self._waiting.popleft()
            ticket._state = RUNNING
            self._running.append(ticket)
        self._changed.notify_all()

    def _position(self, ticket: Ticket) -> int | None:
        with self._changed:
            try:
                return self._waiting.index(ticket) + 1
            except ValueError:
                return None

    def _cancel(self, ticket: Ticket) -> None:
        with self._changed:
            ticket.cancel_event.set()  # also covers the moment between being admitted and starting
            if ticket._state == WAITING:
                self._withdraw(ticket)

    def _release(self, ticket: Ticket) -> None:
        with self._changed:
            if ticket._state == WAITING:
                self._withdraw(ticket)
            elif ticket._state == RUNNING:
                self._running.remove(ticket)
                ticket._state = FINISHED
                self._admit()

    def _withdraw(self, ticket: Ticket) -> None:
        self._waiting.remove(ticket)
        ticket._state = WITHDRAWN
        self._admit()  # the ones behind it move up
