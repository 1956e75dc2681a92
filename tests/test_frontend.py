"""frontend.html in headless Chromium (Playwright, sync API) against a real cluster and edge.

Draw a digit, predict, see the digit and ten bars; send a request from the model panel; watch the cluster panel
lose an agent that is killed; stop the edge and see the page say so. Screenshots go to test-artifacts/frontend.png
(ignored by git) and docs/frontend.png (the README's picture).
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager

import pytest

from tests.harness import REPO_ROOT, start_edge

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-quic",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.cluster,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed (apt-get install chromium)"),
]


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def evidence_on_failure(page, tmp_path, edge):
    """On any failure inside: a screenshot of the page (tmp_path/failure.png) and the edge's log. Closes the page."""
    try:
        yield
    except BaseException:
        try:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
        except Exception:
            pass
        print(edge.log())
        raise
    finally:
        page.close()


def draw_seven(page) -> None:
    """A '7' in three strokes of mouse down/move/up: the top bar, then the diagonal."""
    box = page.locator("#digit-canvas").bounding_box()
    x, y, w, h = box["x"], box["y"], box["width"], box["height"]

    def stroke(points):
        page.mouse.move(x + points[0][0] * w, y + points[0][1] * h)
        page.mouse.down()
        for px, py in points[1:]:
            page.mouse.move(x + px * w, y + py * h, steps=12)
        page.mouse.up()

    stroke([(0.30, 0.22), (0.72, 0.22)])
    stroke([(0.72, 0.22), (0.58, 0.50), (0.46, 0.80)])


def test_page_predicts_shows_agents_and_errors(browser, cluster, tmp_path):
    from playwright.sync_api import expect

    expect.set_options(timeout=15_000)  # a loaded 2-core machine (CI runs everything at once) can be slow to paint
    cluster.start_manager()
    cluster.start_broker()
    agents = cluster.start_agents(2)
    cluster.wait_for_agents(2, model="digits")
    edge = start_edge(cluster.addresses.broker_clients, tmp_path)
    page = browser.new_page(viewport={"width": 1360, "height": 980})
    console_errors = []
    page.on("pageerror", lambda exc: console_errors.append(str(exc)))
    try:
        with evidence_on_failure(page, tmp_path, edge):
            page.goto(edge.url + "/")
            expect(page).to_have_title(re.compile("torch-serving-cluster"))

            # the cluster panel lists both agents
            rows = page.locator("#agents .agent-row")
            expect(rows).to_have_count(2, timeout=10_000)
            ids = sorted(rows.nth(i).get_attribute("data-agent-id") for i in range(2))
            assert ids == sorted(p.name for p in agents)
            expect(page.locator("#status")).to_have_text(re.compile("Ready"))

            # draw, predict: a digit and ten bars whose probabilities add up to 1
            draw_seven(page)
            page.click("#predict")
            expect(page.locator("#prediction")).to_have_text(re.compile(r"^[0-9]$"), timeout=10_000)
            bars = page.locator(".prob-bar")
            expect(bars).to_have_count(10)
            probabilities = [float(bars.nth(i).get_attribute("data-probability")) for i in range(10)]
            assert abs(sum(probabilities) - 1) < 1e-3
            assert int(page.locator("#prediction").inner_text()) == probabilities.index(max(probabilities))
            expect(page.locator("#predict-meta")).to_contain_text("served by agent-")
            expect(page.locator("#error")).to_be_hidden()

            # the model panel: pick echo, see its tensors, send the prefilled example
            expect(page.locator("#model-select option")).to_have_count(2, timeout=10_000)
            page.select_option("#model-select", "echo")
            expect(page.locator("#model-io[data-model=echo]")).to_contain_text("FP32")
            expect(page.locator("#request-body")).to_have_value(re.compile('"name": "x"'))
            body = json.loads(page.locator("#request-body").input_value())
            assert body["inputs"][0]["name"] == "x" and body["inputs"][0]["shape"] == [1, 1]
            page.click("#send")
            expect(page.locator("#response-status")).to_have_text(re.compile("200 OK"))
            assert json.loads(page.locator("#response").inner_text())["outputs"][0]["name"] == "y"
            page.locator("#request-body").fill(
                '{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1]}]}'
            )
            page.click("#send")
            expect(page.locator("#response-status")).to_have_text("HTTP 400")
            expect(page.locator("#response")).to_contain_text("refused the input")
            page.click("#reset-body")
            expect(page.locator("#request-body")).to_have_value(re.compile('"example-1"'))
            page.click("#send")
            expect(page.locator("#response-status")).to_have_text(re.compile("200 OK"))

            artifacts = REPO_ROOT / "test-artifacts"
            artifacts.mkdir(exist_ok=True)
            page.screenshot(path=str(artifacts / "frontend.png"), full_page=True)  # docs/frontend.png is a copy of one

            # kill one agent (SIGKILL, by pid): it disappears from the panel once the broker declares it dead
            cluster.kill(agents[0])
            expect(rows).to_have_count(1, timeout=10_000)
            assert rows.first.get_attribute("data-agent-id") == agents[1].name

            # stop the edge: the page says the edge cannot be reached
            edge.stop()
            expect(page.locator("#error")).to_contain_text("edge server is not reachable", timeout=10_000)
            expect(page.locator("#status")).to_have_text("Edge unreachable")
            assert not console_errors, console_errors
    finally:
        edge.stop()


def test_page_says_when_no_agent_is_live(browser, cluster, tmp_path):
    cluster.start_manager()
    cluster.start_broker()
    agent = cluster.start_agent("agent-lonely")
    cluster.wait_for_agents(1)
    edge = start_edge(cluster.addresses.broker_clients, tmp_path)
    from playwright.sync_api import expect

    page = browser.new_page()
    try:
        page.goto(edge.url + "/")
        expect(page.locator("#agents .agent-row")).to_have_count(1, timeout=10_000)
        cluster.stop(agent)
        expect(page.locator("#agents .agent-row")).to_have_count(0, timeout=10_000)
        draw_seven(page)
        page.click("#predict")
        expect(page.locator("#error")).to_contain_text("no live agent", timeout=10_000)
        expect(page.locator("#status")).to_have_text("No live agent")
    finally:
        page.close()
        edge.stop()


def test_page_lists_the_brokers_and_drops_a_killed_one(browser, cluster):
    """Two brokers (one agent each) report to the manager; the page lists both (GET /brokers, from the manager) with
    their agents, in flight and queued, and drops the one that is killed."""
    from playwright.sync_api import expect

    from tests.test_broker_reports import start_second_broker

    cluster.start_manager()
    cluster.start_broker("--name", "b1")
    b2 = start_second_broker(cluster)
    cluster.start_agent("agent-1", "--models", "echo")
    cluster.start_agent("agent-2", "--models", "echo", CLUSTER_BROKER_AGENTS=b2.addresses["broker_agents"])
    edge = cluster.start_edge("--log-level", "warning")  # knows the manager: the cluster's addresses
    page = browser.new_page()
    console_errors = []
    page.on("pageerror", lambda exc: console_errors.append(str(exc)))
    try:
        page.goto(edge.url + "/")
        rows = page.locator("#brokers .broker-row")
        expect(rows).to_have_count(2, timeout=30_000)
        names = [rows.nth(i).get_attribute("data-broker-name") for i in range(2)]
        assert names == ["b1", "b2"]
        for i in range(2):  # each broker routes to its one agent
            expect(rows.nth(i).locator("td").nth(1)).to_have_text("1", timeout=30_000)
            expect(rows.nth(i).locator(".broker-in-flight")).to_have_text("0")
            expect(rows.nth(i).locator(".broker-queued")).to_have_text("0")
        expect(page.locator("#broker-count")).to_have_text("2")

        cluster.kill(b2)
        expect(rows).to_have_count(1, timeout=15_000)
        assert rows.first.get_attribute("data-broker-name") == "b1"
        assert not console_errors, console_errors
    finally:
        page.close()
