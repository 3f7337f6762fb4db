"""The web UI: composes the history sidebar, the model banner and the tabs (one module each) into one Blocks.

`build_ui(services)` returns the Blocks; `run_app.py` queues and launches it. Widgets only: every read and
write goes through the `app` services.

Stable element ids (for the browser tests and for custom CSS):

    model-banner        model name, dtype, quantization, device, memory; load progress or failure
    chatbot             the transcript; user turns show their images as thumbnails
    chat-input          text + images (upload, paste, drag and drop); Enter sends
    notice              errors and hints for the chat (bad image, overflow, model still loading, place in line)
    gen-stats           speed and token counts of the last answer
    stop-btn regenerate-btn edit-btn delete-turn-btn      transcript actions
    edit-bar edit-note cancel-edit-btn                    shown while editing a message
    variant-events      hidden: receives the clicks on the ‹ › version arrows (.variant-nav) in the transcript
    context-meter       tokens and image slots left, overflow warning
    settings-panel      temperature top-p top-k max-new-tokens repetition-penalty seed system-prompt
    screen-panel        monitor capture-btn
    pdf-panel           pdf-upload pdf-pages pdf-selection pdf-attach-btn pdf-info
    history-sidebar     new-chat-btn history-search search-results history-list rename-box rename-btn
                        delete-btn delete-confirm delete-yes-btn delete-no-btn export-json-btn
                        export-md-btn export-file import-btn history-notice
    model-details       the Model tab
    account             who is signed in, and Sign out (only with accounts)

Who is signed in (app.gate puts it on each request) decides what the services show (app.viewer): each user sees
their own history; the Model and Training tabs are the owner's only.
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from app import viewer
from app.gate import LOGOUT_PATH, SignIn
from app.services import Services

from .chat_tab import ChatTab
from .common import QUIET, use_scratch
from .history import HistoryPanel
from .model_tab import ModelTab
from .training_tab import TrainingTab
from .style import CSS, FOCUS_OPENED_JS, KEEP_DRAFT_JS, theme

TITLE = "DeepSeek-VL local"


class ChatApp(gr.Blocks):
    """Blocks that bring their own theme, CSS and file access to `launch()`, so the launcher needs none
    of gradio 6's launch-time styling arguments."""

    def launch(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        kwargs.setdefault("theme", theme())
        kwargs.setdefault("css", CSS)
        kwargs.setdefault("footer_links", ["settings"])
        # Gradio's own run history would copy every message (images included) into the browser's
        # localStorage: a second, unencrypted history, and slow once a big message was sent.
        kwargs.setdefault("run_history", False)
        # Files handed to the browser (exports, PDF pages, screenshots) are made in the app's scratch space.
        kwargs["allowed_paths"] = [*(kwargs.get("allowed_paths") or ()), *self.file_dirs]
        return super().launch(*args, **kwargs)


def signed_in_user() -> str | None:
    """The user of the gradio event being handled (None outside one): what app.gate's SignIn found."""
    from gradio.context import LocalContext

    request = LocalContext.request.get(None)
    if request is None:
        return None
    return getattr(request, "username", None) or viewer.NOBODY


# The owner's tabs, hidden for everyone else. Gradio 6 hides a Tab's panel on a visible=False update but not
# its button, so the page hides the buttons itself; the services refuse these actions to others anyway.
OWNER_TABS_HIDDEN = "<style>#model-tab-button, #training-tab-button {display: none !important}</style>"


def account_html(sign_in: SignIn | None, user: str) -> str:
    if sign_in is None or sign_in.accounts is None:
        return ""
    return (f'<span>Signed in as <b>{html.escape(sign_in.display_name(user))}</b></span> '
            f'<a href="{LOGOUT_PATH}" id="logout-link">Sign out</a>' + ("" if user == viewer.OWNER else OWNER_TABS_HIDDEN))


def build_ui(services: Services, sign_in: SignIn | None = None) -> gr.Blocks:
    """`sign_in`: the gate in front of the server (run_app.py); without one, everything runs as the owner."""
    if sign_in is not None:
        viewer.resolve_with(signed_in_user)
    # Attachments are content-addressed and never change: serve them straight from the data directory
    # instead of copying every thumbnail into gradio's cache on each transcript update.
    gr.set_static_paths([services.attachments_dir])
    use_scratch(services.scratch)

    with ChatApp(title=TITLE, fill_width=True) as demo:
        demo.file_dirs = [str(services.scratch.files_dir)]
        conv = gr.State(None)  # the open conversation's id, shared by the sidebar and the chat tab
        account = gr.HTML("", visible=False, elem_id="account")
        history = HistoryPanel(services, conv)
        banner = ModelTab.make_banner(services.models)
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Chat", id="chat", elem_id="chat-tab"):
                chat = ChatTab(services, conv)
            with gr.Tab("Model", id="model", elem_id="model-tab") as model_tab:
                model = ModelTab(services, banner)
            with gr.Tab("Training", id="training", elem_id="training-tab") as training_tab:
                training = TrainingTab(services)
        model.timer.render()  # polls the banner whichever tab is open
        chat.build_tools()  # the right-hand side panel

        chat.wire(after_change=[(history.refresh, [conv], [history.list, history.rename_box])])
        history.wire(chat)
        model.wire(chat)
        training.wire(services, tabs, model.timer)

        def on_load(conversation_id, value, max_new_tokens, request: gr.Request):
            # /?c=<id> opens that conversation (the screenshot hotkey sends the browser there).
            wanted = services.history.get(request.query_params.get("c") if request else None)
            opened = chat.open_updates(wanted) if wanted else {}
            conversation_id = wanted.id if wanted else conversation_id
            owner = viewer.is_owner()
            return {**history.refresh(conversation_id), **model.updates(), **chat.on_load(conversation_id),
                    **(training.on_load() if owner else {}), **opened,
                    model_tab: gr.Tab(visible=owner), training_tab: gr.Tab(visible=owner),
                    account: gr.update(value=account_html(sign_in, viewer.current()),
                                       visible=bool(sign_in and sign_in.accounts)),
                    chat.meter: chat.refresh_meter(conversation_id, value, max_new_tokens)}

        load_outputs = [account, model_tab, training_tab, history.list, history.rename_box, model.banner,
                        model.details, model.recent, chat.meter,
                        chat.monitor, chat.screen_note, chat.page_loaded, *chat.settings.inputs, training.run_picker,
                        training.status, training.plot, training.log, training.timer, training.chats]
        load_outputs += [c for c in chat.open_outputs if c not in load_outputs]
        demo.load(on_load, chat.meter_inputs, load_outputs, **QUIET)
        demo.load(None, js=KEEP_DRAFT_JS)
        demo.load(None, js=FOCUS_OPENED_JS)
    return demo
