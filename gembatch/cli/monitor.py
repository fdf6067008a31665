"""What `gembatch poll`, `status` and `demo` show: a live job table, a status table, JSON,
and plain lines when stdout is not a terminal.

Why: the original `poll` redrew one Rich table in place so that 23 hours-long jobs could be
watched at a glance (seed 000), but it swallowed poll errors. Here every view is a pure
function of the job records and the facts of one poll cycle (`CycleInfo`): nothing is read
from the ledger or the network, errors are always shown, and tests render real records.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, TextIO

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, JustifyMethod, RenderableType, RenderResult
from rich.measure import Measurement
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gembatch.engine.reducers import remote_cleanup_pending
from gembatch.jobs import (
    ErrorClass,
    Job,
    JobStatus,
    RemoteState,
    Step,
    TaskState,
    format_duration,
    parse_time,
)

MAX_ROWS = 40  # the live view must fit a screen: Rich Live cannot redraw what scrolled away
MAX_ERROR_LINES = 5
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


@dataclass
class CycleInfo:
    """What the last poll cycle learned, beyond the job records themselves."""

    last_update: float  # epoch seconds of the last poll cycle
    next_poll_at: float | None  # epoch seconds; None while a cycle is running
    checking: bool = False  # a cycle is running now
    newly_completed: int = 0  # jobs that reached a terminal status in the last cycle
    # (job label, message) from the last cycle: poll errors are shown, never swallowed
    errors: list[tuple[str, str]] = field(default_factory=list)
    interrupted: bool = False


# --------------------------------------------------------------------------------------
# How a job looks
# --------------------------------------------------------------------------------------


class _Kind(StrEnum):
    """A job as a person reads it. Values are the words of the plain (non-terminal) output:
    the public statuses, with `expired` told apart from `failed`."""

    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    CANCELLING = "cancelling"
    RUNNING = "running"
    PENDING = "pending"


# kind -> (symbol, word, style); RUNNING takes its symbol and word from the step.
_LOOKS: dict[_Kind, tuple[str, str, str]] = {
    _Kind.COMPLETED: ("✓", "Success", "green"),
    _Kind.FAILED: ("✗", "Failed", "red"),
    _Kind.EXPIRED: ("⌛", "Expired", "magenta"),
    _Kind.CANCELLED: ("⊘", "Cancelled", "orange1"),
    _Kind.CANCELLING: ("⊘", "Cancelling", "orange1"),
    _Kind.RUNNING: ("⏳", "Running", "yellow"),
    _Kind.PENDING: ("⏸", "Queued", "blue"),
}

_STEP_LOOKS: dict[Step, tuple[str, str]] = {
    Step.VALIDATING: ("⏳", "validating"),
    Step.UPLOADING: ("⬆", "uploading"),
    Step.SUBMITTING: ("⬆", "submitting"),
    Step.QUEUED: ("⏳", "queued remotely"),  # our side is running; Gemini's batch is pending
    Step.PROCESSING: ("⏳", "processing"),
    Step.DOWNLOADING: ("⬇", "downloading"),
    Step.CLEANING_UP: ("⏳", "cleaning up"),
    Step.FINALIZING: ("⏳", "finalizing"),
}

_KIND_OF_STATUS = {
    JobStatus.COMPLETED: _Kind.COMPLETED,
    JobStatus.FAILED: _Kind.FAILED,
    JobStatus.CANCELLED: _Kind.CANCELLED,
    JobStatus.CANCELLING: _Kind.CANCELLING,
    JobStatus.RUNNING: _Kind.RUNNING,
    JobStatus.PENDING: _Kind.PENDING,
}


def _kind(job: Job) -> _Kind:
    if job.status is JobStatus.FAILED and _expired(job):
        return _Kind.EXPIRED
    return _KIND_OF_STATUS[job.status]


def _expired(job: Job) -> bool:
    if RemoteState.parse(job.final_state) is RemoteState.EXPIRED:
        return True
    if job.tasks and job.tasks[-1].remote_state is RemoteState.EXPIRED:
        return True
    return job.error is not None and job.error.error_class is ErrorClass.EXPIRED


def _retry_in(job: Job, now: float) -> int | None:
    """Seconds until the next retry of an unfinished task, if one is waiting."""
    waits = [
        task.not_before
        for task in job.tasks
        if not task.state.terminal and task.not_before is not None and task.not_before > now
    ]
    return math.ceil(min(waits) - now) if waits else None


def _describe(job: Job, kind: _Kind, now: float) -> tuple[str, str, str]:
    """(symbol, word, notes) of a job's state: notes are `retry in 42s`, `cleanup pending:
    2` (remote deletes being retried), or ""."""
    symbol, word, _ = _LOOKS[kind]
    if kind is _Kind.RUNNING and job.step is not None:
        symbol, word = _STEP_LOOKS[job.step]
    if kind is _Kind.RUNNING and any(t.state is TaskState.CREATE_UNKNOWN for t in job.tasks):
        symbol, word = "?", "create outcome unknown"  # until a listing says: never again
    notes = []
    if kind in (_Kind.RUNNING, _Kind.PENDING) and word != "create outcome unknown":
        wait = _retry_in(job, now)
        if wait is not None:
            notes.append(f"retry in {format_duration(wait)}")
    pending = remote_cleanup_pending(job)
    if pending:
        notes.append(f"cleanup pending: {pending}")
    return symbol, word, ", ".join(notes)


def state_label(job: Job, now: float | None = None) -> Text:
    """`✓ Success`, `✗ Failed`, `⊘ Cancelled`, `⌛ Expired`, `⏳ processing`, `⏸ Queued,
    retry in 42s`, `⊘ Cancelling`, coloured. `now` (epoch seconds) dates the retry countdown;
    None means the current time."""
    kind = _kind(job)
    symbol, word, retry = _describe(job, kind, time.time() if now is None else now)
    text = f"{symbol} {word}, {retry}" if retry else f"{symbol} {word}"
    return Text(text, style=_LOOKS[kind][2], no_wrap=True)


def _plain_state(job: Job, now: float) -> str:
    """The state in words, for logs: `running (processing)`, `pending (retry in 42s)`."""
    kind = _kind(job)
    _, word, retry = _describe(job, kind, now)
    if kind not in (_Kind.RUNNING, _Kind.PENDING):
        return f"{kind.value} ({retry})" if retry else kind.value
    details = [word] if kind is _Kind.RUNNING and job.step is not None else []
    details += [retry] if retry else []
    return f"{kind.value} ({', '.join(details)})" if details else kind.value


def progress_text(job: Job) -> str:
    """`done/total` requests, plus ` (3 failed)`; "" when the count is unknown."""
    counts = job.requests
    # The original tool never recorded request counts: zero done would be a false claim.
    if counts.total == 0 or (job.foreign and counts.done == 0):
        return ""
    text = f"{counts.done:,}/{counts.total:,}"
    if counts.failed:
        text += f" ({counts.failed:,} failed)"
    return text


# --------------------------------------------------------------------------------------
# Times
# --------------------------------------------------------------------------------------


def _local_time(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts).strftime(TIME_FORMAT)


def _ended_at(job: Job) -> float | None:
    ended = parse_time(job.completed_at)
    if ended is None and job.status.terminal and job.tasks:
        # Records of the original tool (v0.3.x) hold the end only in their batch.
        latest = job.tasks[-1]
        ended = parse_time(latest.ended_at) or parse_time((latest.batch or {}).get("end_time"))
    return ended


def _duration_seconds(job: Job) -> float | None:
    """The recorded duration of a finished job, or the one its timestamps imply."""
    if not job.status.terminal:
        return None
    if isinstance(job.duration_seconds, int | float) and not isinstance(job.duration_seconds, bool):
        return float(job.duration_seconds)
    created, ended = parse_time(job.created_at), _ended_at(job)
    if created is None or ended is None:
        return None
    return max(0.0, ended - created)


def _duration_text(job: Job, now: float) -> str:
    if job.status.terminal:
        return format_duration(_duration_seconds(job))
    created = parse_time(job.created_at)
    return "" if created is None else format_duration(max(0.0, now - created))


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------


def _count_text(job: Job) -> str:
    total = job.requests.total
    return f"{total:,}" if total else ""


def current_error(job: Job) -> Any:
    """The error to show for a job: the one that ended it, or one a task is still
    dealing with. A past error that was recovered from (a 429 on create, then the batch
    ran) is not the job's error: it stays in the job's error history (`errors`)."""
    if job.error is None or job.status is JobStatus.COMPLETED:
        return None
    if job.status.terminal:
        return job.error
    current = any(t.error is not None and "replaced_by" not in t.extra for t in job.tasks)
    return job.error if current else None


def _error_text(job: Job) -> str:
    error = current_error(job)
    if error is None:
        return ""
    message = _one_line(error.message)
    return f"{error.code}: {message}" if error.code else message


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def job_rows(jobs: Sequence[Job], now: float) -> list[list[RenderableType]]:
    """One row per job: input file, count, state, progress, created, ended, duration."""
    return [_row(job, now) for job in jobs]


def _row(job: Job, now: float) -> list[RenderableType]:
    return [
        Text(job.input_file or job.id),
        Text(_count_text(job)),
        state_label(job, now),
        Text(progress_text(job)),
        Text(_local_time(parse_time(job.created_at))),
        Text(_local_time(_ended_at(job))),
        Text(_duration_text(job, now)),
    ]


@dataclass(frozen=True)
class _Column:
    header: str
    justify: JustifyMethod = "left"
    drop: int | None = None  # narrow screens lose columns by this rank, 1 first; None: never
    flex: bool = False  # takes the room the others leave, shortened with an ellipsis
    style: str = ""


_ROW_COLUMNS = [
    _Column("Input File", flex=True),
    _Column("Count", "right", drop=3),
    _Column("State"),
    _Column("Progress", "right"),
    _Column("Created", drop=1),
    _Column("Ended", drop=2),
    _Column("Duration", "right", drop=4),
]
FLEX_MIN_WIDTH = 12


class _FitTable:
    """A table that fits the width it is given: it drops the least useful columns first,
    then shortens the flexible ones. With `wrap=False` no row ever takes two lines, so a
    live view keeps its height on any screen (a plain Rich table would squeeze every column,
    down to nothing)."""

    def __init__(
        self, columns: list[_Column], rows: list[list[RenderableType]], wrap: bool = False
    ) -> None:
        self.columns = columns
        self.rows = [[_as_text(cell) for cell in row] for row in rows]
        self.wrap = wrap

    def _natural(self, index: int) -> int:
        widths = [cell_len(self.columns[index].header)]
        widths += [max(map(cell_len, row[index].plain.splitlines() or [""])) for row in self.rows]
        return max(widths)

    def _table(self, kept: list[int], widths: dict[int, int], rows: bool = True) -> Table:
        table = Table(
            box=box.SIMPLE_HEAD,
            header_style="bold",
            show_edge=False,
            pad_edge=False,
            collapse_padding=True,
        )
        for index in kept:
            column = self.columns[index]
            table.add_column(
                column.header,
                justify=column.justify,
                style=column.style,
                width=widths[index],
                no_wrap=not (self.wrap and column.flex),
                overflow="fold" if self.wrap and column.flex else "ellipsis",
            )
        for row in self.rows if rows else []:
            table.add_row(*(row[index] for index in kept))
        return table

    def _overhead(self, console: Console, kept: list[int]) -> int:
        """Borders and padding: what a table of these columns adds to their widths."""
        ones = dict.fromkeys(kept, 1)
        options = console.options.update_width(10 * len(kept) + 100)
        table = self._table(kept, ones, rows=False)
        return Measurement.get(console, options, table).maximum - len(kept)

    def _fit(self, console: Console, width: int) -> Table:
        kept = list(range(len(self.columns)))
        natural = {index: self._natural(index) for index in kept}
        while True:
            flex = [i for i in kept if self.columns[i].flex]
            fixed = sum(natural[i] for i in kept if i not in flex)
            room = width - self._overhead(console, kept) - fixed
            needed = sum(min(natural[i], FLEX_MIN_WIDTH) for i in flex)
            droppable = [i for i in kept if self.columns[i].drop is not None]
            if room >= needed or not droppable:
                break
            kept.remove(min(droppable, key=lambda i: self.columns[i].drop or 0))
        widths = dict(natural)
        widths.update(_share(max(room, len(flex)), {i: natural[i] for i in flex}))
        return self._table(kept, widths)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self._fit(console, options.max_width)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        every = list(range(len(self.columns)))
        natural = {index: self._natural(index) for index in every}
        widest = Measurement.get(console, options, self._table(every, natural)).maximum
        return Measurement(min(widest, 40), widest).clamp(max_width=options.max_width)


def _share(room: int, wanted: dict[int, int]) -> dict[int, int]:
    """Split `room` among columns wanting `wanted` widths: the small ones get all they want,
    the others an equal share of what is left (at least 1 each)."""
    given: dict[int, int] = {}
    left = dict(wanted)
    while left:
        fair = room // len(left)
        small = {i: w for i, w in left.items() if w <= fair}
        if not small:
            for n, i in enumerate(sorted(left)):
                given[i] = max(1, fair + (1 if n < room % len(left) else 0))
            break
        for i, w in small.items():
            given[i] = w
            room -= w
            del left[i]
    return given


def _as_text(cell: RenderableType) -> Text:
    if isinstance(cell, Text):
        return cell
    return Text(str(cell))


def _visible(jobs: Sequence[Job], max_rows: int) -> tuple[list[Job], int, int]:
    """The jobs that fit: all of them, or the unfinished ones (ledger order) and then the
    most recently finished ones (shown in ledger order). Returns (shown, hidden unfinished,
    hidden finished)."""
    max_rows = max(1, max_rows)
    if len(jobs) <= max_rows:
        return list(jobs), 0, 0
    active = [i for i, job in enumerate(jobs) if not job.status.terminal]
    finished = [i for i, job in enumerate(jobs) if job.status.terminal]
    shown_active = active[:max_rows]
    room = max_rows - len(shown_active)
    by_recency = sorted(
        finished, key=lambda i: (_ended_at(jobs[i]) or float("-inf"), i), reverse=True
    )
    shown_finished = sorted(by_recency[:room])
    shown = [jobs[i] for i in shown_active + shown_finished]
    return shown, len(active) - len(shown_active), len(finished) - len(shown_finished)


def _hidden_line(hidden_active: int, hidden_finished: int) -> Text | None:
    if hidden_active:
        return Text(
            f"... and {hidden_active + hidden_finished:,} more jobs "
            f"({hidden_active:,} unfinished, {hidden_finished:,} finished)",
            style="dim",
        )
    if hidden_finished:
        return Text(f"... and {hidden_finished:,} more finished jobs", style="dim")
    return None


def _footer(jobs: Sequence[Job], info: CycleInfo, now: float) -> list[Text]:
    total = len(jobs)
    completed = sum(1 for job in jobs if job.status.terminal)
    remaining = total - completed
    pending = sum(remote_cleanup_pending(job) for job in jobs)
    errors = len(info.errors)
    parts: list[str | tuple[str, str]] = [
        "Total jobs: ",
        (str(total), "bold"),
        " | Completed: ",
        (str(completed), "bold green"),
        " | Remaining: ",
        (str(remaining), "bold yellow" if remaining else "bold"),
        " | Newly completed: ",
        (str(info.newly_completed), "bold cyan" if info.newly_completed else "bold"),
        " | Errors: ",
        (str(errors), "bold red" if errors else "bold"),
    ]
    if pending:
        parts += [" | Cleanup pending: ", (str(pending), "bold yellow")]
    if (remaining or pending) and not info.interrupted:
        if info.checking:
            parts += [" | ", ("Checking status...", "yellow")]
        elif info.next_poll_at is not None:
            wait = max(0, math.ceil(info.next_poll_at - now))
            parts += [" | Next poll: ", (format_duration(wait), "bold")]
    lines = [Text.assemble(*parts, no_wrap=True, overflow="ellipsis")]
    for label, message in info.errors[:MAX_ERROR_LINES]:
        lines.append(
            Text(f"✗ {label}: {_one_line(message)}", style="red", no_wrap=True, overflow="ellipsis")
        )
    if errors > MAX_ERROR_LINES:
        lines.append(Text(f"... and {errors - MAX_ERROR_LINES} more", style="red"))
    if info.interrupted:
        lines.append(Text("Interrupted: run `gembatch poll` again to resume.", style="bold yellow"))
    elif total == 0:
        lines.append(Text("No jobs in the ledger.", style="dim"))
    elif remaining == 0 and pending:
        lines.append(
            Text(
                f"Every job has ended; {pending} remote item(s) left to delete: retried "
                "until done (Ctrl-C: the next `gembatch poll` goes on)",
                style="yellow",
            )
        )
    elif remaining == 0:
        lines.append(Text("🎉 All jobs completed!", style="bold green"))
    return lines


def monitor_view(
    jobs: Sequence[Job],
    info: CycleInfo,
    now: float,
    title: str = "Gemini Batch Job Monitor",
    max_rows: int = MAX_ROWS,
) -> RenderableType:
    """The live view of `gembatch poll`: one panel (so Rich Live redraws it in place) with
    the job table, at most `max_rows` rows (fewer if the screen is shorter), and the
    footer."""
    return _MonitorView(list(jobs), info, now, title, max_rows)


@dataclass
class _MonitorView:
    """Lays the panel out for the screen it is drawn on. Rich Live crops what does not fit
    from the bottom, which is where the footer (countdown, errors) is: so table rows give
    way first, never the footer."""

    jobs: list[Job]
    info: CycleInfo
    now: float
    title: str
    max_rows: int

    def _panel(self, max_rows: int) -> Panel:
        shown, hidden_active, hidden_finished = _visible(self.jobs, max_rows)
        parts: list[RenderableType] = [_FitTable(_ROW_COLUMNS, job_rows(shown, self.now))]
        hidden = _hidden_line(hidden_active, hidden_finished)
        if hidden is not None:
            parts.append(hidden)
        parts.extend(_footer(self.jobs, self.info, self.now))
        return Panel(
            Group(*parts),
            title=Text(self.title, style="bold"),
            subtitle=Text(f"updated {_local_time(self.info.last_update)}", style="dim"),
            expand=True,  # a fixed width: the border does not jump as the footer changes
        )

    def _fit(self, console: Console, options: ConsoleOptions) -> Panel:
        height = options.height or options.size.height
        rows = max(1, self.max_rows)
        panel = self._panel(rows)
        for _ in range(3):  # one line per row: the second try fits unless the screen is tiny
            lines = len(console.render_lines(panel, options.update(height=None), pad=False))
            if lines <= height or rows == 1:
                break
            rows = max(1, min(rows, len(self.jobs)) - (lines - height))
            panel = self._panel(rows)
        return panel

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self._fit(console, options)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self._fit(console, options))


def status_table(jobs: Sequence[Job], now: float) -> RenderableType:
    """`gembatch status`: every job, with its id and priority (and its error, if any job
    has one); no footer. Long input names and errors wrap instead of being cut."""
    columns = [_Column("ID", style="dim"), *_ROW_COLUMNS]
    columns.insert(4, _Column("Priority", "right", drop=1))
    with_errors = any(current_error(job) is not None for job in jobs)
    if with_errors:
        columns.append(_Column("Error", flex=True, style="red"))
    rows: list[list[RenderableType]] = []
    for job in jobs:
        cells = [Text(job.id), *_row(job, now)]
        cells.insert(4, Text(str(job.priority)))
        if with_errors:
            cells.append(Text(_error_text(job)))
        rows.append(cells)
    return _FitTable(columns, rows, wrap=True)


def status_json(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """`gembatch status --json`: one object per job, in ledger order, JSON-ready."""
    return [
        {
            "id": job.id,
            "input_file": job.input_file,
            "status": job.status.value,
            "step": job.step.value if job.step else None,
            "progress": job.progress,
            "requests": job.requests.to_dict(),
            "priority": job.priority,
            "attempts": job.attempts,
            "tasks": [
                {
                    "index": task.index,
                    "attempt": task.attempt,
                    "state": task.state.value,
                    "batch_name": task.batch_name,
                    "remote_state": task.remote_state.value if task.remote_state else None,
                    "requests": task.requests.to_dict(),
                }
                for task in job.tasks
            ],
            "result_file": job.result_file,
            "error": error.to_dict() if (error := current_error(job)) else None,
            "error_count": len(job.errors),  # the history itself is in the ledger
            "create_outcome_unknown": sum(
                1 for t in job.tasks if t.state is TaskState.CREATE_UNKNOWN
            ),
            "remote_cleanup_pending": remote_cleanup_pending(job),
            "created_at": job.created_at,
            "completed_at": job.completed_at,
            "final_state": job.final_state,
            "duration_seconds": _json_seconds(_duration_seconds(job)),
        }
        for job in jobs
    ]


def _json_seconds(seconds: float | None) -> int | float | None:
    if seconds is None:
        return None
    return int(seconds) if float(seconds).is_integer() else round(seconds, 3)


# --------------------------------------------------------------------------------------
# Plain output (stdout is not a terminal)
# --------------------------------------------------------------------------------------


def _labels(jobs: Sequence[Job]) -> dict[str, str]:
    """job id -> its input file, with the id added where two jobs share an input file."""
    seen: dict[str, int] = {}
    for job in jobs:
        seen[job.input_file] = seen.get(job.input_file, 0) + 1
    return {
        job.id: job.input_file
        if job.input_file and seen[job.input_file] == 1
        else f"{job.input_file} [{job.id}]".lstrip()
        for job in jobs
    }


def _plain_line(job: Job, label: str, now: float) -> str:
    parts = [f"{label}:", _plain_state(job, now)]
    progress = progress_text(job)
    if progress:
        parts.append(progress)
    if job.status.terminal:
        duration = format_duration(_duration_seconds(job))
        if duration:
            parts.append(f"in {duration}")
    if job.status is JobStatus.COMPLETED and job.result_file:
        parts.append(f"-> {job.result_file}")
    error = _error_text(job)
    if error:
        parts.append(f"error: {error}")
    return " ".join(parts)


def summary_lines(jobs: Sequence[Job]) -> list[str]:
    """Totals by status, requests, results files and failures, as plain lines."""
    kinds = [_kind(job) for job in jobs]
    remaining = sum(1 for job in jobs if not job.status.terminal)
    finished = [
        f"{kinds.count(kind):,} {kind.value}"
        for kind in (_Kind.COMPLETED, _Kind.FAILED, _Kind.EXPIRED, _Kind.CANCELLED)
        if kind in kinds
    ]
    noun = "job" if len(jobs) == 1 else "jobs"
    lines = [f"{len(jobs):,} {noun}: " + ", ".join([*finished, f"{remaining:,} remaining"])]
    counts = [job.requests for job in jobs]
    total = sum(c.total for c in counts)
    if total:
        succeeded, failed = sum(c.succeeded for c in counts), sum(c.failed for c in counts)
        lines.append(f"requests: {succeeded:,} succeeded, {failed:,} failed of {total:,}")
    labels = _labels(jobs)
    for job in jobs:
        if job.status is JobStatus.COMPLETED and job.result_file:
            lines.append(f"results: {labels[job.id]} -> {job.result_file}")
    for job, kind in zip(jobs, kinds, strict=True):
        if kind in (_Kind.FAILED, _Kind.EXPIRED):
            error = _error_text(job)
            lines.append(f"{kind.value}: {labels[job.id]}" + (f": {error}" if error else ""))
    pending = sum(remote_cleanup_pending(job) for job in jobs)
    if pending:
        lines.append(
            f"remote cleanup pending: {pending} item(s) whose delete failed; "
            "`gembatch poll` retries them, `gembatch cleanup` deletes them now"
        )
    return lines


class PlainReporter:
    """One plain line per event, for logs and pipes: no colours, no redrawing."""

    def __init__(self, out: TextIO, clock: Callable[[], float] = time.time) -> None:
        self._out = out
        self._clock = clock
        self._seen: dict[str, tuple[Any, ...]] = {}
        self._told_interrupted = False

    def update(self, jobs: Sequence[Job], info: CycleInfo) -> None:
        """A line for each job whose status, step, requests done or error changed since the
        last call (every job on the first call), and one per error of the cycle."""
        now = self._clock()
        stamp = _local_time(now)
        labels = _labels(jobs)
        for job in jobs:
            unknown = any(t.state is TaskState.CREATE_UNKNOWN for t in job.tasks)
            key = (
                job.status,
                job.step,
                job.requests.done,
                _error_text(job),
                unknown,
                remote_cleanup_pending(job),
            )
            if self._seen.get(job.id) == key:
                continue
            self._seen[job.id] = key
            self._write(f"{stamp} {_plain_line(job, labels[job.id], now)}")
        for label, message in info.errors:
            self._write(f"{stamp} error: {label}: {_one_line(message)}")
        if info.interrupted and not self._told_interrupted:
            self._told_interrupted = True
            self._write(f"{stamp} interrupted: run `gembatch poll` again to resume")
        self._out.flush()

    def summary(self, jobs: Sequence[Job]) -> None:
        """The final lines: totals by status, results files, failures."""
        for line in summary_lines(jobs):
            self._write(line)
        self._out.flush()

    def _write(self, line: str) -> None:
        self._out.write(line + "\n")
