"""A ledger line gembatch cannot use is reported on stderr as `PATH:LINE: ...` by every
command that reads the ledger, once per command, and the other jobs go on.

Why: a hand-edited or half-copied job-info.jsonl must not stop the work nor vanish from
view; stdout stays the command's output (tables, progress lines, JSON) for pipes.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

from gembatch.cli.common import MAX_PROBLEMS_SHOWN, ProblemReport, ReportingLedger
from gembatch.ledger import LedgerProblem
from tests.cli.helpers import gembatch, ledger, request_file

FAST = {"clock": {"pending_seconds": 0.2, "running_seconds": 0.4}}
BROKEN = '{"this is": not json'
WHERE = "job-info.jsonl:2: not valid JSON"


def _break_line_2(cwd: Path) -> None:
    with open(cwd / "job-info.jsonl", "a") as handle:
        handle.write(BROKEN + "\n")


def _reported_once(done: Any) -> None:
    assert done.stderr.count(WHERE) == 1, done.stderr
    assert "not valid JSON" not in done.stdout, done.stdout
    assert "Traceback" not in done.stderr


def test_every_command_reports_a_corrupt_line_on_stderr_and_goes_on(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory(FAST)
    request_file(tmp_path / "a.jsonl", 2, prefix="a")
    request_file(tmp_path / "b.jsonl", 2, prefix="b")
    request_file(tmp_path / "c.jsonl", 2, prefix="c")
    assert gembatch(emulator, tmp_path, "submit", "a.jsonl").returncode == 0
    _break_line_2(tmp_path)

    submitted = gembatch(emulator, tmp_path, "submit", "b.jsonl")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "b.jsonl: submitted" in submitted.stdout
    _reported_once(submitted)

    polled = gembatch(emulator, tmp_path, "poll", "--interval", "0.2")
    assert polled.returncode == 0, polled.stdout + polled.stderr
    _reported_once(polled)  # loaded every cycle, told once

    ran = gembatch(emulator, tmp_path, "run", "c.jsonl", "--interval", "0.2")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    _reported_once(ran)

    status = gembatch(emulator, tmp_path, "status", "--json")
    assert status.returncode == 1
    _reported_once(status)
    assert {j["status"] for j in json.loads(status.stdout)} == {"completed"}

    retried = gembatch(emulator, tmp_path, "retry")
    assert retried.returncode == 0 and "nothing to retry" in retried.stdout
    _reported_once(retried)

    info = gembatch(None, tmp_path, "info")
    assert info.returncode == 1
    _reported_once(info)

    lines = (tmp_path / "job-info.jsonl").read_text().splitlines()
    assert lines[1] == BROKEN  # kept byte for byte
    others = [json.loads(line) for n, line in enumerate(lines) if n != 1]
    assert sorted(r["input_file"] for r in others) == ["a.jsonl", "b.jsonl", "c.jsonl"]
    assert {r["status"] for r in others} == {"completed"}


def test_status_names_the_line_of_a_record_it_cannot_read(tmp_path: Path) -> None:
    bad = {"id": "j1", "input_file": "a.jsonl", "status": "pending", "tasks": [], "errors": 5}
    (tmp_path / "job-info.jsonl").write_text(json.dumps(bad) + "\n")
    status = gembatch(None, tmp_path, "status", "--json")
    assert "job-info.jsonl:1: job j1: unreadable" in status.stderr, status.stderr
    assert "Traceback" not in status.stderr
    assert json.loads(status.stdout) == []
    assert ledger(tmp_path) == [bad]


def test_the_report_tells_each_problem_once_and_summarises_a_flood(tmp_path: Path) -> None:
    report = ProblemReport(Path("x.jsonl"))
    problems = [LedgerProblem(n, f"bad {n}", b"?") for n in range(1, MAX_PROBLEMS_SHOWN + 6)]
    err = io.StringIO()
    with redirect_stderr(err):
        report.report(problems[:3])
        report.report(problems[:3])  # the next cycle: nothing new
        report.report(problems)
    lines = err.getvalue().splitlines()
    assert lines[:3] == ["x.jsonl:1: bad 1", "x.jsonl:2: bad 2", "x.jsonl:3: bad 3"]
    assert len(lines) == MAX_PROBLEMS_SHOWN + 1
    assert lines[-1] == "x.jsonl: ... and 5 more problems"
    assert len(report.seen) == MAX_PROBLEMS_SHOWN + 5


def test_the_command_ledger_hands_on_records_without_its_problems(tmp_path: Path) -> None:
    path = tmp_path / "job-info.jsonl"
    path.write_text('{"id": "j1", "input_file": "a.jsonl"}\nnot json\n')
    led = ReportingLedger(path)
    err = io.StringIO()
    with redirect_stderr(err):
        first, second = led.load(), led.load_active()
    assert [r["id"] for r in first.records] == ["j1"] and first.problems == []
    assert [r["id"] for r in second.records] == ["j1"] and second.problems == []
    assert err.getvalue().count(f"{path}:2: not valid JSON") == 1
    assert [p.line for p in led.problem_report.seen] == [2]


def test_poll_reports_a_record_it_cannot_read_on_stderr_once_and_finishes_the_rest(
    emulator_factory: Any, tmp_path: Path
) -> None:
    emulator = emulator_factory(FAST)
    request_file(tmp_path / "a.jsonl", 2, prefix="a")
    assert gembatch(emulator, tmp_path, "submit", "a.jsonl").returncode == 0
    bad = {"id": "j1", "input_file": "x.jsonl", "status": "pending", "tasks": [], "errors": 5}
    with open(tmp_path / "job-info.jsonl", "a") as handle:
        handle.write(json.dumps(bad) + "\n")
    polled = gembatch(emulator, tmp_path, "poll", "--interval", "0.2")
    assert polled.returncode == 0, polled.stdout + polled.stderr
    assert polled.stderr.count("job j1: unreadable record") == 1, polled.stderr
    assert "unreadable" not in polled.stdout, polled.stdout
    assert "Traceback" not in polled.stderr
    records = ledger(tmp_path)
    assert records[1] == bad  # left as it was
    assert records[0]["status"] == "completed"
