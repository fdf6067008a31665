"""What `poll` and `status` show of a create whose outcome is unknown and of remote
cleanup still to retry, rendered from records the reducers made."""

from __future__ import annotations

from gembatch.cli.monitor import PlainReporter, monitor_view, state_label, summary_lines
from gembatch.engine import reducers
from gembatch.jobs import ErrorClass, ErrorInfo, Job, RequestCounts
from tests.cli.test_monitor import NOW, info, render
from tests.engine.test_reducers import OWNER, batch, make_job, submitted


def _unknown() -> Job:
    job = reducers.claim_upload(make_job(), 0, OWNER, NOW)
    job = reducers.claim_create(reducers.uploaded(job, 0, "files/f1", NOW), 0, OWNER, NOW)
    error = ErrorInfo("ReadTimeout", "timed out", ErrorClass.TIMEOUT)
    return reducers.create_unknown(job, 0, NOW, look_at=NOW + 5, since=NOW, why="t", error=error)


def _completed_with_leftovers() -> Job:
    job = submitted(make_job())
    job = reducers.polled(
        job, 0, batch("JOB_STATE_SUCCEEDED", dest={"file_name": "f/o"}), None, NOW
    )
    job = reducers.claim_download(job, 0, OWNER, NOW)
    job = reducers.downloaded(job, 0, "/p/part", RequestCounts(10, 10, 0), NOW)
    results = {"input_file": True, "batch": False, "output_file": False}
    job = reducers.cleaned(job, 0, results, ["503", "503"], NOW, 30.0)
    return reducers.finalize(job, NOW, results_complete=True)


def test_an_unknown_create_and_pending_cleanup_are_shown_and_keep_poll_going() -> None:
    unknown, left = _unknown(), _completed_with_leftovers()
    assert state_label(unknown, NOW).plain == "? create outcome unknown"
    assert state_label(left, NOW).plain == "✓ Success, cleanup pending: 2"

    finished_only = render(monitor_view([left], info(next_poll_at=NOW + 30), NOW))
    assert "Cleanup pending: 2" in finished_only
    assert "Next poll:" in finished_only  # poll goes on while something is left remotely
    assert "All jobs completed" not in finished_only
    assert "2 remote item(s) left to delete" in finished_only
    assert any("remote cleanup pending: 2 item(s)" in line for line in summary_lines([left]))

    lines: list[str] = []

    class Out:
        def write(self, text: str) -> None:
            lines.append(text)

        def flush(self) -> None:
            pass

    PlainReporter(Out(), clock=lambda: NOW).update([unknown, left], info())  # type: ignore[arg-type]
    text = "".join(lines)
    assert "running (create outcome unknown)" in text
    assert "completed (cleanup pending: 2)" in text
