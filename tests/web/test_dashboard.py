"""The web page at `/` in Debian's chromium, on a real `gembatch serve` and emulator: a
person uploads a file and watches its bar move to completed, downloads the results,
cancels and force-deletes running jobs (after saying yes), reads why a job failed in
plain words, sees two jobs move independently (more jobs than live streams: the rest are
polled), and uses a token-protected service once the token is entered; the page's
client module parses event streams and resumes after a Last-Event-ID."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from gembatch.server.process import ServiceProcess
from tests.server.conftest import (
    ServiceLauncher,
    events_of,
    eventually,
    jsonl,
    request_item,
    wait_status,
)
from tests.server.test_api import upload
from tests.web.conftest import WEB_EMULATOR_CONFIG
from tests.web.dashboard import STUCK, UNKNOWN_MODEL, Dashboard, requests_file

PLAYWRIGHT_MISSING = "playwright is missing: pip install -c constraints.txt -e '.[dev]'"
sync_api = pytest.importorskip("playwright.sync_api", reason=PLAYWRIGHT_MISSING)
expect = sync_api.expect
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")  # seed 003's format


def results_of(service: ServiceProcess, job_id: str) -> bytes:
    """The results file the service wrote for the job."""
    return (service.data_dir / "results" / f"{job_id}.jsonl").read_bytes()


def download(dashboard: Dashboard, name: str, target: Path) -> str:
    """Press the row's Download results; save the file to `target`; its suggested name."""
    with dashboard.page.expect_download() as started:
        dashboard.button(name, "Download results").click()
    started.value.save_as(str(target))
    return started.value.suggested_filename


def test_an_uploaded_file_moves_through_the_steps_to_completed_and_its_results_download(
    page: Any, web_service: ServiceProcess, tmp_path: Path
) -> None:
    name = "watch-the-bar.jsonl"
    source = requests_file(tmp_path / name, 30, prefix="w", failing=[7])
    dashboard = Dashboard(page, web_service).open()
    dashboard.upload(source)

    row = dashboard.wait_for(name, "completed", "finalizing")
    job_id = dashboard.job_id(name)
    expect(row).to_have_attribute("data-feed", "post-stream")  # created and followed at once
    seen = dashboard.seen(job_id)
    steps = [step for _, step, _ in seen]
    assert {"queued", "processing", "finalizing"} <= set(steps), seen
    assert steps.index("queued") < steps.index("processing") < steps.index("finalizing"), seen
    progress = [value for status, _, value in seen if status != "pending"]
    assert progress == sorted(progress), f"the bar went backwards: {seen}"
    assert any(0.2 < value < 0.9 for value in progress), f"no move while processing: {seen}"
    assert progress[-1] == 1.0
    expect(row.locator("progress")).to_have_js_property("value", 100)
    expect(row.locator(".job-percent")).to_have_text("100%")
    expect(row.locator(".job-message")).to_have_text(
        "completed: 29 of 30 requests succeeded, 1 failed"
    )
    expect(row.locator(".job-created time")).to_have_attribute("datetime", TIMESTAMP)
    expect(row.locator(".job-finished time")).to_have_attribute("datetime", TIMESTAMP)
    expect(row.locator(".job-error")).to_be_hidden()
    expect(dashboard.button(name, "Cancel")).to_be_hidden()

    saved = tmp_path / "downloaded.jsonl"
    assert download(dashboard, name, saved) == "watch-the-bar.results.jsonl"
    assert saved.read_bytes() == results_of(web_service, job_id)
    lines = [json.loads(line) for line in saved.read_text().splitlines()]
    assert sorted(line["key"] for line in lines) == sorted(f"w{n}" for n in range(1, 31))
    assert "error" in next(line for line in lines if line["key"] == "w7")


def test_a_running_job_is_cancelled_and_another_force_deleted_after_a_confirmation(
    page: Any, web_service: ServiceProcess, tmp_path: Path
) -> None:
    emulator = web_service.emulator  # type: ignore[attr-defined]
    dashboard = Dashboard(page, web_service).open()
    cancelled = before = emulator.stats()["batches_cancelled"]

    name = f"{STUCK}-cancel-me.jsonl"
    dashboard.upload(requests_file(tmp_path / name, 3))
    dashboard.wait_for(name, "running", "queued")  # its remote batch exists, and stays
    dashboard.button(name, "Cancel").click()
    row = dashboard.wait_for(name, "cancelled")
    expect(row.locator(".job-error-words")).to_have_text(
        "Cancelled: the job was stopped before it finished."
    )
    expect(dashboard.button(name, "Cancel")).to_be_hidden()
    eventually(lambda: emulator.stats()["batches_cancelled"] > before, 30, 0.1, "remote cancel")
    with web_service.client() as client:
        status = client.get(f"/api/job/{dashboard.job_id(name)}/status").json()
        assert status["status"] == "cancelled"

    name = f"{STUCK}-delete-me.jsonl"
    dashboard.upload(requests_file(tmp_path / name, 3))
    row = dashboard.wait_for(name, "running", "queued")
    job_id = dashboard.job_id(name)
    cancelled = emulator.stats()["batches_cancelled"]
    delete = dashboard.button(name, "Delete")
    dialog = page.get_by_role("dialog")
    delete.focus()
    page.keyboard.press("Enter")  # the keyboard works as well as the mouse
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text(f"{name} is still running")
    expect(dialog.get_by_role("button", name="Keep the job")).to_be_focused()
    page.keyboard.press("Escape")  # no: nothing happens
    expect(dialog).to_be_hidden()
    expect(delete).to_be_focused()
    expect(row).to_have_attribute("data-status", "running")
    with web_service.client() as client:
        assert client.get(f"/api/job/{job_id}/status").json()["status"] == "running"

    delete.click()
    dialog.get_by_role("button", name="Cancel the batch and delete").click()
    expect(row).to_have_count(0)
    with web_service.client() as client:
        assert client.get(f"/api/job/{job_id}/status").status_code == 404
    assert emulator.stats()["batches_cancelled"] > cancelled
    expect(page.locator("#announcer")).to_have_text(f"Job {name} deleted.")


def test_a_bad_file_and_a_failing_job_say_what_went_wrong_in_plain_words(
    page: Any, web_service: ServiceProcess, tmp_path: Path
) -> None:
    dashboard = Dashboard(page, web_service).open()
    broken = requests_file(tmp_path / "broken.jsonl", 1)
    broken.write_text(broken.read_text() + "{this is not JSON\n")
    dashboard.upload(broken)
    alert = page.get_by_role("alert").filter(has_text="The job was not created")
    expect(alert).to_contain_text("line 2 of the file")
    expect(dashboard.row("broken.jsonl")).to_have_count(0)

    name = "unknown-model.jsonl"
    dashboard.upload(requests_file(tmp_path / name, 2), model=UNKNOWN_MODEL)
    expect(alert).to_be_hidden()
    row = dashboard.wait_for(name, "failed")
    expect(row.locator(".job-error-words")).to_have_text(
        "Failed: Gemini does not know the model (or the batch is gone): check the model name."
    )
    expect(row.locator(".job-error-detail")).to_contain_text(f"models/{UNKNOWN_MODEL} is not found")
    expect(row.locator(".job-finished time")).to_have_count(1)
    expect(dashboard.button(name, "Download results")).to_be_hidden()
    expect(dashboard.button(name, "Cancel")).to_be_hidden()


def test_two_jobs_update_independently(
    page: Any, web_service: ServiceProcess, tmp_path: Path
) -> None:
    held = f"{STUCK}-held.jsonl"
    moving = "moving.jsonl"
    with web_service.client() as client:  # another client: the page finds them in the list
        held_id = upload(client, held, jsonl(_items(2, "h")))
        dashboard = Dashboard(page, web_service).open()
        dashboard.wait_for(held, "running", "queued")
        moving_id = upload(client, moving, jsonl(_items(12, "m")))
        page.get_by_role("button", name="Refresh").click()

        dashboard.wait_for(moving, "completed")
        held_row = dashboard.wait_for(held, "running", "queued")
        expect(held_row.locator(".job-percent")).to_have_text("20%")
        expect(held_row.locator(".job-finished")).to_have_text("not yet")
        later = {"processing", "downloading", "finalizing"}
        assert not later & {step for _, step, _ in dashboard.seen(held_id)}
        assert later <= {step for _, step, _ in dashboard.seen(moving_id)}
        # Each job has its own live stream (EventSource), and each got its own events.
        moving_stream = dashboard.wait_stream_end(moving_id, "completed")
        assert "progress" in moving_stream["events"]
        (held_stream,) = dashboard.streams(held_id)
        assert "completed" not in held_stream["events"] and "error" not in held_stream["events"]

        dashboard.button(held, "Cancel").click()
        dashboard.wait_for(held, "cancelled")
        expect(dashboard.row(moving)).to_have_attribute("data-status", "completed")
        dashboard.wait_stream_end(held_id, "error")
        assert client.get(f"/api/job/{held_id}/status").json()["status"] == "cancelled"


def test_jobs_beyond_the_live_streams_are_polled_every_2_s_as_in_seed_003(
    page: Any, web_service: ServiceProcess
) -> None:
    emulator = web_service.emulator  # type: ignore[attr-defined]
    with web_service.client() as client:
        # This job's batch runs 6 s, so it still runs when the page opens.
        emulator.set_config({"clock": {"running_seconds": 6.0}})
        try:
            polled = upload(client, "oldest.jsonl", jsonl(_items(5, "o")))
            eventually(
                lambda: client.get(f"/api/job/{polled}/status").json()["current_step"]
                in ("queued", "processing"),
                30, 0.1, "the oldest job's batch created",
            )  # fmt: skip
        finally:
            emulator.set_config({"clock": WEB_EMULATOR_CONFIG["clock"]})
        held = [upload(client, f"{STUCK}-{n}.jsonl", jsonl(_items(1, "s"))) for n in range(4)]
        dashboard = Dashboard(page, web_service).open()
        # The list is newest first: the four held jobs get the four live streams.
        for n in range(4):
            expect(dashboard.row(f"{STUCK}-{n}.jsonl")).to_have_attribute("data-feed", "sse")
        row = dashboard.row("oldest.jsonl")
        expect(row).to_have_attribute("data-feed", "poll")
        dashboard.wait_for("oldest.jsonl", "completed")
        assert dashboard.streams(polled) == []
        expect(row.locator(".job-message")).to_have_text("completed: 5 of 5 requests succeeded")
        for job_id in held:
            cancel = {"action": "updateBatchJob", "data": {"job_id": job_id, "status": "cancelled"}}
            assert client.post("/job-operations", json=cancel).status_code == 200
        for n in range(4):
            dashboard.wait_for(f"{STUCK}-{n}.jsonl", "cancelled")


def test_a_token_protected_service_works_once_the_token_is_entered(
    page: Any, service_factory: ServiceLauncher, tmp_path: Path
) -> None:
    svc = service_factory(WEB_EMULATOR_CONFIG, tokens=["alice"])
    token = svc.tokens["alice"]  # type: ignore[attr-defined]
    dashboard = Dashboard(page, svc).open()
    notice = page.get_by_role("alert").filter(has_text="token")
    field = page.get_by_role("textbox", name="Token")
    expect(notice).to_have_text(
        "This service needs an API token. Enter it above to see and create jobs."
    )
    expect(field).to_be_focused()  # the keyboard is where the fix is
    field.fill("not-the-token-0123456789")
    field.press("Enter")
    expect(notice).to_have_text("The service refused this token. Enter a valid API token above.")
    field.fill(token)
    field.press("Enter")
    expect(notice).to_be_hidden()
    expect(page.get_by_text("No jobs yet")).to_be_visible()

    name = "with-a-token.jsonl"
    dashboard.upload(requests_file(tmp_path / name, 4, prefix="t"))
    dashboard.wait_for(name, "completed")
    job_id = dashboard.job_id(name)
    saved = tmp_path / "downloaded.jsonl"
    download(dashboard, name, saved)
    assert saved.read_bytes() == results_of(svc, job_id)

    # The token stays for this tab: after a reload the list loads, and a running job
    # created elsewhere is followed by EventSource, which sends it as ?access_token=.
    held = f"{STUCK}-token.jsonl"
    with svc.client(token) as client:
        held_id = upload(client, held, jsonl(_items(1, "s")))
        page.reload()
        dashboard.wait_for(held, "running", "queued")
        expect(notice).to_be_hidden()
        expect(dashboard.row(name)).to_have_attribute("data-status", "completed")
        dashboard.button(held, "Cancel").click()
        dashboard.wait_for(held, "cancelled")
        stream = dashboard.wait_stream_end(held_id, "error")
        assert "access_token=" in stream["url"] and stream["events"][0] == "status"
        assert client.get(f"/api/job/{held_id}/status").json()["status"] == "cancelled"
    page.get_by_role("button", name="Forget token").click()
    expect(notice).to_be_visible()
    expect(dashboard.row(name)).to_have_count(0)


def _items(count: int, prefix: str) -> list[dict[str, Any]]:
    return [request_item(f"{prefix}{n}") for n in range(1, count + 1)]


PARSE_CHUNKS = """async () => {
  const { readEventStream } = await import('/static/gembatch-client.js');
  const chunks = ['event: progress\\r', '\\ndata: {"a":', ' 1}\\r\\n\\r\\n: a comment\\n\\n',
                  'id: 7\\nevent: status\\ndata: x\\ndata: y\\n\\n', 'data: cut short'];
  const body = new ReadableStream({
    start(controller) {
      for (const chunk of chunks) controller.enqueue(new TextEncoder().encode(chunk));
      controller.close();
    },
  });
  const events = [];
  const end = await readEventStream(new Response(body), (event) => events.push(event));
  return { events, end };
}"""
RESUME = """async ([jobId, lastEventId]) => {
  const { GembatchClient } = await import('/static/gembatch-client.js');
  const events = [];
  const last = await new GembatchClient().followStream(jobId, (e) => events.push(e),
                                                        { lastEventId });
  return { events, last };
}"""


def test_the_client_module_parses_event_streams_and_resumes_after_last_event_id(
    page: Any, web_service: ServiceProcess
) -> None:
    Dashboard(page, web_service).open()
    parsed = page.evaluate(PARSE_CHUNKS)
    assert parsed["events"] == [
        {"type": "progress", "data": {"a": 1}, "id": None},
        {"type": "status", "data": "x\ny", "id": "7"},
    ]  # a CR/LF split across chunks is one line break; the unfinished event is dropped
    assert parsed["end"] == {"lastEventId": "7"}

    with web_service.client() as client:
        job_id = upload(client, "resume.jsonl", jsonl(_items(3, "r")))
        assert wait_status(client, job_id, ["completed"])["status"] == "completed"
        log = events_of(client, job_id)
    followed = page.evaluate(RESUME, [job_id, "2"])
    # Exactly the events after id 2, in order, each once, with the log's data.
    assert [(e["id"], e["type"]) for e in followed["events"]] == [
        (str(e["seq"]), e["type"]) for e in log[2:]
    ]
    assert [e["data"] for e in followed["events"]] == [e["data"] for e in log[2:]]
    assert followed["last"]["type"] == "completed"
