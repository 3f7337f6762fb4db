"""How the services' records look on screen: turn conversations, messages, search hits and model facts into
values for the widgets.

Only presentation lives here (labels, HTML snippets, chatbot message dicts); no decisions about the data.
Everything that ends up in HTML is escaped here, since message text, titles and file names are user input.
"""

from __future__ import annotations

import html
from datetime import datetime, timezone
from typing import Any

from app.records import Conversation, ConversationSummary, Message, SearchHit

# Markers the search puts around its matches: control characters that can't occur in typed text, so the
# escaped snippet can be highlighted without mistaking a literal "[" in a message for a match.
HIGHLIGHT = ("\x02", "\x03")

STREAMING_CURSOR = " ▍"


# ---------------------------------------------------------------------- transcript
def transcript(conversation: Conversation | None, streaming_id: int | None = None) -> tuple[list[dict], list[int]]:
    """Chatbot messages for a conversation, and the message id behind each of them (same order).

    A user turn shows its images (as thumbnails) above its text. `streaming_id` marks the answer being
    written so it gets a cursor. A message with other versions ends with "‹ 2/3 ›" (see variant_nav).
    """
    if not conversation:
        return [], []
    messages, ids = [], []
    for m in conversation.messages:
        if m.is_user:
            content: list[Any] = [{"path": a.path, "alt_text": a.name or "image"} for a in m.attachments]
            text = (m.text + variant_nav(m)).lstrip()
            if text:
                content.append(text)
            if not content:
                content = ["(empty message)"]
            messages.append({"role": "user", "content": content})
        else:
            messages.append({"role": "assistant", "content": answer_text(m, m.id == streaming_id) + variant_nav(m)})
        ids.append(m.id)
    return messages, ids


def variant_nav(message: Message) -> str:
    """ "‹ 2/3 ›" under a message with other versions ("" without): each arrow is a button whose class names
    the version it shows (`variant-<id>`; the chatbot's sanitizer keeps classes but not data attributes), and
    VARIANT_JS in ui/style.py turns its click into an event."""
    if message.variant_count < 2:
        return ""

    def arrow(step: int, glyph: str, label: str) -> str:
        target = message.variant(step)
        if target is None:
            return f'<span class="variant-end">{glyph}</span>'
        return f'<button class="variant-nav variant-{int(target)}" title="{label}">{glyph}</button>'

    return (f'\n\n<span class="variants">{arrow(-1, "‹", "Previous version")} '
            f'{message.variant_index}/{message.variant_count} {arrow(1, "›", "Next version")}</span>')


def answer_text(message: Message, streaming: bool = False) -> str:
    """The assistant bubble: the answer plus a note when it did not finish normally."""
    text = message.text
    if streaming or message.status == "streaming":
        return text + STREAMING_CURSOR
    if message.status == "stopped":
        return (text + "\n\n" if text else "") + "*(stopped)*"
    if message.status == "failed":
        return (text + "\n\n" if text else "") + f"**Generation failed:** {message.error or 'unknown error'}"
    return text or "*(empty answer)*"


def stats_line(stats: dict | None) -> str:
    """One line about the last answer: speed, first-token latency, prompt and cache reuse."""
    if not stats:
        return ""
    parts = [f"{stats.get('tokens', 0)} tokens"]
    if stats.get("tokens_per_second"):
        parts.append(f"{stats['tokens_per_second']:.1f} tok/s")
    if stats.get("ttft"):
        parts.append(f"first token {stats['ttft']:.2f} s")
    if stats.get("prompt_tokens"):
        parts.append(f"prompt {stats['prompt_tokens']} tokens ({stats.get('reused_tokens', 0)} reused)")
    finish = {"stop": "finished", "length": "hit max new tokens", "cancelled": "stopped"}.get(stats.get("finish", ""))
    if finish:
        parts.append(finish)
    return " · ".join(parts)


# ---------------------------------------------------------------------- history
def when(timestamp: str | None, now: datetime | None = None) -> str:
    """A short local time for a saved UTC timestamp: "14:05" today, "Nov 24" this year, else "2023-11-24"."""
    if not timestamp:
        return ""
    try:
        moment = datetime.fromisoformat(timestamp).astimezone()
    except ValueError:
        return ""
    now = (now or datetime.now(timezone.utc)).astimezone()
    if moment.date() == now.date():
        return moment.strftime("%H:%M")
    if moment.year == now.year:
        return moment.strftime("%b %d").replace(" 0", " ")
    return moment.strftime("%Y-%m-%d")


def history_choices(conversations: list[ConversationSummary]) -> list[tuple[str, str]]:
    """(label, conversation id) pairs for the history list, in the service's newest-first order."""
    choices = []
    for c in conversations:
        meta = [when(c.updated_at), f"{c.message_count} msg"]
        choices.append((f"{c.display_title}  ·  {' · '.join(m for m in meta if m)}", c.id))
    return choices


def search_results_html(query: str, hits: list[SearchHit]) -> str:
    """Clickable search results; each item carries its conversation id in data-conversation."""
    if not query.strip():
        return ""
    if not hits:
        return f'<div class="search-empty">No messages match “{html.escape(query.strip())}”.</div>'
    items = []
    for hit in hits:
        snippet = html.escape(hit.snippet)
        snippet = snippet.replace(HIGHLIGHT[0], "<mark>").replace(HIGHLIGHT[1], "</mark>")
        role = "You" if hit.role == "user" else "Assistant"
        items.append(
            f'<li class="search-hit" role="button" tabindex="0" '
            f'data-conversation="{html.escape(hit.conversation_id, quote=True)}">'
            f'<div class="search-hit-title">{html.escape(hit.display_title)}</div>'
            f'<div class="search-hit-snippet"><span class="search-hit-role">{role}:</span> {snippet}</div></li>'
        )
    noun = "match" if len(hits) == 1 else "matches"
    return f'<div class="search-count">{len(hits)} {noun}</div><ul class="search-hits">{"".join(items)}</ul>'


# ---------------------------------------------------------------------- model and context
def banner_html(info: dict) -> str:
    """The model banner: what is loaded and how, or the load progress / failure."""
    status = info.get("status")
    model = html.escape(str(info.get("model") or ""))
    if status == "ready":
        chips = "".join(f'<span class="chip"><b>{html.escape(k)}</b> {html.escape(v)}</span>'
                        for k, v in info.get("facts") or ())
        head = f'<span class="status-dot ready"></span><span class="model-name">{model}</span>{chips}'
    elif status == "loading":
        pct = max(0.0, min(1.0, float(info.get("progress") or 0.0)))
        stage = html.escape(str(info.get("stage") or ""))
        head = (f'<span class="status-dot loading"></span><span class="model-name">Loading {model}…</span>'
                f'<span class="load-bar"><span style="width:{pct * 100:.0f}%"></span></span>'
                f'<span class="chip">{pct:.0%} · {stage}</span>'
                '<span class="chip muted">history and settings work meanwhile</span>')
    elif status == "failed":
        error = html.escape(str(info.get("error") or "unknown error"))
        head = (f'<span class="status-dot failed"></span><span class="model-name">{model}</span>'
                f'<span class="load-error">failed to load: {error}</span>')
    else:
        head = f'<span class="status-dot"></span><span class="model-name">{model}</span> not loaded'
    hint = info.get("hint")
    # One line on small screens (the whole hint on hover and in the Model tab).
    hint_html = f'<div class="banner-hint" title="{html.escape(hint, quote=True)}">{html.escape(hint)}</div>' \
        if hint else ""
    return f'<div class="banner banner-{html.escape(str(status))}"><div class="banner-head">{head}</div>{hint_html}</div>'


def meter_html(budget: Any, model_status: str | None = None) -> str:
    """The context meter: tokens and image slots left, and the service's overflow warning."""
    if budget is None:
        note = "Context meter: available once the model has loaded." if model_status != "failed" \
            else "Context meter: no model loaded."
        return f'<div class="meter meter-idle">{note}</div>'
    limit = max(1, budget.limit)
    used = min(1.0, budget.used / limit)
    reserved = min(1.0 - used, budget.reserved / limit)
    level = "over" if budget.warning and budget.left <= 0 else "warn" if budget.warning else "ok"
    slots = "image slot" if budget.images_left == 1 else "image slots"
    text = (f"{budget.left:,} tokens left · {budget.images_left} {slots} left "
            f"<span class='muted'>(used {budget.used:,} of {budget.limit:,}; answers up to "
            f"{min(budget.reserved, max(0, budget.limit - budget.used)):,} tokens; "
            f"{budget.image_tokens} tokens per image)</span>")
    warning = f'<div class="meter-warning">⚠ {html.escape(budget.warning)}</div>' if budget.warning else ""
    return (f'<div class="meter meter-{level}"><div class="meter-bar">'
            f'<span class="meter-used" style="width:{used * 100:.1f}%"></span>'
            f'<span class="meter-reserved" style="width:{reserved * 100:.1f}%"></span></div>'
            f'<div class="meter-text">{text}</div>{warning}</div>')


def model_markdown(info: dict) -> str:
    """The Model tab: the banner's facts as a table, the load error or hint, and a few tips."""
    rows = [("model", info.get("model")), ("status", info.get("status")), *(info.get("facts") or ())]
    table = "\n".join(f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows if v)
    parts = ["### Model", "", "| property | value |", "|---|---|", table, ""]
    if info.get("backends"):
        parts += ["### What runs each operation", "", "| operation | backend |", "|---|---|",
                  *(f"| {op} | {str(how).replace('|', '/')} |" for op, how in info["backends"].items()), ""]
    if info.get("error"):
        parts += [f"**Load error:** {info['error']}", ""]
    if info.get("hint"):
        parts += [info["hint"], ""]
    parts += ["### Tips", "",
              "- Attach several images to one message: upload, paste (Ctrl+V) or drag and drop them onto the "
              "input box.",
              "- Click a message in the transcript, then **Delete turn**, to delete that turn; without a selection "
              "the last turn goes.",
              "- Click one of your messages, then **Edit message**, to ask it another way: the conversation forks "
              "there. **Regenerate** adds another answer. The earlier versions stay: ‹ 2/3 › under a message "
              "flips between them (and what followed each).",
              "- **PDF pages** renders the chosen pages at the model's input size and attaches them to your next "
              "message."]
    return "\n".join(parts)


# ---------------------------------------------------------------------- notices
def notice_html(message: str, kind: str = "error") -> str:
    icon = {"error": "⚠", "warning": "⚠", "info": "ℹ"}.get(kind, "")
    return f'<div class="notice notice-{kind}" role="alert">{icon} {html.escape(message)}</div>'
