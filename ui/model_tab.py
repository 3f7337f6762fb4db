"""The model: the banner above the tabs (what is loaded, load progress or failure) and the Model tab with its
details. Both are drawn from the same `ModelManager.banner()` facts and refreshed by a timer while loading."""

from __future__ import annotations

import gradio as gr

from app.chat_service import ModelManager

from . import views
from .chat_tab import ChatTab
from .common import QUIET


class ModelTab:
    def __init__(self, models: ModelManager, banner: gr.HTML):
        self.models = models
        self.banner = banner
        self.details = gr.Markdown(elem_id="model-details")

    @staticmethod
    def make_banner(models: ModelManager) -> gr.HTML:
        return gr.HTML(views.banner_html(models.banner()), elem_id="model-banner")

    def updates(self) -> dict:
        info = self.models.banner()
        return {self.banner: views.banner_html(info), self.details: views.model_markdown(info)}

    def wire(self, tab: ChatTab) -> None:
        """Poll the load every second until it ends, then fill the chat's context meter once."""
        timer = gr.Timer(1.0, active=self.models.status in ("idle", "loading"))

        def poll(conversation_id, value, max_new_tokens):
            done = self.models.status in ("ready", "failed")
            return {**self.updates(), timer: gr.Timer(active=not done),
                    tab.meter: tab.refresh_meter(conversation_id, value, max_new_tokens) if done else gr.skip()}

        timer.tick(poll, tab.meter_inputs, [self.banner, self.details, tab.meter, timer], **QUIET)
