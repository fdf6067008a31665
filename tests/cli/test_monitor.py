"""The views of `gembatch poll` and `status`, rendered from real job records."""

from __future__ import annotations

import io
import json
import re
from datetime import datetime

import pytest
from rich.console import Console, RenderableType
from rich.text import Text

from gembatch.cli.monitor import (
    CycleInfo,
    PlainReporter,
    job_rows,
    monitor_view,
    progress_text,
    state_label,
    status_json,
    status_table,
    summary_lines,
)
from gembatch.jobs import (
    ErrorClass,
    ErrorInfo,
    Job,
    JobStatus,
    RemoteState,
    RequestCounts,
    Step,
    Task,
    TaskInput,
    TaskState,
    now_iso,
)

NOW = 1_752_336_000.0  # 2025-07-12T16:00:00Z
ANSI = re.compile(r"\x1b\[")

LEGACY_RECORD = {
    "id": "legacy-abc",
    "input_file": "a.jsonl",
    "count": 5,
    "uploaded_file_name": "files/x",
    "batch": {
        "name": "batches/b",
        "state": "JOB_STATE_SUCCEEDED",
        "create_time": "2025-07-12T16:01:38+00:00",
        "end_time": "2025-07-12T16:02:35+00:00",
    },
}


def make_job(
    job_id: str,
    status: JobStatus,
    *,
    step: Step | None = None,
    total: int = 30,
    succeeded: int = 0,
    failed: int = 0,
    created: float = NOW - 600,
    ended: float | None = None,
    duration: int | None = None,
    final_state: str | None = None,
    remote: RemoteState | None = None,
    task_state: TaskState = TaskState.SUBMITTED,
    not_before: float | None = None,
    error: ErrorInfo | None = None,
    result_file: str | None = None,
    input_file: str | None = None,
) -> Job:
    task = Task(
        index=0,
        attempt=1,
        state=task_state,
        input=TaskInput(path=f"{job_id}.jsonl", count=total),
        batch_name=f"batches/{job_id}",
        remote_state=remote,
        requests=RequestCounts(total, succeeded, failed),
        not_before=not_before,
    )
    return Job(
        id=job_id,
        input_file=input_file or f"{job_id}.jsonl",
        status=status,
        step=step,
        count=total,
        tasks=[task],
        error=error,
        result_file=result_file,
        created_at=now_iso(created),
        completed_at=now_iso(ended) if ended is not None else None,
        final_state=final_state,
        duration_seconds=duration,
    )


def succeeded(job_id: str = "done", **kwargs) -> Job:
    options = {"succeeded": 30, "ended": NOW - 60, "duration": 3723, "task_state": TaskState.DONE}
    options.update(kwargs)
    return make_job(job_id, JobStatus.COMPLETED, final_state="JOB_STATE_SUCCEEDED", **options)


def failed(job_id: str = "broken", **kwargs) -> Job:
    error = ErrorInfo("BATCH_FAILED", "the remote batch failed", ErrorClass.BATCH_FAILED)
    options = {"ended": NOW - 30, "duration": 42, "error": error, "task_state": TaskState.FAILED}
    options["final_state"] = "JOB_STATE_FAILED"
    options.update(kwargs)
    return make_job(job_id, JobStatus.FAILED, **options)


def expired(job_id: str = "late") -> Job:
    return make_job(
        job_id,
        JobStatus.FAILED,
        ended=NOW - 20,
        duration=172_800,
        final_state="JOB_STATE_EXPIRED",
        remote=RemoteState.EXPIRED,
        task_state=TaskState.FAILED,
    )


def cancelled(job_id: str = "stopped") -> Job:
    return make_job(
        job_id,
        JobStatus.CANCELLED,
        ended=NOW - 10,
        duration=5,
        final_state="JOB_STATE_CANCELLED",
        task_state=TaskState.CANCELLED,
    )


def running(job_id: str = "busy", step: Step = Step.PROCESSING, **kwargs) -> Job:
    options = {"succeeded": 10, "failed": 2, "created": NOW - 3723}
    options.update(kwargs)
    return make_job(job_id, JobStatus.RUNNING, step=step, **options)


def queued(job_id: str = "waiting", retry_in: float | None = 42) -> Job:
    return make_job(
        job_id,
        JobStatus.PENDING,
        task_state=TaskState.NEW,
        not_before=None if retry_in is None else NOW + retry_in,
    )


def cancelling(job_id: str = "stopping") -> Job:
    return make_job(job_id, JobStatus.CANCELLING, step=Step.PROCESSING)


def console(width: int = 140, height: int = 60) -> Console:
    return Console(
        record=True, width=width, height=height, force_terminal=True, color_system="truecolor"
    )


def render(renderable: RenderableType, width: int = 140) -> str:
    out = console(width)
    out.print(renderable)
    return out.export_text()


def colours_of(renderable: RenderableType, needle: str) -> set[str]:
    """The colour names of every rendered segment that contains `needle`."""
    return {
        segment.style.color.name
        for segment in console().render(renderable)
        if needle in segment.text and segment.style and segment.style.color
    }


def local(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def info(**kwargs) -> CycleInfo:
    options = {"last_update": NOW, "next_poll_at": NOW + 12}
    options.update(kwargs)
    return CycleInfo(**options)


# --------------------------------------------------------------------------------------
# State labels and progress
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("job", "text", "style"),
    [
        (succeeded(), "✓ Success", "green"),
        (failed(), "✗ Failed", "red"),
        (cancelled(), "⊘ Cancelled", "orange1"),
        (expired(), "⌛ Expired", "magenta"),
        (running(step=Step.PROCESSING), "⏳ processing", "yellow"),
        (running(step=Step.DOWNLOADING), "⬇ downloading", "yellow"),
        (running(step=Step.UPLOADING), "⬆ uploading", "yellow"),
        (queued(retry_in=41.2), "⏸ Queued, retry in 42s", "blue"),
        (queued(retry_in=None), "⏸ Queued", "blue"),
        (cancelling(), "⊘ Cancelling", "orange1"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_every_state_has_its_label_and_colour(job: Job, text: str, style: str) -> None:
    label = state_label(job, NOW)
    assert label.plain == text
    assert str(label.style) == style


def test_a_failed_job_whose_batch_expired_is_shown_as_expired() -> None:
    by_task = failed(remote=RemoteState.EXPIRED, final_state=None)
    assert state_label(by_task, NOW).plain == "⌛ Expired"
    assert state_label(failed(), NOW).plain == "✗ Failed"


def test_a_retry_that_is_due_shows_no_countdown() -> None:
    assert state_label(queued(retry_in=-5), NOW).plain == "⏸ Queued"


def test_progress_is_done_of_total_with_failures() -> None:
    assert progress_text(running(succeeded=10, failed=2)) == "12/30 (2 failed)"
    assert progress_text(running(succeeded=12, failed=0)) == "12/30"
    assert progress_text(make_job("big", JobStatus.RUNNING, total=12_000, succeeded=1_500)) == (
        "1,500/12,000"
    )
    assert progress_text(make_job("empty", JobStatus.PENDING, total=0)) == ""


# --------------------------------------------------------------------------------------
# The live view
# --------------------------------------------------------------------------------------


def test_rows_show_file_count_state_progress_times_and_duration() -> None:
    job = succeeded(total=12_000, succeeded=11_990, failed=10)
    [row] = job_rows([job], NOW)
    cells = [cell.plain if isinstance(cell, Text) else str(cell) for cell in row]
    assert cells == [
        "done.jsonl",
        "12,000",
        "✓ Success",
        "12,000/12,000 (10 failed)",
        local(NOW - 600),
        local(NOW - 60),
        "1h 2m 3s",
    ]


def test_a_running_job_shows_the_time_elapsed_since_it_was_created() -> None:
    [row] = job_rows([running(created=NOW - 3723)], NOW)
    assert str(row[-1]) == "1h 2m 3s"
    assert str(row[5]) == ""  # not ended


def test_monitor_shows_every_job_in_ledger_order() -> None:
    jobs = [succeeded(), failed(), cancelled(), expired(), running(), queued(), cancelling()]
    text = render(monitor_view(jobs, info(), NOW))
    assert "Gemini Batch Job Monitor" in text
    for header in ("Input File", "Count", "State", "Progress", "Created", "Ended", "Duration"):
        assert header in text
    labels = ["✓ Success", "✗ Failed", "⊘ Cancelled", "⌛ Expired", "⏳ processing"]
    labels += ["⏸ Queued, retry in 42s", "⊘ Cancelling"]
    positions = [text.index(label) for label in labels]
    assert positions == sorted(positions)
    assert "12/30 (2 failed)" in text
    assert "1h 2m 3s" in text
    assert "48h 0m 0s" in text
    assert local(NOW - 600) in text


def test_monitor_colours_success_green_failure_red_cancel_orange() -> None:
    view = monitor_view([succeeded(), failed(), cancelled(), expired()], info(), NOW)
    assert colours_of(view, "Success") == {"green"}
    assert colours_of(view, "Failed") == {"red"}
    assert colours_of(view, "Cancelled") == {"orange1"}
    assert colours_of(view, "Expired") == {"magenta"}
    out = console()
    out.print(view)
    html = out.export_html(inline_styles=True)
    assert "color: #008000" in html  # green
    assert "color: #800000" in html  # red


def test_footer_counts_every_terminal_job_as_completed_and_counts_down() -> None:
    jobs = [succeeded(), failed(), expired(), cancelled(), running(), queued()]
    text = render(monitor_view(jobs, info(newly_completed=2, next_poll_at=NOW + 11.2), NOW))
    assert (
        "Total jobs: 6 | Completed: 4 | Remaining: 2 | Newly completed: 2 | Errors: 0 | "
        "Next poll: 12s"
    ) in text
    assert "All jobs completed" not in text


def test_footer_says_checking_while_a_cycle_runs() -> None:
    text = render(monitor_view([running()], info(checking=True, next_poll_at=None), NOW))
    assert "Checking status..." in text
    assert "Next poll" not in text


def test_poll_errors_are_shown_in_red_and_at_most_five() -> None:
    errors = [(f"f{n}.jsonl", f"429 RESOURCE_EXHAUSTED\nquota {n}") for n in range(7)]
    view = monitor_view([running()], info(errors=errors), NOW)
    text = render(view)
    assert "Errors: 7" in text
    assert "✗ f0.jsonl: 429 RESOURCE_EXHAUSTED quota 0" in text
    assert "✗ f4.jsonl: 429 RESOURCE_EXHAUSTED quota 4" in text
    assert "f5.jsonl" not in text
    assert "... and 2 more" in text
    assert colours_of(view, "f0.jsonl: 429") == {"red"}


def test_all_jobs_completed_when_nothing_remains() -> None:
    text = render(monitor_view([succeeded(), failed()], info(next_poll_at=None), NOW))
    assert "Total jobs: 2 | Completed: 2 | Remaining: 0" in text
    assert "🎉 All jobs completed!" in text


def test_interrupted_view_says_how_to_resume() -> None:
    text = render(monitor_view([running()], info(interrupted=True), NOW))
    assert "gembatch poll` again to resume" in text
    assert "Next poll" not in text


def test_many_jobs_show_unfinished_first_then_the_latest_finished() -> None:
    finished = [succeeded(f"old{n:02d}", ended=NOW - 1000 + n) for n in range(50)]
    jobs = [*finished[:25], running("busy"), *finished[25:], queued("waiting")]
    text = render(monitor_view(jobs, info(), NOW, max_rows=10))
    shown = [f"old{n:02d}.jsonl" for n in range(42, 50)]
    assert all(name in text for name in ["busy.jsonl", "waiting.jsonl", *shown])
    assert "old41.jsonl" not in text
    assert "old00.jsonl" not in text
    assert text.index("busy.jsonl") < text.index("waiting.jsonl") < text.index("old42.jsonl")
    assert "... and 42 more finished jobs" in text
    assert "Total jobs: 52 | Completed: 50 | Remaining: 2" in text


def test_a_short_screen_loses_table_rows_never_the_footer() -> None:
    jobs = [running(f"r{n:02d}") for n in range(30)] + [succeeded(f"s{n}") for n in range(5)]
    short = console(height=20)
    short.print(monitor_view(jobs, info(errors=[("r00.jsonl", "boom")]), NOW))
    lines = short.export_text().splitlines()
    assert len(lines) <= 20
    text = "\n".join(lines)
    assert "r00.jsonl" in text and "r29.jsonl" not in text
    assert "... and 22 more jobs (17 unfinished, 5 finished)" in text
    assert "Total jobs: 35 | Completed: 5 | Remaining: 30" in text
    assert "✗ r00.jsonl: boom" in text


def test_rows_stay_one_line_on_a_narrow_screen() -> None:
    long_name = "data/" + "very-long-directory-name/" * 4 + "input.jsonl"
    jobs = [running(input_file=long_name), succeeded()]
    narrow = console(width=80)
    narrow.print(monitor_view(jobs, info(), NOW))
    lines = narrow.export_text().splitlines()
    assert all(len(line) <= 80 for line in lines)
    [busy] = [line for line in lines if "processing" in line]
    assert "12/30 (2 failed)" in busy
    assert "data/very-long" in busy and "…" in busy
    assert any("✓ Success" in line and "done.jsonl" in line for line in lines)


def test_a_record_written_by_the_original_tool_renders() -> None:
    job = Job.from_record(LEGACY_RECORD)
    [row] = job_rows([job], NOW)
    cells = [cell.plain if isinstance(cell, Text) else str(cell) for cell in row]
    created = datetime.fromisoformat("2025-07-12T16:01:38+00:00").timestamp()
    assert cells == ["a.jsonl", "5", "✓ Success", "", local(created), local(created + 57), "57s"]
    text = render(monitor_view([job], info(), NOW))
    assert "✓ Success" in text and "57s" in text
    assert "🎉 All jobs completed!" in text


# --------------------------------------------------------------------------------------
# `gembatch status`
# --------------------------------------------------------------------------------------


def test_status_table_adds_id_priority_and_errors() -> None:
    job = failed("job-1")
    job.priority = 7
    table = status_table([job, succeeded("job-2")], NOW)
    text = render(table, width=200)
    for header in ("ID", "Input File", "Priority", "State", "Error"):
        assert header in text
    assert "job-1" in text and "job-2" in text
    assert re.search(r"✗ Failed\s+7\b", text)
    assert "BATCH_FAILED: the remote batch failed" in text
    assert "Total jobs" not in text
    # Narrower, the least useful columns go and the error wraps: nothing of it is cut.
    narrow = render(table, width=110)
    assert "Priority" not in narrow
    error_words = ["BATCH_FAILED:", "the", "remote", "batch", "failed"]
    assert all(word in narrow for word in error_words)
    assert all(len(line) <= 110 for line in narrow.splitlines())


def test_status_json_round_trips_through_json() -> None:
    jobs = [
        succeeded(result_file="results/done.jsonl"),
        failed(),
        running(),
        queued(),
        Job.from_record(LEGACY_RECORD),
    ]
    data = json.loads(json.dumps(status_json(jobs)))
    assert [entry["id"] for entry in data] == ["done", "broken", "busy", "waiting", "legacy-abc"]
    done, broken, busy, _, legacy = data
    assert done["status"] == "completed" and done["result_file"] == "results/done.jsonl"
    assert done["duration_seconds"] == 3723
    assert broken["error"]["class"] == "BATCH_FAILED"
    assert busy["step"] == "processing"
    assert busy["requests"] == {"total": 30, "succeeded": 10, "failed": 2, "pending": 18}
    assert busy["duration_seconds"] is None
    assert busy["tasks"][0]["batch_name"] == "batches/busy"
    assert busy["tasks"][0]["state"] == "submitted"
    assert legacy["tasks"][0]["remote_state"] == "JOB_STATE_SUCCEEDED"
    assert legacy["duration_seconds"] == 57
    expected = {"id", "input_file", "status", "step", "progress", "requests", "priority"}
    expected |= {"attempts", "tasks", "result_file", "error", "created_at", "completed_at"}
    expected |= {"final_state", "duration_seconds"}
    assert expected <= set(done)


# --------------------------------------------------------------------------------------
# Plain output
# --------------------------------------------------------------------------------------


def test_plain_reporter_prints_every_job_then_only_changes() -> None:
    out = io.StringIO()
    reporter = PlainReporter(out, clock=lambda: NOW)
    busy = running("busy", succeeded=10, failed=2)
    jobs = [succeeded(result_file="results/done.jsonl"), busy, queued()]
    reporter.update(jobs, info())
    first = out.getvalue().splitlines()
    assert len(first) == 3
    assert first[0].startswith(local(NOW))
    assert "done.jsonl: completed 30/30 in 1h 2m 3s -> results/done.jsonl" in first[0]
    assert "busy.jsonl: running (processing) 12/30 (2 failed)" in first[1]
    assert "waiting.jsonl: pending (retry in 42s)" in first[2]

    reporter.update(jobs, info())
    assert out.getvalue().splitlines() == first  # nothing changed, nothing printed

    busy.tasks[0].requests = RequestCounts(30, 20, 2)
    reporter.update(jobs, info())
    new = out.getvalue().splitlines()[len(first) :]
    assert len(new) == 1
    assert "busy.jsonl: running (processing) 22/30 (2 failed)" in new[0]
    assert not ANSI.search(out.getvalue())


def test_plain_reporter_prints_each_poll_error() -> None:
    out = io.StringIO()
    reporter = PlainReporter(out, clock=lambda: NOW)
    reporter.update([running()], info(errors=[("busy.jsonl", "503 UNAVAILABLE\nretrying")]))
    lines = out.getvalue().splitlines()
    assert lines[-1].endswith("error: busy.jsonl: 503 UNAVAILABLE retrying")
    assert not ANSI.search(out.getvalue())


def test_plain_reporter_tells_jobs_apart_that_share_an_input_file() -> None:
    out = io.StringIO()
    PlainReporter(out, clock=lambda: NOW).update(
        [failed("first", input_file="a.jsonl"), running("second", input_file="a.jsonl")], info()
    )
    text = out.getvalue()
    assert "a.jsonl [first]: failed" in text
    assert "a.jsonl [second]: running" in text


def test_plain_summary_gives_totals_results_and_failures() -> None:
    out = io.StringIO()
    jobs = [succeeded(result_file="results/done.jsonl"), failed(), expired(), cancelled()]
    PlainReporter(out).summary(jobs)
    lines = out.getvalue().splitlines()
    assert lines[0] == "4 jobs: 1 completed, 1 failed, 1 expired, 1 cancelled, 0 remaining"
    assert "results: done.jsonl -> results/done.jsonl" in lines
    assert "failed: broken.jsonl: BATCH_FAILED: the remote batch failed" in lines
    assert "expired: late.jsonl" in lines
    assert lines == summary_lines(jobs)
    assert not ANSI.search(out.getvalue())


def test_an_error_recovered_from_is_not_shown_as_the_jobs_error() -> None:
    past = ErrorInfo("429 RESOURCE_EXHAUSTED", "slow down", ErrorClass.RATE_LIMITED)
    done = succeeded(error=past)  # a record written before finalize cleared it
    busy = running(error=past)  # the batch was created after the 429: no task has an error
    stuck = running("stuck", error=past)
    stuck.tasks[0].error = past  # still dealing with it
    jobs = [done, busy, stuck]
    plain = io.StringIO()
    PlainReporter(plain, clock=lambda: NOW).update(jobs, CycleInfo(NOW, None))
    lines = plain.getvalue().splitlines()
    assert [("RESOURCE_EXHAUSTED" in line) for line in lines] == [False, False, True]
    assert [entry["error"] is not None for entry in status_json(jobs)] == [False, False, True]
    console = Console(record=True, width=200)
    console.print(status_table([done, busy], NOW))
    assert "Error" not in console.export_text()
