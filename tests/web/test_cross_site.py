"""Another web page, open in the user's chromium, tries to use the local service: the
requests a page may send anywhere without a CORS preflight (a text/plain or multipart
fetch in `no-cors` mode, a url-encoded fetch, a submitted multipart form) reach the
service, which refuses them; no job is created or deleted.

The foreign page is served from another port of 127.0.0.1 (another origin on the same
machine, so chromium's own private-network rules do not step in and the test sees what
the service itself does).
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from gembatch.server.process import ServiceProcess
from tests.server.conftest import TERMINAL, create_job, inline_body, wait_status

PLAYWRIGHT_MISSING = "playwright is missing: pip install -c constraints.txt -e '.[dev]'"
pytest.importorskip("playwright.sync_api", reason=PLAYWRIGHT_MISSING)

ATTACK = """async (target) => {
  const item = {key: 'x', request: {contents: [{parts: [{text: 'pwned'}]}]}};
  const body = JSON.stringify({requests: [item]});
  const line = JSON.stringify(item);
  const operation = JSON.stringify({action: 'createJob', data: {requests: [item]}});
  const form = new FormData();
  form.append('file', new Blob([line + '\\n']), 'x.jsonl');
  const attempts = [
    [target + '/api/job/batch', {method: 'POST', mode: 'no-cors', body,
                                 headers: {'Content-Type': 'text/plain'}}],
    [target + '/api/job/batch', {method: 'POST', mode: 'no-cors', body: form}],
    [target + '/api/job/batch', {method: 'POST', mode: 'no-cors',
                                 body: new URLSearchParams({requests: body})}],
    [target + '/job-operations', {method: 'POST', mode: 'no-cors',
                                  body: operation,
                                  headers: {'Content-Type': 'text/plain'}}],
    [target + '/api/job/cleanup?max_age_hours=0', {method: 'POST', mode: 'no-cors'}],
  ];
  const sent = [];
  for (const [url, init] of attempts) {
    try { await fetch(url, init); sent.push('sent'); } catch (error) { sent.push(String(error)); }
  }
  return sent;
}"""
FORM_POST = """(target) => {
  const form = document.createElement('form');
  form.method = 'POST';
  form.enctype = 'multipart/form-data';
  form.action = target + '/api/job/batch';
  const field = document.createElement('input');
  field.type = 'file';
  field.name = 'file';
  form.appendChild(field);
  document.body.appendChild(form);
  form.submit();
}"""


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>some other site</title><p>Nothing to see.</p>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def other_site() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_a_page_of_another_site_cannot_create_or_delete_jobs_through_the_browser(
    page: Any, web_service: ServiceProcess, other_site: str
) -> None:
    target = web_service.base_url
    with web_service.client() as client:
        kept = create_job(client, inline_body(1, prefix="kept"))
        assert wait_status(client, kept, TERMINAL)["status"] == "completed"
        before = [job["job_id"] for job in client.get("/api/jobs").json()["jobs"]]

        answers: list[tuple[str, int]] = []
        page.on(
            "response",
            lambda response: (
                answers.append((response.url, response.status))
                if response.url.startswith(target)
                else None
            ),
        )
        page.goto(other_site)
        sent = page.evaluate(ATTACK, target)
        assert sent == ["sent"] * 5, sent  # the browser did send them: no-cors, no preflight
        with page.expect_navigation():
            page.evaluate(FORM_POST, target)

        # Every one reached the service and was refused there, by its status code.
        statuses = sorted(status for _, status in answers)
        assert len(statuses) == 6 and all(s in (403, 415) for s in statuses), answers
        after = [job["job_id"] for job in client.get("/api/jobs").json()["jobs"]]
        assert after == before, "the other site created or deleted jobs"
        assert kept in after
