"""The generation settings panel, drawn from `app.settings.FIELDS` (labels, ranges and help live there)."""

from __future__ import annotations

import gradio as gr

from app.preferences import Preferences
from app.settings import FIELDS, GenerationSettings, SettingsError


class SettingsPanel:
    def __init__(self):
        self.widgets: dict[str, gr.components.Component] = {}
        with gr.Accordion("Generation settings", open=False, elem_id="settings-panel"):
            for f in FIELDS:
                self.widgets[f.name] = self._widget(f)

    @staticmethod
    def _widget(f) -> gr.components.Component:
        common = {"label": f.label, "info": f.info, "elem_id": f.elem_id, "value": f.default}
        if f.control == "slider":
            return gr.Slider(f.minimum, f.maximum, step=f.step, **common)
        if f.control == "number":
            return gr.Number(precision=0, minimum=f.minimum, **common)
        return gr.Textbox(lines=f.lines or 1, placeholder=f.placeholder, **common)

    @property
    def inputs(self) -> list:
        return list(self.widgets.values())

    def __getitem__(self, name: str) -> gr.components.Component:
        return self.widgets[name]

    def read(self, values: tuple) -> GenerationSettings:
        """The widgets' values (in `inputs` order) as settings; SettingsError names a bad one."""
        return GenerationSettings.from_ui(dict(zip(self.widgets, values)))

    def show(self, settings: GenerationSettings) -> dict:
        """Updates that put `settings` into the widgets."""
        values = settings.to_ui()
        return {widget: values[name] for name, widget in self.widgets.items()}

    def wire(self, preferences: Preferences) -> None:
        """Keep what the user sets as their defaults at once, so a reload keeps it even before a send. Only
        the user's own edits count (`input`), not the panel being filled from an opened conversation."""

        def keep(*values):
            try:
                preferences.remember_settings(None, self.read(values))
            except SettingsError:
                pass  # half-typed; the send names the bad setting

        for widget in self.inputs:
            widget.input(keep, self.inputs, None, trigger_mode="always_last", show_progress="hidden")
