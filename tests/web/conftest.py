"""Fixtures for the web page's browser tests: Debian's chromium, driven by Playwright, on
real `gembatch serve` processes backed by real emulator processes.

Why: the page's promises (live bars fed by SSE, uploads, cancel, confirmed force-delete,
downloads, tokens) live in a browser talking to the real service; a test that stubs
either side proves nothing about them. Playwright never downloads a browser here: it
launches /usr/bin/chromium, and the tests skip with the reason when that or Playwright is
missing, or fail instead when GEMBATCH_REQUIRE_BROWSER=1 (.ci/run sets it). Each test
leaves a screenshot under test-artifacts/web/ (ignored by git).
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gembatch.server.process import ServiceProcess
from tests.server.conftest import (  # noqa: F401 - fixtures used by this directory's tests
    ServiceLauncher,
    module_service_factory,
    service_factory,
)
from tests.web.dashboard import STUCK

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "web"
# Batches run 3 s on the emulator (several progress polls at --poll-interval 0.2); batches
# whose display name holds STUCK stay PENDING remotely, so their jobs stay running.
WEB_EMULATOR_CONFIG: dict[str, Any] = {
    "clock": {"pending_seconds": 0.5, "running_seconds": 3.0},
    "faults": {"batches": {"expire_rate": 1.0, "match": STUCK}},
}
EXPECT_TIMEOUT_MS = 30_000  # generous: the suite shares 2 cores with other tests
PLAYWRIGHT_MISSING = "playwright is missing: pip install -c constraints.txt -e '.[dev]'"
# CI must run the browser tests: there a missing chromium or Playwright is a failure.
REQUIRE_BROWSER = os.environ.get("GEMBATCH_REQUIRE_BROWSER") == "1"


def _browser_missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)"
    if importlib.util.find_spec("playwright") is None:
        return PLAYWRIGHT_MISSING
    return None


def _skip_or_fail(reason: str) -> None:
    if REQUIRE_BROWSER:
        pytest.fail(f"GEMBATCH_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


# The test modules skip themselves at import when Playwright is missing (importorskip),
# before any fixture runs: under GEMBATCH_REQUIRE_BROWSER=1 this directory fails here first.
if REQUIRE_BROWSER and (_missing := _browser_missing()):
    _skip_or_fail(_missing)


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """One headless chromium per test process (each test gets its own context)."""
    if missing := _browser_missing():
        _skip_or_fail(missing)
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        _skip_or_fail(PLAYWRIGHT_MISSING)
    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh browser tab (its own storage), recording what the job rows showed. At the
    end it saves a screenshot, and fails the test if the page threw a JavaScript error."""
    context = browser.new_context(accept_downloads=True, viewport={"width": 1200, "height": 1000})
    context.set_default_timeout(EXPECT_TIMEOUT_MS)
    context.add_init_script(RECORDER)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield tab
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
        try:
            tab.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
        finally:
            context.close()
    assert not errors, f"the page threw: {errors}"


@pytest.fixture(scope="module")
def web_service(module_service_factory: ServiceLauncher) -> ServiceProcess:  # noqa: F811
    """A single-user service shared by a module's tests (each test uses its own file
    names, so their rows never mix)."""
    return module_service_factory(WEB_EMULATOR_CONFIG)


# Test instrumentation only (the page does not know about it): every state a job row
# shows, and every EventSource the page opens with the events it received.
RECORDER = """
window.__gembatchSeen = {};
window.__gembatchStreams = [];
const record = (el) => {
  if (!(el instanceof Element) || !el.dataset || !el.dataset.jobId || !el.dataset.status) return;
  (window.__gembatchSeen[el.dataset.jobId] ||= []).push(
    [el.dataset.status, el.dataset.step, Number(el.dataset.progress)]);
};
new MutationObserver((changes) => {
  for (const change of changes) {
    if (change.type === 'attributes') record(change.target);
    for (const node of change.addedNodes || []) record(node);
  }
}).observe(document, {subtree: true, childList: true, attributes: true,
                      attributeFilter: ['data-status', 'data-step', 'data-progress']});
const NativeEventSource = window.EventSource;
window.EventSource = class extends NativeEventSource {
  constructor(url, init) {
    super(url, init);
    const seen = {url: String(url), events: []};
    window.__gembatchStreams.push(seen);
    for (const type of ['status', 'progress', 'completed', 'error']) {
      this.addEventListener(type, (e) => {
        if (e instanceof MessageEvent) seen.events.push(type);
      });
    }
  }
};
"""
