"""The page's models panel during a canary (issue 21), in headless Chromium against a real cluster and edge: the
split live (stable v1 90% / canary v2 10%), each version's requests, error rate and p99, and the decision timeline,
polled from the edge's GET /rollouts. Screenshot: test-artifacts/frontend-canary.png (ignored by git)."""

from __future__ import annotations

import os
import re

import pytest

from bench.canary import MODEL, CanaryCluster, Load
from tests.harness import REPO_ROOT
from tests.models import Scaled
from tests.test_frontend import CHROMIUM, browser, evidence_on_failure  # noqa: F401 (browser: the fixture)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.cluster,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed"),
]


def test_page_shows_a_canary_split_its_figures_and_its_decisions(browser, tmp_path):  # noqa: F811
    from playwright.sync_api import expect

    expect.set_options(timeout=20_000)
    with CanaryCluster(tmp_path, [Scaled(), Scaled()]) as cc:
        edge = cc.cluster.start_edge("--log-level", "warning")  # knows the manager: the cluster's addresses
        page = browser.new_page(viewport={"width": 1360, "height": 1400})
        console_errors = []
        page.on("pageerror", lambda exc: console_errors.append(str(exc)))
        with evidence_on_failure(page, tmp_path, edge):
            with Load(cc.cluster.addresses.broker_clients, in_flight=4, rate=200) as load:
                load.wait_answers(50)
                page.goto(edge.url + "/")
                expect(page.locator("#rollouts-empty")).to_be_visible()
                cc.canary(2, steps=[10, 100], step_seconds=600.0, criteria={"latency_ratio": 1000})  # the page
                cc.wait_running(2)
                card = page.locator(f".rollout[data-model={MODEL}]")
                expect(card.locator(".split-stable")).to_have_text("stable v1 90%")
                expect(card.locator(".split-canary")).to_have_text("canary v2 10%")
                expect(card.locator(".rollout-state")).to_have_text("step 1 of 2")
                expect(card.locator(".rollout-version")).to_have_count(2)
                expect(card.locator(".rollout-version[data-version='2'] .version-requests")).not_to_have_text("0")
                expect(card.locator(".rollout-version[data-version='2'] .version-error-rate")).to_have_text("0.00%")
                expect(card.locator(".rollout-version[data-version='1'] .version-p99")).to_have_text(
                    re.compile(r"^[0-9.]+ ms$")
                )
                expect(card.locator(".timeline li.start")).to_have_count(1)
                artifacts = REPO_ROOT / "test-artifacts"
                artifacts.mkdir(exist_ok=True)
                page.screenshot(path=str(artifacts / "frontend-canary.png"), full_page=True)

                cc.manager.call("abort", name=MODEL)
                expect(card).to_have_attribute("data-outcome", "aborted")
                expect(card.locator(".split-stable")).to_have_text("stable v1 100%")
                expect(card.locator(".timeline li.abort")).to_have_count(1)
            assert load.summary()["failed"] == 0, load.summary()
            assert not console_errors, console_errors
