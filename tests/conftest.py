import importlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The reference vectors of the official code; further case sets in the same layout can be dropped in.
REFERENCE_DIR = Path(os.environ.get("DSVL_REFERENCE_DIR") or REPO.parent / "shared" / "reference")
# Under CI every component a test needs must be there: a browser test that skipped is not a passed one.
IN_CI = bool(os.environ.get("CI"))
# A tiny random DeepSeek-VL (the real architecture, 384 px; the first embedded demo): its answers are gibberish
# that runs on to max_new_tokens, which the tests of Stop, queueing and streaming need (the trained demo answers in
# a few words and stops), and its shapes are the ones the kernel and quantization tests were written for.
TALKATIVE = REPO / "tests" / "models" / "talkative"


def pytest_configure(config):
    if IN_CI and not (REFERENCE_DIR / "README.md").is_file():
        raise pytest.UsageError(f"no reference vectors at {REFERENCE_DIR} (set DSVL_REFERENCE_DIR); CI needs them")


def require(available: bool, what: str) -> None:
    """Skip when a component is missing on a developer's machine; fail the run under CI."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{what} (CI must provide it; see scripts/setup.sh)", pytrace=False)
    pytest.skip(what)


def require_module(name: str):
    """`pytest.importorskip`, except that under CI a missing module fails the run."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        require(False, f"cannot import {name}: {e}")


def app_env(**extra: str) -> dict[str, str]:
    """The environment a test gives run_app.py: headless (no display), offline, unbuffered output."""
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **extra)
    return env


def stop_process(process, timeout: float = 10) -> None:
    """Terminate a server started by a test; kill it if it does not exit in time."""
    import subprocess

    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def talkative_model() -> Path:
    return TALKATIVE


def _manager(source):
    from app.models import ModelManager

    manager = ModelManager(source).start()
    assert manager.wait(120), manager.error
    return manager


@pytest.fixture(scope="session")
def models(talkative_model):
    """The talkative model, loaded once for every test module that chats with it."""
    return _manager(talkative_model)


@pytest.fixture(scope="session")
def demo_models():
    """The embedded demo model (assets/demo-model), loaded once."""
    from engine.demo import DEMO_DIR

    return _manager(DEMO_DIR)
