"""The training-run supervisor with real `python -m engine train` processes on a tiny model: start, watch the
metrics, stop (a checkpoint is saved), resume to the end, chat with the result; one run at a time; a run is
found again after an app restart, and a killed one is marked failed with its last log lines."""

import os
import signal
import time

import pytest

from app.store import Store
from app.training_runs import RunRequest, TrainingError, TrainingRuns
from engine.chat import ChatSession
from engine.generation import SamplingParams
from engine.runtime import Runtime

from training_fixtures import conversations, tiny_model

WAIT_S = 240  # a liveness bound: a fresh process imports torch and loads the model first


def wait_for(condition, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def runs(tmp_path):
    with Store(tmp_path / "data") as store:
        yield TrainingRuns(store, tmp_path / "data" / "training")


def request(tmp_path, steps=40, **kwargs):
    model = tiny_model(tmp_path / "model")
    return RunRequest(model=str(model), data=[str(conversations(tmp_path / "set"))], stages=[3], steps=steps,
                      batch_size=2, save_every=1, seed=0, **kwargs)


def steps_of(runs, run_id):
    return [m for m in runs.metrics(run_id) if m.get("type") == "step"]


def test_start_stop_resume_and_chat_with_the_result(runs, tmp_path):
    run = runs.start(request(tmp_path))
    assert run.status == "running" and (run.out_dir / "train.log").exists()
    with pytest.raises(TrainingError, match="already running"):
        runs.start(request(tmp_path / "other"))

    wait_for(lambda: len(steps_of(runs, run.id)) >= 2, "two training steps")
    runs.stop(run.id)
    stopped = wait_for(lambda: (r := runs.get(run.id)).status != "running" and r, "the run to stop")
    assert stopped.status == "stopped", stopped.error
    done_before = len(steps_of(runs, run.id))
    assert done_before < 40

    resumed = runs.resume(run.id)
    assert resumed.status == "running" and resumed.id == run.id
    finished = wait_for(lambda: (r := runs.get(run.id)).status != "running" and r, "the run to finish", 600)
    assert finished.status == "finished", finished.error
    steps = steps_of(runs, run.id)
    assert [s["step"] for s in steps] == list(range(1, steps[-1]["step"] + 1))  # resumed where it stopped
    assert steps[-1]["step"] == steps[-1]["total_steps"]

    session = ChatSession(Runtime.load(finished.final))
    session.add_user("What is two plus two?")
    answer = session.answer(SamplingParams(max_new_tokens=4))
    assert session.last_stats.tokens >= 1 and answer.strip() == session.turns[-1].text
    with pytest.raises(TrainingError, match="finished"):
        runs.resume(run.id)


def test_a_run_outlives_an_app_restart_and_a_killed_one_is_marked_failed(runs, tmp_path):
    run = runs.start(request(tmp_path, steps=100_000))
    wait_for(lambda: steps_of(runs, run.id), "a first step")
    restarted = TrainingRuns(runs.store, runs.runs_dir)  # a new app process knows only the database
    assert restarted.get(run.id).status == "running"
    os.kill(runs.store.get_run(run.id)["pid"], signal.SIGKILL)
    failed = wait_for(lambda: (r := restarted.get(run.id)).status != "running" and r, "the death to be seen")
    assert failed.status == "failed" and "process is gone" in failed.error
    assert "step" in failed.error or "stage" in failed.error  # the last log lines come with it


@pytest.mark.parametrize("fields, message", [
    ({"data": []}, "data file"), ({"stages": [4]}, "stages"), ({"steps": 0}, "Steps"),
    ({"lr": 2.0}, "Learning rate"), ({"model": " "}, "model"), ({"tuning": "dora"}, "tuning"),
])
def test_bad_requests_are_refused(fields, message):
    values = {"model": "m", "data": ["d.jsonl"], **fields}
    with pytest.raises(TrainingError, match=message):
        RunRequest(**values)


def test_bad_data_fails_with_the_report(runs, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [}\n')
    run = runs.start(RunRequest(model=str(tiny_model(tmp_path / "model")), data=[str(bad)], stages=[3], steps=2))
    failed = wait_for(lambda: (r := runs.get(run.id)).status != "running" and r, "the refusal")
    assert failed.status == "failed" and "exit code 2" in failed.error and "bad.jsonl:1" in failed.error
