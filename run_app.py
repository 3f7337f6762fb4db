"""Start the DeepSeek-VL local chat app: `python run_app.py [--model ID_OR_DIR] [--load-4bit] ...`;
`python run_app.py hotkey [...]` runs only the screenshot hotkey's listener (app.hotkey) for a running app.

Argument parsing imports nothing heavy, so `--help` and bad flags answer at once (no torch, no gradio).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

APP_NAME = "deepseek-vl-local"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
# Same spellings as engine.runtime.DTYPES (a test keeps them in step), without importing torch here.
DTYPE_CHOICES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
API_KEY_ENV = "DSVL_API_KEY"  # keeps the key out of the process list, where --api-key shows to other users

log = logging.getLogger("run_app")


def default_data_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir(APP_NAME))


def _device(text: str) -> str:
    if not DEVICE_RE.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    return text


def _parallel(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text!r}")
    return int(text)


def _auth(text: str) -> tuple[str, str]:
    from app.accounts import AccountsError, parse_pair

    try:
        return parse_pair(text)
    except AccountsError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 1..65535, got {port}")
    return port


def _shortcut(text: str):
    from app.hotkey import parse_shortcut

    try:
        return parse_shortcut(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _monitor(text: str) -> int | str:
    from app.hotkey import parse_monitor

    try:
        return parse_monitor(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_hotkey_options(group) -> None:
    group.add_argument("--shortcut", type=_shortcut, default=_shortcut("ctrl+alt+s"), metavar="KEYS",
                       help="the global shortcut (default ctrl+alt+s; e.g. ctrl+shift+f5, cmd+shift+2)")
    group.add_argument("--capture", type=_monitor, default="pointer", metavar="WHICH",
                       help="what to capture: pointer (the monitor under the mouse, default), all, or a "
                            "monitor number 1, 2, ...")
    group.add_argument("--ask", action="store_true",
                       help="after capturing, ask for a question in a small window; it is sent with the "
                            "screenshot and answered at once")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_app.py",
        description="Chat with DeepSeek-VL on your own machine (a local web app).",
        epilog="Example: python run_app.py --model deepseek-ai/deepseek-vl-7b-chat --load-4bit\n"
               "The screenshot hotkey on its own, for an app already running: python run_app.py hotkey --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = p.add_argument_group("model")
    model.add_argument("--model", metavar="PATH_OR_ID", default=None,
                       help="checkpoint directory or Hugging Face id (default: the embedded demo model, which "
                            "runs offline; trained on simple pictures of shapes, colours, counts and words)")
    quant = model.add_mutually_exclusive_group()
    quant.add_argument("--load-4bit", action="store_true",
                       help="quantize the language model to 4-bit (NF4; on a CPU also faster than bf16)")
    quant.add_argument("--load-8bit", action="store_true",
                       help="quantize the language model to 8-bit (on a CPU also the fastest way to decode)")
    model.add_argument("--device", type=_device, default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    model.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                       help="weights dtype (default auto: bf16/fp16 on GPU, fp32 on CPU, bf16 on CPU when quantized)")
    model.add_argument("--parallel", type=_parallel, default=1, metavar="N",
                       help="answers generated at once (default 1: on a CPU two at once only slow each other "
                            "down, so the others wait in line; a GPU with memory to spare can take more)")
    server = p.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    server.add_argument("--port", type=_port, default=7860, help="port (default 7860)")
    server.add_argument("--share", action="store_true",
                        help="also publish a temporary public gradio.live link (a login is always required: "
                             "without --auth, a password is generated and printed once)")
    server.add_argument("--auth", type=_auth, metavar="USER:PASS", action="append", default=[],
                        help="an account (repeat for more); the first one is the owner, who alone sees the "
                             "Training tab and can change the model; each user sees only their own history. "
                             "Prefer --auth-file: a password on the command line shows in the process list")
    server.add_argument("--auth-file", type=Path, metavar="FILE", default=None,
                        help="accounts as user:password lines (# comments); read once, kept as scrypt hashes")
    server.add_argument("--no-browser", action="store_true", help="do not open a browser tab")
    api = p.add_argument_group("OpenAI-compatible API (at /v1 on the same server)")
    api.add_argument("--api-key", metavar="KEY", default=None,
                     help=f"the key API clients must send (default: ${API_KEY_ENV} if set; else, on this machine "
                          "only, the install token from the data folder; else a new key is generated at each "
                          "start and printed once)")
    api.add_argument("--allow-remote-images", action="store_true",
                     help="fetch images that requests give as http(s) addresses (from public addresses only, "
                          "up to the chat's image size limit); by default only data: URIs are taken")
    api.add_argument("--api-save", action="store_true",
                     help="keep the API's conversations in the app's history (the owner's), beside the chat's own")
    hotkey = p.add_argument_group("screenshot hotkey")
    hotkey.add_argument("--hotkey", action="store_true",
                        help="also listen for a global shortcut that sends the screen to the app as a new "
                             "conversation (X11, Windows, macOS; not Wayland)")
    add_hotkey_options(hotkey)
    p.add_argument("--data-dir", type=Path, default=None,
                   help=f"where conversations and images are kept (default: {default_data_dir()})")
    return p


def build_hotkey_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_app.py hotkey",
        description="Listen for a global shortcut; on a press, capture the screen and open it in the running app "
                    "as a new conversation. The app must run on the same data folder (it keeps the token that "
                    "lets this listener in).")
    add_hotkey_options(p)
    p.add_argument("--no-browser", action="store_true", help="print the new conversation's address, open no tab")
    p.add_argument("--url", default=None,
                   help="the app's address (default: the one the app running on the data folder wrote there)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help=f"the app's data folder (default: {default_data_dir()})")
    return p


def hotkey_main(argv: list[str]) -> int:
    """`run_app.py hotkey`: only the listener, for an app that runs (or will run) on the same data folder."""
    args = build_hotkey_parser().parse_args(argv)
    from app.hotkey import AppClient, Listener

    data_dir = (args.data_dir or default_data_dir()).expanduser()
    listener = Listener(AppClient(data_dir, args.url), args.shortcut, args.capture, args.ask,
                        open_page=None if args.no_browser else open_browser)
    return listener.run()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; adds `quantization` ("4bit", "8bit" or None) and resolves defaults (None = automatic)."""
    args = build_parser().parse_args(argv)
    args.quantization = "4bit" if args.load_4bit else "8bit" if args.load_8bit else None
    args.device = None if args.device == "auto" else args.device
    args.dtype = None if args.dtype == "auto" else args.dtype
    args.data_dir = (args.data_dir or default_data_dir()).expanduser()
    args.api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    args.exposed = args.share or args.host not in LOOPBACK_HOSTS
    return args


def make_accounts(args: argparse.Namespace):
    """(Accounts or None, generated password or None). Reachable from elsewhere, a login is always required:
    with no account given, one is made with a new password, shown this once."""
    from app.accounts import GENERATED_USER, Accounts, generate_password, read_auth_file

    pairs = list(args.auth) + (read_auth_file(args.auth_file) if args.auth_file else [])
    args.auth = []  # the passwords are hashed below and not kept
    generated = None
    if not pairs and args.exposed:
        generated = generate_password()
        pairs = [(GENERATED_USER, generated)]
    return (Accounts(pairs) if pairs else None), generated


def port_taken(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port, or None if it can. SO_REUSEADDR as the server sets it: a port
    left in TIME_WAIT by an instance just killed is free to it, one another program listens on is not."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hotkey"]:
        return hotkey_main(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests, one line each
    from app.accounts import AccountsError

    try:
        accounts, generated_password = make_accounts(args)
    except AccountsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Checked before anything loads: a second start would otherwise load the model and end in gradio's traceback.
    reason = port_taken(args.host, args.port)
    if reason:
        print(f"error: cannot listen on {args.host}:{args.port} ({reason}). If the app is already running, use "
              f"the address it printed; to run another copy, pick a free port: --port {args.port + 1}",
              file=sys.stderr)
        return 2

    from app.models import ModelManager
    from app.scheduler import Scheduler
    from app.scratch import Scratch
    from app.services import Services
    from app.store import Store

    try:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        store = Store(args.data_dir)
    except Exception as e:  # unwritable directory, a damaged database...
        print(f"error: cannot open the data directory {args.data_dir}: {e}", file=sys.stderr)
        return 2
    for other in store.other_instances():
        log.warning("another instance of the app (pid %s, started %s) is using this data folder too: both "
                    "work, and each shows the other's answers once you open or refresh the conversation",
                    other["pid"] or "?", other["started"] or "at an unknown time")
    # Answers left "streaming" by a run that was killed; a live instance's answers are left alone.
    recovered = store.recover_interrupted()
    if recovered:
        log.info("marked %d interrupted answer(s) as stopped", recovered)
    # Temporary files (gradio's uploads included) live in the data folder, so a delete can find every copy;
    # gradio reads GRADIO_TEMP_DIR when it is imported, below.
    scratch = Scratch.of(store)
    scratch.start()
    os.environ["GRADIO_TEMP_DIR"] = str(scratch.gradio_dir)

    # Loading runs in the background: the UI comes up at once and shows the progress.
    models = ModelManager(args.model, device=args.device, dtype=args.dtype, quantization=args.quantization).start()
    services = Services.build(store, models, scratch=scratch, scheduler=Scheduler(args.parallel))
    from starlette.middleware import Middleware

    from app import hotkey, install_token
    from app.api import API_PREFIX, OpenAIApi, generate_api_key
    from app.api_history import ApiHistory
    from app.gate import Files, Gate, SignIn
    from app.handover import ScreenshotHandover
    from ui.app import build_ui  # imported late: gradio is heavy and --help must not need it

    try:
        token = install_token.load_or_create(args.data_dir)
    except install_token.TokenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # On this machine only, the install token is the API key too (local clients read it from the data folder);
    # reachable from elsewhere, a key is made for this run and shown once, unless one is given.
    api_key = args.api_key or (generate_api_key() if args.exposed else token)
    api = OpenAIApi(models, services.chat.scheduler, api_key, remote_images=args.allow_remote_images,
                    history=ApiHistory(store) if args.api_save else None)
    handover = ScreenshotHandover(services.chat, token)
    sign_in = SignIn(token, accounts)
    gate = Middleware(Gate, sign_in=sign_in, files=Files(store, scratch), open_prefixes=(API_PREFIX, hotkey.HANDOVER_PATH))
    demo = build_ui(services, sign_in)
    # quiet: gradio's own banner advises `share=True in launch()`, which means nothing to a user of this app.
    # The API's routes go first in the server's routing table, before gradio's own; the gate wraps them all.
    _, url, share_url = demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share,
                                            auth_dependency=sign_in.user_of, inbrowser=False, quiet=True,
                                            prevent_thread_lock=True,
                                            app_kwargs={"routes": [*api.routes(), *handover.routes()],
                                                        "middleware": [gate]})
    owner_url = install_token.with_token(url, token)
    print(startup_message(owner_url, share_url, models.model_name, args.data_dir, api_key_line(args, api_key),
                          login=(accounts.owner_name, generated_password) if generated_password else None),
          flush=True)
    # Where the hotkey listener finds this server (its port may differ from run to run).
    local_url = hotkey.loopback_url(args.host, urlsplit(url).port or args.port)
    hotkey.write_address(args.data_dir, local_url)
    stop_listening = start_hotkey(args, local_url) if args.hotkey else None
    if not args.no_browser:
        open_browser(owner_url)
    # A plain `kill` ends the app like Ctrl+C, so the scratch folder is removed on the way out.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        demo.block_thread()  # until Ctrl+C
    finally:
        signal.signal(signal.SIGTERM, previous)
        if stop_listening:
            stop_listening.set()
        hotkey.clear_address(args.data_dir, local_url)
        scratch.close()
    return 0


def start_hotkey(args: argparse.Namespace, local_url: str):
    """The listener in a thread beside the server; returns the Event that stops it (None when it cannot run:
    the server goes on, and the reason is printed)."""
    import threading

    from app.hotkey import AppClient, Listener, unsupported_session

    problem = unsupported_session()
    if problem:
        print(f"Hotkey not started. {problem}", flush=True)
        return None
    stop = threading.Event()
    listener = Listener(AppClient(args.data_dir, local_url), args.shortcut, args.capture, args.ask,
                        open_page=None if args.no_browser else open_browser)
    threading.Thread(target=listener.run, args=(stop,), name="hotkey-listener", daemon=True).start()
    return stop


def api_key_line(args: argparse.Namespace, api_key: str) -> str:
    """What the API key is: a key the user gave is not echoed; a generated one is shown this once."""
    if args.api_key:
        return f"the one given (--api-key or ${API_KEY_ENV})"
    if args.exposed:
        return f"{api_key} (new at each start; choose one with --api-key)"
    from app.install_token import token_path

    return f"the install token, in {token_path(args.data_dir)} (or choose one with --api-key)"


def startup_message(url: str, share_url: str | None, model: str, data_dir: Path, api_key: str,
                    login: tuple[str, str] | None = None) -> str:
    """`url`: the owner's address (it carries the install token); `api_key`: what the API key is (a generated
    one shown this once); `login`: a generated (user, password), shown this once."""
    base = url.split("?", 1)[0].rstrip("/")
    lines = [f"DeepSeek-VL local is running at {url}",
             "  (this address signs you in: keep it to yourself; the tab opened at start has it)"]
    if share_url:
        lines.append(f"  public link:  {share_url}")
    if login:
        lines.append(f"  login:        user {login[0]!r}, password {login[1]!r} (new at each start; choose "
                     "accounts with --auth or --auth-file)")
    lines += [f"  model:        {model}; it loads in the background, the page shows the progress",
              f"  data folder:  {data_dir} (conversations and images)",
              f"  OpenAI API:   {base}/v1",
              f"  API key:      {api_key}"]
    lines.append("Press Ctrl+C to stop.")
    return "\n".join(lines)


def open_browser(url: str) -> None:
    """Open a tab, or say why not: on Linux without a display a browser cannot open, and saying nothing
    would leave the user waiting for one."""
    import webbrowser

    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        print("No display found, so no browser was opened: open the address above in a browser.", flush=True)
        return
    if not webbrowser.open(url):
        print("Could not open a browser: open the address above in one.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
