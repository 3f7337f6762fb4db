"""What the app remembers for the user between visits: the generation settings (the last used, and each
conversation's own) and the models loaded lately."""

from __future__ import annotations

from dataclasses import dataclass

from .history import HistoryService
from .settings import GenerationSettings, SettingsError
from .store import Store

DEFAULT_SETTINGS_KEY = "generation_settings"  # the user's settings for a new chat
RECENT_MODELS_KEY = "recent_models"
MAX_RECENT_MODELS = 8


@dataclass(frozen=True)
class RecentModel:
    source: str  # a checkpoint directory or a hub id
    quantization: str | None

    @property
    def label(self) -> str:
        return f"{self.source} ({self.quantization})" if self.quantization else self.source


class Preferences:
    def __init__(self, store: Store, history: HistoryService):
        self.store, self.history = store, history

    def settings_for(self, conversation_id: str | None) -> GenerationSettings:
        """The settings to show: the conversation's own, else the user's last used, else the defaults. Saved
        values that no longer validate (an older version's) fall back instead of failing the page."""
        conversation = self.history.get(conversation_id)
        for saved in (conversation and conversation.settings, self.store.get_setting(DEFAULT_SETTINGS_KEY)):
            if saved:
                try:
                    return GenerationSettings.from_dict(saved)
                except SettingsError:
                    continue
        return GenerationSettings()

    def remember_settings(self, conversation_id: str | None, settings: GenerationSettings) -> None:
        """Keep these as the user's defaults and, when given, as the conversation's own."""
        self.store.set_setting(DEFAULT_SETTINGS_KEY, settings.to_dict())
        if conversation_id and self.history.get(conversation_id):
            self.store.set_conversation_settings(conversation_id, settings.to_dict())

    def recent_models(self) -> list[RecentModel]:
        """The models loaded lately, the newest first."""
        saved = self.store.get_setting(RECENT_MODELS_KEY) or []
        return [RecentModel(m["source"], m.get("quantization")) for m in saved if isinstance(m, dict) and m.get("source")]

    def remember_model(self, source: str, quantization: str | None) -> None:
        model = RecentModel(str(source), quantization)
        models = [model] + [m for m in self.recent_models() if m != model]
        self.store.set_setting(RECENT_MODELS_KEY, [{"source": m.source, "quantization": m.quantization}
                                                   for m in models[:MAX_RECENT_MODELS]])
