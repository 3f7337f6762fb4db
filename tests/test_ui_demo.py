"""The app as a newcomer first sees it: `run_app.py` with no --model, on the embedded demo model, in headless
Chromium. The banner says what the demo knows, the empty chat shows its examples, and a clicked example is
answered right."""

import json

import pytest

from conftest import stop_process
from engine.demo import EXAMPLES_DIR
from engine.training.evaluate import names
from test_ui_browser import (TIMEOUT_MS, _free_port, browser, expect_count, open_app,  # noqa: F401 (fixture)
                             wait_answer_finished)


@pytest.fixture(scope="module")
def page(browser, tmp_path_factory):
    from test_ui_browser import start_server

    root = tmp_path_factory.mktemp("demo-ui")
    port = _free_port()
    proc = start_server(root / "data", port, root / "server.log")  # no model given: the demo
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        open_app(page, f"http://127.0.0.1:{port}/")
        yield page
    finally:
        context.close()
        stop_process(proc)


def test_the_demo_says_what_it_knows_and_answers_its_examples(page):
    page.wait_for_selector("#model-banner .status-dot.ready", timeout=60_000)
    banner = page.locator("#model-banner").inner_text()
    assert "trained by this project's recipe on simple pictures of shapes, colours" in banner, banner
    assert "deepseek-vl-7b-chat" in banner and "Training tab" in banner, banner

    listed = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    examples = page.locator("#chatbot .examples button, #chatbot button.example")
    expect_count(page, "#chatbot .examples button, #chatbot button.example", len(listed))
    for i in (0, 1):  # two of them, each on an empty chat
        if i:
            page.click("#new-chat-btn")
            expect_count(page, "#chatbot [data-testid=user]", 0)
        item = listed[i]
        examples.nth(i).click()
        page.wait_for_function("(q) => document.querySelector('#chatbot .user-row')?.innerText.includes(q)",
                               arg=item["question"])
        expect_count(page, "#chatbot .user-row img", len(item["images"]))
        answer = wait_answer_finished(page)
        assert names(answer, item["expected"]), (item, answer)
