"""The web page by keyboard alone, its labels, the create form's optional fields, and the
POST stream's resume, in Debian's chromium against real service and emulator processes.

Why: "usable by keyboard, labelled controls" (issue 7) is only true if a person who never
touches the mouse can create a job (file chooser included), filter, refresh, download,
cancel and answer the delete dialog, always seeing where the focus is, and if a screen
reader finds a name on every control. The form's Priority, Attempts and JSON options must
reach the job the service runs, seen through the API, not only in the request the page
sent. And the POST stream that creates and follows a job in one request must resume after
its connection drops without losing or repeating an event.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gembatch.server.process import ServiceProcess
from tests.server.conftest import (
    ServiceLauncher,
    events_of,
    jsonl,
    request_item,
)
from tests.server.test_api import upload
from tests.web.dashboard import STUCK, Dashboard, requests_file

PLAYWRIGHT_MISSING = "playwright is missing: pip install -c constraints.txt -e '.[dev]'"
sync_api = pytest.importorskip("playwright.sync_api", reason=PLAYWRIGHT_MISSING)
expect = sync_api.expect
# Batches whose display name (made from the file name) holds this end FAILED remotely.
FAILS = "FAILS"


def results_of(service: ServiceProcess, job_id: str) -> bytes:
    return (service.data_dir / "results" / f"{job_id}.jsonl").read_bytes()


def _items(count: int, prefix: str) -> list[dict[str, Any]]:
    return [request_item(f"{prefix}{n}") for n in range(1, count + 1)]


def test_a_keyboard_alone_creates_filters_refreshes_downloads_and_cancels_with_named_controls(
    page: Any, web_service: ServiceProcess, tmp_path: Path
) -> None:
    held = f"{STUCK}-keys.jsonl"
    with web_service.client() as client:  # a running job, so its row shows Cancel
        held_id = upload(client, held, jsonl(_items(2, "h")))
    # Playwright turns on its file chooser interception when the first listener comes,
    # without waiting for it: listening from the start, a key press cannot outrun it.
    page.on("filechooser", lambda _chooser: None)
    dashboard = Dashboard(page, web_service).open()
    dashboard.wait_for(held, "running", "queued")

    # Create: Tab to the file input, Space opens the file chooser, Tab through the fields.
    source = requests_file(tmp_path / "keys.jsonl", 5, prefix="kb")
    file_input = page.get_by_label("JSONL file")
    stops = dashboard.tab_to(file_input)
    assert stops == [
        "a Skip to the job list",
        "a /docs",
        "input token-input",
        "button Use token",  # Forget token is disabled while no token is in use
        "input file-input",
    ], stops
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Space")
    chooser.value.set_files(str(source))
    page.keyboard.press("Tab")
    expect(page.get_by_role("combobox", name="Model")).to_be_focused()
    page.keyboard.type("gemini-2.5-flash")
    page.keyboard.press("Tab")
    expect(page.get_by_role("textbox", name="Display name")).to_be_focused()
    name = "typed-by-keys"
    page.keyboard.type(name)
    page.keyboard.press("Tab")
    priority = page.get_by_role("spinbutton", name="Priority")
    expect(priority).to_be_focused()
    for _ in range(4):
        page.keyboard.press("ArrowUp")
    expect(priority).to_have_value("4")
    page.keyboard.press("Tab")
    expect(page.get_by_role("spinbutton", name="Attempts")).to_be_focused()
    page.keyboard.type("2")
    more = page.get_by_text("More options (JSON)")
    dashboard.tab_to(more)
    page.keyboard.press("Enter")  # opens the JSON options
    options = page.get_by_role("textbox", name="Other job options")
    dashboard.tab_to(options)
    page.keyboard.type('{"metadata": {"via": "keyboard"}}')
    create = page.get_by_role("button", name="Create job")
    dashboard.tab_to(create)
    page.keyboard.press("Enter")
    row = dashboard.wait_for(name, "completed")
    expect(create).to_be_focused()  # the keyboard stays where it was during the upload
    expect(page.locator("#create-state")).to_contain_text(f"Created job {name}")
    job_id = dashboard.job_id(name)
    with web_service.client() as client:
        status = client.get(f"/api/job/{job_id}/status").json()
    assert status["priority"] == 4 and status["metadata"] == {"via": "keyboard"}, status
    assert status["model"].endswith("gemini-2.5-flash"), status

    # Filter: the status select changes with the arrow keys; Refresh answers to Space.
    status_filter = page.get_by_role("combobox", name="Show")
    assert dashboard.tab_to(status_filter) == ["select status-filter"]
    for _ in range(3):
        page.keyboard.press("ArrowDown")  # all jobs -> pending -> running -> completed
    expect(status_filter).to_have_value("completed")
    expect(dashboard.row(held)).to_have_count(0)
    expect(page.locator("#jobs > li:not([data-status=completed])")).to_have_count(0)
    expect(row).to_have_attribute("data-status", "completed")
    refresh = page.get_by_role("button", name="Refresh")
    dashboard.tab_to(refresh)
    with page.expect_request(lambda r: "/api/jobs?status=completed" in r.url):
        page.keyboard.press("Space")

    # Download: Tab into the row, Enter; the focus stays on the button.
    download = dashboard.button(name, "Download results")
    assert dashboard.tab_to(download) == [f"button Download results {name}"]
    with page.expect_download() as started:
        page.keyboard.press("Enter")
    saved = tmp_path / "downloaded.jsonl"
    started.value.save_as(str(saved))
    assert saved.read_bytes() == results_of(web_service, job_id)
    expect(download).to_be_focused()

    # Back to all jobs: Shift+Tab to the select, Home picks its first option.
    dashboard.tab_to(status_filter, key="Shift+Tab")
    page.keyboard.press("Home")
    expect(status_filter).to_have_value("")
    held_row = dashboard.wait_for(held, "running")

    # Every control has a name: in Chromium's accessibility tree and in the markup. The
    # rows show Download and Delete (completed), Cancel and Delete (running); the JSON
    # options are open.
    expect(options).to_be_visible()
    assert dashboard.unnamed_controls() == []
    names = set(dashboard.control_names())
    for role, label in [
        ("button", f"Download results {name}"),
        ("button", f"Delete {name}"),
        ("button", f"Cancel {held}"),
        ("button", f"Delete {held}"),
        ("progressbar", f"Progress of {held}"),
        ("button", "Forget token"),
    ]:
        assert (role, label) in names, (role, label, sorted(names))

    # The delete dialog: Enter opens it, its buttons are named, Escape keeps the job.
    delete = dashboard.button(name, "Delete")
    dashboard.tab_to(delete)
    page.keyboard.press("Enter")
    dialog = page.get_by_role("dialog", name=f"Delete {name}?")
    expect(dialog).to_be_visible()
    expect(dialog.get_by_role("button", name="Keep the job")).to_be_focused()
    expect(dialog.get_by_role("button", name="Delete the job")).to_be_visible()
    assert dashboard.unnamed_controls() == []
    dashboard.tab_to(dialog.get_by_role("button", name="Delete the job"), key="Shift+Tab")
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(delete).to_be_focused()
    expect(row).to_have_count(1)

    # Cancel the running job by keyboard: its Cancel goes away, the focus moves to Delete.
    cancel = dashboard.button(held, "Cancel")
    dashboard.tab_to(cancel)
    page.keyboard.press("Enter")
    dashboard.wait_for(held, "cancelled")
    expect(cancel).to_be_hidden()
    expect(dashboard.button(held, "Delete")).to_be_focused()
    expect(held_row.locator(".job-error-words")).to_have_text(
        "Cancelled: the job was stopped before it finished."
    )
    with web_service.client() as client:
        assert client.get(f"/api/job/{held_id}/status").json()["status"] == "cancelled"


def test_the_forms_priority_attempts_and_json_options_reach_the_job(
    page: Any, service_factory: ServiceLauncher, tmp_path: Path
) -> None:
    # Every batch of these jobs ends FAILED (BATCH_FAILED, not retried by default), so the
    # number of attempts shows which retry settings the job runs with.
    svc = service_factory(
        {
            "clock": {"pending_seconds": 0.2, "running_seconds": 0.5},
            "faults": {"batches": {"fail_rate": 1.0, "match": FAILS}},
        }
    )
    dashboard = Dashboard(page, svc).open()

    plain = f"{FAILS}-defaults.jsonl"
    dashboard.upload(requests_file(tmp_path / plain, 2, prefix="d"))
    dashboard.wait_for(plain, "failed")
    plain_id = dashboard.job_id(plain)

    name = "retried twice"
    page.get_by_label("JSONL file").set_input_files(
        str(requests_file(tmp_path / f"{FAILS}-options.jsonl", 3, prefix="o"))
    )
    page.get_by_label("Model").fill("gemini-2.5-flash")
    page.get_by_label("Display name").fill(name)
    page.get_by_label("Priority").fill("7")
    page.get_by_label("Attempts").fill("2")
    page.get_by_text("More options (JSON)").click()
    page.get_by_label("Other job options").fill(
        json.dumps(
            {
                # retried at once (the default waits 30 s), and on BATCH_FAILED too
                "retry_config": {"retry_interval": 0, "retry_on_errors": ["BATCH_FAILED"]},
                "metadata": {"team": "web"},
                "max_parallel_tasks": 2,
            }
        )
    )
    page.get_by_role("button", name="Create job").click()
    row = dashboard.wait_for(name, "failed")
    job_id = dashboard.job_id(name)
    expect(row.locator(".job-error-words")).to_have_text(
        "Failed: Gemini reported the batch as failed."
    )
    expect(row.locator(".job-model")).to_have_text("gemini-2.5-flash")
    # The form was reset for the next job.
    for field in ("Model", "Display name", "Attempts", "Other job options"):
        expect(page.get_by_label(field)).to_have_value("")
    expect(page.get_by_label("Priority")).to_have_value("0")

    with svc.client() as client:
        status = client.get(f"/api/job/{job_id}/status").json()
        listed = {job["job_id"]: job for job in client.get("/api/jobs").json()["jobs"]}
        plain_status = client.get(f"/api/job/{plain_id}/status").json()
    for record in (status, listed[job_id]):
        assert record["status"] == "failed", record
        assert record["priority"] == 7, record
        assert record["attempts"] == 2, record  # Attempts 2, retried on BATCH_FAILED, at once
        assert record["error_details"]["class"] == "BATCH_FAILED", record
        assert record["display_name"] == name, record
        assert record["model"].endswith("gemini-2.5-flash"), record
        assert record["metadata"] == {"team": "web"}, record
    # The job with the form left as it was: priority 0, the default retry rules (which do
    # not retry BATCH_FAILED), the service's model, its file name as display name.
    for record in (plain_status, listed[plain_id]):
        assert record["priority"] == 0 and record["attempts"] == 1, record
        assert record["display_name"] == plain and record["metadata"] == {}, record


# Test instrumentation (the page does not know about it): once `window.__gembatchCut` is
# a number N, the next POST stream's connection is cut after its first N events, as a
# dropped connection would be (the real request is aborted, the body errors). Every fetch
# is recorded with its Last-Event-ID header and how many events the page had by then.
CUT_POST_STREAM = """
window.__gembatchCut = null;
window.__gembatchFetches = [];
window.__gembatchEventCount = () => 0;
const realFetch = window.fetch;
window.fetch = async (url, init = {}) => {
  const headers = init.headers || {};
  window.__gembatchFetches.push({ url: String(url), method: init.method || 'GET',
    delivered: window.__gembatchEventCount(), lastEventId: headers['Last-Event-ID'] ?? null });
  const keep = window.__gembatchCut;
  if (keep === null || init.method !== 'POST' || !String(url).includes('/batch/stream')) {
    return realFetch(url, init);
  }
  window.__gembatchCut = null;
  const abort = new AbortController();
  init.signal?.addEventListener('abort', () => abort.abort());
  const response = await realFetch(url, { ...init, signal: abort.signal });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let text = '';
  const body = new ReadableStream({
    async pull(controller) {
      if ((text.match(/\\r?\\n\\r?\\n/g) || []).length >= keep) {
        abort.abort();
        controller.error(new TypeError('network error'));
        return;
      }
      const { value, done } = await reader.read();
      if (done) return controller.close();
      text += decoder.decode(value, { stream: true });
      controller.enqueue(value);
    },
  });
  return new Response(body, { status: response.status, headers: response.headers });
};
"""
CREATE_AND_STREAM = """async ([text, keep]) => {
  const { GembatchClient } = await import('/static/gembatch-client.js');
  const events = [];
  window.__gembatchEventCount = () => events.length;
  window.__gembatchCut = keep;
  const file = new File([text], 'dropped.jsonl', { type: 'application/jsonl' });
  const { jobId, last } = await new GembatchClient().createAndStream(
    file, {}, (event) => events.push(event));
  return { jobId, last, events, requests: window.__gembatchFetches };
}"""


def test_the_post_stream_resumes_after_its_connection_drops_without_losing_an_event(
    page: Any, web_service: ServiceProcess
) -> None:
    page.add_init_script(CUT_POST_STREAM)
    Dashboard(page, web_service).open()
    run = page.evaluate(CREATE_AND_STREAM, [jsonl(_items(4, "p")), 2])
    job_id = run["jobId"]
    assert job_id and run["last"]["type"] == "completed", run
    posts = [r for r in run["requests"] if r["method"] == "POST"]
    resumes = [r for r in run["requests"] if f"/api/job/{job_id}/stream" in r["url"]]
    assert len(posts) == 1 and len(resumes) == 1, run["requests"]
    # Resumed from the last event the POST stream delivered before the cut.
    before_cut = run["events"][: resumes[0]["delivered"]]
    assert before_cut and resumes[0]["lastEventId"] == before_cut[-1]["id"], (resumes, run)
    assert len(before_cut) < len(run["events"]), run  # the rest came after the resume
    received = [e for e in run["events"] if e["type"] != "ping"]

    with web_service.client() as client:
        answer = client.get(f"/api/job/{job_id}/status")
        assert answer.status_code == 200, answer.text
        final = answer.json()
        log = events_of(client, job_id)
    # Every event of the job's log, in order, each once, with the log's data.
    assert [(e["id"], e["type"]) for e in received] == [(str(e["seq"]), e["type"]) for e in log]
    assert [e["data"] for e in received] == [e["data"] for e in log]
    assert received[-1]["data"]["status"] == final["status"] == "completed"


def test_the_pages_upload_keeps_its_live_bar_when_the_post_stream_drops(
    page: Any, web_service: ServiceProcess, tmp_path: Path
) -> None:
    page.add_init_script(CUT_POST_STREAM)
    dashboard = Dashboard(page, web_service).open()
    page.evaluate("() => { window.__gembatchCut = 2; }")
    name = "dropped-then-resumed.jsonl"
    dashboard.upload(requests_file(tmp_path / name, 6, prefix="c"))
    row = dashboard.wait_for(name, "completed", "finalizing")
    job_id = dashboard.job_id(name)
    # The same feed followed it to the end: createAndStream resumed on the GET stream with
    # Last-Event-ID (no EventSource, no polling was needed).
    expect(row).to_have_attribute("data-feed", "post-stream")
    expect(row.locator(".job-trouble")).to_be_hidden()
    fetches = page.evaluate("() => window.__gembatchFetches")
    resumes = [f for f in fetches if f"/api/job/{job_id}/stream" in f["url"]]
    # (cut after the network chunk holding the 2nd event, which may hold the 3rd too)
    assert len(resumes) == 1 and int(resumes[0]["lastEventId"]) >= 2, fetches
    with web_service.client() as client:
        log = events_of(client, job_id)
    assert int(resumes[0]["lastEventId"]) < log[-1]["seq"], (fetches, log)
    assert dashboard.streams(job_id) == []
    seen = dashboard.seen(job_id)
    progress = [value for status, _, value in seen if status != "pending"]
    assert progress == sorted(progress) and progress[-1] == 1.0, seen
    assert {"queued", "processing"} <= {step for _, step, _ in seen}, seen
    saved = tmp_path / "downloaded.jsonl"
    with page.expect_download() as started:
        dashboard.button(name, "Download results").click()
    started.value.save_as(str(saved))
    assert saved.read_bytes() == results_of(web_service, job_id)
