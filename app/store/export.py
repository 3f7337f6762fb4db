"""Export a conversation (JSON with embedded images, or Markdown in a zip with
its images) and import a JSON export back, checking everything first."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import io
import json
import re
import uuid
import zipfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .attachments import MIME_RE, SHA_RE
from .conversations import Conversations
from .db import LOCAL_OWNER, ROLES, STATUSES, StoreError, check_choice, to_json, utc_now

EXPORT_FORMAT = "deepseek-vl-local/conversation"
EXPORT_VERSION = 1
# Fields of a conversation an export carries. "settings" came later; files
# without it import fine (as None), so the version did not change.
CONVERSATION_FIELDS = ("id", "title", "created_at", "updated_at", "model", "system_prompt", "settings")
MARKDOWN_NAME = "conversation.md"
IMAGES_DIR = "images"


def _read_attachment(attachment: dict) -> bytes:
    try:
        return Path(attachment["path"]).read_bytes()
    except OSError as e:
        raise StoreError(f"attachment file missing: {attachment['sha256']} ({e})") from None


def _markdown(conversation: dict, link: Callable[[dict], str]) -> str:
    """Readable Markdown of a conversation; ``link(attachment)`` is where an image points."""
    lines = [f"# {conversation['title'] or 'Untitled conversation'}", ""]
    facts = [f"Created {conversation['created_at']}"]
    if conversation["model"]:
        facts.append(f"model {conversation['model']}")
    lines += ["_" + ", ".join(facts) + "_", ""]
    if conversation["system_prompt"]:
        lines += ["## System prompt", "", conversation["system_prompt"], ""]
    for m in conversation["messages"]:
        lines += [f"## {m['role'].capitalize()}", ""]
        for a in m["attachments"]:
            alt = re.sub(r"[\[\]\\]", "", a["name"] or "image")
            lines += [f"![{alt}]({link(a)})", ""]
        if m["text"]:
            lines += [m["text"], ""]
        if m["status"] != "complete":
            note = f"_({m['status']}"
            note += f": {m['error']})_" if m["error"] else ")_"
            lines += [note, ""]
    return "\n".join(lines)


class Export(Conversations):
    def export_conversation(self, conversation_id: str) -> dict:
        """A JSON-serializable dict with every image embedded (base64).

        It holds the conversation's current path, as shown: other versions of
        its questions and answers (see conversations.py) are left out, so an
        export reads as one conversation and imports as one."""
        conversation = self.get_conversation(conversation_id)
        attachments: dict[str, dict] = {}
        messages = []
        for m in conversation["messages"]:
            for a in m["attachments"]:
                if a["sha256"] not in attachments:
                    attachments[a["sha256"]] = {
                        "sha256": a["sha256"],
                        "mime": a["mime"],
                        "name": a["name"],
                        "data": base64.b64encode(_read_attachment(a)).decode("ascii"),
                    }
            messages.append(
                {
                    "role": m["role"],
                    "text": m["text"],
                    "status": m["status"],
                    "error": m["error"],
                    "created_at": m["created_at"],
                    "updated_at": m["updated_at"],
                    "model": m["model"],
                    "settings": m["settings"],
                    "timings": m["timings"],
                    "attachments": [a["sha256"] for a in m["attachments"]],
                }
            )
        return {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "exported_at": utc_now(),
            "conversation": {key: conversation[key] for key in CONVERSATION_FIELDS},
            "messages": messages,
            "attachments": list(attachments.values()),
        }

    def export_markdown(self, conversation_id: str) -> str:
        """Readable Markdown; images are linked by their stored file name
        (see :meth:`export_markdown_zip` for a file that carries them)."""
        return _markdown(self.get_conversation(conversation_id), lambda a: Path(a["path"]).name)

    def export_markdown_zip(self, conversation_id: str) -> bytes:
        """A zip holding ``conversation.md`` and its images under ``images/``,
        linked relatively, so the Markdown shows its pictures wherever the zip
        is unpacked. The same conversation always gives the same bytes."""
        conversation = self.get_conversation(conversation_id)
        markdown = _markdown(conversation, lambda a: f"{IMAGES_DIR}/{Path(a['path']).name}")
        # Entries dated by the conversation's last change rather than now.
        stamp = datetime.fromisoformat(conversation["updated_at"]).astimezone(timezone.utc)
        date_time = max(stamp.timetuple()[:6], (1980, 1, 1, 0, 0, 0))  # zip dates start in 1980
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:

            def add(name: str, data: bytes, compress: int) -> None:
                info = zipfile.ZipInfo(name, date_time=date_time)
                info.compress_type = compress
                archive.writestr(info, data)

            add(MARKDOWN_NAME, markdown.encode("utf-8"), zipfile.ZIP_DEFLATED)
            added: set[str] = set()
            for m in conversation["messages"]:
                for a in m["attachments"]:
                    if a["sha256"] not in added:
                        added.add(a["sha256"])
                        # Images are compressed already: store them as they are.
                        add(f"{IMAGES_DIR}/{Path(a['path']).name}", _read_attachment(a),
                            zipfile.ZIP_STORED)
        return buffer.getvalue()

    def import_conversation(self, data: dict | str | bytes, owner: str = LOCAL_OWNER) -> str:
        """Add a conversation from :meth:`export_conversation` output (a dict
        or its JSON text) as a new conversation; returns its id.

        Everything is checked before anything is written, and the writes are
        one transaction: bad input raises StoreError and changes nothing.
        """
        conversation, messages, blobs = validate_export(data)
        conversation_id = str(uuid.uuid4())
        written: list[Path] = []
        with self._write():
            try:
                self.db["conversations"].insert({"id": conversation_id, **conversation, "owner": owner})
                for sha, (blob, name, mime) in blobs.items():
                    path = self._put_attachment(sha, blob, name, mime)
                    if path:
                        written.append(path)
                parent = None  # an export is one path: each message follows the one before
                for message, shas in messages:
                    parent = self._insert_message(conversation_id, {**message, "parent_id": parent}, shas)
            except BaseException:
                # Still holding the write lock: nobody else can have started
                # using these files, so removing them is safe.
                for path in written:
                    with contextlib.suppress(OSError):
                        path.unlink()
                raise
        return conversation_id


# --------------------------------------------------------------------------
# Checking an import


def _timestamp(value: Any, where: str) -> str:
    """Normalise an imported timestamp to our UTC format."""
    if not isinstance(value, str):
        raise StoreError(f"{where}: timestamp must be a string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise StoreError(f"{where}: not an ISO 8601 timestamp: {value[:40]!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _optional_str(obj: dict, key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise StoreError(f"{where}.{key} must be a string or null")
    return value


def _json_field(obj: dict, key: str, where: str) -> str | None:
    return to_json(obj.get(key), f"{where}.{key}")


def validate_export(
    data: Any,
) -> tuple[dict, list[tuple[dict, list[str]]], dict[str, tuple[bytes, str | None, str]]]:
    """Check an export fully; returns (conversation row, [(message row,
    shas)], {sha: (bytes, name, mime)}) ready to insert."""
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except ValueError as e:
            raise StoreError(f"import is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise StoreError("import must be a JSON object")
    if data.get("format") != EXPORT_FORMAT:
        raise StoreError(f"not a conversation export (format must be {EXPORT_FORMAT!r})")
    if data.get("version") != EXPORT_VERSION:
        raise StoreError(f"unsupported export version: {data.get('version')!r}")

    blobs: dict[str, tuple[bytes, str | None, str]] = {}
    attachments = data.get("attachments", [])
    if not isinstance(attachments, list):
        raise StoreError("attachments must be a list")
    for i, a in enumerate(attachments):
        where = f"attachments[{i}]"
        if not isinstance(a, dict):
            raise StoreError(f"{where} must be an object")
        sha = a.get("sha256")
        if not isinstance(sha, str) or not SHA_RE.fullmatch(sha):
            raise StoreError(f"{where}.sha256 is not a sha256 hex digest")
        mime = a.get("mime")
        if not isinstance(mime, str) or not MIME_RE.fullmatch(mime.strip().lower()):
            raise StoreError(f"{where}.mime is not a mime type")
        if not isinstance(a.get("data"), str):
            raise StoreError(f"{where}.data must be a base64 string")
        try:
            blob = base64.b64decode(a["data"], validate=True)
        except (binascii.Error, ValueError):
            raise StoreError(f"{where}.data is not valid base64") from None
        if not blob:
            raise StoreError(f"{where}.data is empty")
        if hashlib.sha256(blob).hexdigest() != sha:
            raise StoreError(f"{where}: data does not match its sha256 {sha}")
        blobs[sha] = (blob, _optional_str(a, "name", where), mime)

    c = data.get("conversation")
    if not isinstance(c, dict):
        raise StoreError("conversation must be an object")
    now = utc_now()
    conversation = {
        "title": _optional_str(c, "title", "conversation"),
        "model": _optional_str(c, "model", "conversation"),
        "system_prompt": _optional_str(c, "system_prompt", "conversation"),
        "settings": _json_field(c, "settings", "conversation"),
        "created_at": _timestamp(c.get("created_at", now), "conversation.created_at"),
        "updated_at": _timestamp(c.get("updated_at", now), "conversation.updated_at"),
    }

    raw_messages = data.get("messages")
    if not isinstance(raw_messages, list):
        raise StoreError("messages must be a list")
    messages = []
    used: set[str] = set()
    for i, m in enumerate(raw_messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise StoreError(f"{where} must be an object")
        check_choice(m.get("role"), ROLES, f"{where}.role")
        status = check_choice(m.get("status", "complete"), STATUSES, f"{where}.status")
        if not isinstance(m.get("text"), str):
            raise StoreError(f"{where}.text must be a string")
        shas = m.get("attachments", [])
        if not isinstance(shas, list):
            raise StoreError(f"{where}.attachments must be a list of sha256s")
        for sha in shas:
            if sha not in blobs:
                raise StoreError(
                    f"{where} refers to an attachment not in the file: {str(sha)[:80]!r}"
                )
        used.update(shas)
        messages.append(
            (
                {
                    "role": m["role"],
                    "text": m["text"],
                    # Nothing is generating an imported answer any more.
                    "status": "stopped" if status == "streaming" else status,
                    "error": _optional_str(m, "error", where),
                    "created_at": _timestamp(m.get("created_at", now), f"{where}.created_at"),
                    "updated_at": _timestamp(m.get("updated_at", now), f"{where}.updated_at"),
                    "model": _optional_str(m, "model", where),
                    "settings": _json_field(m, "settings", where),
                    "timings": _json_field(m, "timings", where),
                },
                list(shas),
            )
        )
    # Images no message refers to would only be garbage: skip them.
    blobs = {sha: blob for sha, blob in blobs.items() if sha in used}
    return conversation, messages, blobs
