"""Time to first token over the OpenAI-compatible API, turn 1 vs turn N: does KV-prefix reuse survive a client
that resends the whole conversation each turn?

    .venv/bin/python benchmarks/bench_api.py [--model PATH_OR_ID] [--conversations 3] [--turns 5] [-- run_app flags]

Starts `run_app.py` (default: the embedded demo model) with a key of its own, then holds --conversations
conversations of --turns turns through the `openai` client, streaming, each user turn with one new image (as
benchmarks/bench_engine.py does at the engine level). TTFT is from sending the request to the first content
chunk, so it includes HTTP, JSON, base64 and image decoding. The baseline row sends the last turn's whole
conversation with its first message changed, so nothing but the system prompt can come from a cache: a full
recompute of the same length.

Prints one table; copy it into benchmarks/RESULTS.md with the machine and load. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import openai
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str | None, extra: list[str], key: str, port: int, data_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "run_app.py", "--no-browser", "--port", str(port), "--data-dir", str(data_dir), *extra]
    if model:
        cmd += ["--model", model]
    env = {**os.environ, "DSVL_API_KEY": key, "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("DISPLAY", None)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def wait_ready(client: openai.OpenAI, model: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            sys.exit(f"run_app.py exited with {proc.returncode}")
        try:
            client.chat.completions.create(model=model, max_tokens=1, messages=[{"role": "user", "content": "hi"}])
            return
        except (openai.APIConnectionError, openai.APIStatusError):
            if time.monotonic() > deadline:
                sys.exit("the API did not answer in time")
            time.sleep(1)


def image_part(seed: int) -> dict:
    image = Image.effect_noise((640, 480), 40 + seed).convert("RGB")  # photo-like: not a trivial PNG
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return {"type": "image_url",
            "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()}}


def ask(client: openai.OpenAI, model: str, messages: list, max_tokens: int) -> tuple[float, str, object]:
    """(TTFT seconds, answer, usage) of one streamed request."""
    start = time.perf_counter()
    ttft, pieces, usage = None, [], None
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft or time.perf_counter() - start
            pieces.append(chunk.choices[0].delta.content)
    return ttft or time.perf_counter() - start, "".join(pieces), usage


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint for run_app.py (default: the demo model)")
    p.add_argument("--conversations", type=int, default=3)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("extra", nargs="*", help="more run_app.py flags, after --")
    args = p.parse_args()

    key, port = secrets.token_urlsafe(16), free_port()
    data_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-api-{port}"
    proc = start(args.model, args.extra, key, port, data_dir)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=3600)
    try:
        time.sleep(2)
        while True:
            try:
                model = client.models.list().data[0].id
                break
            except openai.APIConnectionError:
                time.sleep(1)
        wait_ready(client, model, proc, args.startup_timeout)
        load = os.getloadavg()[0]
        ttfts = {turn: [] for turn in range(1, args.turns + 1)}
        tokens = {}
        recompute = []
        for c in range(args.conversations):
            messages = []
            for turn in range(1, args.turns + 1):
                messages.append({"role": "user", "content": [image_part(100 * c + turn),
                                                             {"type": "text", "text": f"Turn {turn}: what is new here?"}]})
                ttft, answer, usage = ask(client, model, messages, args.max_tokens)
                ttfts[turn].append(ttft)
                tokens[turn] = (usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens)
                messages.append({"role": "assistant", "content": answer})
            # The same last request, its first message changed: nothing after the system prompt is cached.
            cold = [dict(messages[0], content=[*messages[0]["content"][:-1],
                                               {"type": "text", "text": f"Cold {c}: what is new here?"}]),
                    *messages[1:-1]]
            ttft, _, usage = ask(client, model, cold, args.max_tokens)
            recompute.append((ttft, usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens))
    finally:
        proc.terminate()
        proc.wait(30)

    first = statistics.median(ttfts[1])
    print(f"model {model}; {args.conversations} conversations; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load {load:.2f} at start")
    print("| turn | TTFT median s | min s | prompt tokens | cached tokens | × turn 1 |")
    print("|---|---|---|---|---|---|")
    for turn, values in ttfts.items():
        median = statistics.median(values)
        print(f"| {turn} | {median:.3f} | {min(values):.3f} | {tokens[turn][0]} | {tokens[turn][1]} | "
              f"{median / first:.2f} |")
    median = statistics.median(r[0] for r in recompute)
    print(f"| {args.turns}, recomputed | {median:.3f} | {min(r[0] for r in recompute):.3f} | {recompute[-1][1]} | "
          f"{recompute[-1][2]} | {median / first:.2f} |")


if __name__ == "__main__":
    main()
