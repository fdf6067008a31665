"""`gembatch poll` in a real terminal (tmux) against a real emulator process (seed 000).

Why: the live table's promises (one table redrawn at a fixed position, no scrolling log, a
footer with totals and a countdown, a clean Ctrl-C that a second `poll` resumes from) are
about what a person sees on a screen. Rendering tests cannot see cursor movement, so these
run the real command in a tmux pane and read the pane, as a person would; the last test
checks the other side: with stdout a pipe, plain lines and no escape sequences.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gembatch.emulator.process import EmulatorProcess
from tests.conftest import write_requests

TMUX = shutil.which("tmux")
GEMBATCH = [sys.executable, "-m", "gembatch"]
NAMES = ("a.jsonl", "b.jsonl", "c.jsonl")
KEYS = {"k1", "k2", "k3"}
TITLE = "Gemini Batch Job Monitor"
WIDTH, HEIGHT = 160, 50
LIVE_CLOCK = {"clock": {"pending_seconds": 1.0, "running_seconds": 6.0}}
SLOW_CLOCK = {"clock": {"pending_seconds": 1.0, "running_seconds": 20.0}}
PLAIN_CLOCK = {"clock": {"pending_seconds": 0.5, "running_seconds": 3.0}}
EXIT_LINE = re.compile(r"^EXIT=(\d+)\s*$", re.MULTILINE)
PLAIN_EVENT = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ([abc]\.jsonl): (.+)$")


# --------------------------------------------------------------------------------------
# A tmux server of our own
# --------------------------------------------------------------------------------------


class Tmux:
    """One detached session on a private tmux server (its own socket: the user's tmux,
    if any, is never touched)."""

    def __init__(self, socket: Path, session: str = "s") -> None:
        self.socket = socket
        self.session = session
        self.last_screen = ""

    def tmux(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert TMUX is not None
        return subprocess.run(
            [TMUX, "-S", str(self.socket), *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=15,
            # Run from inside tmux, $TMUX would make tmux refuse to nest a new session.
            env={k: v for k, v in os.environ.items() if k != "TMUX"},
        )

    def start(self, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
        """Run `argv` in a fresh WIDTH x HEIGHT pane, then print `EXIT=<code>` and keep the
        pane open so the screen can still be read after the command ended."""
        # COLUMNS/LINES would override the pane's real size in Rich: drop them.
        command = " ".join(
            [
                "env -u COLUMNS -u LINES",
                *(shlex.quote(f"{key}={value}") for key, value in env.items()),
                shlex.join(argv),
                "; echo EXIT=$?; sleep 600",
            ]
        )
        self.tmux(
            "new-session", "-d", "-s", self.session,
            "-x", str(WIDTH), "-y", str(HEIGHT), "-c", str(cwd), command,
        )  # fmt: skip

    def screen(self) -> str:
        self.last_screen = self.tmux("capture-pane", "-p", "-t", self.session).stdout
        return self.last_screen

    def send_keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.session, *keys)

    def wait_for(self, predicate: Callable[[str], Any], timeout: float, what: str) -> str:
        """The first screen for which `predicate` holds; fails with the last screen."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if predicate(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{what}: not on screen within {timeout} s; last screen:\n{screen}"
                )
            time.sleep(0.2)

    def exit_code(self, timeout: float) -> tuple[int, str]:
        screen = self.wait_for(EXIT_LINE.search, timeout, "EXIT=<code>")
        match = EXIT_LINE.search(screen)
        assert match is not None
        return int(match.group(1)), screen

    def kill(self) -> None:
        self.tmux("kill-server", check=False)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    if TMUX is None:
        pytest.skip("tmux not installed: these tests drive `gembatch poll` in a real terminal")
    # A short directory of its own: a socket path must stay under ~100 characters.
    socket_dir = Path(tempfile.mkdtemp(prefix="gbtmux-"))
    session = Tmux(socket_dir / "sock")
    try:
        yield session
    finally:
        session.kill()
        shutil.rmtree(socket_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def workdir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    for name in NAMES:
        write_requests(work / name, [f"{name} question {i}" for i in range(1, 4)])
    return work


def gembatch_argv(work: Path, *args: str) -> list[str]:
    return [*GEMBATCH, "--job-info", str(work / "job-info.jsonl"), *args]


def run_gembatch(
    work: Path, emu: EmulatorProcess, *args: str, timeout: float = 45
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **emu.client_env()}
    for name in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(name, None)
    return subprocess.run(
        gembatch_argv(work, *args),
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def submit_all(work: Path, emu: EmulatorProcess) -> None:
    done = run_gembatch(work, emu, "submit", *NAMES)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in NAMES:
        assert f"{name}: submitted batches/" in done.stdout, done.stdout


def start_poll(tmux: Tmux, work: Path, emu: EmulatorProcess) -> None:
    tmux.start(gembatch_argv(work, "poll", "--interval", "1"), work, emu.client_env())


def assert_results(work: Path, names: tuple[str, ...] = NAMES) -> None:
    """One result line per input key, each a JSON object with its key."""
    for name in names:
        lines = (work / "results" / name).read_text(encoding="utf-8").splitlines()
        keys = [json.loads(line)["key"] for line in lines]
        assert sorted(keys) == sorted(KEYS), (name, keys)


def ledger_records(work: Path) -> list[dict[str, Any]]:
    text = (work / "job-info.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class Frame:
    """One capture of the pane, cut into the live panel and what is above and below it."""

    def __init__(self, screen: str) -> None:
        self.lines = screen.split("\n")
        tops = [i for i, line in enumerate(self.lines) if TITLE in line]
        assert len(tops) <= 1, "the panel is drawn more than once:\n" + screen
        self.top = tops[0] if tops else None
        self.bottom = None
        if self.top is not None:
            self.bottom = next(
                (i for i in range(self.top, len(self.lines)) if self.lines[i].startswith("╰")),
                None,
            )
        self.header = next((i for i, line in enumerate(self.lines) if "Input File" in line), None)
        self.text = screen

    @property
    def complete(self) -> bool:
        """The whole panel is on screen (a capture may land in the middle of a redraw)."""
        return (
            self.top is not None
            and self.bottom is not None
            and self.header is not None
            and any("Total jobs:" in line for line in self.panel)
        )

    @property
    def panel(self) -> list[str]:
        if self.top is None or self.bottom is None:
            return []
        return self.lines[self.top : self.bottom + 1]

    @property
    def below(self) -> list[str]:
        return [] if self.bottom is None else self.lines[self.bottom + 1 :]

    def row(self, name: str) -> str:
        rows = [line for line in self.panel if name in line]
        assert len(rows) == 1, (name, self.text)
        return rows[0]

    def row_index(self, name: str) -> int:
        return next(i for i, line in enumerate(self.lines) if name in line)


# --------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------


def test_poll_redraws_one_table_in_place_until_every_job_succeeds(
    tmp_path: Path, emulator_factory: Callable[..., EmulatorProcess], tmux: Tmux
) -> None:
    emu = emulator_factory(LIVE_CLOCK)
    work = workdir(tmp_path)
    submit_all(work, emu)
    start_poll(tmux, work, emu)

    frames: list[Frame] = []
    deadline = time.monotonic() + 40
    while True:
        screen = tmux.screen()
        if EXIT_LINE.search(screen):
            break
        if TITLE in screen:
            frames.append(Frame(screen))
        assert time.monotonic() < deadline, "poll did not finish:\n" + screen
        time.sleep(0.25)
    final = Frame(screen)
    assert "Traceback" not in screen, screen
    assert EXIT_LINE.search(screen).group(1) == "0", screen  # type: ignore[union-attr]
    # The table left on screen is the last frame (on a loaded machine the captures may
    # all land before the last jobs succeeded).
    frames.append(final)

    complete = [f for f in frames if f.complete]
    # Live for ~7 s, captured every 0.25 s: plenty of whole frames while jobs run.
    assert len(complete) >= 5, f"only {len(complete)} whole frames captured"
    live = [f for f in complete if "All jobs completed" not in f.text]
    assert len(live) >= 3, f"only {len(live)} frames while jobs were running"

    # Columns, and a fixed position: the header, the title and each row never move.
    header = complete[0].lines[complete[0].header]  # type: ignore[index]
    for column in ("Input File", "Count", "State", "Progress"):
        assert column in header, header
    assert {f.top for f in complete} == {complete[0].top}, "the panel moved"
    assert {f.header for f in complete} == {complete[0].header}, "the header moved"
    for name in NAMES:
        assert {f.row_index(name) for f in complete} == {complete[0].row_index(name)}, name

    # No scrolling log: while jobs run, each file is on exactly one line of the whole
    # screen, and nothing is printed above or below the panel.
    for frame in frames:  # torn frames too: a redraw may blank a row, never add one
        if "All jobs completed" in frame.text:
            continue
        for name in NAMES:
            count = sum(name in line for line in frame.lines)
            assert count <= 1, f"{name} on {count} lines:\n{frame.text}"
    for frame in live:
        for name in NAMES:
            assert sum(name in line for line in frame.lines) == 1, (name, frame.text)
        assert not any(line.strip() for line in frame.lines[: frame.top]), frame.text
        assert not any(line.strip() for line in frame.below), frame.text

    # The footer: totals always, the countdown between cycles.
    assert all("Total jobs: 3" in f.text for f in complete)
    assert any(re.search(r"Next poll: \d+s", f.text) for f in live), "no countdown seen"

    # States: running (queued remotely or processing) first, then ✓ Success, never back.
    for name in NAMES:
        states = [f.row(name) for f in complete]
        assert "⏳" in states[0] or "⏸" in states[0], states[0]
        first_success = next(i for i, row in enumerate(states) if "✓ Success" in row)
        assert first_success > 0, f"{name} never seen running"
        assert all("✓ Success" in row for row in states[first_success:]), states
        assert "3/3" in states[-1], states[-1]

    # The end: the last frame stays, then the summary below it; exit code 0.
    assert final.complete, screen
    for name in NAMES:
        assert "✓ Success" in final.row(name), screen
    assert "Completed: 3 | Remaining: 0" in screen, screen
    assert "All jobs completed!" in screen, screen
    assert "3 jobs: 3 completed" in screen, screen
    for name in NAMES:
        assert f"{name} -> {work / 'results' / name}" in screen, screen
    assert_results(work)


def test_ctrl_c_stops_cleanly_and_poll_resumes(
    tmp_path: Path, emulator_factory: Callable[..., EmulatorProcess], tmux: Tmux
) -> None:
    emu = emulator_factory(SLOW_CLOCK)
    work = workdir(tmp_path)
    submit_all(work, emu)
    start_poll(tmux, work, emu)

    # Wait until a cycle has seen the batches running, then press Ctrl-C.
    tmux.wait_for(lambda s: "processing" in s and "Total jobs: 3" in s, 20, "jobs running")
    tmux.send_keys("C-c")
    code, screen = tmux.exit_code(timeout=15)

    assert code == 130, screen
    assert "Traceback" not in screen, screen
    assert "interrupted" in screen.lower(), screen
    assert "run the same command again to resume" in screen, screen
    assert screen.count(TITLE) == 1, screen
    assert "✓ Success" not in screen, "the jobs finished before Ctrl-C: the clock is too fast"

    # Nothing half-written: the ledger parses, no temp files, no results for unfinished jobs.
    records = ledger_records(work)
    assert {r["input_file"] for r in records} == set(NAMES)
    assert all(r["status"] != "completed" for r in records), records
    assert not list(work.rglob("*.tmp")), list(work.rglob("*.tmp"))
    for name in NAMES:
        assert not (work / "results" / name).exists(), name

    # Running poll again (stdout a pipe) resumes to the end, submitting nothing twice.
    resumed = run_gembatch(work, emu, "poll", "--interval", "1")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "Traceback" not in resumed.stderr, resumed.stderr
    assert_results(work)
    assert not list(work.rglob("*.tmp")), list(work.rglob("*.tmp"))
    assert all(r["status"] == "completed" for r in ledger_records(work))
    stats = emu.stats()
    creates = stats["creates_by_display_name"]
    assert len(creates) == len(NAMES), creates
    assert set(creates.values()) == {1}, creates
    assert stats["batches_created"] == len(NAMES), stats


def test_ctrl_c_leaves_the_table_saying_interrupted(
    tmp_path: Path, emulator_factory: Callable[..., EmulatorProcess], tmux: Tmux
) -> None:
    emu = emulator_factory(SLOW_CLOCK)
    work = workdir(tmp_path)
    submit_all(work, emu)
    start_poll(tmux, work, emu)
    tmux.wait_for(lambda s: "processing" in s and "Total jobs: 3" in s, 20, "jobs running")
    tmux.send_keys("C-c")
    code, screen = tmux.exit_code(timeout=15)
    assert code == 130, screen
    panel = "\n".join(Frame(screen).panel)
    assert "Interrupted" in panel, screen
    assert "Next poll" not in panel and "Checking status" not in panel, screen


def test_poll_without_a_terminal_prints_plain_lines(
    tmp_path: Path, emulator_factory: Callable[..., EmulatorProcess]
) -> None:
    emu = emulator_factory(PLAIN_CLOCK)
    work = workdir(tmp_path)
    submit_all(work, emu)

    done = run_gembatch(work, emu, "poll", "--interval", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "\x1b[" not in out and "\x1b[" not in done.stderr, repr(out)
    assert "\r" not in out, repr(out)
    assert not set("╭╰│─") & set(out), out
    assert TITLE not in out, out

    lines = out.splitlines()
    assert all(line.strip() for line in lines), out
    events = [PLAIN_EVENT.match(line) for line in lines]
    events_by_file: dict[str, list[str]] = {name: [] for name in NAMES}
    for match in events:
        if match:
            events_by_file[match.group(1)].append(match.group(2))
    for name, seen in events_by_file.items():
        # One line per event: a line only when something changed, never the same twice.
        assert seen, f"no event for {name}:\n{out}"
        assert all(a != b for a, b in itertools.pairwise(seen)), (name, seen)
        completed = [e for e in seen if e.startswith("completed")]
        assert len(completed) == 1, (name, seen)
        assert seen[-1] == completed[0], (name, seen)
        assert completed[0].startswith("completed 3/3 in "), completed
        assert completed[0].endswith(f"-> {work / 'results' / name}"), completed
    # Event lines first, then the summary.
    first_summary = next(i for i, m in enumerate(events) if m is None)
    assert all(m is None for m in events[first_summary:]), out
    summary = lines[first_summary:]
    assert summary[0] == "3 jobs: 3 completed, 0 remaining", out
    assert "requests: 9 succeeded, 0 failed of 9" in summary, out
    for name in NAMES:
        assert f"results: {name} -> {work / 'results' / name}" in summary, out
    assert_results(work)
