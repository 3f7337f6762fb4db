"""The application service between the UI and the engine: the model loading in the background, and chat
conversations kept in the Store and answered by engine ChatSessions. No widgets here.

The Store is the one source of truth for a conversation; a ChatSession is only a cache (KV cache, image
embeddings, decoded images). Before every answer the session's turns are rebuilt from the stored messages of
the conversation's current path, and the session's longest-common-prefix reuse makes that cheap when nothing
changed. So regenerate, edit, delete and switching between versions only change the store (a conversation is a
tree: a regenerated answer or an edited question is a new version beside the old one, see app.store), the
session recomputes only what follows the prefix the old and new paths share, and an app restarted on the same
data directory continues a conversation exactly as the live one would have.

Every generation goes through the Scheduler, the one door to the model shared with other callers: one answer at
a time by default, the others wait in line and their streams say their place ("queued" events).

Error reporting: the streaming methods (send, regenerate, edit, edit_last) return iterators of StreamEvent and
report every problem as an "error" event (after validation problems nothing has been stored); the other
methods raise ChatError, or the subsystem's own user-facing error (PdfError, CaptureError).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from PIL import Image

from engine.chat import ASSISTANT, MIN_ANSWER_ROOM, USER, ChatSession, Turn, overflow_message
from engine.generation import SamplingParams
from engine.processing import ImageError, load_image
from engine.runtime import Runtime

from . import viewer
from .errors import ChatError
from .models import ModelManager
from .scheduler import Scheduler, Ticket
from .settings import GenerationSettings
from .store import Store, StoreError

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 100_000
MAX_IMAGE_BYTES = 50 * 1024 * 1024
NO_SUCH_CONVERSATION = "This conversation does not exist (it may have been deleted)."
# Requests one user may have queued or running at once (in different conversations), so that one user of a
# shared link cannot fill the line in front of everyone else.
MAX_REQUESTS_PER_USER = 4

ImageInput = Union[bytes, bytearray, memoryview, str, os.PathLike, Image.Image]


# ====================================================================== chat
@dataclass
class StreamEvent:
    """One step of an answer's stream, in this order: "queued"* (only when it must wait), then "started",
    "delta"*, and "done"; or it ends early with "error" (at any point) or "cancelled" (stopped while queued)."""

    kind: str  # "queued", "started", "delta", "done", "error" or "cancelled"
    conversation_id: str | None
    message_id: int | None = None  # the assistant message (None before it exists: errors, queued, cancelled)
    text: str = ""  # delta: the new piece; done: the full answer; error and cancelled: the message for the user
    stats: dict = field(default_factory=dict)  # done: prompt_tokens, reused_tokens, ttft, tokens, ...
    user_message_id: int | None = None  # queued, started, cancelled, errors after it was stored: the question
    position: int | None = None  # queued: place in line among waiting requests, 1 = next to get the model


STOPPED_IN_LINE = "Stopped before the answer started; your question is kept (Regenerate answers it)."


@dataclass
class BudgetInfo:
    limit: int  # the model's context window, in tokens
    used: int  # tokens the prompt takes, pending message included
    reserved: int  # max_new_tokens, kept free for the answer
    left: int  # tokens still free after reserving the answer
    image_tokens: int  # tokens one image costs
    images_left: int  # images that still fit beside the reserved answer
    warning: str | None  # set when the next message would be refused or its answer cut short


@dataclass
class PdfAttachment:
    images: list[Image.Image]  # rendered at the model's input size, ready to pass to send()
    pages: list[int]  # 1-based page numbers, in the same order
    message: str | None  # says which selected pages were skipped for lack of room


@dataclass
class _Entry:
    """A cached session plus what it knows about the store's attachments."""

    session: ChatSession
    keys: dict[str, str] = field(default_factory=dict)  # attachment sha256 -> session image key


class _StopEvent(threading.Event):
    """A cancel flag that stays set: ChatSession.stream clears its flag when it starts, which would lose a
    Stop pressed in the moment between storing the question and the first decode step."""

    def clear(self) -> None:
        pass


@dataclass
class _Job:
    """A conversation's request in flight: its Stop flag, and its scheduler ticket once it has joined the line."""

    cancel: threading.Event
    user: str  # who asked (app.viewer): the per-user limit counts these
    ticket: Ticket | None = None


class ChatService:
    def __init__(self, store: Store, models: ModelManager, scheduler: Scheduler | None = None, *,
                 max_sessions: int = 4, overflow: str = "error", max_text_chars: int = MAX_TEXT_CHARS,
                 flush_tokens: int = 8, flush_seconds: float = 0.5,
                 max_requests_per_user: int = MAX_REQUESTS_PER_USER):
        self.store = store
        self.models = models
        self.scheduler = scheduler or Scheduler()  # pass a shared one when other callers use the same model
        self.max_sessions = max_sessions
        self.overflow = overflow
        self.max_text_chars = max_text_chars
        self.flush_tokens = flush_tokens
        self.flush_seconds = flush_seconds
        self.max_requests_per_user = max_requests_per_user
        self._lock = threading.RLock()
        self._sessions: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._active: dict[str, _Job] = {}  # conversation id -> its queued or running request
        models.on_unload.append(self._forget_all)

    def switch_model(self, source: str, quantization: str | None = None) -> None:
        """Load another checkpoint once the answers running or waiting now are done (see ModelManager.switch)."""
        viewer.require_owner("change the model")
        self.models.switch(source, quantization, scheduler=self.scheduler)

    # ------------------------------------------------------------------ streaming operations
    def send(self, conversation_id: str | None, text: str, images: Sequence[ImageInput] = (),
             settings: GenerationSettings | dict | None = None) -> Iterator[StreamEvent]:
        """Ask a question (None: in a new conversation) and stream the answer.

        Everything is validated before anything is stored; the question and its images are stored before
        generation starts, the answer as it streams.
        """
        cancel = _StopEvent()
        claimed = False
        try:
            runtime = self.models.require()
            settings = GenerationSettings.coerce(settings)
            params, system_prompt = settings.sampling(), settings.system_prompt
            text = self._check_text(text, has_images=bool(images))
            decoded = [self._read_image(i, source) for i, source in enumerate(images or ())]
            messages, stored_prompt, waiting = [], None, None
            if conversation_id is None:
                self._check_room(viewer.current())  # before a new conversation is made for nothing
            else:
                self._claim(conversation_id, cancel)
                claimed = True
                conversation = self._conversation(conversation_id)
                messages, stored_prompt = conversation["messages"], conversation["system_prompt"]
                waiting = _waiting_images(messages)
                if waiting:
                    messages = messages[:-1]  # its images join this question (see start_from_image)
            entry = self._entry(conversation_id, runtime)
            session = entry.session
            session.system_prompt = self._system_prompt(runtime, system_prompt, stored_prompt)
            session.turns = self._turns(messages, lambda a: self._image_key(entry, a))
            if session.turns and session.turns[-1].role == USER:
                session.turns.append(Turn(ASSISTANT, ""))  # an earlier question was left without an answer
            kept = [session.images[self._image_key(entry, a)] for a in waiting["attachments"]] if waiting else []
            # Raises ContextOverflow before changing anything; see _reserve for the room kept.
            session.add_user(text, kept + [image for image, _, _ in decoded], reserve=_reserve(params))
        except (ValueError, StoreError) as e:  # ChatError, ImageError, ContextOverflow are ValueErrors
            if claimed:
                self._release(conversation_id)
            yield StreamEvent("error", conversation_id, text=str(e))
            return

        try:
            if conversation_id is None:
                conversation_id = self.store.create_conversation(model=self.models.model_name,
                                                                 system_prompt=system_prompt, owner=viewer.current())
                self._claim(conversation_id, cancel)
                claimed = True
            shas = [self.store.add_attachment(data, name=name) for _, data, name in decoded]
            if waiting:
                shas = [a["sha256"] for a in waiting["attachments"]] + shas
            user_id = self.store.add_message(conversation_id, "user", text, shas,
                                             parent_id=messages[-1]["id"] if messages else None)
            if waiting:  # after the new question holds its images, so deleting it keeps their files
                self.store.delete_message(waiting["id"])
            entry.keys.update(zip(shas, session.turns[-1].images))
            self._register(conversation_id, entry)
        except (ValueError, StoreError) as e:
            if claimed:
                self._release(conversation_id)
            yield StreamEvent("error", conversation_id, text=f"Could not save the message: {e}")
            return
        try:
            yield from self._generate(conversation_id, entry, params, system_prompt, user_id)
        finally:
            self._release(conversation_id)

    def regenerate(self, conversation_id: str, settings: GenerationSettings | dict | None = None
                   ) -> Iterator[StreamEvent]:
        """Answer the last question again. The new answer is added beside the earlier ones, which stay
        as its other versions (see select_variant)."""
        return self._redo(conversation_id, None, None, settings)

    def edit_last(self, conversation_id: str, text: str, settings: GenerationSettings | dict | None = None
                  ) -> Iterator[StreamEvent]:
        """Edit the last question (see edit)."""
        return self._redo(conversation_id, None, text, settings)

    def edit(self, conversation_id: str, message_id: int, text: str,
             settings: GenerationSettings | dict | None = None) -> Iterator[StreamEvent]:
        """Ask any question of the conversation again, changed, and answer it: a new version of that question
        (its images stay) that starts a new branch there. The old version keeps its answer and everything
        after it (see select_variant)."""
        return self._redo(conversation_id, message_id, text, settings)

    def select_variant(self, conversation_id: str, message_id: int) -> None:
        """Show another version of a message on the conversation's current path (an earlier answer, or a
        question as it was before an edit): the path then goes through it and on the way that branch was
        left. The next send, regenerate or edit continues from there."""
        self._claim(conversation_id, threading.Event())
        try:
            messages = self._conversation(conversation_id)["messages"]
            if not any(message_id in m["variant_ids"] for m in messages):
                raise ChatError(f"Message {message_id} is not a version of a message in this conversation.")
            self.store.select_message(message_id)
        finally:
            self._release(conversation_id)

    def _redo(self, conversation_id: str, message_id: int | None, new_text: str | None,
              settings: GenerationSettings | dict | None) -> Iterator[StreamEvent]:
        """Answer a question of the current path again (message_id; None: the last one), as a new version
        of its answer; with new_text, first add a new version of the question with that text."""
        cancel = _StopEvent()
        claimed = False
        try:
            runtime = self.models.require()
            settings = GenerationSettings.coerce(settings)
            params, system_prompt = settings.sampling(), settings.system_prompt
            self._claim(conversation_id, cancel)
            claimed = True
            conversation = self._conversation(conversation_id)
            messages = conversation["messages"]
            if message_id is None:
                index = next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "user"), None)
                if index is None:
                    raise ChatError("This conversation has no question to answer yet.")
            else:
                index = next((i for i, m in enumerate(messages) if m["id"] == message_id), None)
                if index is None:
                    raise ChatError(f"Message {message_id} is not in this conversation.")
                if messages[index]["role"] != "user":
                    raise ChatError("Only your own messages can be edited; Regenerate answers a question again.")
            question = messages[index]
            if new_text is not None:
                new_text = self._check_text(new_text, has_images=bool(question["attachments"]))
            entry = self._entry(conversation_id, runtime)
            session = entry.session
            session.system_prompt = self._system_prompt(runtime, system_prompt, conversation["system_prompt"])
            # The path up to this question: the session reuses its KV cache for the prefix they share.
            session.turns = self._turns(messages[:index + 1], lambda a: self._image_key(entry, a))
            # Re-fitting the question with this answer's room raises ContextOverflow before any change.
            session.edit_last_user(question["text"] if new_text is None else new_text, reserve=_reserve(params))
        except (ValueError, StoreError) as e:
            if claimed:
                self._release(conversation_id)
            yield StreamEvent("error", conversation_id, text=str(e))
            return
        try:
            user_id = question["id"]
            if new_text is not None:
                try:  # the new version is stored at once (the user sees it while waiting in line)
                    user_id = self.store.add_message(conversation_id, "user", new_text,
                                                     [a["sha256"] for a in question["attachments"]],
                                                     parent_id=question["parent_id"])
                except (ValueError, StoreError) as e:
                    yield StreamEvent("error", conversation_id, text=f"Could not save the change: {e}")
                    return
            self._register(conversation_id, entry)
            yield from self._generate(conversation_id, entry, params, system_prompt, user_id)
        finally:
            self._release(conversation_id)

    def _generate(self, conversation_id: str, entry: _Entry, params: SamplingParams, system_prompt: str | None,
                  user_id: int) -> Iterator[StreamEvent]:
        """Queue for the model, then stream the answer to the session's last turn into a new assistant message
        after the question `user_id` (the caller holds the claim).

        The question is already stored (the user sees it while waiting); the answer row is created only when the
        model is ours. So a request stopped in line, or a process killed while it waited, leaves the question
        without an answer (which the conversation handles: Regenerate answers it) and never an empty answer
        row; crash recovery only has the answers that were really streaming to mark stopped.

        A worker thread waits in line and runs the model, handing events over a queue: torch's inference mode is
        thread-local, and a UI may advance this iterator from a different thread each step. The worker also does
        all the store writes, so a slow or vanished reader cannot leave the message half-written."""
        with self._lock:
            job = self._active[conversation_id]
            # The service lock orders this with stop(): a Stop pressed earlier gives a withdrawn ticket.
            job.ticket = ticket = self.scheduler.submit(label=f"chat {conversation_id[:8]}", cancel=job.cancel)
        events: queue.SimpleQueue[StreamEvent] = queue.SimpleQueue()
        worker = threading.Thread(target=self._produce, name=f"generate-{conversation_id[:8]}",
                                  args=(conversation_id, entry, params, system_prompt, user_id, ticket,
                                        events.put), daemon=True)
        worker.start()
        try:
            while True:
                event = events.get()
                yield event
                if event.kind in ("done", "error", "cancelled"):
                    break
        finally:
            # The reader went away (tab closed): leave the line, or stop and store the answer as stopped.
            ticket.cancel()
            worker.join()

    def _produce(self, conversation_id: str, entry: _Entry, params: SamplingParams, system_prompt: str | None,
                 user_id: int, ticket: Ticket, emit: Callable[[StreamEvent], None]) -> None:
        with ticket:  # gives the model to the next in line however this ends, crash included
            for place in ticket.places():
                emit(StreamEvent("queued", conversation_id, user_message_id=user_id, position=place))
            if not ticket.running or ticket.cancel_event.is_set():  # stopped in line (or just as it got out)
                emit(StreamEvent("cancelled", conversation_id, user_message_id=user_id, text=STOPPED_IN_LINE))
                return
            try:
                record = GenerationSettings.from_sampling(params, system_prompt).to_dict()
                message_id = self.store.add_message(conversation_id, "assistant", "", status="streaming",
                                                    settings=record, model=self.models.model_name, parent_id=user_id)
            except Exception as e:  # in this thread an uncaught error would leave the reader waiting forever
                emit(StreamEvent("error", conversation_id, text=f"Could not save the answer: {e}",
                                 user_message_id=user_id))
                return
            emit(StreamEvent("started", conversation_id, message_id, user_message_id=user_id))
            self._answer(conversation_id, entry, params, message_id, ticket.cancel_event, emit)

    def _answer(self, conversation_id: str, entry: _Entry, params: SamplingParams, message_id: int,
                cancel: threading.Event, emit: Callable[[StreamEvent], None]) -> None:
        session = entry.session
        pieces: list[str] = []
        flushed_tokens, flushed_at = 0, time.monotonic()
        try:
            with contextlib.closing(session.stream(params, cancel=cancel)) as stream:
                for piece in stream:
                    pieces.append(piece)
                    emit(StreamEvent("delta", conversation_id, message_id, piece))
                    # Save the partial answer now and then, so a crash loses little.
                    tokens = session.last_stats.tokens
                    if tokens - flushed_tokens >= self.flush_tokens or \
                            time.monotonic() - flushed_at >= self.flush_seconds:
                        self.store.update_message(message_id, text="".join(pieces))
                        flushed_tokens, flushed_at = tokens, time.monotonic()
            stats = answer_timings(session)
            final = session.turns[-1].text  # exactly what the session keeps as the answer (stripped)
            status = "stopped" if stats["finish"] == "cancelled" else "complete"
            self.store.update_message(message_id, text=final, status=status, timings=stats)
            emit(StreamEvent("done", conversation_id, message_id, final, stats))
        except Exception as e:
            self._forget(conversation_id)  # its KV cache may be half-updated: rebuild it next time
            error = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            log.exception("generation failed in conversation %s", conversation_id)
            try:
                self.store.update_message(message_id, text="".join(pieces).strip(), status="failed", error=error)
            except Exception as store_error:  # the event below must still reach the reader
                log.error("could not mark message %s failed: %s", message_id, store_error)
            emit(StreamEvent("error", conversation_id, message_id, f"Generation failed: {error}"))

    def stop(self, conversation_id: str) -> bool:
        """Stop this conversation's request: one waiting in line leaves it (its stream ends with "cancelled", the
        question stays, no answer is stored); a running answer ends within one decode step and is stored as
        stopped. Returns False when nothing was queued or running."""
        with self._lock:
            job = self._active.get(conversation_id)
            if job is None or job.user != viewer.current():
                return False
            if job.ticket is not None:
                job.ticket.cancel()
            else:  # still being stored: _generate's submit sees the flag
                job.cancel.set()
        return True

    def is_generating(self, conversation_id: str) -> bool:
        """True while this conversation has a request queued or running (anything Stop would act on)."""
        with self._lock:
            job = self._active.get(conversation_id)
            return job is not None and job.user == viewer.current()

    def queue_position(self, conversation_id: str) -> int | None:
        """The conversation's place in line (1 = next to get the model); None when it is not waiting."""
        with self._lock:
            job = self._active.get(conversation_id)
            ticket = job.ticket if job and job.user == viewer.current() else None
        return ticket.position if ticket else None

    # ------------------------------------------------------------------ other operations
    def delete_turn(self, conversation_id: str, message_id: int) -> int:
        """Delete a question with its answers, or an answer alone, in all their versions (Store.delete_turn);
        the turns after it stay. Returns how many messages went."""
        self._claim(conversation_id, threading.Event())
        try:
            messages = self._conversation(conversation_id)["messages"]
            if not any(m["id"] == message_id for m in messages):
                raise ChatError(f"Message {message_id} is not in this conversation.")
            return self.store.delete_turn(message_id)
        finally:
            self._release(conversation_id)

    def delete_conversation(self, conversation_id: str) -> None:
        self._claim(conversation_id, threading.Event())
        try:
            self.store.delete_conversation(conversation_id)
            self._forget(conversation_id)
        finally:
            self._release(conversation_id)

    def budget(self, conversation_id: str | None, pending_text: str = "", pending_images: int = 0,
               max_new_tokens: int = 512) -> BudgetInfo | None:
        """Context use if the pending message were sent now; None while the model is not ready."""
        runtime = self.models.runtime
        if runtime is None or self.models.status != "ready":
            return None
        messages, stored_prompt = [], None
        if conversation_id is not None:
            conversation = self._conversation(conversation_id)
            messages, stored_prompt = conversation["messages"], conversation["system_prompt"]
        # Token counts only need a distinct key per image, not its pixels: use the attachment hashes.
        turns = self._turns(messages, lambda a: a["sha256"])
        if turns and turns[-1].role == USER:
            turns.append(Turn(ASSISTANT, ""))
        turns.append(Turn(USER, pending_text or "", [f"pending-{i}" for i in range(pending_images)]))
        scratch = ChatSession(runtime, self._system_prompt(runtime, None, stored_prompt))
        scratch.turns = turns
        b = scratch.budget(reserve=max_new_tokens)
        must_keep = min(max_new_tokens, MIN_ANSWER_ROOM)
        warning = None
        if b.used + must_keep > b.limit:
            if self.overflow == "drop_oldest" and len(turns) > 1:
                warning = "The conversation is longer than the model's context: the oldest turns will be left out."
            else:  # the very refusal send() would give
                warning = overflow_message(b.used + must_keep, b.limit, must_keep, sum(len(t.images) for t in turns),
                                           b.image_tokens, earlier_turns=len(turns) > 1)
        elif b.used + max_new_tokens > b.limit:
            warning = (f"The context window is nearly full: the answer will be cut to about {b.limit - b.used} "
                       "tokens.")
        return BudgetInfo(limit=b.limit, used=b.used, reserved=max_new_tokens, left=b.left,
                          image_tokens=b.image_tokens, images_left=b.images_left, warning=warning)

    def attach_pdf_pages(self, pdf: bytes | str | os.PathLike, selection_text: str, long_side: int | None = None, *,
                         conversation_id: str | None = None, pending_text: str = "", pending_images: int = 0,
                         max_new_tokens: int = 512, progress: Callable[[int, int], None] | None = None,
                         cancel: threading.Event | None = None) -> PdfAttachment:
        """Render the selected pages at the model's input size, as many as fit the context budget.

        Raises PdfError (bad PDF or selection, or no room at all) and RenderCancelled when `cancel` is set.
        """
        from .pdf_pages import limit_pages, open_pdf, parse_page_selection, render_pages

        runtime = self.models.require()
        long_side = long_side or runtime.config.vision.input_size
        room = self.budget(conversation_id, pending_text, pending_images, max_new_tokens)
        with open_pdf(pdf) as doc:
            selected = parse_page_selection(selection_text, doc.page_count)
            limited = limit_pages(selected, room.images_left)
            images = render_pages(doc, limited.pages, long_side, progress=progress,
                                  cancel=cancel.is_set if cancel else None)
        return PdfAttachment(images, [i + 1 for i in limited.pages], limited.message)

    def start_from_image(self, image: ImageInput, question: str | None = None,
                         settings: GenerationSettings | dict | None = None, name: str | None = None) -> str:
        """A new conversation that starts with this image (a screenshot from the hotkey); returns its id.

        With a question, it is asked at once and answered in the background (an open page follows the answer
        as it is stored). Without one, the image waits for its question: stored as a question with no text and
        no answer, which the next send() in this conversation completes (its images go with that question).
        Raises ChatError when the image is unusable or the question cannot be asked (e.g. no model yet).
        """
        if question and question.strip():
            return self._ask_in_background(image, question, settings)
        _, data, stored_name = self._read_image(0, image)
        conversation_id = self.store.create_conversation(model=self.models.model_name, owner=viewer.current())
        sha = self.store.add_attachment(data, name=name or stored_name)
        self.store.add_message(conversation_id, "user", "", [sha], parent_id=None)
        return conversation_id

    def _ask_in_background(self, image: ImageInput, question: str, settings) -> str:
        """send() in a thread of its own; returns the conversation's id once the question is stored."""
        first: queue.Queue[StreamEvent] = queue.Queue()
        user = viewer.current()

        def run() -> None:
            with viewer.acting_as(user):  # a new thread starts without the asking user's context
                ask()

        def ask() -> None:
            told = False
            for event in self.send(None, question, [image], settings):
                if not told and (event.kind == "error" or event.conversation_id):
                    first.put(event)
                    told = True
            if not told:
                first.put(StreamEvent("error", None, text="The question was not stored."))

        threading.Thread(target=run, name="ask-about-image", daemon=True).start()
        event = first.get()
        if event.conversation_id is None:
            raise ChatError(event.text)
        return event.conversation_id

    def capture_screen(self, monitor: int = 1) -> bytes:
        """A screenshot as PNG bytes, ready to pass to send(); raises CaptureError (e.g. headless)."""
        from .screen_capture import capture_png

        return capture_png(monitor)

    # ------------------------------------------------------------------ helpers
    def _check_text(self, text: Any, has_images: bool) -> str:
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise ChatError("The message must be text.")
        text = text.strip()
        if not text and not has_images:
            raise ChatError("Type a message or attach an image first.")
        if len(text) > self.max_text_chars:
            raise ChatError(f"The message is {len(text):,} characters long; the limit is {self.max_text_chars:,}. "
                            "Shorten it, or attach long documents as PDF pages.")
        return text

    def check_image(self, source: ImageInput, index: int = 0) -> None:
        """Raise ChatError saying why this image cannot be sent (checked when it is attached, not only at send)."""
        self._read_image(index, source)

    @staticmethod
    def _read_image(index: int, source: ImageInput) -> tuple[Image.Image, bytes, str | None]:
        """(decoded RGB image, bytes to store, file name); ChatError naming the image when it is unusable."""
        label, name = f"Image {index + 1}", None
        try:
            if isinstance(source, Image.Image):
                image = load_image(source)
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")  # lossless: the stored file decodes to these very pixels
                return image, buffer.getvalue(), None
            if isinstance(source, (str, os.PathLike)):
                path = Path(source)
                name = path.name
                label = f"Image {index + 1} ({name})"
                try:
                    if path.stat().st_size > MAX_IMAGE_BYTES:
                        raise ChatError(f"{label} is larger than {MAX_IMAGE_BYTES // 2**20} MB.")
                    data = path.read_bytes()
                except OSError as e:
                    raise ChatError(f"{label} cannot be read: {e.strerror or e}.") from None
            elif isinstance(source, (bytes, bytearray, memoryview)):
                data = bytes(source)
                if len(data) > MAX_IMAGE_BYTES:
                    raise ChatError(f"{label} is larger than {MAX_IMAGE_BYTES // 2**20} MB.")
            else:
                raise ChatError(f"{label}: cannot attach a {type(source).__name__}; "
                                "pass image bytes, a file path or a PIL image.")
            return load_image(data), data, name
        except ImageError as e:
            raise ChatError(f"{label}: {e}") from None

    def _conversation(self, conversation_id: str) -> dict:
        try:
            conversation = self.store.get_conversation(conversation_id)
        except StoreError:
            raise ChatError(NO_SUCH_CONVERSATION) from None
        if conversation["owner"] != viewer.current():  # answered as one that does not exist
            raise ChatError(NO_SUCH_CONVERSATION)
        return conversation

    def _check_mine(self, conversation_id: str) -> None:
        """Another user's conversation is answered as one that does not exist: its id tells nothing."""
        if self.store.conversation_owner(conversation_id) != viewer.current():
            raise ChatError(NO_SUCH_CONVERSATION)

    @staticmethod
    def _system_prompt(runtime: Runtime, from_settings: str | None, stored: str | None) -> str:
        return from_settings or stored or runtime.processor.system_prompt

    @staticmethod
    def _turns(messages: Sequence[dict], key: Callable[[dict], str]) -> list[Turn]:
        """Stored messages -> alternating turns; `key(attachment)` gives each image's key."""
        turns: list[Turn] = []
        for m in messages:
            role = USER if m["role"] == "user" else ASSISTANT
            if role == ASSISTANT and (not turns or turns[-1].role == ASSISTANT):
                continue  # an answer whose question was deleted answers nothing
            if role == USER and turns and turns[-1].role == USER:
                turns.append(Turn(ASSISTANT, ""))  # a question whose answer was deleted or never stored
            turns.append(Turn(role, m["text"], [key(a) for a in m["attachments"]]))
        return turns

    @staticmethod
    def _image_key(entry: _Entry, attachment: dict) -> str:
        """The session's key for a stored image, decoding the file only the first time."""
        sha = attachment["sha256"]
        if sha not in entry.keys:
            try:
                entry.keys[sha] = entry.session.add_image(Path(attachment["path"]))
            except ImageError as e:
                name = attachment.get("name") or sha[:12]
                raise ChatError(f"A stored image of this conversation ({name}) cannot be used: {e}") from None
        return entry.keys[sha]

    def _entry(self, conversation_id: str | None, runtime: Runtime) -> _Entry:
        with self._lock:
            entry = self._sessions.get(conversation_id) if conversation_id else None
            if entry is not None and entry.session.runtime is runtime:
                self._sessions.move_to_end(conversation_id)
                return entry
        # New conversation, evicted session, or another model loaded since.
        return _Entry(ChatSession(runtime, overflow=self.overflow))

    def _register(self, conversation_id: str, entry: _Entry) -> None:
        with self._lock:
            self._sessions[conversation_id] = entry
            self._sessions.move_to_end(conversation_id)
            # Evict least recently used sessions (their KV caches hold memory), never one that is generating.
            for victim in [c for c in self._sessions if c not in self._active]:
                if len(self._sessions) <= self.max_sessions:
                    break
                del self._sessions[victim]

    def _forget_all(self) -> None:
        with self._lock:
            self._sessions.clear()

    def _forget(self, conversation_id: str) -> None:
        with self._lock:
            self._sessions.pop(conversation_id, None)

    def _claim(self, conversation_id: str, cancel: threading.Event) -> None:
        """One request per conversation at a time (the scheduler orders requests, not turns of one chat), and
        at most max_requests_per_user per user; only in the asking user's own conversations."""
        self._check_mine(conversation_id)
        user = viewer.current()
        with self._lock:
            if conversation_id in self._active:
                raise ChatError("An answer is still being generated (or waiting its turn) in this conversation; "
                                "stop it first.")
            self._check_room(user)
            self._active[conversation_id] = _Job(cancel, user)

    def _check_room(self, user: str) -> None:
        with self._lock:  # reentrant use from _claim is fine: an RLock
            if sum(job.user == user for job in self._active.values()) >= self.max_requests_per_user:
                raise ChatError(f"You already have {self.max_requests_per_user} questions being answered or "
                                "waiting in line; wait for one to finish (or stop one) before asking more.")

    def _release(self, conversation_id: str) -> None:
        with self._lock:
            self._active.pop(conversation_id, None)


def _waiting_images(messages: Sequence[dict]) -> dict | None:
    """The last message when it is images waiting for their question (see start_from_image), else None."""
    last = messages[-1] if messages else None
    if last and last["role"] == "user" and not last["text"].strip() and last["attachments"]:
        return last
    return None


def _reserve(params: SamplingParams) -> int:
    """Room a question must leave to be accepted. Not all of max_new_tokens: the session caps a long answer
    to the window, so only a question that leaves no room for even a short answer is refused."""
    return min(params.max_new_tokens, MIN_ANSWER_ROOM)


def answer_timings(session: ChatSession) -> dict:
    """The record of the session's last answer stored with it (speed, token counts, backend)."""
    s = session.last_stats
    return {"prompt_tokens": s.prompt_tokens, "reused_tokens": s.reused_tokens, "new_images": s.new_images,
            "ttft": round(s.ttft, 4), "tokens": s.tokens, "tokens_per_second": round(s.tokens_per_second, 2),
            "finish": s.finish, "backend": session.runtime.backend()}
