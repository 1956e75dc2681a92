"""The page with an edge that asks for a token (cluster edge --token), in headless Chromium.

The edge here is create_app on tests/test_edge_app.py's FakeBus, served by uvicorn in a thread of this process (a real
HTTP server on 127.0.0.1, no cluster processes: the page's own behaviour is what is under test). The page asks for
the token once, on the first 401, keeps it in the tab's sessionStorage (a reload does not ask again, a new tab does)
and sends it as a Bearer header on every call, POSTs included; a refused token is asked again; a cancelled prompt
leaves a message saying what is needed.
"""

from __future__ import annotations

import os
import re
import socket
import threading

import pytest

from cluster.role_settings import EdgeSettings
from edge import create_app
from tests.harness import wait_for
from tests.test_edge_app import FakeBus, FakeManager
from tests.test_frontend import CHROMIUM, browser, draw_seven  # noqa: F401 (browser: the fixture)

TOKEN = "page-token-1"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.cluster,  # multi-process: Chromium (the edge itself runs in this process, on the fake bus)
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed"),
]


@pytest.fixture
def locked_edge():
    """http://127.0.0.1:PORT of an edge with --token TOKEN on the fake bus, served by uvicorn in a thread."""
    import uvicorn

    app = create_app(EdgeSettings(edge_token=(TOKEN,)), client=FakeBus(), manager=FakeManager())
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), 15, "uvicorn to start")
    assert server.started, "uvicorn's thread ended before it started serving"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def answer_prompts(page, *answers: str | None) -> list[str]:
    """Answer the page's prompts in turn with `answers` (None: cancel); returns the prompts' messages, as they come."""
    asked: list[str] = []

    def on_dialog(dialog) -> None:
        asked.append(dialog.message)
        answer = answers[len(asked) - 1] if len(asked) <= len(answers) else None
        dialog.dismiss() if answer is None else dialog.accept(answer)

    page.on("dialog", on_dialog)
    return asked


def test_page_asks_for_the_token_once_and_keeps_it_for_the_tab(browser, locked_edge):  # noqa: F811
    from playwright.sync_api import expect

    expect.set_options(timeout=15_000)
    context = browser.new_context()
    page = context.new_page()
    asked = answer_prompts(page, TOKEN)
    sent = []
    page.on("request", lambda r: sent.append((r.method, r.url, r.headers.get("authorization"))))
    try:
        page.goto(locked_edge + "/")
        expect(page.locator("#agents .agent-row")).to_have_count(2)  # the refresh, /models and metadata all got 401
        assert len(asked) == 1 and "needs an access token" in asked[0], asked
        assert page.evaluate("sessionStorage.getItem('edge-token')") == TOKEN
        expect(page.locator("#status")).to_have_text(re.compile("Ready"))

        draw_seven(page)
        page.click("#predict")
        expect(page.locator("#prediction")).to_have_text(re.compile(r"^[0-9]$"))
        posts = [auth for method, url, auth in sent if method == "POST" and url.endswith("/infer")]
        assert posts and all(auth == f"Bearer {TOKEN}" for auth in posts), posts

        page.reload()  # the same tab: the token is still there, no prompt
        expect(page.locator("#agents .agent-row")).to_have_count(2)
        expect(page.locator("#model-select option")).to_have_count(2)
        assert len(asked) == 1, asked

        other = context.new_page()  # another tab: its own sessionStorage, so it asks
        asked_there = answer_prompts(other, TOKEN)
        other.goto(locked_edge + "/")
        expect(other.locator("#agents .agent-row")).to_have_count(2)
        assert len(asked_there) == 1
        other.close()
    finally:
        context.close()


def test_page_asks_again_for_a_refused_token_and_explains_a_cancelled_prompt(browser, locked_edge):  # noqa: F811
    from playwright.sync_api import expect

    expect.set_options(timeout=15_000)
    page = browser.new_page()
    asked = answer_prompts(page, "wrong-token", TOKEN)
    try:
        page.goto(locked_edge + "/")
        expect(page.locator("#agents .agent-row")).to_have_count(2)
        assert len(asked) == 2 and "refused" in asked[1], asked
        assert page.evaluate("sessionStorage.getItem('edge-token')") == TOKEN
    finally:
        page.close()

    page = browser.new_page()
    asked = answer_prompts(page, None)  # cancel
    try:
        page.goto(locked_edge + "/")
        expect(page.locator("#error")).to_contain_text("needs an access token")
        expect(page.locator("#status")).to_have_text("Token needed")
        assert len(asked) == 1 and page.evaluate("sessionStorage.getItem('edge-token')") is None
    finally:
        page.close()
