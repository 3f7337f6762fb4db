"""The training-run supervisor: each run is a `python -m engine train` process of its own (the UI stays
responsive, and a crash in training cannot take the app down), recorded in the app's SQLite file.

The process runs in a session of its own, so it outlives an app restart; the app finds it again by pid and
process start time. A stop asks it (SIGTERM) to save a checkpoint and exit; resume starts it again with
`--resume`. How a run ended is read from its exit code when this app started it, else from its metrics.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from . import viewer
from .errors import ChatError
from .store import Store

EXIT_STOPPED = 3  # `python -m engine train` after SIGINT/SIGTERM, with a checkpoint saved
LOG_NAME = "train.log"
REPO_ROOT = Path(__file__).resolve().parents[1]


class TrainingError(ChatError):
    """A training request the user can fix (bad settings, a run already going)."""


@dataclass(frozen=True)
class RunRequest:
    """What the Training tab asks for; None leaves a value to the stage presets (Table 4, scaled)."""

    model: str
    data: list[str]
    text_data: list[str] = field(default_factory=list)
    stages: list[int] = field(default_factory=lambda: [1, 2, 3])
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    seed: int | None = None
    tuning: str = "full"  # "full", "lora" or "qlora"
    skip_bad: bool = False
    save_every: int | None = None

    def __post_init__(self):
        if not str(self.model).strip():
            raise TrainingError("Choose the model to start from (a checkpoint directory or hub id).")
        if not self.data:
            raise TrainingError("Give at least one data file (JSONL conversations).")
        if not self.stages or any(s not in (1, 2, 3) for s in self.stages):
            raise TrainingError("Choose the stages to run among 1, 2 and 3.")
        if self.tuning not in ("full", "lora", "qlora"):
            raise TrainingError(f"Unknown tuning {self.tuning!r}: full, lora or qlora.")
        for name in ("steps", "batch_size", "warmup_steps", "save_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < (0 if name == "warmup_steps" else 1)):
                raise TrainingError(f"{name.replace('_', ' ').capitalize()} must be a whole number ≥ "
                                    f"{0 if name == 'warmup_steps' else 1}, got {value!r}.")
        if self.lr is not None and not 0 < self.lr < 1:
            raise TrainingError(f"Learning rate must be between 0 and 1, got {self.lr!r}.")

    def plan(self) -> dict:
        """The data report and each stage's settings (Table 4 scaled, overrides applied) and memory estimate,
        loading no weights; DataError / TrainingError (engine.training) say what is wrong."""
        from engine.training.loop import RunConfig, plan

        overrides = {k: v for k, v in (("steps", self.steps), ("batch_size", self.batch_size), ("lr", self.lr),
                                       ("warmup_steps", self.warmup_steps)) if v is not None}
        return plan(RunConfig(model=str(self.model), out="", data=list(self.data), text_data=list(self.text_data),
                              stages=sorted(self.stages), overrides=overrides, skip_bad=self.skip_bad,
                              lora=self.tuning == "lora", qlora=self.tuning == "qlora"))

    def argv(self, out: Path, resume: bool = False) -> list[str]:
        args = ["-m", "engine", "train", "--model", str(self.model), "--out", str(out),
                "--stages", ",".join(map(str, sorted(self.stages)))]
        args += [a for path in self.data for a in ("--data", str(path))]
        args += [a for path in self.text_data for a in ("--text-data", str(path))]
        for flag, value in (("--steps", self.steps), ("--batch-size", self.batch_size), ("--lr", self.lr),
                            ("--warmup-steps", self.warmup_steps), ("--seed", self.seed),
                            ("--save-every", self.save_every)):
            if value is not None:
                args += [flag, str(value)]
        if self.tuning != "full":
            args.append(f"--{self.tuning}")
        if self.skip_bad:
            args.append("--skip-bad")
        if resume:
            args.append("--resume")
        return args


@dataclass(frozen=True)
class TrainingRun:
    id: str
    status: str  # "running", "finished", "stopped" or "failed"
    created_at: str
    out_dir: Path
    request: RunRequest
    final: str | None  # the finished checkpoint, ready to chat with
    error: str | None

    @classmethod
    def from_row(cls, row: dict) -> TrainingRun:
        return cls(row["id"], row["status"], row["created_at"], Path(row["out_dir"]), RunRequest(**row["request"]),
                   row["final"], row["error"])


class TrainingRuns:
    def __init__(self, store: Store, runs_dir: Path, python: str = sys.executable):
        self.store, self.runs_dir, self.python = store, Path(runs_dir), python
        self._processes: dict[str, subprocess.Popen] = {}  # runs this app started: their exit codes are known

    # ------------------------------------------------------------------ starting and stopping
    def start(self, request: RunRequest) -> TrainingRun:
        """Start a run; refused while another one is running (one device, one run)."""
        viewer.require_owner("train models")
        self._refuse_if_busy()
        return self._launch(request, self.runs_dir / _stamp(), resume=False)

    def resume(self, run_id: str) -> TrainingRun:
        """Continue a stopped or failed run from its last checkpoint, with the same settings."""
        viewer.require_owner("train models")
        run = self.get(run_id)
        if run.status == "running":
            raise TrainingError("This run is still running.")
        if run.status == "finished":
            raise TrainingError("This run has finished; start a new one to train further.")
        self._refuse_if_busy()
        return self._launch(run.request, run.out_dir, resume=True, run_id=run.id)

    def stop(self, run_id: str) -> None:
        """Ask the run to save a checkpoint and exit (it finishes its current step first)."""
        viewer.require_owner("train models")
        run = self.get(run_id)
        process = self._alive(self.store.get_run(run_id))
        if run.status != "running" or process is None:
            raise TrainingError("This run is not running.")
        process.send_signal(signal.SIGTERM)

    def _launch(self, request: RunRequest, out: Path, resume: bool, run_id: str | None = None) -> TrainingRun:
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / LOG_NAME, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        try:
            process = subprocess.Popen([self.python, *request.argv(out, resume)], stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=REPO_ROOT,
                                       start_new_session=True)  # outlives the app, and its Ctrl+C
        finally:
            log.close()
        started = psutil.Process(process.pid).create_time()
        if run_id is None:
            run_id = self.store.add_run(asdict(request), str(out), process.pid, started)
        else:
            self.store.update_run(run_id, status="running", pid=process.pid, process_started=started, error=None)
        self._processes[run_id] = process
        return self.get(run_id)

    def _refuse_if_busy(self) -> None:
        busy = [r for r in self.list() if r.status == "running"]
        if busy:
            raise TrainingError(f"A training run is already running ({busy[0].id}, started {busy[0].created_at}); "
                                "stop it first: one run at a time on this machine.")

    # ------------------------------------------------------------------ reading
    def get(self, run_id: str) -> TrainingRun:
        viewer.require_owner("see training runs")
        return TrainingRun.from_row(self._refresh(self.store.get_run(run_id)))

    def list(self, limit: int = 50) -> list[TrainingRun]:
        viewer.require_owner("see training runs")
        return [TrainingRun.from_row(self._refresh(row)) for row in self.store.list_runs(limit)]

    def metrics(self, run_id: str) -> list[dict]:
        """The lines of the run's metrics.jsonl (steps, evaluations, events) written so far."""
        return _read_metrics(self.get(run_id).out_dir)

    def log_tail(self, run_id: str, lines: int = 40) -> str:
        path = self.get(run_id).out_dir / LOG_NAME
        if not path.exists():
            return ""
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])

    # ------------------------------------------------------------------ noticing how a run ended
    def _alive(self, row: dict):
        """The run's process if it is still the one that was started (a pid can be reused), else None."""
        process = self._processes.get(row["id"])
        if process is not None:
            return process if process.poll() is None else None
        try:
            found = psutil.Process(row["pid"])
            if abs(found.create_time() - (row["process_started"] or 0)) < 1 and found.status() != psutil.STATUS_ZOMBIE:
                return found
        except (psutil.NoSuchProcess, psutil.AccessDenied, TypeError, ValueError):
            pass
        return None

    def _refresh(self, row: dict) -> dict:
        if row["status"] != "running" or self._alive(row) is not None:
            return row
        out = Path(row["out_dir"])
        process = self._processes.pop(row["id"], None)
        code = process.returncode if process is not None else None
        events = [m.get("event") for m in _read_metrics(out) if m.get("type") == "event"]
        final = out / "final"
        if code == 0 or (code is None and "done" in events and (final / "config.json").is_file()):
            changes = {"status": "finished", "final": str(final), "error": None}
        elif code == EXIT_STOPPED or (code is None and events and events[-1] == "stopped"):
            changes = {"status": "stopped", "error": None}
        else:
            tail = "\n".join((out / LOG_NAME).read_text(errors="replace").splitlines()[-12:]) \
                if (out / LOG_NAME).exists() else ""
            why = f"exit code {code}" if code is not None else "the process is gone (killed, or the machine restarted)"
            changes = {"status": "failed", "error": f"Training ended with {why}.\n{tail}".strip()}
        self.store.update_run(row["id"], **changes)
        return {**row, **changes}


def _read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # the line being written
    return records


def _stamp() -> str:
    from datetime import datetime

    return datetime.now().strftime("run-%Y%m%d-%H%M%S-%f")
