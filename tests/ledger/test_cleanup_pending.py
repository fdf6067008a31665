"""Finished jobs with remote cleanup still to do are found by every ledger (JSONL, SQLite,
PostgreSQL) without reading the finished ones that are clean: each cycle retries them."""

from __future__ import annotations

from typing import Any

from gembatch.engine import reducers
from gembatch.jobs import Job, RequestCounts
from tests.engine.test_reducers import NOW, OWNER, batch, make_job, submitted
from tests.ledger.test_contract import backend, ledger  # noqa: F401 - the contract's fixtures


def _finished(job_id: str, cleanup_errors: list[str]) -> Job:
    job = make_job()
    job.id = job_id
    job = submitted(job)
    done = batch("JOB_STATE_SUCCEEDED", dest={"file_name": "files/out"})
    job = reducers.polled(job, 0, done, None, NOW)
    job = reducers.claim_download(job, 0, OWNER, NOW)
    job = reducers.downloaded(job, 0, "/p/part", RequestCounts(10, 10, 0), NOW)
    results = dict.fromkeys(("input_file", "batch", "output_file"), not cleanup_errors)
    job = reducers.cleaned(job, 0, results, cleanup_errors, NOW, 5.0)
    return reducers.finalize(job, NOW, results_complete=True)


def test_finished_jobs_with_deletes_left_to_retry_are_found_until_cleaned(
    ledger: Any,  # noqa: F811
) -> None:
    left = _finished("j-left", ["delete batches/b1: 503"])
    clean = _finished("j-clean", [])
    running = submitted(make_job())
    running.id = "j-running"
    ledger.add_many([left.to_record(), clean.to_record(), running.to_record()])

    assert [r["id"] for r in ledger.load_cleanup_pending().records] == ["j-left"]
    assert [r["id"] for r in ledger.load_active().records] == ["j-running"]

    def cleaned(record: dict[str, Any]) -> dict[str, Any]:
        job = Job.from_record(record)
        results = dict.fromkeys(("input_file", "batch", "output_file"), True)
        return reducers.cleaned(job, 0, results, [], NOW + 6).to_record()

    result = ledger.apply({"j-left": cleaned})
    assert not result.errors
    assert ledger.load_cleanup_pending().records == []
