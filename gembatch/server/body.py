"""Client JSON, read with limits: the one reader of every JSON document the service accepts.

Why: Python's `json` loads a whole body into memory (a 27 MB body cost 277 MB), accepts
NaN, nests until RecursionError, builds integers of any size, and keeps unpaired UTF-16
surrogates; each of these became a 500, or a row the database could not hold or serve
back. Here a body is spooled to disk, then read as a stream of events by ijson's C parser,
with limits: at most MAX_DEPTH levels, integers within ±(2^63 - 1), finite numbers,
strings that are Unicode text, and outside the requests no NUL (PostgreSQL text cannot
hold it) and at most MAX_OPTIONS_BYTES. The `requests` array of a create body is never
built whole: each request is written, as it is read, as one line of the job's JSONL file.
A problem is a 422 (400 for what is not JSON at all) naming the field, e.g.
`["body", "metadata", "x"]`; nothing is left on disk.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

import ijson

MAX_DEPTH = 100  # nesting of a whole document (protobuf, behind Gemini, reads 100 levels)
MAX_INT = 2**63 - 1  # 64-bit integers: what most JSON readers (yajl too) can hold
MAX_OPTIONS_BYTES = 1024 * 1024  # everything but the requests, as multipart `options`
MAX_REQUESTS = 1_000_000
MAX_KEY_CHARS = 512
MAX_LISTED = 20
READ_SIZE = 256 * 1024

_HIGH = frozenset(b"89abAB")  # second hex digit of a high surrogate (D800-DBFF)
# An escape of a surrogate, with the backslashes before it (an odd run: the last one
# starts the escape), and the low surrogate escape right after it, if any.
_SURROGATE_ESCAPE = re.compile(
    rb"(\\+)u([dD][89a-fA-F][0-9a-fA-F]{2})(\\u[dD][c-fC-F][0-9a-fA-F]{2})?"
)
_TAIL = 12  # bytes after a backslash run that a match can need ("u" + 4 + "\u" + 4)


class BodyRefused(Exception):
    """The body cannot be accepted: `status` (400: not JSON; 422: JSON over a limit or of
    the wrong shape) and `detail` (a message, or FastAPI-style problems)."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def problem(loc: list[Any], msg: str, kind: str = "value_error") -> dict[str, Any]:
    return {"loc": loc, "msg": msg, "type": kind}


@dataclass(frozen=True)
class Spilled:
    """Where a requests array was: its `count` requests are lines of the JSONL file."""

    count: int


# -- unpaired surrogates, found on the raw bytes ----------------------------------------


class SurrogateGuard:
    """Finds escapes of unpaired UTF-16 surrogates (`"\\ud800"`) in JSON text as it streams.

    yajl (ijson's C parser) silently turns an unpaired high surrogate into "?", and such
    a string cannot be written as UTF-8 nor stored by PostgreSQL. `feed` returns the bytes
    with each one made invalid JSON (`\\u?d800`), so the parser stops right there and the
    error names the field; `found` keeps the first one for the message."""

    def __init__(self) -> None:
        self._carry = b""
        self._offset = 0  # of the carry's first byte in the whole text
        self.found: tuple[int, str] | None = None  # (byte offset, the escape)

    def feed(self, chunk: bytes) -> bytes:
        data = self._carry + chunk if self._carry else chunk
        if b"\\" not in data:
            self._offset += len(data)
            self._carry = b""
            return data
        safe = max(0, len(data) - _TAIL)
        while safe > 0 and data[safe - 1] == 0x5C:  # keep a backslash run whole
            safe -= 1
        out, cut = self._scan(data, safe)
        self._carry = data[cut:]
        self._offset += cut
        return out

    def finish(self) -> bytes:
        data, self._carry = self._carry, b""
        out, _ = self._scan(data, len(data))
        return out

    def _scan(self, data: bytes, limit: int) -> tuple[bytes, int]:
        """(data[:cut] with each unpaired escape spoiled, cut). Matches that start before
        `limit` are judged (each lies wholly inside `data`); the rest waits for more."""
        pieces: list[bytes] = []
        copied = done = 0
        for match in _SURROGATE_ESCAPE.finditer(data):
            if match.start() >= limit:
                break
            done = match.end()
            run = match.group(1)
            if len(run) % 2 == 0:
                continue  # an escaped backslash, then the letters "ud..."
            if match.group(2)[1] in _HIGH and match.group(3):
                continue  # a pair: one character
            at = match.start() + len(run)  # the "u"
            if self.found is None:
                self.found = (self._offset + at - 1, "\\u" + match.group(2).decode())
            pieces += [data[copied : at + 1], b"?"]
            copied = at + 1
        cut = max(limit, done)
        if not pieces:
            return data[:cut], cut
        pieces.append(data[copied:cut])
        return b"".join(pieces), cut


# -- reading a document ---------------------------------------------------------------------

_SCALARS = frozenset(("string", "number", "boolean", "null"))
_STARTS = frozenset(("start_map", "start_array"))
_PLAIN = frozenset(("string", "boolean", "null"))  # nothing to check in a request


class _Requests:
    """Where the requests go: each one, checked, as a JSONL line of `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self.problems: list[dict[str, Any]] = []
        self.omitted = 0
        self._out: IO[bytes] | None = None

    def write(self, item: Any, loc: list[Any]) -> None:
        self.count += 1
        if self.count > MAX_REQUESTS:
            raise BodyRefused(422, [problem(loc[:-1], f"at most {MAX_REQUESTS} requests per "
                                            "job: split them over several jobs")])  # fmt: skip
        if type(item) is not dict:
            self._problem(loc, 'each request must be an object {"key": ..., "request": {...}}')
            return
        key = item.get("key")
        if key is None:
            key = f"request-{self.count}"
        elif type(key) is str and not 1 <= len(key) <= MAX_KEY_CHARS:
            self._problem([*loc, "key"], f"a key has 1 to {MAX_KEY_CHARS} characters")
        for name in item:
            if name not in ("key", "request"):
                self._problem([*loc, name], "Extra inputs are not permitted", "extra_forbidden")
        request = item.get("request")
        if type(request) is not dict:
            missing = "request" not in item
            found, kind = ("missing", "missing") if missing else ("not an object", "dict_type")
            message = f'"request" (a GenerateContentRequest) is {found}'
            self._problem([*loc, "request"], message, kind)
            return
        if self.problems or self.omitted:
            return  # refused anyway: only look for more problems
        if self._out is None:
            self._out = open(self.path, "wb", buffering=1024 * 1024)  # noqa: SIM115
        line = json.dumps({"key": key, "request": request}, ensure_ascii=False)
        self._out.write(line.encode("utf-8"))
        self._out.write(b"\n")

    def _problem(self, loc: list[Any], msg: str, kind: str = "value_error") -> None:
        if len(self.problems) < MAX_LISTED:
            self.problems.append(problem(loc, msg, kind))
        else:
            self.omitted += 1

    def close(self) -> None:
        if self._out is not None:
            self._out.close()


class _Reader:
    """One pass over a document's events. `requests_at`: the keys leading to the requests
    array (("requests",) in a create body, ("data", "requests") in `/job-operations`)."""

    def __init__(
        self,
        events: Iterator[tuple[str, Any]],
        loc: list[Any],
        requests_at: tuple[str, ...] = (),
        requests: _Requests | None = None,
    ) -> None:
        self.events = events
        self.loc = loc
        self.requests_at = requests_at
        self.requests = requests
        self.budget = MAX_OPTIONS_BYTES
        # The value being built, for naming where a problem is: containers from the
        # outside in, and the key being filled in each object.
        self.prefix: list[Any] = list(loc)
        self.stack: list[Any] = []
        self.keys: list[Any] = []

    def where(self) -> list[Any]:
        path = list(self.prefix)
        innermost = len(self.stack) - 1
        for level, (container, key) in enumerate(zip(self.stack, self.keys, strict=True)):
            if type(container) is list:  # an open child is its last element
                path.append(len(container) - (level < innermost))
            else:
                path.append(key)
        return path

    def document(self) -> Any:
        event, value = next(self.events)
        if event == "start_map" and self.requests_at:
            return self._object(0)
        return self._value(event, value, 0, nul=False)

    def _object(self, level: int) -> dict[str, Any]:
        """An object on the way to the requests array (its start already read)."""
        result: dict[str, Any] = {}
        seen_requests = False
        for event, value in self.events:
            if event == "end_map":
                return result
            key = self._key(value)
            self.prefix.append(key)
            event, value = next(self.events)
            if key == self.requests_at[level] and event in _STARTS:
                if level + 1 < len(self.requests_at):
                    result[key] = self._object(level + 1) if event == "start_map" else (
                        self._value(event, value, level + 1, nul=False))  # fmt: skip
                elif event == "start_array":
                    if seen_requests:
                        raise BodyRefused(422, [problem(self.where(), "given twice")])
                    seen_requests = True
                    result[key] = self._spill(level + 2)
                else:
                    result[key] = self._value(event, value, level + 1, nul=False)
            else:
                result[key] = self._value(event, value, level + 1, nul=False)
            self.prefix.pop()
        raise BodyRefused(400, "the body must be JSON: it ends inside an object")

    def _spill(self, depth: int) -> Spilled:
        """The requests array (its start already read): each element to the JSONL file."""
        assert self.requests is not None
        for index, (event, value) in enumerate(self.events):
            if event == "end_array":
                return Spilled(index)
            self.prefix.append(index)
            item = self._value(event, value, depth, nul=True)
            self.requests.write(item, list(self.prefix))
            self.prefix.pop()
        raise BodyRefused(400, "the body must be JSON: it ends inside the requests")

    def _key(self, key: str) -> str:
        if "\x00" in key:
            raise BodyRefused(422, [problem(self.where(), "a name contains NUL (\\u0000)")])
        self.budget -= len(key) + 8
        return key

    def _value(self, event: str, value: Any, depth: int, *, nul: bool) -> Any:
        """One whole value from its first event. `nul`: a request (its strings may hold
        NUL: requests go to a file, not the database); otherwise the value counts against
        the budget. The hot loop of a big body: one branch per event, no calls."""
        if event in _SCALARS:
            return self._scalar(event, value, nul)
        if depth + 1 > MAX_DEPTH:
            raise BodyRefused(422, [problem(self.where(), _TOO_DEEP)])
        if event not in _STARTS:  # pragma: no cover - ijson only starts values so
            raise BodyRefused(400, "the body must be JSON")
        root: Any = {} if event == "start_map" else []
        stack, keys = self.stack, self.keys
        base = len(stack)
        limit = base + MAX_DEPTH - depth  # the stack may hold this many containers
        stack.append(root)
        keys.append(None)
        parent, in_list = root, type(root) is list
        scalar = self._scalar
        for event, value in self.events:
            if event == "map_key":
                keys[-1] = value if nul else self._key(value)
            elif event in _PLAIN and nul:
                if in_list:
                    parent.append(value)
                else:
                    parent[keys[-1]] = value
            elif event in _SCALARS:
                value = scalar(event, value, nul)
                if in_list:
                    parent.append(value)
                else:
                    parent[keys[-1]] = value
            elif event in _STARTS:
                if len(stack) >= limit:
                    raise BodyRefused(422, [problem(self.where(), _TOO_DEEP)])
                new: Any = {} if event == "start_map" else []
                if in_list:
                    parent.append(new)
                else:
                    parent[keys[-1]] = new
                stack.append(new)
                keys.append(None)
                parent, in_list = new, event == "start_array"
            else:  # an end
                stack.pop()
                keys.pop()
                if len(stack) == base:
                    return root
                parent = stack[-1]
                in_list = type(parent) is list
        raise BodyRefused(400, "the body must be JSON: it ends inside a value")

    def _scalar(self, event: str, value: Any, nul: bool) -> Any:
        if event == "number":
            if type(value) is float and not math.isfinite(value):
                raise BodyRefused(422, [problem(self.where(), "a number out of range")])
            if type(value) is int and not -MAX_INT <= value <= MAX_INT:
                raise BodyRefused(422, [problem(self.where(), _BIG_INT)])
        elif event == "string" and not nul:
            if "\x00" in value:
                raise BodyRefused(422, [problem(self.where(), "contains NUL (\\u0000), which "
                                                "cannot be stored; remove it")])  # fmt: skip
            self.budget -= len(value)
        if not nul:
            self.budget -= 8
            if self.budget < 0:
                raise BodyRefused(422, [problem(self.where(), _TOO_BIG)])
        return value


_TOO_DEEP = f"nested deeper than {MAX_DEPTH} levels"
_BIG_INT = f"an integer beyond ±{MAX_INT} (2^63 - 1); send big numbers as strings"
_TOO_BIG = (
    f"everything but the requests must fit in {MAX_OPTIONS_BYTES // 1024} KiB; keep large "
    "data in the requests or elsewhere"
)
_CONSTANT = re.compile(r"\b(NaN|-?Infinity)\b")


def read(
    source: BinaryIO,
    *,
    guard: SurrogateGuard | None = None,
    loc: tuple[Any, ...] = ("body",),
    requests_at: tuple[str, ...] = (),
    requests_file: Path | None = None,
) -> Any:
    """The document in `source` (JSON text whose unpaired surrogates `guard` has already
    spoiled), read with the limits above. With `requests_at`, the array found at those
    keys is written to `requests_file` as JSONL (a `Spilled` takes its place); a problem
    in a request raises only after the whole array was read, listing up to 20. Raises
    BodyRefused; removes `requests_file` when it does."""
    requests = _Requests(requests_file) if requests_file is not None else None
    events = ijson.basic_parse(source, use_float=True, buf_size=READ_SIZE)
    reader = _Reader(events, list(loc), requests_at, requests)
    try:
        try:
            document = reader.document()
            for _ in events:  # trailing data: yajl says what is wrong with it
                raise BodyRefused(400, "the body must be one JSON document")
        except (ijson.JSONError, UnicodeDecodeError, StopIteration) as exc:
            raise _not_json(exc, reader.where(), guard) from None
        if requests is not None and (requests.problems or requests.omitted):
            extra = requests.omitted
            listed = requests.problems + (
                [problem(list(loc), f"... and {extra} more problems")] if extra else []
            )
            raise BodyRefused(422, listed)
        if guard is not None and guard.found is not None:  # pragma: no cover - see guard
            raise BodyRefused(422, [problem(list(loc), _surrogate(guard))])
    except BaseException:
        if requests is not None:
            requests.close()
            requests.path.unlink(missing_ok=True)
        raise
    if requests is not None:
        requests.close()
    return document


def read_bytes(data: bytes, loc: tuple[Any, ...] = ("body",)) -> Any:
    """A small document held in memory (multipart `options`, `/job-operations` without
    requests), with the same limits."""
    import io

    guard = SurrogateGuard()
    text = guard.feed(data) + guard.finish()
    return read(io.BytesIO(text), guard=guard, loc=loc)


def _not_json(exc: BaseException, loc: list[Any], guard: SurrogateGuard | None) -> BodyRefused:
    if isinstance(exc, StopIteration):
        return BodyRefused(400, "the body must be JSON: it is empty")
    if isinstance(exc, UnicodeDecodeError):
        return BodyRefused(400, "the body must be UTF-8 JSON: it has bytes that are not UTF-8")
    text = exc.args[0] if exc.args else ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = str(text)
    first = text.splitlines()[0] if text else type(exc).__name__
    if guard is not None and guard.found is not None and "after '\\u'" in text:
        return BodyRefused(422, [problem(loc, _surrogate(guard))])
    if "integer overflow" in first:
        return BodyRefused(422, [problem(loc, _BIG_INT)])
    if "floating point" in first and "overflow" in first:
        return BodyRefused(422, [problem(loc, "a number beyond the range of a double "
                                         "(about 1.8e308)")])  # fmt: skip
    if "invalid bytes in UTF8" in first:
        return BodyRefused(400, "the body must be UTF-8 JSON: it has bytes that are not UTF-8")
    if ("invalid char" in first or "malformed number" in first) and _CONSTANT.search(text):
        return BodyRefused(422, [problem(loc, "NaN and Infinity are not JSON numbers: send "
                                         "null, or the value as a string")])  # fmt: skip
    if "premature EOF" in first:
        return BodyRefused(400, "the body must be JSON: it ends before the document does")
    return BodyRefused(400, f"the body must be JSON: {first}")


def _surrogate(guard: SurrogateGuard) -> str:
    assert guard.found is not None
    offset, escape = guard.found
    return (
        f"{escape} (at byte {offset}) is half of a UTF-16 surrogate pair, not a character: "
        "send the whole pair, or the character itself in UTF-8"
    )


# -- spooling a request body --------------------------------------------------------------


async def spool(chunks: AsyncIterator[bytes], directory: Path) -> tuple[Path, SurrogateGuard]:
    """The body, streamed to a hidden file in `directory` (through a SurrogateGuard);
    removed again if reading it fails (the client went away, the body is over the limit)."""
    import tempfile

    guard = SurrogateGuard()
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed below
        dir=directory, prefix=".body-", delete=False
    )
    path = Path(handle.name)
    try:
        with handle:
            async for chunk in chunks:
                handle.write(guard.feed(chunk))
            handle.write(guard.finish())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, guard


def read_spooled(
    path: Path,
    guard: SurrogateGuard,
    *,
    requests_at: tuple[str, ...],
    requests_file: Path,
    loc: tuple[Any, ...] = ("body",),
) -> Any:
    """`read` of a spooled body; the spool is removed whatever happens."""
    try:
        with open(path, "rb") as source:
            return read(
                source, guard=guard, loc=loc, requests_at=requests_at, requests_file=requests_file
            )
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def walk_problems(detail: Any, transform: Callable[[list[Any]], list[Any]]) -> Any:
    """`detail` with each problem's `loc` passed through `transform`."""
    if not isinstance(detail, list):
        return detail
    return [{**p, "loc": transform(p["loc"])} if isinstance(p, dict) and "loc" in p else p
            for p in detail]  # fmt: skip
