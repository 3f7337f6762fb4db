"""An OpenAI-compatible API on the app's own server: `GET /v1/models` and `POST /v1/chat/completions`.

No serving engine runs DeepSeek-VL v1, so this is how other clients (the `openai` package, Open WebUI, editors)
reach the model. Requests are checked here and turned into engine calls; they take their place in the app's
Scheduler like the UI's answers (same model, same line).

Prefix reuse: an OpenAI client resends the whole conversation every turn. A small pool of ChatSessions per API
key keeps their KV caches; each request takes the session whose turns share the longest prefix with it, and
the session computes only what follows the tokens it already holds. A request that shares nothing gets a fresh
session (the least recently used one is dropped past the pool's size), so two clients talking at once do not
evict each other's caches.

What differs from OpenAI, on purpose:
- an unset `temperature` (and `top_p`) means the app's defaults (greedy), as in the UI; an unset `max_tokens`
  means the rest of the context window;
- images of a message go before its text (the model's prompt format has no place for them in between);
- `image_url` takes `data:` URIs; web addresses only with run_app.py --allow-remote-images (app.remote_images
  fetches them, from public addresses only), else a clear 400 says how to allow them;
- `n` must be 1; `tools` and `logprobs` are refused; other unknown fields are ignored, as clients send many.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from engine.chat import ASSISTANT, MIN_ANSWER_ROOM, USER, ChatSession, ContextOverflow, Turn
from engine.generation import SamplingParams
from engine.processing import ImageError
from engine.runtime import Runtime

from .api_history import ApiHistory
from .chat_service import MAX_TEXT_CHARS, answer_timings
from .errors import ChatError
from .models import ModelManager
from .remote_images import RemoteImageError, fetch_image
from .scheduler import Scheduler, Ticket
from .settings import GenerationSettings

log = logging.getLogger(__name__)

API_PREFIX = "/v1/"  # every route below starts with it (the sign-in gate leaves these to the key check)
MAX_BODY_BYTES = 32 * 2**20  # a few large images in base64
MAX_STOP_STRINGS = 4  # as OpenAI
DEMO_MODEL_ID = "deepseek-vl-demo"
OWNED_BY = "deepseek-vl-local"

TurnSpec = tuple[str, str, tuple[str, ...]]  # role, text, sha256 of each image's data


def generate_api_key() -> str:
    return "sk-dsvl-" + secrets.token_urlsafe(24)


def model_id(models: ModelManager) -> str:
    """The name clients give as `model`: the hub id, or the checkpoint folder's name."""
    if models.is_demo:
        return DEMO_MODEL_ID
    text = str(models.source)
    return text if text.count("/") == 1 and not Path(text).exists() else Path(text).name


# ====================================================================== errors
class ApiError(Exception):
    """A request refused, answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# ====================================================================== request parsing
@dataclass
class ChatRequest:
    """A checked /v1/chat/completions body."""

    model: str
    system_prompt: str | None  # None: the model's own
    turns: list[TurnSpec]  # alternating, user first and last
    images: dict[str, bytes]  # sha256 -> image data, for every image in `turns`
    image_labels: dict[str, str]  # sha256 -> "image 2 of message 3", for error messages
    temperature: float
    top_p: float
    max_tokens: int | None  # None: the rest of the context window
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool


def parse_json(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(f"The request body is not valid JSON: {e}.") from None
    if not isinstance(data, dict):
        raise _bad(f"The request body must be a JSON object, got {type(data).__name__}.")
    return data


def parse_chat_request(data: dict, fetch: Callable[[str], bytes] | None = None) -> ChatRequest:
    """Check a /v1/chat/completions body (the model name is checked by the caller). Raises ApiError (400).
    `fetch` gets the bytes of an http(s) image address (None: such addresses are refused)."""
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("`model` is required: the name of the model (GET /v1/models lists it).", "model")
    n = data.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise _bad(f"`n` must be 1: this server gives one answer per request (got {n!r}).", "n")
    if data.get("tools"):
        raise _bad("Tools (function calling) are not supported by this model.", "tools")
    if data.get("logprobs"):
        raise _bad("`logprobs` is not supported by this server.", "logprobs")
    stream = data.get("stream") or False
    if not isinstance(stream, bool):
        raise _bad("`stream` must be true or false.", "stream")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("`stream_options` must be an object.", "stream_options")

    defaults = GenerationSettings()
    temperature = _number(data, "temperature", defaults.temperature, 0.0, 2.0)
    top_p = _number(data, "top_p", defaults.top_p, 0.0, 1.0)
    if top_p == 0:
        raise _bad("`top_p` must be greater than 0.", "top_p")
    max_name = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = data.get(max_name)
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise _bad(f"`{max_name}` must be a whole number ≥ 1, got {max_tokens!r}.", max_name)
    seed = data.get("seed")
    if seed is not None and not _is_int(seed):
        raise _bad(f"`seed` must be a whole number, got {seed!r}.", "seed")
    stop = data.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise _bad(f"`stop` must be a string or a list of at most {MAX_STOP_STRINGS} strings.", "stop")

    system_prompt, turns, images, labels = _parse_messages(data.get("messages"), fetch)
    return ChatRequest(model=model, system_prompt=system_prompt, turns=turns, images=images, image_labels=labels,
                       temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                       seed=None if seed is None else seed % 2**63, stop=[s for s in stop if s], stream=stream,
                       include_usage=bool(options.get("include_usage")))


def _parse_messages(messages: Any, fetch: Callable[[str], bytes] | None
                    ) -> tuple[str | None, list[TurnSpec], dict[str, bytes], dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise _bad("`messages` must be a non-empty list of messages.", "messages")
    system: list[str] = []
    turns: list[list] = []  # [role, [texts], [shas]]; consecutive messages of one role are merged
    images: dict[str, bytes] = {}
    labels: dict[str, str] = {}
    for index, message in enumerate(messages, 1):
        where = f"message {index}"
        if not isinstance(message, dict):
            raise _bad(f"{where.capitalize()} must be an object with `role` and `content`.", "messages")
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise _bad(f"{where.capitalize()} has role {role!r}; this server takes system, user and assistant "
                       "messages (no tool messages).", "messages")
        texts, shas = _parse_content(message.get("content"), where, images, labels, role == "user", fetch)
        if role in ("system", "developer"):
            system.append("\n\n".join(texts))
            continue
        engine_role = USER if role == "user" else ASSISTANT
        if not turns and engine_role == ASSISTANT:
            raise _bad("The conversation must start with a user message (after any system message).", "messages")
        if turns and turns[-1][0] == engine_role:
            turns[-1][1] += texts
            turns[-1][2] += shas
        else:
            turns.append([engine_role, texts, shas])
    if not turns or turns[-1][0] != USER:
        raise _bad("The last message must be a user message: it is the one answered.", "messages")
    specs = []
    for role, texts, shas in turns:
        text = "\n\n".join(t.strip() for t in texts if t.strip())
        if len(text) > MAX_TEXT_CHARS:
            raise _bad(f"A {role.lower()} message is {len(text):,} characters long; the limit is "
                       f"{MAX_TEXT_CHARS:,}.", "messages")
        specs.append((role, text, tuple(shas)))
    if not specs[-1][1] and not specs[-1][2]:
        raise _bad("The last user message is empty: give text or an image.", "messages")
    system_prompt = "\n\n".join(s for s in system if s.strip()) if system else None
    return system_prompt, specs, images, labels


def _parse_content(content: Any, where: str, images: dict[str, bytes], labels: dict[str, str],
                   allow_images: bool, fetch: Callable[[str], bytes] | None) -> tuple[list[str], list[str]]:
    """A message's content -> (texts, image shas); the image data lands in `images`."""
    if content is None:  # an assistant message that only called tools
        return [], []
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise _bad(f"The content of {where} must be a string or a list of parts.", "messages")
    texts, shas = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            if not allow_images:
                raise _bad(f"Only user messages can hold images ({where} is not one).", "messages")
            label = f"image {len(shas) + 1} of {where}"
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise _bad(f"The {label} has no `image_url.url`.", "messages")
            data = _image_data(url, label, fetch)
            sha = hashlib.sha256(data).hexdigest()
            images[sha] = data
            labels.setdefault(sha, label)
            shas.append(sha)
        else:
            raise _bad(f"{where.capitalize()} has a content part of type {kind!r}; this server takes `text` and "
                       "`image_url` parts.", "messages")
    return texts, shas


def _image_data(url: str, label: str, fetch: Callable[[str], bytes] | None) -> bytes:
    if url.lower().startswith(("http://", "https://")):
        if fetch is None:
            raise _bad(f"The {label} is a web address: this server does not fetch images from the web unless it "
                       "was started with --allow-remote-images. Send the image itself as a data URI "
                       "(data:image/png;base64,...).", "messages", "image_url_not_supported")
        try:
            return fetch(url)
        except RemoteImageError as e:
            raise _bad(f"The {label} was not fetched: {e}", "messages",
                       "image_url_refused" if e.refused else "image_url_unreachable") from None
    head, comma, payload = url.partition(",")
    if not url.startswith("data:") or not comma or not head.endswith(";base64"):
        raise _bad(f"The {label} must be a base64 data URI (data:image/png;base64,...).", "messages",
                   "invalid_image_url")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"The {label} is not valid base64.", "messages", "invalid_image") from None
    if not data:
        raise _bad(f"The {label} is empty.", "messages", "invalid_image")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(data: dict, name: str, default: float, low: float, high: float) -> float:
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise _bad(f"`{name}` must be a number from {low:g} to {high:g}, got {value!r}.", name)
    return float(value)


# ====================================================================== sessions
@dataclass
class _Slot:
    """A pooled session and what it holds, in the request's terms (so the next request can be matched)."""

    session: ChatSession
    owner: str
    system_prompt: str | None = None
    spec: list[TurnSpec] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)  # image data sha256 -> session image key
    busy: bool = False


class SessionPool:
    """ChatSessions kept between requests, per owner (API key), least recently used first."""

    def __init__(self, size: int = 2, overflow: str = "error"):
        self.size = size
        self.overflow = overflow
        self._lock = threading.Lock()
        self._slots: list[_Slot] = []

    def take(self, owner: str, runtime: Runtime, system_prompt: str | None, spec: list[TurnSpec]) -> _Slot:
        """The idle session sharing the longest turn prefix with `spec`, or a fresh one; marked busy."""
        with self._lock:
            best, best_common = None, 0
            for slot in self._slots:
                if slot.busy or slot.owner != owner or slot.session.runtime is not runtime \
                        or slot.system_prompt != system_prompt:
                    continue
                common = _common_prefix(slot.spec, spec)
                if common > best_common:
                    best, best_common = slot, common
            if best is None:
                best = _Slot(ChatSession(runtime, overflow=self.overflow), owner)
                idle = [s for s in self._slots if not s.busy]
                if len(self._slots) >= self.size and idle:
                    self._slots.remove(idle[0])
            else:
                self._slots.remove(best)
            self._slots.append(best)  # most recently used last
            best.busy = True
            return best

    def give_back(self, slot: _Slot, keep: bool) -> None:
        """Done with the slot; `keep` False drops it (its cache may be half-updated after an error)."""
        with self._lock:
            slot.busy = False
            if not keep and slot in self._slots:
                self._slots.remove(slot)
            while len(self._slots) > self.size:
                idle = [s for s in self._slots if not s.busy]
                if not idle:
                    break
                self._slots.remove(idle[0])

    def clear(self) -> None:
        """The model is being unloaded: let its sessions (and their KV caches) go."""
        with self._lock:
            self._slots = [s for s in self._slots if s.busy]


def _common_prefix(a: list[TurnSpec], b: list[TurnSpec]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# ====================================================================== jobs
@dataclass
class _Job:
    """A checked request with its session ready: run() waits in line, generates and reports events."""

    request: ChatRequest
    slot: _Slot
    params: SamplingParams
    owner: str
    cancel: threading.Event = field(default_factory=lambda: _StickyEvent())
    ticket: Ticket | None = None
    id: str = field(default_factory=lambda: "chatcmpl-" + secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def stop(self) -> None:
        """Leave the line, or end the answer within a step; a no-op once it is done."""
        with self._lock:
            self.cancel.set()
            if self.ticket is not None:
                self.ticket.cancel()


class _StickyEvent(threading.Event):
    """A cancel flag that stays set: ChatSession.stream clears its flag when it starts, which would lose a stop
    that came between getting the model and the first decode step."""

    def clear(self) -> None:
        pass


@dataclass
class _Event:
    kind: str  # "delta", "done", "error" or "cancelled"
    text: str = ""
    finish: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of the prompt, served from the KV cache


# ====================================================================== the API
class OpenAIApi:
    """The routes and their logic; `routes()` gives them to the web server (see run_app.py)."""

    def __init__(self, models: ModelManager, scheduler: Scheduler, api_key: str, *, pool_size: int = 2,
                 max_body_bytes: int = MAX_BODY_BYTES, remote_images: bool = False,
                 history: ApiHistory | None = None):
        """`remote_images`: fetch http(s) image addresses (app.remote_images); `history`: save the answered
        conversations there (None: nothing is stored)."""
        if not api_key:
            raise ValueError("an API key is required")
        self.models = models
        self.scheduler = scheduler
        self._key = api_key.encode()
        self._owner = "api:" + hashlib.sha256(self._key).hexdigest()[:8]
        self.max_body_bytes = max_body_bytes
        self.fetch = fetch_image if remote_images else None
        self.history = history
        self.pool = SessionPool(pool_size)
        models.on_unload.append(self.pool.clear)

    def routes(self) -> list[Route]:
        return [Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.get_model, methods=["GET"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"])]

    # ------------------------------------------------------------------ endpoints
    async def list_models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ApiError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def get_model(self, request: Request) -> Response:
        try:
            self._authorize(request)
            self._check_model(request.path_params["model"])
        except ApiError as e:
            return e.response()
        return JSONResponse(self._model_card())

    async def chat_completions(self, request: Request) -> Response:
        try:
            owner = self._authorize(request)
            body = await self._read_body(request)
            job = await anyio.to_thread.run_sync(self._prepare, body, owner)
        except ApiError as e:
            return e.response()
        events = self._start(job)
        if job.request.stream:
            return StreamingResponse(self._sse(job, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.create_task(self._stop_on_disconnect(request, job))
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    if event.kind == "error":
                        return ApiError(500, event.text, type="server_error").response()
                    if event.kind == "done":
                        return JSONResponse(self._completion(job, event))
            return ApiError(499, "The request was cancelled.", type="server_error").response()
        finally:
            watcher.cancel()

    # ------------------------------------------------------------------ checks
    def _authorize(self, request: Request) -> str:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self._key):
            raise ApiError(401, "Missing or wrong API key: send `Authorization: Bearer KEY` with the key given to "
                                "run_app.py --api-key (or the one it printed at start).", code="invalid_api_key")
        return self._owner

    async def _read_body(self, request: Request) -> bytes:
        too_big = ApiError(413, f"The request body is larger than {self.max_body_bytes // 2**20} MiB; send fewer or "
                                "smaller images.", code="request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_model(self, name: str) -> None:
        served = model_id(self.models)
        if name != served:
            raise ApiError(404, f"The model {name!r} does not exist on this server; it serves {served!r}.",
                           param="model", code="model_not_found")

    def _model_card(self) -> dict:
        return {"id": model_id(self.models), "object": "model", "created": 0, "owned_by": OWNED_BY}

    # ------------------------------------------------------------------ preparing (in a worker thread)
    def _prepare(self, body: bytes, owner: str) -> _Job:
        """Check the request and set up its session; ApiError when it cannot be answered. Nothing waits for
        the model here: decoding images and counting tokens need no slot."""
        data = parse_json(body)
        if isinstance(data.get("model"), str):  # an unknown model first: nothing else matters then
            self._check_model(data["model"])
        request = parse_chat_request(data, self.fetch)
        try:
            runtime = self.models.require()
        except ChatError as e:
            raise ApiError(503, str(e), type="server_error", code="model_not_ready") from None
        system_prompt = request.system_prompt
        slot = self.pool.take(owner, runtime, system_prompt, request.turns)
        try:
            session = slot.session
            for sha in dict.fromkeys(s for _, _, shas in request.turns for s in shas):
                if sha not in slot.keys or slot.keys[sha] not in session.images:
                    try:
                        slot.keys[sha] = session.add_image(request.images[sha])
                    except ImageError as e:
                        raise _bad(f"The {request.image_labels[sha]} cannot be used: {e}", "messages",
                                   "invalid_image") from None
            turns = [Turn(role, text, [slot.keys[s] for s in shas]) for role, text, shas in request.turns]
            session.system_prompt = runtime.processor.system_prompt if system_prompt is None else system_prompt
            # Only the images of this conversation stay decoded; embeddings have their own LRU cache.
            used = {k for t in turns for k in t.images}
            session.images = {k: v for k, v in session.images.items() if k in used}
            slot.keys = {sha: k for sha, k in slot.keys.items() if k in used}
            session.turns = turns[:-1]
            max_tokens = request.max_tokens or session.context_limit
            last = turns[-1]
            try:  # refuses what does not fit, with room for at least a short answer
                session.add_user(last.text, [session.images[k] for k in last.images],
                                 reserve=min(max_tokens, MIN_ANSWER_ROOM))
            except ContextOverflow as e:
                raise _bad(str(e), "messages", "context_length_exceeded") from None
            except ValueError as e:  # e.g. text that spells the image placeholder
                raise _bad(f"The conversation cannot be prompted: {e}.", "messages") from None
            slot.system_prompt, slot.spec = system_prompt, list(request.turns)
            params = SamplingParams(temperature=request.temperature, top_p=request.top_p, max_new_tokens=max_tokens,
                                    seed=request.seed)
            return _Job(request, slot, params, owner)
        except BaseException:
            slot.spec = []  # its turns were changed half-way: match nothing
            self.pool.give_back(slot, keep=True)
            raise

    # ------------------------------------------------------------------ generating
    def _run(self, job: _Job, emit: Callable[[_Event], None]) -> None:
        """Wait in line for the model, then answer; in a thread of its own (torch's inference mode is
        per-thread, so one thread runs the whole answer)."""
        slot, session, keep = job.slot, job.slot.session, True
        try:
            with job._lock:  # ordered with stop(): a stop before this gives a withdrawn ticket
                job.ticket = self.scheduler.submit(owner=job.owner, label=f"api {job.id[9:17]}", cancel=job.cancel)
            with job.ticket as ticket:
                if not ticket.wait() or job.cancel.is_set():
                    emit(_Event("cancelled"))
                    return
                if session.runtime is not self.models.runtime:
                    emit(_Event("error", "The model was switched while this request waited; send it again."))
                    return
                try:
                    stream = session.stream(job.params, cancel=job.cancel, stop=job.request.stop)
                    with contextlib.closing(stream):
                        for piece in stream:
                            emit(_Event("delta", piece))
                except Exception as e:
                    keep = False  # its KV cache may be half-updated
                    log.exception("API generation failed")
                    emit(_Event("error", f"Generation failed: {type(e).__name__}: {e}"))
                    return
                stats = session.last_stats
                if stats.finish == "cancelled":
                    emit(_Event("cancelled"))
                    return
                slot.spec = job.request.turns + [(ASSISTANT, session.turns[-1].text, ())]
                done = _Event("done", session.turns[-1].text, stats.finish, stats.prompt_tokens, stats.tokens,
                              stats.reused_tokens)
            if self.history is not None:  # after the model is free again, before the client hears the answer
                self._save(job, done.text, answer_timings(session))
            emit(done)
        finally:
            self.pool.give_back(slot, keep)

    def _save(self, job: _Job, answer: str, timings: dict) -> None:
        request = job.request
        try:
            self.history.save(job.owner, request.system_prompt, request.turns, request.images, answer,
                              model=self.models.model_name, timings=timings,
                              settings=GenerationSettings.from_sampling(job.params, request.system_prompt).to_dict())
        except Exception:  # the answer is still given; the history misses it
            log.exception("could not save the API conversation")

    def _start(self, job: _Job) -> AsyncIterator[_Event]:
        """Start the job in its thread now (so it ends, and gives its session back, even if nobody reads) and
        return its events as they come; closing the iterator early (the client left) stops the job."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[_Event] = asyncio.Queue()

        def emit(event: _Event) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is gone: the server is stopping
                loop.call_soon_threadsafe(events.put_nowait, event)

        threading.Thread(target=self._run, args=(job, emit), name=f"api-{job.id[9:17]}", daemon=True).start()

        async def read() -> AsyncIterator[_Event]:
            try:
                while True:
                    event = await events.get()
                    yield event
                    if event.kind != "delta":
                        return
            finally:
                job.stop()

        return read()

    @staticmethod
    async def _stop_on_disconnect(request: Request, job: _Job) -> None:
        while not job.cancel.is_set():
            if await request.is_disconnected():
                job.stop()
                return
            await asyncio.sleep(0.5)

    # ------------------------------------------------------------------ responses
    def _completion(self, job: _Job, done: _Event) -> dict:
        return {"id": job.id, "object": "chat.completion", "created": job.created, "model": job.request.model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                             "finish_reason": done.finish, "logprobs": None}],
                "usage": _usage(done)}

    async def _sse(self, job: _Job, events: AsyncIterator[_Event]) -> AsyncIterator[str]:
        def chunk(delta: dict, finish: str | None = None) -> str:
            return _data({"id": job.id, "object": "chat.completion.chunk", "created": job.created,
                          "model": job.request.model, "system_fingerprint": None,
                          "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

        yield chunk({"role": "assistant", "content": ""})
        async with contextlib.aclosing(events):
            async for event in events:
                if event.kind == "delta":
                    yield chunk({"content": event.text})
                elif event.kind == "done":
                    yield chunk({}, event.finish)
                    if job.request.include_usage:
                        yield _data({"id": job.id, "object": "chat.completion.chunk", "created": job.created,
                                     "model": job.request.model, "choices": [], "usage": _usage(event)})
                elif event.kind == "error":
                    yield _data(ApiError(500, event.text, type="server_error").body())
        yield "data: [DONE]\n\n"


def _usage(done: _Event) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
