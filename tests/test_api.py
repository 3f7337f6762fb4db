"""The OpenAI-compatible API with the official `openai` client against a real `run_app.py` on the talkative model
(a tiny random model whose answers run on to max_tokens, see conftest): one server with the default flags, one
with --allow-remote-images and --api-save (whose history is read back with a Store on its data folder).

Answers are greedy, so each is checked against the same conversation answered in this process by an engine
ChatSession on the same checkpoint: equal text and equal token counts show that the prompt (system prompt,
images, earlier turns) reached the model as sent.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from app.store import Store
from engine.chat import ChatSession, Turn, USER, ASSISTANT
from engine.generation import SamplingParams

from conftest import app_env, require_module, stop_process

openai = require_module("openai")
httpx = require_module("httpx")

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key-123"
MODEL = "talkative"  # the checkpoint folder's name
STARTUP_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(data_dir: Path, model: Path, *flags: str):
    """run_app.py on `model` with an API key; its base URL once the model is ready."""
    log_path = data_dir.parent / f"{data_dir.name}-server.log"
    port = _free_port()
    env = app_env()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "run_app.py", "--no-browser", "--port", str(port), "--data-dir",
                                 str(data_dir), "--model", str(model), "--api-key", KEY, *flags], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:  # until a request is answered (the model loads in the background)
            if proc.poll() is not None:
                pytest.fail(f"run_app.py exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                request = urllib.request.Request(f"{base}/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                                                 data=json.dumps({"model": MODEL, "max_tokens": 1, "messages": [
                                                     {"role": "user", "content": "hi"}]}).encode())
                with urllib.request.urlopen(request, timeout=10) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the API did not answer within {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("api-data")


@pytest.fixture(scope="module")
def server(data_dir, talkative_model):
    """The app with the default flags: no remote images, nothing saved."""
    with running_app(data_dir, talkative_model) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def saving_data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("api-saving-data")


@pytest.fixture(scope="module")
def saving_client(saving_data_dir, talkative_model):
    """A client of the app started with --allow-remote-images --api-save."""
    with running_app(saving_data_dir, talkative_model, "--allow-remote-images", "--api-save") as base:
        yield openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=120)


# ---------------------------------------------------------------------- helpers
def png(color, size=(64, 48)) -> Image.Image:
    return Image.new("RGB", size, color)


def data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def user(text: str, *images: Image.Image) -> dict:
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": data_uri(i)}} for i in images),
                                        {"type": "text", "text": text}]}


def engine_answer(runtime, turns: list[tuple[str, str, list]], max_tokens: int, system: str | None = None):
    """The same conversation answered greedily by a fresh ChatSession here: (answer text, stats)."""
    session = ChatSession(runtime, system)
    session.turns = [Turn(role, text, [session.add_image(i) for i in images]) for role, text, images in turns[:-1]]
    _, text, images = turns[-1]
    session.add_user(text, images)
    session.answer(SamplingParams(max_new_tokens=max_tokens))
    return session.turns[-1].text, session.last_stats


def check_against_engine(response, runtime, turns, max_tokens, system=None):
    text, stats = engine_answer(runtime, turns, max_tokens, system)
    assert response.choices[0].message.content == text
    assert response.usage.prompt_tokens == stats.prompt_tokens
    assert response.usage.completion_tokens == stats.tokens
    assert response.usage.total_tokens == stats.prompt_tokens + stats.tokens
    assert response.choices[0].finish_reason == stats.finish


# ---------------------------------------------------------------------- answers
def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_plain_completion(client, models):
    response = client.chat.completions.create(model=MODEL, max_tokens=12,
                                              messages=[user("Describe a sunny day.")])
    assert response.object == "chat.completion" and response.model == MODEL
    assert response.choices[0].message.role == "assistant"
    check_against_engine(response, models.runtime, [(USER, "Describe a sunny day.", [])], 12)


def test_streaming_gives_the_same_answer_in_chunks(client):
    messages = [user("Tell me a story.")]
    whole = client.chat.completions.create(model=MODEL, max_tokens=20, messages=messages)
    chunks = list(client.chat.completions.create(model=MODEL, max_tokens=20, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1  # streamed, not all at the end
    assert "".join(content).strip() == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []  # the usage chunk asked for with include_usage
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == \
        (whole.usage.prompt_tokens, whole.usage.completion_tokens)


def test_two_images_in_one_message(client, models):
    red, blue = png("red"), png("blue")
    response = client.chat.completions.create(model=MODEL, max_tokens=10,
                                              messages=[user("Compare these.", red, blue)])
    check_against_engine(response, models.runtime, [(USER, "Compare these.", [red, blue])], 10)
    assert response.usage.prompt_tokens > 2 * 576  # both images are in the prompt


def test_images_in_turns_one_and_three_reuse_the_cached_prefix(client, models):
    green, yellow = png("green"), png("yellow")
    messages = [user("What is this?", green)]
    turns = [(USER, "What is this?", [green])]
    first = client.chat.completions.create(model=MODEL, max_tokens=8, messages=messages)
    check_against_engine(first, models.runtime, turns, 8)
    for text, images in [("And now?", []), ("And this one?", [yellow])]:
        answer = first.choices[0].message.content
        messages += [{"role": "assistant", "content": answer}, user(text, *images)]
        turns += [(ASSISTANT, answer, []), (USER, text, images)]
        response = client.chat.completions.create(model=MODEL, max_tokens=8, messages=messages)
        check_against_engine(response, models.runtime, turns, 8)
        # The earlier turns, the first image included, came from the KV cache of the request before.
        assert response.usage.prompt_tokens_details.cached_tokens > 576
        first = response
    assert response.usage.prompt_tokens > 2 * 576


def test_system_prompt(client, models):
    system = "You answer in exactly one word."
    response = client.chat.completions.create(model=MODEL, max_tokens=10, messages=[
        {"role": "system", "content": system}, user("Who are you?")])
    check_against_engine(response, models.runtime, [(USER, "Who are you?", [])], 10, system=system)
    default = client.chat.completions.create(model=MODEL, max_tokens=10, messages=[user("Who are you?")])
    assert default.usage.prompt_tokens != response.usage.prompt_tokens


def test_stop_cuts_the_answer_before_the_stop_string(client):
    messages = [user("Count to twenty.")]
    full = client.chat.completions.create(model=MODEL, max_tokens=30, messages=messages).choices[0].message.content
    stop = full[6:9]
    assert stop.strip()  # a piece from inside the answer
    response = client.chat.completions.create(model=MODEL, max_tokens=30, messages=messages, stop=[stop, "zzzz"])
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].message.content == full[:full.index(stop)].strip()
    streamed = client.chat.completions.create(model=MODEL, max_tokens=30, messages=messages, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices).strip() == \
        response.choices[0].message.content


def test_max_tokens_ends_with_length(client):
    response = client.chat.completions.create(model=MODEL, max_tokens=3, messages=[user("Write an essay.")])
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 3


def test_seeded_sampling_is_reproducible(client):
    def ask(seed):
        return client.chat.completions.create(model=MODEL, max_tokens=16, temperature=1.0, top_p=0.9, seed=seed,
                                              messages=[user("Surprise me.")]).choices[0].message.content

    assert ask(5) == ask(5)
    assert len({ask(5), ask(6), ask(7)}) > 1


# ---------------------------------------------------------------------- refusals
def _refused(call, status: int, *words: str):
    with pytest.raises(openai.APIStatusError) as info:
        call()
    error = info.value
    assert error.status_code == status
    assert set(error.body) >= {"message", "type", "param", "code"}  # OpenAI's error object
    for word in words:
        assert word in error.message
    return error


def test_key_is_required(server):
    for key in ("wrong-key", ""):
        other = openai.OpenAI(base_url=server, api_key=key or "x", max_retries=0,
                              default_headers=None if key else {"Authorization": ""})
        _refused(lambda: other.models.list(), 401, "API key")
        _refused(lambda: other.chat.completions.create(model=MODEL, messages=[user("hi")]), 401, "API key")


def test_unknown_model(client):
    error = _refused(lambda: client.chat.completions.create(model="gpt-4o", messages=[user("hi")]), 404, "gpt-4o",
                     MODEL)
    assert error.code == "model_not_found"


def test_more_than_one_answer_is_refused(client):
    _refused(lambda: client.chat.completions.create(model=MODEL, n=2, messages=[user("hi")]), 400, "`n` must be 1")


def test_image_that_does_not_decode(client):
    junk = "data:image/png;base64," + base64.b64encode(b"certainly not a PNG").decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "look"},
                                             {"type": "image_url", "image_url": {"url": junk}}]}]
    _refused(lambda: client.chat.completions.create(model=MODEL, messages=messages), 400, "image 1 of message 1",
             "not an image")
    bad_base64 = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%"}}]}]
    _refused(lambda: client.chat.completions.create(model=MODEL, messages=bad_base64), 400, "not valid base64")


def image_url_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is this?"}]}]


def test_remote_image_urls_are_refused(client):
    messages = image_url_message("https://example.com/a.png")
    error = _refused(lambda: client.chat.completions.create(model=MODEL, messages=messages), 400, "does not fetch",
                     "--allow-remote-images", "data URI")
    assert error.code == "image_url_not_supported"


@pytest.fixture()
def image_server():
    """A local web server with an image at /a.png; its base URL, and the paths it was asked for."""
    requests = []
    body = base64.b64decode(data_uri(png("teal")).partition(",")[2])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", requests
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_remote_images_from_private_addresses_are_refused(saving_client, image_server):
    """With --allow-remote-images a web address is fetched, but never from this machine or its network (the
    fetching itself is tested in test_remote_images, with an address policy that lets the test server in)."""
    base, requests = image_server
    for url in (f"{base}/a.png", "http://169.254.169.254/latest/meta-data/"):
        error = _refused(lambda: saving_client.chat.completions.create(model=MODEL, messages=image_url_message(url)),
                         400, "image 1 of message 1", "private, loopback", "only from public addresses")
        assert error.code == "image_url_refused"
    assert requests == []  # refused before connecting


def test_too_many_images_for_the_context(client):
    images = [png((i * 30, 0, 0)) for i in range(8)]  # 8 × 576 tokens > the demo model's 4096
    error = _refused(lambda: client.chat.completions.create(model=MODEL, messages=[user("all of them", *images)]),
                     400, "does not fit", "remove some images")
    assert error.code == "context_length_exceeded"


def test_text_too_long_for_the_context(client):
    error = _refused(lambda: client.chat.completions.create(model=MODEL, messages=[user("word " * 6000)]), 400,
                     "does not fit", "shorten the text")
    assert error.code == "context_length_exceeded"


def test_body_over_the_size_limit(client):
    huge = "data:image/png;base64," + base64.b64encode(bytes(33 * 2**20)).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": huge}}]}]
    _refused(lambda: client.chat.completions.create(model=MODEL, messages=messages), 413, "larger than 32 MiB")


@pytest.mark.parametrize("body, words", [
    (b"{not json", ["not valid JSON"]),
    (b"[1, 2]", ["must be a JSON object"]),
    (json.dumps({"model": MODEL}).encode(), ["`messages`"]),
    (json.dumps({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}).encode(), ["role 'tool'"]),
    (json.dumps({"model": MODEL, "messages": [{"role": "assistant", "content": "x"}]}).encode(),
     ["must start with a user message"]),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 5}).encode(),
     ["`temperature`", "0 to 2"]),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).encode(),
     ["`max_tokens`"]),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": [1]}).encode(), ["`stop`"]),
])
def test_malformed_requests(server, body, words):
    response = httpx.post(f"{server}/chat/completions", content=body, timeout=30,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    for word in words:
        assert word in error["message"]


def test_two_conversations_at_once_keep_their_own_caches(client):
    a, b = [user("First conversation.", png("purple"))], [user("Second conversation.", png("orange"))]
    for messages in (a, b):
        answer = client.chat.completions.create(model=MODEL, max_tokens=6, messages=messages)
        messages += [{"role": "assistant", "content": answer.choices[0].message.content}, user("Go on.")]
    for messages in (a, b):  # B's request did not take A's session: both continue from their cache
        response = client.chat.completions.create(model=MODEL, max_tokens=6, messages=messages)
        assert response.usage.prompt_tokens_details.cached_tokens > 576


# ---------------------------------------------------------------------- in this process
def test_requests_wait_in_the_schedulers_line(models):
    """An API request queues behind whatever holds the model (here a ticket standing for a UI answer)."""
    import threading

    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from app.api import OpenAIApi
    from app.scheduler import Scheduler

    scheduler = Scheduler(1)
    api = OpenAIApi(models, scheduler, KEY)
    results = []
    with TestClient(Starlette(routes=api.routes())) as http:
        ui_answer = scheduler.submit(label="a UI answer")
        assert ui_answer.running
        request = threading.Thread(target=lambda: results.append(http.post(
            "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
            json={"model": MODEL, "max_tokens": 2, "messages": [user("hi")]})))
        request.start()
        deadline = time.monotonic() + 30
        while scheduler.waiting == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scheduler.waiting == 1 and not results  # in line, not answered
        ui_answer.release()
        request.join(60)
    assert results[0].status_code == 200 and results[0].json()["usage"]["completion_tokens"] == 2
    assert scheduler.running == 0 and scheduler.waiting == 0


# ---------------------------------------------------------------------- --api-save
def stored(data_dir: Path) -> dict[str, dict]:
    """Every stored conversation with its messages, by id."""
    with Store(data_dir) as store:
        return {c["id"]: store.get_conversation(c["id"]) for c in store.list_conversations(limit=1000)}


def test_without_api_save_nothing_is_stored(client, data_dir):
    client.chat.completions.create(model=MODEL, max_tokens=4, messages=[user("Remember this?", png("red"))])
    assert stored(data_dir) == {}


def test_api_save_keeps_a_growing_conversation_as_one(saving_client, saving_data_dir):
    before = stored(saving_data_dir)
    system = "You are terse."
    picture = png("navy")
    messages = [{"role": "system", "content": system}, user("What colour is this?", picture)]
    first = saving_client.chat.completions.create(model=MODEL, max_tokens=6, messages=messages)
    messages += [{"role": "assistant", "content": first.choices[0].message.content}, user("Are you sure?")]
    second = saving_client.chat.completions.create(model=MODEL, max_tokens=6, messages=messages)

    new = {k: v for k, v in stored(saving_data_dir).items() if k not in before}
    assert len(new) == 1
    (conversation,) = new.values()
    assert conversation["system_prompt"] == system
    assert conversation["title"] == "What colour is this?"
    got = [(m["role"], m["text"], len(m["attachments"])) for m in conversation["messages"]]
    assert got == [("user", "What colour is this?", 1), ("assistant", first.choices[0].message.content, 0),
                   ("user", "Are you sure?", 0), ("assistant", second.choices[0].message.content, 0)]
    image = conversation["messages"][0]["attachments"][0]
    assert Path(image["path"]).read_bytes() == base64.b64decode(data_uri(picture).partition(",")[2])
    answer = conversation["messages"][3]
    assert answer["settings"]["system_prompt"] == system and answer["settings"]["max_new_tokens"] == 6
    assert answer["timings"]["tokens"] == second.usage.completion_tokens

    # Another conversation (it does not continue the stored one) is stored apart.
    other = saving_client.chat.completions.create(model=MODEL, max_tokens=4, messages=[user("Something else.")])
    newer = {k: v for k, v in stored(saving_data_dir).items() if k not in before}
    assert len(newer) == 2 and newer[conversation["id"]] == conversation
    (kept,) = (c for k, c in newer.items() if k != conversation["id"])
    assert [(m["role"], m["text"]) for m in kept["messages"]] == [
        ("user", "Something else."), ("assistant", other.choices[0].message.content)]

    # A refused request (an image that does not decode, continuing the first conversation) changes nothing.
    junk = "data:image/png;base64," + base64.b64encode(b"not a picture").decode()
    bad = messages + [{"role": "assistant", "content": second.choices[0].message.content},
                      {"role": "user", "content": [{"type": "image_url", "image_url": {"url": junk}},
                                                   {"type": "text", "text": "And this?"}]}]
    _refused(lambda: saving_client.chat.completions.create(model=MODEL, max_tokens=4, messages=bad), 400,
             "not an image")
    assert {k: v for k, v in stored(saving_data_dir).items() if k not in before} == newer
