"""The model: the banner above the tabs (what is loaded, load progress or failure) and the Model tab with its
details and the form that loads another checkpoint without a restart. Banner and details are drawn from the
same `ModelManager.banner()` facts and refreshed by a timer while a load runs."""

from __future__ import annotations

import gradio as gr

from app.services import Services

from . import views
from .chat_tab import ChatTab
from .common import QUIET, guard, hide, show

QUANTIZATION_CHOICES = [("none (full precision)", "none"), ("8-bit", "8bit"), ("4-bit", "4bit")]


class ModelTab:
    def __init__(self, services: Services, banner: gr.HTML):
        self.models, self.chat, self.preferences = services.models, services.chat, services.preferences
        self.banner = banner
        self.details = gr.Markdown(elem_id="model-details")
        with gr.Group(elem_id="model-switch"):
            gr.Markdown("### Load another model")
            self.recent = gr.Dropdown(label="Recently loaded", choices=[], value=None, elem_id="recent-models")
            with gr.Row():
                self.source = gr.Textbox(label="Checkpoint directory or Hugging Face id", scale=3, max_lines=1,
                                         placeholder="deepseek-ai/deepseek-vl-7b-chat or /path/to/checkpoint",
                                         elem_id="model-source")
                self.quantization = gr.Radio(QUANTIZATION_CHOICES, value="none", label="Quantization", scale=2,
                                             elem_id="model-quantization")
            with gr.Row():
                self.load_btn = gr.Button("Load", variant="primary", elem_id="model-load-btn")
                self.cancel_btn = gr.Button("Cancel loading", elem_id="model-cancel-btn")
            self.notice = gr.HTML("", visible=False, elem_id="model-notice")
        self.pending = gr.State(None)  # (source, quantization) asked for, remembered once it has loaded
        # Rendered by build_ui outside the tabs: gradio mounts a tab's contents only once it is opened, and a
        # timer in an unopened Model tab never ticks (a load started from the Training tab, or at startup).
        self.timer = gr.Timer(1.0, active=self.models.status in ("idle", "loading"), render=False)

    @staticmethod
    def make_banner(models) -> gr.HTML:
        return gr.HTML(views.banner_html(models.banner()), elem_id="model-banner")

    def updates(self) -> dict:
        info = self.models.banner()
        recent = self.preferences.recent_models()
        return {self.banner: views.banner_html(info), self.details: views.model_markdown(info),
                self.recent: gr.update(choices=[(m.label, i) for i, m in enumerate(recent)], value=None)}

    # ------------------------------------------------------------------ actions
    def load(self, source, quantization):
        source = (source or "").strip()
        quantization = None if quantization == "none" else quantization
        self.chat.switch_model(source, quantization)
        return {self.pending: (source, quantization), self.timer: gr.Timer(active=True),
                **show(self.notice, f"Loading {source}… the answers in progress finish first.", "info"),
                **self.updates()}

    def cancel(self):
        if self.models.status != "loading":
            return show(self.notice, "No model is loading.", "info")
        self.models.cancel()
        return show(self.notice, "Cancelling the load…", "info")

    def pick_recent(self, index):
        recent = self.preferences.recent_models()
        if index is None or not 0 <= int(index) < len(recent):
            return {}
        model = recent[int(index)]
        return {self.source: model.source, self.quantization: model.quantization or "none"}

    # ------------------------------------------------------------------ wiring
    def wire(self, tab: ChatTab) -> None:
        """Poll a load every second until it ends; then fill the chat's context meter and remember the model."""
        g = guard(self.notice)

        def poll(pending, conversation_id, value, max_new_tokens):
            status = self.models.status
            done = status in ("ready", "failed")
            update = {**self.updates(), self.timer: gr.Timer(active=not done),
                      tab.meter: tab.refresh_meter(conversation_id, value, max_new_tokens) if done else gr.skip()}
            if done and pending:
                if status == "ready":
                    self.preferences.remember_model(*pending)
                update.update({self.pending: None, **hide(self.notice)})
            return update

        outputs = [self.banner, self.details, self.recent, self.timer, self.pending, self.notice, tab.meter]
        self.timer.tick(poll, [self.pending, *tab.meter_inputs], outputs, **QUIET)
        self.load_btn.click(g(self.load), [self.source, self.quantization],
                            [self.pending, self.timer, self.notice, self.banner, self.details, self.recent], **QUIET)
        self.cancel_btn.click(g(self.cancel), None, [self.notice], **QUIET)
        self.recent.input(g(self.pick_recent), [self.recent], [self.source, self.quantization, self.notice], **QUIET)
