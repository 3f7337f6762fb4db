"""The services one app instance runs, built once by `run_app.py` (and by tests) and handed to the UI."""

from __future__ import annotations

from dataclasses import dataclass

from .chat_service import ChatService
from .errors import ChatError
from .models import ModelManager
from .history import HistoryService
from .preferences import Preferences
from .pdf_pages import PdfError, RenderCancelled
from .scratch import Scratch
from .screen_capture import CaptureError
from .store import Store, StoreError
from .training_runs import TrainingRuns

# Errors whose message is written for the user (front ends show it as is; anything else is a bug to log).
USER_ERRORS = (ChatError, StoreError, PdfError, CaptureError, RenderCancelled, ValueError, OSError)


@dataclass
class Services:
    store: Store  # for the services below and the data directory's paths; the UI never reads it
    models: ModelManager
    chat: ChatService
    history: HistoryService
    preferences: Preferences
    scratch: Scratch  # temporary files, gradio's cache included; deleting attachments removes their copies
    training: TrainingRuns  # training runs as processes of their own

    @property
    def attachments_dir(self):
        """Where attachment files live (content-addressed, never changed): the UI serves them as static files."""
        return self.store.attachments_dir

    @classmethod
    def build(cls, store: Store, models: ModelManager, scratch: Scratch | None = None, **chat_options) -> Services:
        scratch = scratch or Scratch.of(store)
        store.on_attachments_deleted(scratch.forget)
        history = HistoryService(store)
        return cls(store, models, ChatService(store, models, **chat_options), history, Preferences(store, history),
                   scratch, TrainingRuns(store, store.data_dir / "training"))
