"""run_app.py: flag parsing, and main() wiring the store, model manager and service into the UI."""

import os
import subprocess
import sys
import types
from pathlib import Path

import platformdirs
import pytest

import run_app

REPO = Path(__file__).resolve().parents[1]


def test_defaults():
    args = run_app.parse_args([])
    assert args.model is None and args.quantization is None
    assert args.device is None and args.dtype is None  # automatic
    assert (args.host, args.port, args.share, args.auth, args.no_browser) == ("127.0.0.1", 7860, False, [], False)
    assert args.data_dir == Path(platformdirs.user_data_dir("deepseek-vl-local"))


def test_flags(tmp_path):
    args = run_app.parse_args(["--model", "deepseek-ai/deepseek-vl-7b-chat", "--load-4bit", "--device", "cuda:1",
                               "--dtype", "bf16", "--host", "0.0.0.0", "--port", "8080", "--share",
                               "--auth", "ada:s3cr:et", "--data-dir", str(tmp_path), "--no-browser"])
    assert args.model == "deepseek-ai/deepseek-vl-7b-chat" and args.quantization == "4bit"
    assert (args.device, args.dtype, args.host, args.port) == ("cuda:1", "bf16", "0.0.0.0", 8080)
    assert args.share and args.no_browser and args.auth == [("ada", "s3cr:et")]  # colons allowed in the password
    assert args.data_dir == tmp_path
    assert run_app.parse_args(["--load-8bit"]).quantization == "8bit"


def test_api_key_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.delenv(run_app.API_KEY_ENV, raising=False)
    assert run_app.parse_args([]).api_key is None  # main() generates one
    monkeypatch.setenv(run_app.API_KEY_ENV, "from-env")
    assert run_app.parse_args([]).api_key == "from-env"
    assert run_app.parse_args(["--api-key", "from-flag"]).api_key == "from-flag"


def test_a_given_api_key_is_not_echoed(tmp_path):
    given = run_app.parse_args(["--api-key", "sk-given", "--data-dir", str(tmp_path)])
    assert "sk-given" not in run_app.api_key_line(given, "sk-given")
    local = run_app.parse_args(["--data-dir", str(tmp_path)])
    assert "install token" in run_app.api_key_line(local, "tok")  # this machine only: the token is the key
    exposed = run_app.parse_args(["--host", "0.0.0.0", "--data-dir", str(tmp_path)])
    assert run_app.api_key_line(exposed, "sk-new").startswith("sk-new (new at each start")
    message = run_app.startup_message("http://127.0.0.1:1/?token=t", None, "m", Path("/d"), "sk-1")
    assert "http://127.0.0.1:1/v1" in message and "API key:      sk-1" in message


def test_parallel_answers():
    assert run_app.parse_args([]).parallel == 1
    assert run_app.parse_args(["--parallel", "3"]).parallel == 3


@pytest.mark.parametrize("argv, message", [
    (["--load-4bit", "--load-8bit"], "not allowed with argument"),
    (["--auth", "nopassword"], "USER:PASS"),
    (["--auth", ":pw"], "USER:PASS"),
    (["--auth", "user:"], "USER:PASS"),
    (["--port", "70000"], "1..65535"),
    (["--device", "tpu"], "not a device"),
    (["--dtype", "int3"], "invalid choice"),
    (["--parallel", "0"], "whole number ≥ 1"),
    (["--parallel", "two"], "whole number ≥ 1"),
])
def test_bad_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_app.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_dtype_choices_match_the_engine():
    from engine.runtime import DTYPES

    assert set(run_app.DTYPE_CHOICES) - {"auto"} == set(DTYPES)


def test_help_needs_neither_torch_nor_gradio():
    code = ("import sys, run_app\n"
            "try:\n    run_app.parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('LOADED', 'gradio' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60).stdout
    assert "--load-4bit" in out and "LOADED False False" in out


def test_main_builds_the_service_and_launches_the_ui(tmp_path, monkeypatch, capsys):
    from app.store import Store

    # An answer left "streaming" by a killed run, last written long ago.
    with Store(tmp_path) as store:
        cid = store.create_conversation()
        store.add_message(cid, "user", "hi")
        mid = store.add_message(cid, "assistant", "partial", status="streaming")
        store.db.execute("UPDATE messages SET updated_at = '2000-01-01T00:00:00.000000+00:00' WHERE id = ?", [mid])

    seen = {}

    class FakeBlocks:
        def queue(self):
            return self

        def launch(self, **kwargs):
            seen["launch"] = kwargs
            return None, "http://127.0.0.1:9000/", None

        def block_thread(self):
            seen["blocked"] = True
            seen["address"] = (tmp_path / "app-address").read_text()  # for the hotkey listener, while running

    def build_ui(services, sign_in):
        seen["parts"] = (services.chat, services.models, services.store)
        seen["sign_in"] = sign_in
        return FakeBlocks()

    monkeypatch.setitem(sys.modules, "ui.app", types.SimpleNamespace(build_ui=build_ui))
    monkeypatch.setenv("GRADIO_TEMP_DIR", "restored after this test")  # main() points it into the data folder
    assert run_app.main(["--data-dir", str(tmp_path), "--port", "9000", "--auth", "u:p", "--no-browser"]) == 0

    service, models, store = seen["parts"]
    assert service.models is models and service.store is store
    assert service.scheduler.slots == 1  # one answer at a time unless --parallel says otherwise
    assert models.wait(60) and models.is_demo  # the demo loaded in the background
    app_kwargs = seen["launch"].pop("app_kwargs")
    routes = app_kwargs["routes"]  # the OpenAI-compatible API, on the same server
    assert {r.path for r in routes} >= {"/v1/models", "/v1/chat/completions", "/hotkey/screenshot"}
    assert [m.cls.__name__ for m in app_kwargs["middleware"]] == ["Gate"]  # in front of everything
    assert seen["address"] == "http://127.0.0.1:9000/\n" and not (tmp_path / "app-address").exists()
    sign_in = seen["sign_in"]
    assert seen["launch"] == {"server_name": "127.0.0.1", "server_port": 9000, "share": False,
                              "auth_dependency": sign_in.user_of, "inbrowser": False, "quiet": True,
                              "prevent_thread_lock": True}
    assert sign_in.accounts.check("u", "p") == "@owner"  # --auth's first account is the owner
    assert seen["blocked"]
    out = capsys.readouterr().out
    token = (tmp_path / "install-token").read_text().strip()
    assert f"running at http://127.0.0.1:9000/?token={token}" in out and str(tmp_path) in out
    assert models.model_name in out
    # No --api-key, on this machine only: the install token is the key.
    assert "OpenAI API:   http://127.0.0.1:9000/v1" in out and "API key:      the install token" in out
    assert store.get_conversation(cid)["messages"][1]["status"] == "stopped"
    # Gradio's cache was in the app's scratch folder, removed when the app ended.
    assert os.environ["GRADIO_TEMP_DIR"] == str(tmp_path / "tmp" / store.instance_id / "gradio")
    assert list((tmp_path / "tmp").iterdir()) == []
    store.close()


def test_a_port_in_use_is_a_clear_error_before_anything_loads(tmp_path, capsys):
    import socket

    with socket.socket() as other:  # another program (or the app itself, started before) holds the port
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        assert run_app.main(["--data-dir", str(tmp_path), "--port", str(port), "--no-browser"]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and f"--port {port + 1}" in err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []  # no store opened, no model loading
    assert run_app.port_taken("127.0.0.1", port) is None  # free again once the other closed it
