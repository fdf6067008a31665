"""The job dashboard as tests see it: a page object over Playwright, and input files.

Why: the tests speak of what a person does (upload a file, press Cancel, confirm a forced
delete) and what they see (a row's status, step and bar); the selectors behind those words
live here once, found by role and label as a keyboard or screen-reader user finds them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gembatch.server.process import ServiceProcess
from tests.server.conftest import jsonl, request_item
from tests.server.test_api import STUCK, UNKNOWN_MODEL

__all__ = ["STUCK", "UNKNOWN_MODEL", "Dashboard", "requests_file"]


def requests_file(path: Path, count: int, prefix: str = "k", failing: Iterable[int] = ()) -> Path:
    """A JSONL input of `count` requests keyed `<prefix><n>`; those numbered in `failing`
    ask the emulator for an error line (the batch still succeeds)."""
    bad = set(failing)
    items = [
        request_item(f"{prefix}{n}", f"prompt {n}" + (" [[emulator:error]]" if n in bad else ""))
        for n in range(1, count + 1)
    ]
    path.write_text(jsonl(items), encoding="utf-8")
    return path


class Dashboard:
    def __init__(self, page: Any, service: ServiceProcess) -> None:
        self.page = page
        self.service = service

    def open(self) -> Dashboard:
        from playwright.sync_api import expect

        self.page.goto(self.service.base_url + "/")
        expect(self.page.get_by_role("heading", name="Jobs", exact=True)).to_be_visible()
        return self

    def upload(self, path: Path, model: str | None = None) -> None:
        """Choose `path` in the form (and a model), and press Create job."""
        self.page.get_by_label("JSONL file").set_input_files(str(path))
        if model is not None:
            self.page.get_by_label("Model").fill(model)
        self.page.get_by_role("button", name="Create job").click()

    def row(self, name: str) -> Any:
        """The list item of the job displayed as `name` (its file name by default)."""
        return self.page.get_by_role("listitem", name=f"Job {name}", exact=True)

    def button(self, name: str, action: str) -> Any:
        """A row's button: `action` is its visible text (Cancel, Delete, Download results)."""
        return self.row(name).get_by_role("button", name=f"{action} {name}", exact=True)

    def job_id(self, name: str) -> str:
        value = self.row(name).get_attribute("data-job-id")
        assert value, f"no job id on the row of {name}"
        return value

    def wait_for(self, name: str, status: str, step: str | None = None) -> Any:
        """The row, once it shows `status` (and `step`)."""
        from playwright.sync_api import expect

        row = self.row(name)
        expect(row).to_have_attribute("data-status", status)
        if step is not None:
            expect(row).to_have_attribute("data-step", step)
        return row

    def seen(self, job_id: str) -> list[tuple[str, str, float]]:
        """Every (status, step, progress) the job's row showed, in order."""
        rows = self.page.evaluate("(id) => window.__gembatchSeen[id] || []", job_id)
        return [(status, step, float(progress)) for status, step, progress in rows]

    def streams(self, job_id: str) -> list[dict[str, Any]]:
        """The EventSources the page opened for the job: `{url, events}`."""
        every = self.page.evaluate("() => window.__gembatchStreams")
        return [s for s in every if f"/api/job/{job_id}/stream" in s["url"]]

    def wait_stream_end(self, job_id: str, event: str) -> dict[str, Any]:
        """The job's EventSource, once its last event is `event` (`completed`, `error`)."""
        self.page.wait_for_function(
            """([id, type]) => window.__gembatchStreams.some(
                 (s) => s.url.includes(`/api/job/${id}/stream`) && s.events.at(-1) === type)""",
            arg=[job_id, event],
        )
        (stream,) = self.streams(job_id)
        return stream

    # -- the keyboard and the accessibility tree -------------------------------------------
    def tab_to(self, target: Any, key: str = "Tab", limit: int = 40) -> list[str]:
        """Press `key` (Tab, Shift+Tab) until `target` (a locator) has the focus. Every
        stop on the way must show a visible focus ring. Returns the stops' names."""
        stops: list[str] = []
        for _ in range(limit):
            self.page.keyboard.press(key)
            stop = self.page.evaluate(FOCUSED)
            assert stop["ring"], f"no visible focus ring on {stop['name']} (after {stops})"
            stops.append(stop["name"])
            if target.evaluate("(el) => el === document.activeElement"):
                return stops
        raise AssertionError(f"{key} never reached {target} (stops: {stops})")

    def unnamed_controls(self) -> list[str]:
        """Controls without an accessible name, by Chromium's own accessibility tree (the
        ones rendered now) and by the page's markup (every control, hidden or not)."""
        cdp = self.page.context.new_cdp_session(self.page)
        try:
            nodes = cdp.send("Accessibility.getFullAXTree")["nodes"]
        finally:
            cdp.detach()
        missing = [
            f"{node['role']['value']} (backend node {node.get('backendDOMNodeId')})"
            for node in nodes
            if not node.get("ignored")
            and node.get("role", {}).get("value") in CONTROL_ROLES
            and not str(node.get("name", {}).get("value", "")).strip()
        ]
        return missing + self.page.evaluate(UNNAMED_IN_MARKUP)

    def control_names(self) -> list[tuple[str, str]]:
        """(role, name) of every control in Chromium's accessibility tree now."""
        cdp = self.page.context.new_cdp_session(self.page)
        try:
            nodes = cdp.send("Accessibility.getFullAXTree")["nodes"]
        finally:
            cdp.detach()
        return [
            (node["role"]["value"], str(node.get("name", {}).get("value", "")))
            for node in nodes
            if not node.get("ignored") and node.get("role", {}).get("value") in CONTROL_ROLES
        ]


# Roles a person operates (Chromium's names; `summary` is a DisclosureTriangle).
CONTROL_ROLES = frozenset(
    {
        "button",
        "checkbox",
        "combobox",
        "DisclosureTriangle",
        "link",
        "listbox",
        "progressbar",
        "radio",
        "searchbox",
        "slider",
        "spinbutton",
        "switch",
        "textbox",
    }
)

# The focused element: a readable name, and whether a keyboard user sees where focus is
# (:focus-visible matches and an outline is drawn).
FOCUSED = """() => {
  const el = document.activeElement;
  const style = getComputedStyle(el);
  const name = el.getAttribute('aria-label') || el.id || el.textContent.trim().slice(0, 40);
  const ring = el !== document.body && el.matches(':focus-visible') &&
    style.outlineStyle !== 'none' && parseFloat(style.outlineWidth) > 0;
  return { name: `${el.tagName.toLowerCase()} ${name}`, ring };
}"""

# Every input, button, select, textarea and summary, hidden or not (per-row buttons of
# any state, the closed dialog's buttons, the row template's), must have a name source:
# aria-label, aria-labelledby, a <label>, or its own text.
UNNAMED_IN_MARKUP = """() => {
  const roots = [document, ...[...document.querySelectorAll('template')].map((t) => t.content)];
  const named = (el) => {
    if ((el.getAttribute('aria-label') || '').trim()) return true;
    const by = (el.getAttribute('aria-labelledby') || '').split(/\\s+/).filter(Boolean);
    if (by.some((id) => (document.getElementById(id)?.textContent || '').trim())) return true;
    if ([...(el.labels || [])].some((label) => label.textContent.trim())) return true;
    if (el.matches('button, summary') && el.textContent.trim()) return true;
    return false;
  };
  const unnamed = [];
  for (const root of roots) {
    for (const el of root.querySelectorAll('input, button, select, textarea, summary')) {
      if (el.type === 'hidden') continue;
      if (!named(el)) unnamed.push(`${el.tagName.toLowerCase()}#${el.id || el.className}`);
    }
  }
  return unnamed;
}"""
