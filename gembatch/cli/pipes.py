"""A reader that goes away (`gembatch status | head -1`) ends the command quietly.

Why: Python ignores SIGPIPE, so a write after the reader left raises BrokenPipeError
wherever it happens, and each layer answers differently: Typer exits 1, Rich exits 1, a
command's own OSError handler prints "cannot write stdout: Broken pipe". Restoring
SIGPIPE's default would do what other Unix tools do, but it would also kill `serve` or
`poll` on any closed socket. So the entry point wraps stdout and stderr once: a write
that finds its pipe closed points the stream at /dev/null (nothing more is written, and
Python's final flush has nothing to complain about) and raises SystemExit(141), the
status a shell reports for a tool SIGPIPE ended. SystemExit passes every `except
OSError` and `except Exception` on its way out, and cleanups (`finally`, context
managers) still run.
"""

from __future__ import annotations

import os
import sys
from typing import Any

CLOSED_PIPE_EXIT = 128 + 13  # 128 + SIGPIPE


class ClosedPipeGuard:
    """A text stream (or its binary `buffer`) whose writes end the process quietly once
    the pipe behind it has no reader; everything else is the wrapped stream's."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, data: Any) -> Any:
        try:
            return self._stream.write(data)
        except BrokenPipeError:
            self._closed()

    def writelines(self, lines: Any) -> None:
        try:
            self._stream.writelines(lines)
        except BrokenPipeError:
            self._closed()

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._closed()

    @property
    def buffer(self) -> Any:
        return ClosedPipeGuard(self._stream.buffer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def _closed(self) -> None:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass  # no descriptor (a test's stream): nothing will flush into it later
        raise SystemExit(CLOSED_PIPE_EXIT)


def guard_standard_streams() -> None:
    """Wrap sys.stdout and sys.stderr (once) so that a reader going away ends the
    command with exit 141 and nothing on stderr."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, ClosedPipeGuard):
            setattr(sys, name, ClosedPipeGuard(stream))


def flush_standard_streams() -> None:
    """Flush now, while a closed pipe can still end the command quietly: the flush
    Python does at exit would print "Exception ignored ... BrokenPipeError"."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
