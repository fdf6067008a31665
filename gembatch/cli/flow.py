"""Submit and poll, as `submit`, `poll`, `run` and `demo` share them.

Why: seed 001's submit (many files, `[i/n]` progress, skip duplicates, non-zero exit on
any error) and seed 000's poll (a live table at a fixed position, resume, downloads and
cleanup as jobs finish) are the heart of the command line; `run` and `demo` are the two
in sequence. Everything here only drives the engine and shows what it did.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from gembatch.engine.engine import CycleReport, Engine, EngineSettings, StartOutcome
from gembatch.errors import UserError
from gembatch.inputs import SplitLimits, ValidatedInput, validate_files
from gembatch.jobs import Job, JobStatus, RetryConfig
from gembatch.units import format_size


@dataclass
class SubmitOptions:
    model: str
    priority: int = 0
    force: bool = False
    dry_run: bool = False
    max_task_bytes: int | None = None
    max_task_requests: int | None = None
    max_parallel_tasks: int | None = None
    retry_config: RetryConfig | None = None


@dataclass
class Submitted:
    """What `submit` did: how many files failed to start, and the jobs the command is
    about (the new ones and the earlier jobs that duplicates were skipped for)."""

    failures: int = 0
    job_ids: list[str] = field(default_factory=list)


@dataclass
class PollOptions:
    interval: float = 30.0
    once: bool = False
    concurrency: int = 32
    max_live_batches: int = 10
    # Once every job has ended, remote deletes that keep failing are retried this long
    # before `poll` exits (saying so); the next poll or `gembatch cleanup` goes on with
    # them. A delete refused for good (a revoked key) must not keep the command forever.
    cleanup_wait: float = 600.0


def validate(files: list[str], options: SubmitOptions) -> list[ValidatedInput]:
    """Every file checked before anything leaves the machine; any problem stops all."""
    limits = SplitLimits()
    if options.max_task_bytes:
        limits = SplitLimits(
            max_bytes=options.max_task_bytes, max_requests=options.max_task_requests
        )
    elif options.max_task_requests:
        limits = SplitLimits(max_requests=options.max_task_requests)
    return validate_files(files, limits)


def print_dry_run(inputs: list[ValidatedInput], out: TextIO, model_line: str | None = None) -> None:
    total_requests = sum(i.count for i in inputs)
    total_bytes = sum(i.size_bytes for i in inputs)
    for i, item in enumerate(inputs, 1):
        tasks = len(item.tasks)
        print(
            f"[{i}/{len(inputs)}] {item.display}: {item.count:,} requests, "
            f"{format_size(item.size_bytes)}, {tasks} task{'s' if tasks != 1 else ''}, "
            f"~{item.estimated_tokens:,} tokens",
            file=out,
        )
    print(
        f"dry run: {len(inputs)} file(s), {total_requests:,} requests, {format_size(total_bytes)} "
        "would be submitted; nothing was uploaded",
        file=out,
    )
    if model_line:
        print(model_line, file=out)


MODEL_FIX = (
    "choose a model the API serves with -m/--model or $GEMBATCH_MODEL "
    "(e.g. -m gemini-2.5-flash-lite; https://ai.google.dev/gemini-api/docs/models)"
)


def unknown_model_error(check: Any) -> UserError:
    """The refusal for a model the API does not serve (a failed `ModelCheck`)."""
    return UserError(f"{check.refusal}; {MODEL_FIX}; nothing was uploaded")


async def check_models(remote: Any, models: list[str], err: TextIO) -> list[Any]:
    """One models.get per distinct model, before any upload or ledger write: an unknown
    model stops everything (UserError, exit 2). When the check cannot tell (network,
    5xx, 429 after one retry; a bad key), submission goes on and the create decides
    (see gembatch.gemini.model_check.check_model for why)."""
    from gembatch.gemini.model_check import check_models as check_all

    checks = await check_all(remote, models)
    for check in checks:
        if check.known is False:
            raise unknown_model_error(check)
        if check.warning:
            print(f"warning: {check.warning}", file=err)
        if check.known is None and check.transient:
            print(
                f"note: could not check model {check.model!r} ({check.code}: "
                f"{check.message}); submitting anyway",
                file=err,
            )
    return checks


async def submit(
    engine: Engine, inputs: list[ValidatedInput], options: SubmitOptions, out: TextIO
) -> Submitted:
    """Check the model, record the jobs, then start as many as the live-batch limit
    allows."""
    await check_models(engine.remote, [options.model], sys.stderr)
    added = await asyncio.to_thread(
        engine.add_jobs,
        inputs,
        model=options.model,
        priority=options.priority,
        retry_config=options.retry_config,
        max_parallel_tasks=options.max_parallel_tasks,
        force=options.force,
    )
    total = len(added)
    position = {}
    for i, result in enumerate(added, 1):
        if result.job is None:
            print(f"[{i}/{total}] {result.input.display}: skip: {result.reason}", file=out)
        else:
            position[result.job.id] = i
    new_jobs = {r.job.id: r.job for r in added if r.job is not None}
    about = [(r.job or r.existing).id for r in added if (r.job or r.existing) is not None]
    if not new_jobs:
        return Submitted(0, about)
    outcomes: dict[str, list[StartOutcome]] = {}
    for outcome in await engine.start(job_ids=set(new_jobs)):
        outcomes.setdefault(outcome.job_id, []).append(outcome)
    # A job whose every task was refused for good ends now, not at the next poll.
    await engine.finalize(CycleReport())
    failures = 0
    for job_id, job in new_jobs.items():
        label = f"[{position[job_id]}/{total}] {job.input_file}"
        results = outcomes.get(job_id, [])
        errors = [o for o in results if not o.ok]
        if errors:
            failures += 1
            for o in errors:
                when = ""
                if o.unknown:
                    when = "; `gembatch poll` finds out, and creates again only if none was made"
                elif o.retry_at:
                    when = (
                        f"; will retry at {time.strftime('%H:%M:%S', time.localtime(o.retry_at))}"
                    )
                    when += " (run `gembatch poll`)"
                print(f"{label}: error: {o.message}{when}", file=out)
            continue
        tasks = len(job.tasks)
        started = [o for o in results if o.ok]
        if not started:
            print(
                f"{label}: queued ({job.count:,} requests): {engine.settings.max_live_batches} "
                "remote batches are live (the limit); `gembatch poll` submits it when one ends",
                file=out,
            )
        elif tasks == 1:
            print(f"{label}: submitted {started[0].batch_name} ({job.count:,} requests)", file=out)
        else:
            print(
                f"{label}: {len(started)} of {tasks} tasks submitted ({job.count:,} requests); "
                "`gembatch poll` submits the rest",
                file=out,
            )
    for result in added:
        if result.job is not None and result.note:
            print(f"[{position[result.job.id]}/{total}] {result.job.input_file}: {result.note}",
                  file=out)  # fmt: skip
    return Submitted(failures, about)


def outcome_code(engine: Engine, job_ids: list[str]) -> int:
    """0 when every job the command is about has completed, else 1: the exit code tells
    the final state of those jobs, not what happened on the way (a 429 that was retried
    does not fail the command; a skipped duplicate of a failed job does not pass)."""
    by_id = {job.id: job for job in engine.jobs()}
    jobs = [by_id.get(job_id) for job_id in job_ids]
    return 0 if all(j is not None and j.status is JobStatus.COMPLETED for j in jobs) else 1


async def poll(engine: Engine, options: PollOptions, out: TextIO) -> int:
    """Cycles until every job is finished and nothing is left to delete remotely (or
    once). Returns the exit code."""
    from gembatch.cli.monitor import CycleInfo, PlainReporter, monitor_view

    interactive = out.isatty()
    live = None
    reporter = None if interactive else PlainReporter(out)
    jobs = await asyncio.to_thread(engine.jobs)
    if not jobs:
        print(
            "no jobs in the ledger yet: submit some with `gembatch submit FILE...`",
            file=sys.stderr,
        )
        return 0
    told: set[str] = set()  # unreadable records reported on stderr so far
    _report_records(engine, told)
    info = CycleInfo(last_update=time.time(), next_poll_at=None, checking=True)
    if interactive:
        from rich.console import Console
        from rich.live import Live

        console = Console(file=out)
        live = Live(monitor_view(jobs, info, time.time()), console=console, auto_refresh=False)
        quiet = _quiet_keyboard()
        live.start(refresh=True)
    ended_at: float | None = None  # when every job had ended (cleanup may go on)
    try:
        while True:
            report = await _interruptible(engine.cycle(), live, reporter, jobs, info)
            jobs = await asyncio.to_thread(engine.jobs)
            labels = {j.id: j.input_file for j in jobs}
            now = time.time()
            errors = [
                (labels.get(job_id, job_id or "ledger"), _without(labels.get(job_id), msg))
                for job_id, msg in report.errors
            ]
            _report_records(engine, told)
            # Remote deletes that failed are retried after the jobs have ended, until done
            # or for `cleanup_wait` seconds.
            if report.unfinished == 0 and ended_at is None:
                ended_at = now
            gave_up = ended_at is not None and now - ended_at >= options.cleanup_wait
            done = (report.unfinished == 0 and (report.cleanup_pending == 0 or gave_up)) or (
                options.once
            )
            wake = None if done else now + options.interval
            if wake is not None and report.next_due is not None:
                wake = min(wake, max(report.next_due, now + 0.2))
            info = CycleInfo(
                last_update=now,
                next_poll_at=wake,
                newly_completed=len(report.finished),
                errors=errors,
            )
            if live is not None:
                live.update(monitor_view(jobs, info, now), refresh=True)
            elif reporter is not None:
                reporter.update(jobs, info)
            if done:
                break
            while wake is not None and time.time() < wake:
                await _interruptible(
                    asyncio.sleep(min(1.0, max(0.0, wake - time.time()))),
                    live,
                    reporter,
                    jobs,
                    info,
                )
                if live is not None:
                    live.update(monitor_view(jobs, info, time.time()), refresh=True)
            if live is not None:
                info.checking = True
                info.next_poll_at = None
                live.update(monitor_view(jobs, info, time.time()), refresh=True)
    finally:
        if live is not None:
            live.stop()
            quiet()
    if reporter is not None:
        reporter.summary(jobs)
    else:
        _summary(jobs, out)
    if not options.once and report.unfinished == 0 and report.cleanup_pending:
        print(
            f"note: {report.cleanup_pending} remote file(s) or batch(es) could not be deleted "
            f"yet (see the errors above); `gembatch poll` again later, or `gembatch cleanup`, "
            "deletes them",
            file=sys.stderr,
        )
    unfinished = [j for j in jobs if not j.status.terminal]
    if options.once and unfinished:
        return 0
    return 1 if any(j.status is JobStatus.FAILED for j in jobs) else 0


def _report_records(engine: Engine, told: set[str]) -> None:
    """Ledger records the engine could not read, on stderr once each (stdout is the
    table or the progress lines): `LEDGER: job ID: unreadable record (...)`."""
    where = getattr(engine.ledger, "path", "ledger")
    for problem in engine.problems:
        if problem not in told:
            told.add(problem)
            # sys.stderr looked up now: a live table redirects it while it is shown.
            print(f"{where}: {problem}", file=sys.stderr)


def _without(label: str | None, message: str) -> str:
    """The engine's message without the input file it starts with: the line shows it."""
    if label and message.startswith(f"{label}: "):
        return message[len(label) + 2 :]
    return message


def _quiet_keyboard() -> Any:
    """Stop the terminal from echoing keys (and `^C`) over the live table: an echo at the
    end of a full-width line moves the cursor down and the next redraw lands one line low.
    Returns the function that restores the terminal."""
    try:
        import termios

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError):  # not a terminal, or not POSIX
        return lambda: None
    quiet = list(saved)
    quiet[3] &= ~(termios.ECHO | getattr(termios, "ECHOCTL", 0))
    try:
        termios.tcsetattr(fd, termios.TCSANOW, quiet)
    except OSError:
        return lambda: None

    def restore() -> None:
        try:
            termios.tcsetattr(fd, termios.TCSANOW, saved)
        except OSError:
            pass

    return restore


async def _interruptible(
    awaitable: Any, live: Any, reporter: Any, jobs: list[Job], info: Any
) -> Any:
    """Await; on Ctrl-C, say so on the screen (the table stays there) before stopping."""
    try:
        return await awaitable
    except (asyncio.CancelledError, KeyboardInterrupt):
        info.interrupted = True
        info.checking = False
        info.next_poll_at = None
        if live is not None:
            from gembatch.cli.monitor import monitor_view

            live.update(monitor_view(jobs, info, time.time()), refresh=True)
        elif reporter is not None:
            reporter.update(jobs, info)
        raise


def _summary(jobs: list[Job], out: TextIO) -> None:
    from gembatch.cli.monitor import summary_lines

    for line in summary_lines(jobs):
        print(line, file=out)


def engine_for(ledger: Any, remote: Any, poll_options: PollOptions, role: str) -> Engine:
    settings = EngineSettings(
        max_live_batches=poll_options.max_live_batches,
        poll_concurrency=poll_options.concurrency,
    )
    return Engine(ledger, remote, tuned(settings), role=role)


def tuned(settings: EngineSettings) -> EngineSettings:
    """Apply $GEMBATCH_ENGINE, a JSON object of EngineSettings fields (for operators and
    tests that need, say, shorter download retry intervals)."""
    import dataclasses
    import json
    import os

    text = os.environ.get("GEMBATCH_ENGINE")
    if not text:
        return settings
    try:
        overrides = json.loads(text)
        return dataclasses.replace(settings, **overrides)
    except (ValueError, TypeError) as exc:
        names = ", ".join(f.name for f in dataclasses.fields(EngineSettings))
        raise UserError(f"GEMBATCH_ENGINE must be a JSON object of {names}: {exc}") from None


def exclusive_poll_lock(job_info: Path) -> Any:
    """One polling process per ledger: a second would download and clean up the same
    batches. The lock is the kernel's, so a killed poll never leaves it behind."""
    import filelock

    from gembatch.ledger.jsonl import describe_lock_holder, holder_lock

    path = Path(f"{job_info}.poll.lock")
    if not path.parent.is_dir():
        raise UserError(f"{path.parent} does not exist: give --job-info a path in a directory")
    lock = holder_lock(path)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise UserError(
            f"{describe_lock_holder(path)} is already polling {job_info}; "
            "let it finish or stop it, then run this again"
        ) from None
    return lock
