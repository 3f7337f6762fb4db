"""The local endpoint through which the hotkey listener hands a screenshot to the running app.

POST /hotkey/screenshot with `Authorization: Bearer <install token>` and a JSON body
{"image": "<base64 PNG>", "question": "..." (optional)}: the app stores a new conversation starting with the
image (asked and answered at once when a question is given) and answers {"conversation": id, "path": "/?c=id"},
the page that opens it.

Only loopback callers presenting the per-install token (app.install_token) are served, so neither another
user of this machine nor a web page (which cannot read the token file) can post into the history.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from typing import TYPE_CHECKING

from . import install_token
from .errors import ChatError
from .hotkey import HANDOVER_PATH as PATH

if TYPE_CHECKING:
    from .chat_service import ChatService

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 96 * 1024 * 1024  # base64 of the largest image the chat takes (50 MB), with room to spare


def conversation_path(conversation_id: str) -> str:
    """The page that opens this conversation (ui.app reads `c` on load)."""
    return f"/?c={conversation_id}"


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    def response(self) -> JSONResponse:
        return JSONResponse({"error": str(self)}, status_code=self.status)


class ScreenshotHandover:
    def __init__(self, chat: ChatService, token: str):
        self.chat = chat
        self.token = token

    def routes(self) -> list[Route]:
        return [Route(PATH, self.receive, methods=["POST"])]

    def authorize(self, request: Request) -> None:
        """Raise Refused unless the caller is on this machine and presents the install token."""
        host = request.client.host if request.client else None
        if not install_token.is_loopback(host):
            raise Refused(403, "screenshots are only accepted from this machine")
        presented = install_token.bearer(request.headers.get("authorization"))
        if presented is None:
            raise Refused(401, "missing install token (Authorization: Bearer <token from the data folder>)")
        if not install_token.matches(presented, self.token):
            raise Refused(403, "wrong install token")

    async def receive(self, request: Request) -> Response:
        try:
            self.authorize(request)
            image, question = parse_body(await _read_body(request))
            # Storing (and, with a question, waiting for it to be stored) touches SQLite: not on the event loop.
            conversation_id = await asyncio.to_thread(self.chat.start_from_image, image, question,
                                                      None, "screenshot.png")
        except Refused as e:
            return e.response()
        except ChatError as e:
            return Refused(422, str(e)).response()
        log.info("screenshot from the hotkey stored as conversation %s", conversation_id)
        return JSONResponse({"conversation": conversation_id, "path": conversation_path(conversation_id)})


async def _read_body(request: Request) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise Refused(413, "the screenshot is too large")
    return bytes(body)


def parse_body(body: bytes) -> tuple[bytes, str | None]:
    """(image bytes, question or None); Refused(400) saying what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise Refused(400, "the body must be JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("image"), str):
        raise Refused(400, 'expected {"image": "<base64 PNG>", "question": "..."}')
    question = data.get("question")
    if question is not None and not isinstance(question, str):
        raise Refused(400, "question must be text")
    try:
        image = base64.b64decode(data["image"], validate=True)
    except (binascii.Error, ValueError):
        raise Refused(400, "image is not valid base64") from None
    return image, (question or "").strip() or None
