"""Job decisions without servers: the reducers and the transition tables they enforce."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gembatch.engine import reducers
from gembatch.jobs import (
    JOB_TRANSITIONS,
    TASK_TRANSITIONS,
    ErrorClass,
    ErrorInfo,
    InvalidTransition,
    Job,
    JobEvent,
    JobStatus,
    RemoteState,
    RequestCounts,
    RetryConfig,
    Step,
    TaskEvent,
    TaskInput,
    TaskState,
    format_duration,
    job_transition,
    legal_status_change,
    task_transition,
)
from gembatch.retry import Decision

OWNER = {"pid": 1, "host": "h", "token": "t"}
NOW = 1_700_000_000.0


def make_job(tasks: int = 1, retry: RetryConfig | None = None, count: int = 10) -> Job:
    per = count // tasks
    plans = [(i * 100, (i + 1) * 100, per) for i in range(tasks)]
    return reducers.new_job(
        job_id="jtest",
        input_file="batch/in.jsonl",
        input_path="/data/batch/in.jsonl",
        sha256="0" * 64,
        size_bytes=tasks * 100,
        count=per * tasks,
        plans=plans,
        model="models/gemini-2.5-flash",
        priority=0,
        retry_config=retry or RetryConfig(),
        max_parallel_tasks=None,
        result_file="/data/batch/results/in.jsonl",
        now=NOW,
    )


def batch(state: str, name: str = "batches/b1", **extra: Any) -> dict[str, Any]:
    return {"name": name, "state": state, "display_name": "d", **extra}


def submitted(job: Job, index: int = 0, name: str = "batches/b1", now: float = NOW) -> Job:
    job = reducers.claim_upload(job, index, OWNER, now)
    job = reducers.uploaded(job, index, "files/f1", now)
    job = reducers.claim_create(job, index, OWNER, now)
    return reducers.created(job, index, batch("JOB_STATE_PENDING", name), now)


def roundtrip(job: Job) -> Job:
    """What the ledger does between two reducers: JSON out, JSON in."""
    return Job.from_record(json.loads(json.dumps(job.to_record())))


def test_a_new_job_is_pending_with_one_new_task_per_plan() -> None:
    job = make_job(tasks=3, count=30)
    assert job.status is JobStatus.PENDING
    assert [t.state for t in job.tasks] == [TaskState.NEW] * 3
    assert len({t.display_name for t in job.tasks}) == 3
    assert job.tasks[1].display_name == "gembatch-in-jtest-t1a1"
    assert job.requests == RequestCounts(total=30)


def test_upload_and_create_lead_to_submitted_and_a_running_job() -> None:
    job = reducers.claim_upload(make_job(), 0, OWNER, NOW)
    assert job.status is JobStatus.RUNNING and job.step is Step.UPLOADING
    assert job.tasks[0].owner == OWNER
    job = roundtrip(reducers.uploaded(job, 0, "files/f1", NOW))
    assert job.tasks[0].state is TaskState.UPLOADED and job.tasks[0].owner is None
    job = roundtrip(reducers.claim_create(job, 0, OWNER, NOW))
    assert job.tasks[0].state is TaskState.CREATING
    assert job.tasks[0].owner["intent_at"]  # the intent is on record before the create
    job = roundtrip(reducers.created(job, 0, batch("JOB_STATE_PENDING"), NOW))
    assert job.tasks[0].state is TaskState.SUBMITTED
    assert job.tasks[0].batch_name == "batches/b1"
    assert job.step is Step.QUEUED
    record = job.to_record()
    assert record["batch"]["name"] == "batches/b1"  # seed-002 fields mirror the task
    assert record["uploaded_file_name"] == "files/f1"


def test_running_is_never_finished() -> None:
    job = submitted(make_job())
    job = reducers.polled(job, 0, batch("JOB_STATE_RUNNING"), RequestCounts(10, 4, 1), NOW)
    assert job.tasks[0].state is TaskState.SUBMITTED
    assert job.status is JobStatus.RUNNING and job.step is Step.PROCESSING
    assert job.requests == RequestCounts(10, 4, 1)
    assert 0.2 < job.progress < 0.9
    # an unknown remote state is treated as still running, never as done
    job = reducers.polled(job, 0, batch("BATCH_STATE_SOMETHING_NEW"), None, NOW)
    assert job.tasks[0].state is TaskState.SUBMITTED


def test_succeeded_leads_to_a_download_then_cleanup_then_finalize() -> None:
    job = submitted(make_job())
    job = reducers.polled(
        job, 0, batch("JOB_STATE_SUCCEEDED", dest={"file_name": "files/batch-b1"}), None, NOW
    )
    task = job.tasks[0]
    assert task.state is TaskState.SUCCEEDED and task.output_file == "files/batch-b1"
    assert job.step is Step.DOWNLOADING and not reducers.needs_finalize(job)
    job = reducers.claim_download(job, 0, OWNER, NOW)
    job = reducers.downloaded(job, 0, "/p/part.jsonl", RequestCounts(10, 9, 1), NOW)
    assert job.step is Step.CLEANING_UP
    job = reducers.cleaned(job, 0, {"input_file": True, "batch": True}, [], NOW)
    assert job.tasks[0].state is TaskState.DONE and reducers.needs_finalize(job)
    job = reducers.finalize(job, NOW + 3723, results_complete=True)
    assert job.status is JobStatus.COMPLETED
    assert job.final_state == "JOB_STATE_SUCCEEDED"
    assert job.completed_at and job.duration_seconds == 3723
    assert format_duration(job.duration_seconds) == "1h 2m 3s"
    assert job.progress == 1.0
    assert "9 of 10 requests succeeded, 1 failed" in job.message


@pytest.mark.parametrize(
    "remote, status, final",
    [
        ("JOB_STATE_FAILED", JobStatus.FAILED, "JOB_STATE_FAILED"),
        ("JOB_STATE_EXPIRED", JobStatus.FAILED, "JOB_STATE_EXPIRED"),
        ("JOB_STATE_CANCELLED", JobStatus.CANCELLED, "JOB_STATE_CANCELLED"),
    ],
)
def test_remote_endings_end_the_job_with_final_state_and_duration(
    remote: str, status: JobStatus, final: str
) -> None:
    job = submitted(make_job())
    job = reducers.polled(job, 0, batch(remote), None, NOW)
    assert job.tasks[0].state in (TaskState.FAILED, TaskState.CANCELLED)
    job = reducers.finalize(job, NOW + 10, results_complete=False)
    assert job.status is status
    assert job.final_state == final
    assert job.completed_at and job.duration_seconds == 10


def test_expired_batch_is_retried_with_a_new_task_when_configured() -> None:
    config = RetryConfig(retry_on_errors=(ErrorClass.EXPIRED,), max_attempts=2)
    job = submitted(make_job(retry=config))
    job = reducers.polled(job, 0, batch("JOB_STATE_EXPIRED"), None, NOW)
    assert [t.state for t in job.tasks] == [TaskState.FAILED, TaskState.NEW]
    new = job.tasks[1]
    assert new.attempt == 2 and new.input == job.tasks[0].input
    assert new.display_name != job.tasks[0].display_name
    assert not reducers.needs_finalize(job)
    assert new.not_before is not None and new.not_before > NOW  # after a backoff
    # the second expiry uses the last attempt: no third task
    job = submitted(job, 1, "batches/b2", now=NOW + 3600)
    job = reducers.polled(job, 1, batch("JOB_STATE_EXPIRED", "batches/b2"), None, NOW)
    assert len(job.tasks) == 2 and reducers.needs_finalize(job)
    assert reducers.finalize(job, NOW, results_complete=False).final_state == "JOB_STATE_EXPIRED"


def test_a_failed_create_starts_over_with_a_new_display_name_or_fails() -> None:
    job = reducers.claim_create(
        reducers.uploaded(reducers.claim_upload(make_job(), 0, OWNER, NOW), 0, "files/f", NOW),
        0,
        OWNER,
        NOW,
    )
    error = ErrorInfo("429 RESOURCE_EXHAUSTED", "quota", ErrorClass.RATE_LIMITED)
    retried = reducers.step_failed(
        job, 0, TaskEvent.CREATE_FAILED, error, Decision(True, 5.0, "r"), NOW, input_deleted=True
    )
    task = retried.tasks[0]
    assert task.state is TaskState.NEW and task.attempt == 2
    assert task.display_name.endswith("t0a2")
    assert task.uploaded_file_name is None and task.not_before == NOW + 5
    assert retried.status is JobStatus.PENDING  # waiting, holding no slot
    assert "retry in 5 s" in retried.message
    with pytest.raises(InvalidTransition):
        reducers.claim_upload(retried, 0, OWNER, NOW)  # not due yet
    failed = reducers.step_failed(
        job, 0, TaskEvent.CREATE_FAILED, error, Decision(False, 0, "no"), NOW
    )
    assert failed.tasks[0].state is TaskState.FAILED
    assert failed.error is not None and failed.errors[-1]["class"] == "RATE_LIMITED"


def test_a_failed_download_keeps_the_task_succeeded_for_another_try() -> None:
    job = submitted(make_job())
    job = reducers.polled(job, 0, batch("JOB_STATE_SUCCEEDED"), None, NOW)
    job = reducers.claim_download(job, 0, OWNER, NOW)
    error = ErrorInfo("DOWNLOAD_INCOMPLETE", "cut", ErrorClass.DOWNLOAD)
    again = reducers.step_failed(
        job, 0, TaskEvent.DOWNLOAD_FAILED, error, Decision(True, 5, "r"), NOW
    )
    assert again.tasks[0].state is TaskState.SUCCEEDED and again.tasks[0].step_failures == 1
    gave_up = reducers.step_failed(
        job, 0, TaskEvent.DOWNLOAD_FAILED, error, Decision(False, 0, "no"), NOW
    )
    assert gave_up.tasks[0].state is TaskState.FAILED


def test_retry_of_a_failed_download_downloads_the_same_batch_again() -> None:
    job = submitted(make_job())
    done = batch("JOB_STATE_SUCCEEDED", dest={"file_name": "files/batch-b1"})
    job = reducers.polled(job, 0, done, RequestCounts(10, 10, 0), NOW)
    job = reducers.claim_download(job, 0, OWNER, NOW)
    error = ErrorInfo("ENOSPC", "disk full", ErrorClass.LOCAL_IO)
    job = reducers.step_failed(
        job, 0, TaskEvent.DOWNLOAD_FAILED, error, Decision(False, 0, "no"), NOW
    )
    job = roundtrip(reducers.finalize(job, NOW, results_complete=False))
    assert job.status is JobStatus.FAILED and reducers.download_failed(job.tasks[0])

    job = roundtrip(reducers.retry(job, NOW + 1))

    old, new = job.tasks
    assert new.state is TaskState.SUCCEEDED  # no upload, no create: the same batch
    assert (new.batch_name, new.output_file) == ("batches/b1", "files/batch-b1")
    assert new.uploaded_file_name == "files/f1" and old.extra["replaced_by"] == new.index
    assert job.status is JobStatus.PENDING and legal_status_change(JobStatus.FAILED, job.status)
    assert job.requests == RequestCounts(10, 10, 0)  # the batch's counts, moved: once
    job = reducers.claim_download(job, new.index, OWNER, NOW + 2)
    assert job.status is JobStatus.RUNNING
    job = reducers.downloaded(job, new.index, "/p/part", RequestCounts(10, 10, 0), NOW + 3)
    job = reducers.cleaned(job, new.index, {"input_file": True, "batch": True}, [], NOW + 3)
    job = reducers.finalize(job, NOW + 4, results_complete=True)
    assert job.status is JobStatus.COMPLETED and job.requests == RequestCounts(10, 10, 0)
    assert job.error is None and len(job.errors) == 1  # the past error stays in the history


def test_cancel_pending_is_immediate_and_running_waits_for_gemini() -> None:
    pending = reducers.cancel(make_job(), NOW)
    assert pending.status is JobStatus.CANCELLED
    assert pending.tasks[0].state is TaskState.CANCELLED
    running = reducers.cancel(submitted(make_job()), NOW)
    assert running.status is JobStatus.CANCELLING
    assert running.tasks[0].state is TaskState.SUBMITTED
    with pytest.raises(InvalidTransition):
        reducers.claim_upload(reducers.cancel(make_job(tasks=2), NOW), 1, OWNER, NOW)
    running = reducers.polled(running, 0, batch("JOB_STATE_CANCELLED"), None, NOW)
    done = reducers.finalize(running, NOW, results_complete=False)
    assert done.status is JobStatus.CANCELLED and done.final_state == "JOB_STATE_CANCELLED"


def test_success_that_raced_a_cancel_wins() -> None:
    job = reducers.cancel(submitted(make_job()), NOW)
    job = reducers.polled(job, 0, batch("JOB_STATE_SUCCEEDED"), None, NOW)
    job = reducers.downloaded(
        reducers.claim_download(job, 0, OWNER, NOW), 0, "/p", RequestCounts(10, 10, 0), NOW
    )
    job = reducers.cleaned(job, 0, {}, [], NOW)
    assert reducers.finalize(job, NOW, results_complete=True).status is JobStatus.COMPLETED


def test_retry_of_failed_requests_counts_each_key_once() -> None:
    job = submitted(make_job())
    job = reducers.polled(job, 0, batch("JOB_STATE_SUCCEEDED"), None, NOW)
    job = reducers.downloaded(
        reducers.claim_download(job, 0, OWNER, NOW), 0, "/p", RequestCounts(10, 7, 3), NOW
    )
    job = reducers.finalize(reducers.cleaned(job, 0, {}, [], NOW), NOW, results_complete=True)
    assert job.requests == RequestCounts(10, 7, 3)
    subset = TaskInput(path="/w/retry1.jsonl", count=3, keys_from=-1)
    job = reducers.retry(job, NOW, subset)
    assert job.status is JobStatus.PENDING and job.completed_at is None
    assert job.requests == RequestCounts(10, 7, 0)  # 3 pending again
    job = submitted(job, 1, "batches/b2")
    job = reducers.polled(job, 1, batch("JOB_STATE_SUCCEEDED", "batches/b2"), None, NOW)
    job = reducers.downloaded(
        reducers.claim_download(job, 1, OWNER, NOW), 1, "/p2", RequestCounts(3, 2, 1), NOW
    )
    job = reducers.finalize(reducers.cleaned(job, 1, {}, [], NOW), NOW, results_complete=True)
    assert job.requests == RequestCounts(10, 9, 1)
    assert job.status is JobStatus.COMPLETED


def test_retry_refuses_a_job_with_nothing_to_retry() -> None:
    with pytest.raises(InvalidTransition):
        reducers.retry(submitted(make_job()), NOW)  # running
    job = submitted(make_job())
    job = reducers.polled(job, 0, batch("JOB_STATE_SUCCEEDED"), None, NOW)
    job = reducers.downloaded(
        reducers.claim_download(job, 0, OWNER, NOW), 0, "/p", RequestCounts(10, 10, 0), NOW
    )
    job = reducers.finalize(reducers.cleaned(job, 0, {}, [], NOW), NOW, results_complete=True)
    with pytest.raises(InvalidTransition):
        reducers.retry(job, NOW)


def test_poll_errors_are_recorded_and_only_a_vanished_batch_ends_the_task() -> None:
    job = submitted(make_job())
    transient = ErrorInfo("503 UNAVAILABLE", "overloaded", ErrorClass.SERVER_ERROR)
    job = reducers.poll_failed(job, 0, transient, 5.0, NOW)
    assert job.tasks[0].state is TaskState.SUBMITTED
    assert job.tasks[0].not_before == NOW + 5 and job.error == transient
    auth = ErrorInfo("400 INVALID_ARGUMENT", "API key not valid", ErrorClass.AUTH)
    assert reducers.poll_failed(job, 0, auth, 5, NOW).tasks[0].state is TaskState.SUBMITTED
    gone = ErrorInfo("404 NOT_FOUND", "not found", ErrorClass.NOT_FOUND)
    assert reducers.poll_failed(job, 0, gone, 5, NOW).tasks[0].state is TaskState.FAILED


def test_dead_claims_are_released_to_where_work_resumes() -> None:
    job = reducers.claim_create(
        reducers.uploaded(reducers.claim_upload(make_job(), 0, OWNER, NOW), 0, "files/f", NOW),
        0,
        OWNER,
        NOW,
    )
    released = reducers.release(job, 0, TaskState.UPLOADED, NOW, "no batch found")
    assert released.tasks[0].state is TaskState.UPLOADED
    assert released.tasks[0].uploaded_file_name == "files/f"
    with pytest.raises(InvalidTransition):
        reducers.release(submitted(make_job()), 0, TaskState.NEW, NOW, "x")


# -- the tables ---------------------------------------------------------------------------


@given(st.sampled_from([None, *JobStatus]), st.sampled_from(list(JobEvent)))
def test_every_job_pair_is_allowed_exactly_when_the_table_lists_it(
    status: JobStatus | None, event: JobEvent
) -> None:
    if (status, event) in JOB_TRANSITIONS:
        assert job_transition(status, event) == JOB_TRANSITIONS[(status, event)]
    else:
        with pytest.raises(InvalidTransition):
            job_transition(status, event)


@given(
    st.sampled_from(list(TaskState)),
    st.sampled_from(list(TaskEvent)),
    st.sampled_from(list(TaskState)),
)
def test_every_task_triple_is_allowed_exactly_when_the_table_lists_it(
    state: TaskState, event: TaskEvent, target: TaskState
) -> None:
    allowed = TASK_TRANSITIONS.get((state, event), frozenset())
    if target in allowed:
        assert task_transition(state, event, target) is target
    else:
        with pytest.raises(InvalidTransition):
            task_transition(state, event, target)


def test_terminal_tasks_and_jobs_have_no_way_out_except_retry_and_delete() -> None:
    for (state, _), _targets in TASK_TRANSITIONS.items():
        assert not state.terminal
    for (status, event), _ in JOB_TRANSITIONS.items():
        if status is not None and status.terminal:
            assert event in (JobEvent.RETRY, JobEvent.DELETE, JobEvent.PRUNE)
    assert not legal_status_change(JobStatus.COMPLETED, JobStatus.RUNNING)
    assert legal_status_change(JobStatus.RUNNING, JobStatus.COMPLETED)


def test_running_never_reaches_a_download_or_cleanup_without_succeeded() -> None:
    """The original tool deleted running batches; no path here does. (RECOVERED is taken
    only when the batch is gone (404) and every key is already on disk.)"""
    reachable = {TaskState.SUBMITTED}
    frontier = [TaskState.SUBMITTED]
    while frontier:
        state = frontier.pop()
        for (src, event), targets in TASK_TRANSITIONS.items():
            if src is state and event not in (TaskEvent.REMOTE_SUCCEEDED, TaskEvent.RECOVERED):
                for target in targets - reachable:
                    reachable.add(target)
                    frontier.append(target)
    assert TaskState.DOWNLOADING not in reachable
    assert TaskState.DOWNLOADED not in reachable
    assert TaskState.DONE not in reachable


# -- records ------------------------------------------------------------------------------


def test_job_records_round_trip_and_keep_unknown_fields() -> None:
    job = submitted(make_job(tasks=2, count=20))
    record = job.to_record()
    record["my_note"] = {"kept": True}
    record["tasks"][0]["custom"] = 1
    again = Job.from_record(json.loads(json.dumps(record))).to_record()
    assert again["my_note"] == {"kept": True}
    assert again["tasks"][0]["custom"] == 1
    assert again == record


@pytest.mark.parametrize(
    "record, status, task_state",
    [
        (
            {"id": "legacy-1", "input_file": "a.jsonl", "count": 5,
             "uploaded_file_name": "files/u", "batch": {"name": "batches/x",
             "state": "JOB_STATE_RUNNING", "create_time": "2025-07-12T16:01:38+00:00"}},
            JobStatus.RUNNING, TaskState.SUBMITTED,
        ),
        (
            {"id": "legacy-2", "input_file": "a.jsonl", "count": 5, "batch": {
             "name": "batches/x", "state": "JOB_STATE_SUCCEEDED"}},
            JobStatus.COMPLETED, TaskState.DONE,
        ),
        (
            {"id": "legacy-3", "input_file": "a.jsonl", "job_name": "batches/x",
             "created_at": "2025-07-13T01:01:38.807581",
             "completed_at": "2025-07-13T01:03:03.448724",
             "final_state": "JOB_STATE_FAILED", "duration_seconds": 84},
            JobStatus.FAILED, TaskState.FAILED,
        ),
    ],
)  # fmt: skip
def test_records_written_by_the_original_tool_become_jobs(
    record: dict[str, Any], status: JobStatus, task_state: TaskState
) -> None:
    job = Job.from_record(record)
    assert job.status is status
    assert job.tasks[0].state is task_state
    assert job.tasks[0].batch_name == "batches/x"
    assert job.foreign
    out = job.to_record()
    assert out["input_file"] == "a.jsonl"
    if "uploaded_file_name" in record:
        assert out["uploaded_file_name"] == record["uploaded_file_name"]


def test_remote_state_parsing_accepts_every_spelling() -> None:
    assert RemoteState.parse("BATCH_STATE_RUNNING") is RemoteState.RUNNING
    assert RemoteState.parse("JOB_STATE_EXPIRED") is RemoteState.EXPIRED
    assert RemoteState.parse("succeeded") is RemoteState.SUCCEEDED
    assert RemoteState.parse(None) is RemoteState.UNSPECIFIED
    assert not RemoteState.parse("JOB_STATE_PAUSED").terminal
