"""The sign-in gate: nothing the server has (pages, gradio's API and queue, files) is answered to a caller who has
not signed in, and a signed-in user is served only their own files.

Ways in, checked on every request:
- the per-install token (app.install_token): `?token=...` on a page address (the tab the app opens at start,
  the address printed with --no-browser, the hotkey's page) starts a session as the owner; programs may send
  it as `Authorization: Bearer ...`. Only the user running the app can read the token file.
- a session cookie, made by the token or by a password login at /login (when accounts are set up:
  app.accounts), signed with a key made from the token: it outlives a restart of the app.

Routes that check callers themselves pass through: the OpenAI API (/v1, its key) and the hotkey's endpoint (the
token). Gradio's file routes are checked here, by path: an attachment only for a user one of whose messages holds
it, a scratch file (exports, PDF pages) only for the user it was made for, gradio's upload cache (file names that
are salted digests, not guessable) for any signed-in user, and nothing outside the data directory at all.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import os
import secrets
import threading
import time
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from . import install_token
from .accounts import Accounts, LoginLimiter
from .viewer import OWNER

SESSION_SECONDS = 7 * 24 * 3600
LOGIN_PATH, LOGOUT_PATH = "/login", "/logout"
# Gradio calls this on itself while starting, without a session (it starts the queue; nothing to read).
STARTUP_PATH = "/gradio_api/startup-events"
FILE_ROUTES = ("/gradio_api/file=", "/gradio_api/file/", "/file=", "/file/")
# Gradio routes this app never uses and that reach beyond it (a URL proxy for Hugging Face Spaces).
CLOSED_PREFIXES = ("/gradio_api/proxy=", "/proxy=")
MAX_LOGIN_BODY = 16 * 1024
USE_PRINTED_ADDRESS = "Open the address the app printed when it started: it carries this install's token."


class Sessions:
    """Session cookies signed with a key made from the install token, so that they outlive a restart of the app
    (an open tab goes on working) and nothing about them is stored. A cookie names its user and its expiry;
    `valid_user` decides whether that user still exists (an account removed since is signed out)."""

    def __init__(self, token: str, valid_user=lambda user: True, seconds: float = SESSION_SECONDS):
        self._key = hashlib.sha256(b"dsvl session key\0" + token.encode()).digest()
        self.valid_user, self.seconds = valid_user, seconds
        # Signed out before expiry: cookie -> its expiry. Kept in memory: the browser deletes its cookie at sign-out,
        # so only a copy taken before could be used again after a restart.
        self._ended: dict[str, float] = {}
        self._lock = threading.Lock()

    def start(self, user: str) -> str:
        # Hex and digits: characters a cookie takes as is. The nonce keeps two sessions apart (one can end alone).
        payload = f"{user.encode().hex()}.{int(time.time() + self.seconds)}.{secrets.token_hex(8)}"
        return f"{payload}.{self._sign(payload)}"

    def user(self, cookie: str | None) -> str | None:
        try:
            name, expiry, nonce, signature = (cookie or "").split(".")
            user = bytes.fromhex(name).decode()
            expires = int(expiry)
        except ValueError:  # missing, malformed, not hex or not UTF-8 (all ValueErrors)
            return None
        if not hmac.compare_digest(signature, self._sign(f"{name}.{expiry}.{nonce}")) or expires < time.time():
            return None
        with self._lock:
            if cookie in self._ended:
                return None
        return user if self.valid_user(user) else None

    def end(self, cookie: str | None) -> None:
        if self.user(cookie) is not None:
            with self._lock:
                now = time.time()
                self._ended = {c: t for c, t in self._ended.items() if t > now}
                self._ended[cookie] = now + self.seconds

    def _sign(self, payload: str) -> str:
        return hmac.new(self._key, payload.encode(), hashlib.sha256).hexdigest()


class SignIn:
    """Who a request comes from: the owner (install token), a session's user, or None."""

    def __init__(self, token: str, accounts: Accounts | None = None, limiter: LoginLimiter | None = None):
        self.token = token
        self.accounts = accounts
        self.limiter = limiter or LoginLimiter()
        self.sessions = Sessions(token, self.known_user)
        # Per install, so two apps on one host (cookies ignore the port) keep their sessions apart.
        self.cookie = "dsvl-session-" + hashlib.sha256(token.encode()).hexdigest()[:10]

    def known_user(self, user: str) -> bool:
        return user == OWNER or (self.accounts is not None and self.accounts.has(user))

    def user_of(self, request: Request) -> str | None:
        """Also gradio's `auth_dependency`: its request.username is what this returns."""
        bearer = install_token.bearer(request.headers.get("authorization"))
        if bearer is not None and install_token.matches(bearer, self.token):
            return OWNER
        return self.sessions.user(request.cookies.get(self.cookie))

    def login(self, name: str, password: str) -> tuple[str | None, str, int]:
        """(session key or None, message for the page, HTTP status) for a password sign-in (accounts set up)."""
        wait = self.limiter.wait(name)
        if wait > 0:
            return None, f"Too many failed sign-ins; try again in {max(1, round(wait / 60))} minute(s).", 429
        user = self.accounts.check(name, password)
        if user is None:
            self.limiter.failed(name)
            return None, "Wrong user name or password.", 401
        return self.sessions.start(user), "", 303

    def display_name(self, user: str) -> str:
        if self.accounts is not None:
            return self.accounts.display_name(user)
        return "you" if user == OWNER else user


class Files:
    """Which files a user may fetch through gradio's file routes."""

    def __init__(self, store, scratch):
        self.store, self.scratch = store, scratch
        self.attachments = Path(store.attachments_dir).resolve()
        self.uploads = Path(scratch.gradio_dir).resolve()

    def allowed(self, raw: str, user: str) -> bool:
        try:
            path = Path(os.path.abspath(raw)).resolve()
        except (OSError, ValueError):  # a NUL byte, a name too long...
            return False
        if path.is_relative_to(self.attachments):
            return self.store.owns_attachment(user, path.stem)
        if self.scratch.made_for(path, user):
            return True
        return path.is_relative_to(self.uploads)


def file_route_path(path: str) -> str | None:
    """The file path a gradio file route asks for (None: not a file route)."""
    for prefix in FILE_ROUTES:
        if path.startswith(prefix):
            return path[len(prefix):]
    return None


class Gate:
    """ASGI middleware around the whole server (pass as starlette Middleware(Gate, sign_in=..., files=...))."""

    def __init__(self, app, sign_in: SignIn, files: Files, open_prefixes: tuple[str, ...] = ()):
        self.app, self.sign_in, self.files, self.open_prefixes = app, sign_in, files, open_prefixes

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path.startswith(self.open_prefixes) or (path == STARTUP_PATH and _from_loopback(scope)):
            return await self.app(scope, receive, send)
        request = Request(scope, receive)
        if path.startswith(CLOSED_PREFIXES):
            return await _send(Response(status_code=404), scope, receive, send)
        if path == LOGIN_PATH and scope["type"] == "http":
            return await _send(await self.login(request), scope, receive, send)
        if path == LOGOUT_PATH and scope["type"] == "http":
            self.sign_in.sessions.end(request.cookies.get(self.sign_in.cookie))
            response = RedirectResponse(LOGIN_PATH, status_code=303)
            response.delete_cookie(self.sign_in.cookie, path="/")
            return await _send(response, scope, receive, send)
        presented = request.query_params.get(install_token.TOKEN_PARAM)
        if presented and scope["type"] == "http":
            return await _send(self.token_login(request, presented), scope, receive, send)

        user = self.sign_in.user_of(request)
        if user is None:
            return await _send(self.refusal(request), scope, receive, send)
        wanted = file_route_path(path)
        if wanted is not None and not self.files.allowed(wanted, user):
            return await _send(JSONResponse({"detail": "File not found."}, status_code=404), scope, receive, send)
        return await self.app(scope, receive, send)

    def token_login(self, request: Request, presented: str) -> Response:
        """A page address carrying the install token: start an owner session, then show the same address
        without the token (so it stays out of the history bar and of bookmarks)."""
        if not install_token.matches(presented, self.sign_in.token):
            return _page("Wrong link", "This link's token is not this app's. Open the address the app printed "
                         "when it started.", 403)
        query = urlencode([(k, v) for k, v in parse_qsl(request.url.query) if k != install_token.TOKEN_PARAM])
        response = RedirectResponse(request.url.path + (f"?{query}" if query else ""), status_code=303)
        self._set_cookie(response, request, self.sign_in.sessions.start(OWNER))
        return response

    async def login(self, request: Request) -> Response:
        target = _safe_next(request.query_params.get("next"))
        if self.sign_in.accounts is None:
            return _page("Sign in", USE_PRINTED_ADDRESS, 401)
        if request.method != "POST":
            return login_page(target)
        body = await request.body()
        if len(body) > MAX_LOGIN_BODY:
            return login_page(target, "That sign-in form is too large.", 413)
        form = dict(parse_qsl(body.decode("utf-8", "replace")))
        target = _safe_next(form.get("next")) or target
        key, message, status = self.sign_in.login(form.get("username", "").strip(), form.get("password", ""))
        if key is None:
            return login_page(target, message, status)
        response = RedirectResponse(target or "/", status_code=status)
        self._set_cookie(response, request, key)
        return response

    def refusal(self, request: Request) -> Response:
        """Pages go to the sign-in page; everything else gets a plain 401."""
        wants_page = request.method == "GET" and "text/html" in request.headers.get("accept", "")
        if wants_page and self.sign_in.accounts is not None:
            next_path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"{LOGIN_PATH}?next={quote(next_path, safe='')}", status_code=303)
        if wants_page:
            return _page("Sign in", USE_PRINTED_ADDRESS + " (The tab the app opened at start has it already.)", 401)
        return JSONResponse({"detail": "Not signed in."}, status_code=401)

    def _set_cookie(self, response: Response, request: Request, key: str) -> None:
        secure = request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"
        response.set_cookie(self.sign_in.cookie, key, max_age=SESSION_SECONDS, path="/", httponly=True,
                            samesite="lax", secure=secure)


def _from_loopback(scope) -> bool:
    client = scope.get("client")
    return install_token.is_loopback(client[0] if client else None)


def _safe_next(value: str | None) -> str | None:
    """Only a path on this server (no //host, no scheme): the login page must not send anyone elsewhere."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return None


async def _send(response: Response, scope, receive, send) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    await response(scope, receive, send)


STYLE = """body{font-family:system-ui,sans-serif;background:#f6f7f9;display:flex;justify-content:center;
margin-top:12vh}main{background:#fff;padding:2rem 2.5rem;border-radius:12px;box-shadow:0 2px 12px #0002;
width:22rem}h1{font-size:1.3rem;margin-top:0}label{display:block;margin:.8rem 0 .3rem}input{width:100%;
padding:.5rem;box-sizing:border-box;font-size:1rem}button{margin-top:1.2rem;width:100%;padding:.6rem;
font-size:1rem;background:#2563eb;color:#fff;border:0;border-radius:6px}.error{color:#b91c1c}"""


def _page(title: str, text: str, status: int) -> HTMLResponse:
    return HTMLResponse(f"<!doctype html><title>{html.escape(title)} · DeepSeek-VL local</title>"
                        f"<style>{STYLE}</style><main><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p></main>",
                        status_code=status)


def login_page(next_path: str | None, error: str = "", status: int = 200) -> HTMLResponse:
    error_html = f'<p class="error" id="login-error">{html.escape(error)}</p>' if error else ""
    next_html = f'<input type="hidden" name="next" value="{html.escape(next_path)}">' if next_path else ""
    return HTMLResponse(
        f"<!doctype html><title>Sign in · DeepSeek-VL local</title><style>{STYLE}</style><main>"
        f"<h1>DeepSeek-VL local</h1>{error_html}<form method=post action='{LOGIN_PATH}'>{next_html}"
        "<label for=username>User name</label><input id=username name=username autocomplete=username autofocus>"
        "<label for=password>Password</label><input id=password name=password type=password "
        "autocomplete=current-password><button id=login-btn type=submit>Sign in</button></form></main>",
        status_code=status)
