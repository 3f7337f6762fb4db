"""The Scheduler on its own: FIFO places, updates as places change, cancel, release on crash, several slots.
(ChatService's use of it, on the demo model, is in test_chat_service.py.)"""

import queue
import threading

import pytest

from app.scheduler import Scheduler


def watch(ticket) -> queue.Queue:
    """Iterate ticket.places() in a thread; each place, then None at the end, arrives on the returned queue."""
    places: queue.Queue = queue.Queue()

    def follow():
        for place in ticket.places():
            places.put(place)
        places.put(None)

    threading.Thread(target=follow, daemon=True).start()
    return places


def test_one_at_a_time_in_fifo_order():
    scheduler = Scheduler()
    first = scheduler.submit("ada", "first")
    second, third = scheduler.submit("bob", "second"), scheduler.submit("ada", "third")
    assert first.running and first.position is None and first.wait(0)
    assert (second.state, second.position, third.position) == ("waiting", 1, 2)
    assert not second.wait(0)  # no timeout passes while it is still in line
    assert (scheduler.running, scheduler.waiting) == (1, 2)
    first.release()
    assert first.state == "finished" and second.running and third.position == 1
    second.release()
    assert third.running and (scheduler.running, scheduler.waiting) == (1, 0)
    third.release()
    assert scheduler.running == 0


def test_places_are_reported_as_they_change():
    scheduler = Scheduler()
    running = scheduler.submit(label="running")
    ahead = scheduler.submit(label="ahead")
    ticket = scheduler.submit(label="watched")
    places = watch(ticket)
    assert places.get(timeout=10) == 2
    ahead.cancel()  # leaving the line moves everyone behind up
    assert places.get(timeout=10) == 1
    running.release()
    assert places.get(timeout=10) is None and ticket.running  # the iterator ends when the ticket runs
    assert not running.cancel_event.is_set()


def test_a_free_model_reports_no_place():
    ticket = Scheduler().submit()
    assert list(ticket.places()) == [] and ticket.running


def test_cancel_in_line_leaves_it_without_touching_the_running_one():
    scheduler = Scheduler()
    running, waiting = scheduler.submit(), scheduler.submit()
    places = watch(waiting)
    assert places.get(timeout=10) == 1
    waiting.cancel()
    assert places.get(timeout=10) is None
    assert waiting.state == "withdrawn" and not waiting.wait(0)
    assert running.running and not running.cancel_event.is_set() and scheduler.waiting == 0
    running.release()
    assert waiting.state == "withdrawn"  # a withdrawn ticket is never admitted later


def test_cancel_while_running_signals_and_keeps_the_slot_until_release():
    scheduler = Scheduler()
    running, waiting = scheduler.submit(), scheduler.submit()
    running.cancel()
    assert running.cancel_event.is_set() and running.running and waiting.position == 1
    running.release()
    assert waiting.running


def test_a_crash_inside_the_block_frees_the_model():
    scheduler = Scheduler()
    first, second = scheduler.submit(), scheduler.submit()
    with pytest.raises(RuntimeError, match="boom"):
        with first:
            raise RuntimeError("boom")
    assert first.state == "finished" and second.running


def test_release_twice_frees_only_its_own_slot():
    scheduler = Scheduler()
    first, second, third = scheduler.submit(), scheduler.submit(), scheduler.submit()
    first.release()
    first.release()
    assert second.running and third.position == 1


def test_a_stop_pressed_before_submitting_gives_a_withdrawn_ticket():
    scheduler = Scheduler()
    stop = threading.Event()
    stop.set()
    ticket = scheduler.submit(cancel=stop)
    assert ticket.state == "withdrawn" and ticket.cancel_event is stop
    assert (scheduler.running, scheduler.waiting) == (0, 0) and list(ticket.places()) == []


def test_several_slots_run_that_many_at_once():
    scheduler = Scheduler(slots=2)
    a, b, c = scheduler.submit(), scheduler.submit(), scheduler.submit()
    assert a.running and b.running and c.position == 1
    b.release()
    assert c.running and scheduler.running == 2


def test_a_waiter_blocked_in_wait_gets_the_model():
    scheduler = Scheduler()
    running, waiting = scheduler.submit(), scheduler.submit()
    result: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: result.put(waiting.wait()), daemon=True).start()
    running.release()
    assert result.get(timeout=10) is True


@pytest.mark.parametrize("slots", [0, -1, 1.5, True, "2"])
def test_bad_slot_counts_are_refused(slots):
    with pytest.raises(ValueError, match="slots must be a whole number"):
        Scheduler(slots)
