"""The model behind the app: loaded in a background thread so the UI shows progress (and a clear error)
meanwhile; switched to another checkpoint without a restart, between two answers."""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from engine.demo import DEMO_ABOUT, DEMO_DIR, DEMO_NAME
from engine.loading import LoadCancelled, LoadError
from engine.runtime import Runtime

from .errors import ChatError
from .scheduler import Scheduler

log = logging.getLogger(__name__)

REAL_MODEL_HINT = "python run_app.py --model deepseek-ai/deepseek-vl-7b-chat --load-4bit"


class LoadProgress(NamedTuple):
    fraction: float  # 0..1
    stage: str


QUANTIZATIONS = (None, "8bit", "4bit")


class ModelManager:
    """Loads the Runtime in a background thread so the UI can show progress (and a clear error) meanwhile, and
    switches to another checkpoint on request."""

    def __init__(self, source: str | os.PathLike | None = None, device: str | None = None, dtype: str | None = None,
                 quantization: str | None = None, *, loader: Callable[..., Runtime] = Runtime.load):
        _check_quantization(quantization)
        self.source = DEMO_DIR if source is None else source
        self.device = None if device in (None, "", "auto") else device
        self.dtype = None if dtype in (None, "", "auto") else dtype
        self.quantization = quantization
        self._loader = loader
        self._lock = threading.Lock()
        self._finished = threading.Event()  # set when a load ends, either way
        self._cancel = threading.Event()
        self._status = "idle"
        self._error: str | None = None
        self._progress = LoadProgress(0.0, "not started")
        self._runtime: Runtime | None = None
        # Called before a switch drops the loaded model, so that caches holding it (chat sessions and their
        # KV caches) let it go and its memory is free for the next one.
        self.on_unload: list[Callable[[], None]] = []

    @classmethod
    def from_runtime(cls, runtime: Runtime, source: str | os.PathLike | None = None) -> "ModelManager":
        """A manager around an already loaded runtime (tests, embedding the service elsewhere)."""
        manager = cls(runtime.directory if source is None else source, quantization=runtime.quantization)
        manager._runtime, manager._status = runtime, "ready"
        manager._progress = LoadProgress(1.0, "ready")
        manager._finished.set()
        return manager

    # ------------------------------------------------------------------ state
    @property
    def status(self) -> str:
        """"idle" (not started), "loading", "ready" or "failed"."""
        return self._status

    @property
    def progress(self) -> LoadProgress:
        return self._progress

    @property
    def error(self) -> str | None:
        return self._error

    @property
    def runtime(self) -> Runtime | None:
        return self._runtime

    @property
    def is_demo(self) -> bool:
        try:
            return Path(self.source).resolve() == DEMO_DIR.resolve()
        except OSError:
            return False

    @property
    def model_name(self) -> str:
        if self.is_demo:
            return DEMO_NAME
        return self._runtime.name if self._runtime else str(self.source)

    # ------------------------------------------------------------------ loading
    def start(self) -> "ModelManager":
        """Begin loading in the background (again after a failure); does nothing while loading or ready."""
        with self._lock:
            if self._status in ("loading", "ready"):
                return self
            self._status, self._error = "loading", None
            self._progress = LoadProgress(0.0, "opening the checkpoint")
            self._cancel.clear()
            self._finished.clear()
            threading.Thread(target=self._load, name="model-loader", daemon=True).start()
        return self

    def switch(self, source: str | os.PathLike, quantization: str | None = None, *,
               scheduler: Scheduler | None = None) -> "ModelManager":
        """Load another checkpoint in the background instead of this one, without a restart.

        With a scheduler, the switch takes its place in line for every slot: the answers already running or
        waiting finish on the old model, and the old model is unloaded before the new one loads (two models
        at once may not fit). Cancelling before the unload keeps the old model; after it, leaves none."""
        _check_quantization(quantization)
        _check_source(source)
        with self._lock:
            if self._status == "loading":
                raise ChatError("A model is still loading: cancel it first, or wait for it to finish.")
            previous = (self.source, self.quantization, self._status, self._error, self._progress)
            self.source, self.quantization = source, quantization
            self._status, self._error = "loading", None
            self._progress = LoadProgress(0.0, "waiting for the answers in progress to finish")
            self._cancel.clear()
            self._finished.clear()
            threading.Thread(target=self._switch, args=(scheduler, previous), name="model-switch", daemon=True).start()
        return self

    def _switch(self, scheduler: Scheduler | None, previous: tuple) -> None:
        tickets = [scheduler.submit(label="switch model", cancel=self._cancel) for _ in range(scheduler.slots)] \
            if scheduler else []
        try:
            for ticket in tickets:
                ticket.wait()
            if self._cancel.is_set():  # nothing was unloaded yet: the old model stays
                with self._lock:
                    self.source, self.quantization, self._status, self._error, self._progress = previous
                self._finished.set()
                return
            for forget in self.on_unload:
                forget()
            self._runtime = None
            gc.collect()
            self._progress = LoadProgress(0.0, "opening the checkpoint")
            self._load()
        finally:
            for ticket in tickets:
                ticket.release()

    def _load(self) -> None:
        runtime, error = None, None
        try:
            runtime = self._loader(self.source, device=self.device, dtype=self.dtype, quantization=self.quantization,
                                   progress=self._on_progress, cancel=self._cancel)
            if self._cancel.is_set():  # quantizing does not check the flag: honour a late cancel here
                runtime, error = None, "Loading the model was cancelled."
        except LoadCancelled:
            error = "Loading the model was cancelled."
        except LoadError as e:
            error = str(e)
        except Exception as e:  # anything else still has to reach the UI instead of dying with the thread
            log.exception("loading %s failed", self.source)
            error = f"Could not load the model {self.source}: {type(e).__name__}: {e}"
        with self._lock:
            self._runtime, self._error = runtime, error
            self._status = "ready" if runtime is not None else "failed"
            self._progress = LoadProgress(1.0, "ready") if runtime else LoadProgress(self._progress.fraction, "failed")
        self._finished.set()

    def _on_progress(self, stage: str, done: int, total: int) -> None:
        part = done / total if total else 1.0
        # The runtime quantizes each layer as its weights are read: one stage, whatever the quantization.
        text = f"loading and quantizing to {self.quantization}" if self.quantization else "loading weights"
        self._progress = LoadProgress(min(1.0, part), f"{text} ({done}/{total})")

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the current load to end; True when the model is ready."""
        self._finished.wait(timeout)
        return self._status == "ready"

    def cancel(self) -> None:
        """Stop an in-progress load (the status becomes "failed" with a cancelled message)."""
        self._cancel.set()

    def require(self) -> Runtime:
        """The runtime, or a ChatError saying why there is none yet."""
        runtime = self._runtime
        if runtime is not None and self._status == "ready":
            return runtime
        if self._status == "loading":
            fraction, stage = self._progress
            raise ChatError(f"The model is still loading ({fraction:.0%}, {stage}); try again in a moment.")
        if self._status == "failed":
            raise ChatError(f"The model failed to load: {self._error}")
        raise ChatError("The model has not been loaded yet.")

    # ------------------------------------------------------------------ display
    def banner(self) -> dict:
        """What the UI shows about the model; `text` is a ready-made one-paragraph summary."""
        info: dict[str, Any] = {"status": self._status, "model": self.model_name, "demo": self.is_demo,
                                "hint": None, "progress": self._progress.fraction, "stage": self._progress.stage,
                                "error": self._error, "device": self.device or "auto", "dtype": self.dtype or "auto",
                                "quantization": self.quantization or "none", "memory": None, "memory_bytes": None,
                                "context": None, "image_size": None}
        if self.is_demo:
            info["hint"] = (f"{DEMO_ABOUT} For real use load deepseek-ai/deepseek-vl-7b-chat from the Model tab "
                            f"(or run: {REAL_MODEL_HINT} on a small GPU), or a checkpoint made in the Training tab.")
        if self._runtime is not None and self._status == "ready":
            d = self._runtime.describe()
            info["hint"] = info["hint"] or d["advice"]
            info.update(backend=d["backend"], backends=d["backends"])
            info.update(device=d["device"], dtype=d["dtype"], quantization=d["quantized_as"],
                        output_layer=d["output_layer"] if d["quantization"] != "none" else None,
                        memory_bytes=d["memory_bytes"], memory=_size(d["memory_bytes"]), context=d["context"],
                        image_size=d["image_size"])
        info["facts"] = self._facts(info)
        info["text"] = self._banner_text(info)
        return info

    @staticmethod
    def _facts(info: dict) -> list[tuple[str, str]]:
        """(label, value) pairs describing the loaded model: the banner's chips, the Model tab's table and the
        one-line summary are all made from this list."""
        if info["status"] != "ready":
            return []
        facts = [("device", info["device"]), ("dtype", info["dtype"]), ("quantization", info["quantization"]),
                 ("output layer", info.get("output_layer")),
                 ("memory", info["memory"]), ("decoding", info.get("backend")),
                 ("context", f"{info['context']} tokens" if info.get("context") else None),
                 ("image input", f"{info['image_size']} px" if info.get("image_size") else None)]
        return [(label, str(value)) for label, value in facts if value]

    @staticmethod
    def _banner_text(info: dict) -> str:
        if info["status"] == "ready":
            head = " · ".join([f"Model: {info['model']}", *(f"{k} {v}" for k, v in info["facts"])])
        elif info["status"] == "loading":
            head = f"Loading {info['model']}: {info['progress']:.0%} ({info['stage']})"
        elif info["status"] == "failed":
            head = f"Model {info['model']} failed to load: {info['error']}"
        else:
            head = f"Model {info['model']} is not loaded."
        return head + (f"\n{info['hint']}" if info["hint"] else "")


def _check_source(source: str | os.PathLike) -> None:
    """Refuse at once what can be told wrong without loading (the old model is still there then): an empty
    name, a folder without config.json, a path that does not exist. A hub id (owner/name) is tried."""
    text = str(source).strip()
    if not text:
        raise ChatError("Give a checkpoint directory or a Hugging Face id to load.")
    path = Path(text).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise ChatError(f"{text} is a folder but holds no config.json: it is not a checkpoint.")
    looks_like_path = text.startswith(("/", ".", "~")) or text.count("/") != 1 or "\\" in text
    if not path.exists() and looks_like_path:
        raise ChatError(f"No such checkpoint directory: {text}. Give an existing folder or a hub id like "
                        "deepseek-ai/deepseek-vl-1.3b-chat.")


def _check_quantization(quantization: str | None) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be None, '8bit' or '4bit', got {quantization!r}")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


