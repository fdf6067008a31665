"""Creates whose outcome is unknown and remote cleanup that failed, without servers: the
reducers decide; the ledger then only stores what they say."""

from __future__ import annotations

import pytest

from gembatch.engine import reducers
from gembatch.jobs import (
    TASK_LIVE,
    ErrorClass,
    ErrorInfo,
    InvalidTransition,
    Job,
    JobStatus,
    RequestCounts,
    RetryConfig,
    Step,
    TaskEvent,
    TaskState,
)
from gembatch.retry import Decision
from tests.engine.test_reducers import NOW, OWNER, batch, make_job, roundtrip, submitted

TIMEOUT = ErrorInfo("ReadTimeout", "timed out waiting for the answer", ErrorClass.TIMEOUT)


def creating(job: Job | None = None) -> Job:
    job = job or make_job()
    job = reducers.claim_upload(job, 0, OWNER, NOW)
    job = reducers.uploaded(job, 0, "files/f1", NOW)
    return reducers.claim_create(job, 0, OWNER, NOW)


def unknown(job: Job | None = None) -> Job:
    return reducers.create_unknown(
        creating(job), 0, NOW, look_at=NOW, since=NOW, why="timed out", error=TIMEOUT
    )


def test_a_create_without_an_answer_stays_unknown_holding_its_slot_and_its_input() -> None:
    job = roundtrip(unknown())
    task = job.tasks[0]
    assert task.state is TaskState.CREATE_UNKNOWN and task.state in TASK_LIVE
    assert task.owner is None  # any process may settle it
    assert task.uploaded_file_name == "files/f1"  # the batch, if it exists, reads it
    assert job.status is JobStatus.RUNNING and job.step is Step.SUBMITTING
    assert job.message.startswith("create outcome unknown (timed out)")
    assert "waiting for Gemini to list batches" in job.message
    assert reducers.remote_leftovers(task) == {}  # nothing of it may be deleted
    assert not reducers.needs_finalize(job)
    # A failed listing changes nothing but the time of the next look.
    failed = ErrorInfo("ConnectError", "could not connect", ErrorClass.NETWORK)
    again = reducers.create_unknown(job, 0, NOW + 1, look_at=NOW + 5, error=failed)
    assert again.tasks[0].state is TaskState.CREATE_UNKNOWN
    assert again.tasks[0].not_before == NOW + 5 and again.tasks[0].step_failures == 1
    assert again.tasks[0].extra["create_unknown"]["since"] == NOW
    assert again.tasks[0].display_name == task.display_name and again.tasks[0].attempt == 1
    # Never a second create meanwhile, and a cancel waits for the answer too.
    with pytest.raises(InvalidTransition):
        reducers.claim_create(again, 0, OWNER, NOW + 10)
    cancelled = reducers.cancel(again, NOW + 2)
    assert cancelled.status is JobStatus.CANCELLING
    assert cancelled.tasks[0].state is TaskState.CREATE_UNKNOWN


def test_a_listing_that_finds_the_batch_records_it_once_and_only_for_its_own_attempt() -> None:
    job = unknown()
    name = job.tasks[0].display_name
    found = reducers.created(job, 0, batch("JOB_STATE_PENDING"), NOW, name=name)
    assert found.tasks[0].state is TaskState.SUBMITTED
    assert "create_unknown" not in found.tasks[0].extra
    with pytest.raises(InvalidTransition):  # a second process with the same finding
        reducers.created(found, 0, batch("JOB_STATE_PENDING"), NOW, name=name)
    with pytest.raises(InvalidTransition):  # a finding about another attempt's name
        reducers.created(job, 0, batch("JOB_STATE_PENDING"), NOW, name=name + "x")


def test_no_batch_listed_lets_the_next_attempt_create_from_the_same_input_or_fails() -> None:
    job = unknown()
    name = job.tasks[0].display_name
    again = reducers.create_not_made(job, 0, name, Decision(True, 2.0, "r"), NOW, "none")
    task = again.tasks[0]
    assert task.state is TaskState.UPLOADED and task.uploaded_file_name == "files/f1"
    assert task.attempt == 2 and task.display_name != name and task.not_before == NOW + 2
    with pytest.raises(InvalidTransition):  # a stale decision about the old attempt
        reducers.create_not_made(again, 0, name, Decision(True, 2.0, "r"), NOW, "none")
    # Its sender died (no answer to judge by): the same attempt goes on at once.
    dead = reducers.create_unknown(creating(), 0, NOW, look_at=NOW, since=NOW)
    resumed = reducers.create_not_made(dead, 0, name, None, NOW, "none")
    assert resumed.tasks[0].state is TaskState.UPLOADED
    assert resumed.tasks[0].attempt == 1 and resumed.tasks[0].display_name == name
    # Out of attempts: the task fails and only then may cleanup delete its input.
    failed = reducers.create_not_made(job, 0, name, Decision(False, 0, "no"), NOW, "none")
    assert failed.tasks[0].state is TaskState.FAILED
    assert reducers.remote_leftovers(failed.tasks[0]) == {"input_file": "files/f1"}
    # A job cancelled while the outcome was unknown ends instead of waiting for ever.
    cancelled = reducers.cancel(job, NOW)
    ended = reducers.create_not_made(cancelled, 0, name, Decision(True, 2, "r"), NOW, "none")
    assert ended.tasks[0].state is TaskState.CANCELLED and reducers.needs_finalize(ended)


def test_a_definitive_create_failure_whose_input_could_not_be_deleted_reuses_it() -> None:
    refused = ErrorInfo("ConnectError", "could not connect", ErrorClass.NETWORK)
    job = reducers.step_failed(
        creating(), 0, TaskEvent.CREATE_FAILED, refused, Decision(True, 1, "r"), NOW
    )
    task = job.tasks[0]
    assert task.state is TaskState.UPLOADED and task.uploaded_file_name == "files/f1"
    assert task.attempt == 2  # a new display name all the same


def test_a_failed_remote_delete_stays_due_with_backoff_until_it_is_done() -> None:
    job = submitted(make_job())
    job = reducers.polled(
        job, 0, batch("JOB_STATE_SUCCEEDED", dest={"file_name": "files/batch-b1"}), None, NOW
    )
    job = reducers.claim_download(job, 0, OWNER, NOW)
    job = reducers.downloaded(job, 0, "/p/part.jsonl", RequestCounts(10, 10, 0), NOW)
    results = {"input_file": True, "batch": False, "output_file": False}
    job = reducers.cleaned(job, 0, results, ["delete: 503", "delete: 503"], NOW, 7.0)
    job = roundtrip(reducers.finalize(job, NOW, results_complete=True))
    task = job.tasks[0]
    assert job.status is JobStatus.COMPLETED  # the results are safe: the job is done
    assert task.state is TaskState.DONE and task.not_before == NOW + 7
    assert reducers.remote_leftovers(task) == {
        "batch": "batches/b1",
        "output_file": "files/batch-b1",
    }
    assert reducers.remote_cleanup_pending(job) == 2
    job = reducers.cleaned(job, 0, {"batch": True, "output_file": True}, [], NOW + 8)
    assert job.tasks[0].not_before is None and reducers.remote_cleanup_pending(job) == 0
    assert job.status is JobStatus.COMPLETED


def test_a_task_that_ends_with_something_remote_is_due_for_cleanup_at_once() -> None:
    job = submitted(make_job(retry=RetryConfig(max_attempts=1)))
    job = reducers.polled(job, 0, batch("JOB_STATE_FAILED"), None, NOW)
    assert job.tasks[0].state is TaskState.FAILED and job.tasks[0].not_before == NOW
    assert reducers.remote_leftovers(job.tasks[0]) == {
        "input_file": "files/f1",
        "batch": "batches/b1",
    }
