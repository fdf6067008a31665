"""Request files: validated, hashed and split into tasks in one pass, then read back by range.

Why: a bad line found by Gemini costs an upload, a wait and a failed batch, and a file over
the 2 GB input limit fails outright. So each file is checked line by line (naming file:line
and the fix) while it is hashed and cut into tasks, byte ranges of whole lines that uploads
and retries then read in place, never copying or loading the file.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import os
import re
import stat
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from json.scanner import make_scanner
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from gembatch import fsutil
from gembatch.errors import UserError

StrPath = str | os.PathLike[str]

BLOCK_SIZE = 8 * 1024 * 1024  # big reads: per-call overhead vanishes, memory stays flat
MAX_LISTED = 20
_UTF8_BOM = b"\xef\xbb\xbf"
_OTHER_BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}


# -- results of validation -------------------------------------------------------------


@dataclass(frozen=True)
class InputProblem:
    """One thing wrong with an input file, with where it is and what to do."""

    path: str  # as the user wrote it
    line: int | None  # 1-based, counting blank lines
    message: str

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.message}"


class InputInvalid(UserError):
    """The input cannot be submitted; `problems` says where and why (nothing was uploaded)."""

    def __init__(self, problems: Sequence[InputProblem], omitted: int = 0) -> None:
        self.problems = list(problems)
        self.omitted = omitted  # problems found but not kept (beyond each file's limit)
        super().__init__(_describe_problems(self.problems, omitted))

    def __reduce__(self) -> tuple[Any, ...]:  # from a validating worker process
        return (type(self), (self.problems, self.omitted))

    @property
    def total(self) -> int:
        return len(self.problems) + self.omitted


def _describe_problems(problems: Sequence[InputProblem], omitted: int) -> str:
    total = len(problems) + omitted
    noun = "problem" if total == 1 else "problems"
    lines = [f"the input has {total} {noun}; nothing was submitted. Fix and run again:"]
    lines += [f"  {problem}" for problem in problems[:MAX_LISTED]]
    rest = total - min(len(problems), MAX_LISTED)
    if rest:
        lines.append(f"  ... and {rest} more")
    return "\n".join(lines)


@dataclass(frozen=True)
class SplitLimits:
    """When a file becomes several tasks (remote batches); `None` means no limit."""

    max_bytes: int = 1_900_000_000  # Gemini's input file limit is 2 GB
    max_requests: int | None = None
    max_tokens: int | None = None  # estimated, see estimate_tokens

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_requests", "max_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer, not {value!r}")


@dataclass(frozen=True)
class TaskPlan:
    """One task's share of a file: the whole lines in bytes [start, end)."""

    start: int
    end: int
    count: int
    size_bytes: int
    estimated_tokens: int


@dataclass(frozen=True)
class ValidatedInput:
    path: Path  # absolute, resolved
    display: str  # as given by the user
    size_bytes: int
    sha256: str
    count: int
    estimated_tokens: int
    tasks: list[TaskPlan] = field(default_factory=list)


# -- checking one parsed line (pure) ---------------------------------------------------

# GenerateContentRequest's top-level fields, in both spellings the API accepts.
KNOWN_REQUEST_FIELDS = frozenset(
    {
        "model",
        "contents",
        "tools",
        "toolConfig",
        "tool_config",
        "safetySettings",
        "safety_settings",
        "systemInstruction",
        "system_instruction",
        "generationConfig",
        "generation_config",
        "cachedContent",
        "cached_content",
        "labels",
    }
)

# GenerationConfig fields people put one level too high (the SDK's flat `config` invites it).
_GENERATION_CONFIG_FIELDS = frozenset(
    {
        "temperature",
        "topP",
        "top_p",
        "topK",
        "top_k",
        "candidateCount",
        "candidate_count",
        "maxOutputTokens",
        "max_output_tokens",
        "stopSequences",
        "stop_sequences",
        "responseMimeType",
        "response_mime_type",
        "responseSchema",
        "response_schema",
        "responseJsonSchema",
        "response_json_schema",
        "thinkingConfig",
        "thinking_config",
        "responseModalities",
        "response_modalities",
        "seed",
        "presencePenalty",
        "presence_penalty",
        "frequencyPenalty",
        "frequency_penalty",
        "responseLogprobs",
        "response_logprobs",
        "logprobs",
        "speechConfig",
        "speech_config",
        "mediaResolution",
        "media_resolution",
        "imageConfig",
        "image_config",
    }
)

_RENAMES = {
    "system_instructions": "system_instruction",
    "systemInstructions": "systemInstruction",
    "system": "system_instruction",
    "system_prompt": "system_instruction",
    "systemPrompt": "systemInstruction",
    "tool": "tools",
    "safety_setting": "safety_settings",
    "safetySetting": "safetySettings",
    "generation_configs": "generation_config",
    "messages": "contents",
    "content": "contents",
}


def check_record(record: Any) -> tuple[str | None, tuple[str, ...]]:
    """The key of one parsed input line (None if unusable) and what is wrong with it."""
    if not isinstance(record, dict):
        return None, (_not_an_object(record),)
    problems: list[str] = []
    key = record.get("key")
    if key is None or "key" not in record:
        problems.append(_missing_key(record))
        key = None
    elif not isinstance(key, str) or not key:
        problems.append(_bad_key(key))
        key = None
    request = record.get("request")
    if "request" not in record:
        problems.append(_missing_request(record))
    elif not isinstance(request, dict):
        problems.append(
            f'"request" must be a JSON object (a GenerateContentRequest), found {_kind(request)}'
        )
    else:
        problems.extend(check_request(request))
    return key, tuple(problems)


def check_request(request: dict[str, Any]) -> list[str]:
    """What is wrong with one GenerateContentRequest object (empty when nothing)."""
    problems: list[str] = []
    contents = request.get("contents")
    stand_in = ""
    if not isinstance(contents, list) or not contents:
        stand_in = _contents_stand_in(request)
        problems.append(_bad_contents(request, stand_in))
    if not KNOWN_REQUEST_FIELDS.issuperset(request):
        problems.extend(
            _unknown_field(name)
            for name in request
            if name not in KNOWN_REQUEST_FIELDS and name != stand_in
        )
    return problems


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")


def _not_an_object(value: Any) -> str:
    found = _kind(value)
    hint = ""
    if isinstance(value, list):
        hint = " (JSONL has one request object per line, not a JSON array)"
    return f'expected a JSON object like {{"key": "k1", "request": {{...}}}}, found {found}{hint}'


def _missing_key(record: dict[str, Any]) -> str:
    if "custom_id" in record:
        return (
            'missing "key" ("custom_id", "method", "body" is OpenAI\'s batch format); Gemini '
            'lines are {"key": "k1", "request": {"contents": [...]}}'
        )
    return 'missing "key": give every line a unique string "key" to match its result to it'


def _bad_key(key: Any) -> str:
    if isinstance(key, str):
        return '"key" is empty: give every line a unique, non-empty string "key"'
    if isinstance(key, int | float) and not isinstance(key, bool):
        return f'"key" must be a string, found {_kind(key)}: write it as "key": "{key}"'
    return f'"key" must be a non-empty string, found {_kind(key)}'


def _missing_request(record: dict[str, Any]) -> str:
    if "contents" in record:
        return '"contents" must be inside "request": {"key": "k1", "request": {"contents": [...]}}'
    if "body" in record:
        return (
            'missing "request" ("body" is OpenAI\'s batch format); put the '
            'GenerateContentRequest under "request"'
        )
    return (
        'missing "request": put the GenerateContentRequest under "request", e.g. '
        '{"key": "k1", "request": {"contents": [...]}}'
    )


def _contents_stand_in(request: dict[str, Any]) -> str:
    """The field someone used instead of "contents" (OpenAI's "messages", ...), or ""."""
    if "contents" in request:
        return ""
    return next((name for name in ("messages", "content", "prompt", "text") if name in request), "")


def _bad_contents(request: dict[str, Any], stand_in: str) -> str:
    if stand_in:
        return (
            f'request has "{stand_in}" instead of "contents": write '
            '"contents": [{"role": "user", "parts": [{"text": "..."}]}]'
        )
    if "contents" not in request:
        return 'request has no "contents": add "contents": [{"parts": [{"text": "..."}]}]'
    if request["contents"] == []:
        return '"contents" is empty: add at least one Content, e.g. [{"parts": [{"text": "..."}]}]'
    found = _kind(request["contents"])
    return f'"contents" must be a non-empty array of Content objects, found {found}'


def _unknown_field(name: str) -> str:
    shown = json.dumps(name, ensure_ascii=False)
    if name in _GENERATION_CONFIG_FIELDS:
        return (
            f"request has {shown} at the top level; it belongs inside generation_config, "
            f'e.g. "generation_config": {{{shown}: ...}}'
        )
    if name == "config":
        return (
            'request has "config" (the SDK\'s GenerateContentConfig); on the wire its fields '
            "go into generation_config, system_instruction, tools and safety_settings"
        )
    better = _RENAMES.get(name) or next(
        iter(difflib.get_close_matches(name, KNOWN_REQUEST_FIELDS, n=1, cutoff=0.75)), None
    )
    if better:
        return f'request has an unknown field {shown}: did you mean "{better}"?'
    return (
        f"request has an unknown field {shown}; a GenerateContentRequest has "
        "contents, generation_config, system_instruction, tools, tool_config, "
        "safety_settings, cached_content, labels, model"
    )


def estimate_tokens(line: bytes) -> int:
    """A cheap, deliberately high token estimate of one request line: its UTF-8 bytes / 4.

    Counting bytes rather than characters over-counts non-Latin text a little, which is the
    safe side for a quota."""
    return max(1, (len(line) + 3) // 4)


# -- streaming whole lines ------------------------------------------------------------

Chunk = tuple[bytes | None, int, int, int]


class Readable(Protocol):
    """What iter_line_chunks needs of a file: a binary file, or a wrapper of one."""

    def seek(self, offset: int, whence: int = ..., /) -> int: ...

    def read(self, size: int = ..., /) -> bytes: ...


def iter_line_chunks(
    handle: Readable,
    start: int = 0,
    end: int | None = None,
    *,
    on_block: Callable[[bytes], None] | None = None,
    max_line: int | None = None,
) -> Iterator[Chunk]:
    """Yield `(buf, lo, hi, base)`: buf[lo:hi] holds whole lines, buf[i] is at file offset
    base + i. Only the last chunk may end without "\\n" (a last line with no newline).

    Reads BLOCK_SIZE blocks and hands them on without copying; only a line that straddles
    two blocks is joined. `on_block` sees every byte read, once, in order (for hashing).
    A line longer than `max_line` is not kept: it comes as `(None, 0, length, base)`.
    """
    handle.seek(start)
    pos = start
    pending: list[bytes] = []  # the start of a line that continues in the next block
    pending_len = 0
    pending_base = start
    oversize = False
    while end is None or pos < end:
        block = handle.read(BLOCK_SIZE if end is None else min(BLOCK_SIZE, end - pos))
        if not block:
            break
        if on_block is not None:
            on_block(block)
        base, pos = pos, pos + len(block)
        first = block.find(b"\n")
        if first < 0:
            pending_len += len(block)
            if max_line is not None and pending_len > max_line:
                oversize, pending = True, []
            elif not oversize:
                pending.append(block)
            continue
        lo = 0
        if pending_len:
            if oversize:
                yield None, 0, pending_len + first + 1, pending_base
            else:
                head = b"".join(pending) + block[: first + 1]
                yield head, 0, len(head), pending_base
            pending, pending_len, oversize = [], 0, False
            lo = first + 1
        last = block.rfind(b"\n") + 1
        if last > lo:
            yield block, lo, last, base
        if last < len(block):
            pending, pending_len, pending_base = [block[last:]], len(block) - last, base + last
            if max_line is not None and pending_len > max_line:
                oversize, pending = True, []
    if pending_len:
        if oversize:
            yield None, 0, pending_len, pending_base
        else:
            head = b"".join(pending)
            yield head, 0, len(head), pending_base


def iter_lines(
    path: StrPath, start: int = 0, end: int | None = None
) -> Iterator[tuple[int, bytes]]:
    """(file offset, line including its "\\n") for each line in [start, end); a UTF-8 BOM
    at the start of the file is skipped."""
    with open(path, "rb") as handle:
        if start == 0 and handle.read(3) == _UTF8_BOM:
            start = 3
        for buf, lo, hi, base in iter_line_chunks(handle, start, end):
            assert buf is not None
            pos = lo
            while pos < hi:
                stop = buf.find(b"\n", pos, hi) + 1 or hi
                yield base + pos, buf[pos:stop]
                pos = stop


def json_string_at(buf: bytes, pos: int) -> tuple[str, int] | None:
    """Decode the JSON string token starting at buf[pos] (a '"'): (value, index after it).
    None when it is not a well-formed string token."""
    if buf[pos : pos + 1] != b'"':
        return None
    quote = buf.find(b'"', pos + 1)
    while quote > 0 and buf[quote - 1] == 0x5C:  # backslash: escaped unless itself escaped
        slashes = len(buf[pos + 1 : quote]) - len(buf[pos + 1 : quote].rstrip(b"\\"))
        if slashes % 2 == 0:
            break
        quote = buf.find(b'"', quote + 1)
    if quote < 0:
        return None
    raw = buf[pos + 1 : quote]
    try:
        if b"\\" in raw:
            value = json.loads(buf[pos : quote + 1])
        else:
            value = raw.decode("utf-8")
    except ValueError:  # UnicodeDecodeError and JSONDecodeError both are ValueErrors
        return None
    return value, quote + 1


def line_key(line: bytes) -> str | None:
    """The "key" of a validated request line: read straight from `{"key": "...", ...`
    when it comes first (the usual shape), else by parsing the line."""
    if line.startswith((b'{"key":', b'{"key": ')) and line.count(b'"key"') == 1:
        found = json_string_at(line, 7 if line[7:8] == b'"' else 8)
        if found is not None:
            return found[0]
    try:
        record = json.loads(line)
    except ValueError:
        return None
    key = record.get("key") if isinstance(record, dict) else None
    return key if isinstance(key, str) else None


# -- validation (I/O) ------------------------------------------------------------------


class _Planner:
    """Cuts a file into tasks: a new task starts when the next line would break a limit.

    The scan loop tracks the room left in the current task (bytes, requests, tokens) in
    local variables and calls `cut` only when a line does not fit: one comparison per
    line instead of a method call."""

    def __init__(self, limits: SplitLimits, start: int) -> None:
        self.full = (
            limits.max_bytes,
            limits.max_requests or _NO_LIMIT,
            limits.max_tokens or _NO_LIMIT,
        )
        self.room = self.full
        self.tasks: list[TaskPlan] = []
        self.start = start

    def cut(self, end: int, room: tuple[int, int, int]) -> tuple[int, int, int]:
        """Close the current task at `end` (given the room it had left); the room of the next."""
        size, count, tokens = (full - left for full, left in zip(self.full, room, strict=True))
        # A task of blank lines only (they fit nowhere else) carries nothing: left out.
        if count:
            self.tasks.append(TaskPlan(self.start, end, count, size, tokens))
        self.start = end
        return self.full

    def finish(self) -> list[TaskPlan]:
        self.cut(self.start + self.full[0] - self.room[0], self.room)
        return self.tasks


_NO_LIMIT = 1 << 62  # room that never runs out
_JSON_SPACE = " \t\r"  # what JSON allows around a value ("\n" ends the line)


class _BadLine:
    """A line that is not UTF-8, in place of its text."""

    def __init__(self, message: str) -> None:
        self.message = message


class _Scan:
    """State of one validation pass over one file."""

    def __init__(self, display: str, limits: SplitLimits, max_problems: int, start: int) -> None:
        self.display = display
        self.max_bytes = limits.max_bytes
        self.max_problems = max_problems
        self.problems: list[InputProblem] = []
        self.omitted = 0
        self.first_line: dict[str, int] = {}
        self.planner = _Planner(limits, start)
        self.count = 0
        self.tokens = 0
        self.lineno = 0
        # json.loads' own C scanner without the wrapper; one per scan, as it keeps a memo.
        # Strict: NaN and Infinity are not JSON (Gemini refuses them).
        self.decoder = json.JSONDecoder(parse_constant=_not_json_number)
        # typeshed wants a make_scanner here; any object with a decoder's attributes will do.
        self.scan_json = make_scanner(self.decoder)  # type: ignore[arg-type]

    def problem(self, line: int | None, message: str) -> None:
        if len(self.problems) < self.max_problems:
            self.problems.append(InputProblem(self.display, line, message))
        else:
            self.omitted += 1

    def chunk(self, buf: bytes, lo: int, hi: int, base: int) -> None:
        """Check the whole lines of buf[lo:hi] (as iter_line_chunks yields them)."""
        cut = hi if buf[hi - 1] == 0x0A else buf.rfind(b"\n", lo, hi) + 1 or lo
        if cut > lo:
            self._lines(buf[lo : cut - 1], base + lo, 1)
        if cut < hi:  # the file's last line, without a newline
            self._lines(buf[cut:hi], base + cut, 0)

    def _lines(self, data: bytes, offset: int, newline: int) -> None:
        """Check the lines of `data` (each followed by `newline` bytes in the file) and plan
        the tasks. The hot loop: one UTF-8 decode per block, json's C scanner per line, and
        the common case of check_record, estimate_tokens and the planner inlined."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            pairs: Iterator[tuple[str | _BadLine, int]] = _decode_lines(data, offset, newline)
        else:
            lines = text.split("\n")
            # "\n" never occurs inside a UTF-8 sequence: both splits give the same lines.
            pairs = zip(
                lines, map(len, lines if text.isascii() else data.split(b"\n")), strict=True
            )
        scan, loads, known = self.scan_json, self.decoder.decode, KNOWN_REQUEST_FIELDS.issuperset
        first_line = self.first_line
        planner = self.planner
        room_bytes, room_requests, room_tokens = planner.room
        lineno = self.lineno
        count = tokens_total = 0
        for line, length in pairs:
            lineno += 1
            size = length + newline
            if not isinstance(line, str):
                self.problem(lineno, line.message)
                record = _INVALID
            elif not line.strip(_JSON_SPACE):  # blank: skipped, but still part of a task
                if size > room_bytes:
                    room = (room_bytes, room_requests, room_tokens)
                    room_bytes, room_requests, room_tokens = planner.cut(offset, room)
                room_bytes -= size
                offset += size
                continue
            else:
                try:
                    record, end = scan(line, 0)
                    if end != len(line) and line[end:].strip(_JSON_SPACE):
                        record = loads(line)  # raises "Extra data" with its column
                except (StopIteration, ValueError, RecursionError):
                    record = self._parse_slowly(line, lineno)
                if "\\u" in line and _SURROGATE_ESCAPE.search(line) and _half_pair(record):
                    self.problem(lineno, _HALF_PAIR)
                    record = _INVALID
            if record is _INVALID:
                pass
            elif (  # what check_record accepts, in the shape almost every line has
                type(record) is dict
                and type(key := record.get("key")) is str
                and key
                and type(request := record.get("request")) is dict
                and type(contents := request.get("contents")) is list
                and contents
                and known(request)
            ):
                first = first_line.setdefault(key, lineno)
                if first != lineno:
                    self.problem(lineno, _duplicate(key, first))
            else:
                self._check(record, lineno)
            tokens = (length + 3) // 4  # estimate_tokens
            if size > room_bytes or tokens > room_tokens or not room_requests:
                room = (room_bytes, room_requests, room_tokens)
                room_bytes, room_requests, room_tokens = planner.cut(offset, room)
                if size > room_bytes:
                    self.problem(lineno, _too_large(lineno, size, self.max_bytes))
            room_bytes -= size
            room_requests -= 1
            room_tokens -= tokens
            count += 1
            tokens_total += tokens
            offset += size
        planner.room = (room_bytes, room_requests, room_tokens)
        self.lineno = lineno
        self.count += count
        self.tokens += tokens_total

    def _parse_slowly(self, line: str, lineno: int) -> Any:
        """json.loads, for what the scanner refused: leading spaces, or a real error."""
        try:
            return self.decoder.decode(line)
        except json.JSONDecodeError as exc:
            self.problem(lineno, _bad_json(line, exc, lineno))
        except _NotJsonNumber as exc:
            self.problem(
                lineno, f"{exc} is not a JSON number: write null, or the value as a string"
            )
        except RecursionError:
            self.problem(lineno, "JSON nested too deeply to be a request")
        return _INVALID

    def _check(self, record: Any, lineno: int) -> None:
        key, messages = check_record(record)
        for message in messages:
            self.problem(lineno, message)
        if key is not None:
            first = self.first_line.setdefault(key, lineno)
            if first != lineno:
                self.problem(lineno, _duplicate(key, first))

    def oversize(self, size: int, offset: int) -> None:
        """A line too long to keep in memory (iter_line_chunks skipped it)."""
        self.lineno += 1
        self.problem(self.lineno, _too_large(self.lineno, size, self.max_bytes))
        self.count += 1
        planner = self.planner
        room = planner.cut(offset, planner.room)
        planner.room = (room[0] - size, room[1] - 1, room[2])


_INVALID = object()  # a line already reported as not JSON


class _NotJsonNumber(ValueError):
    """NaN, Infinity or -Infinity: Python's json reads them, JSON has no such numbers."""


def _not_json_number(name: str) -> Any:
    raise _NotJsonNumber(name)


# An escape of a UTF-16 surrogate: the line holds an emoji written as a pair (fine), or
# half of a pair, which decodes to a string that is not text (not UTF-8, refused by Gemini).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_HALF_PAIR = (
    "a string holds half of a UTF-16 surrogate pair (an escape like \\ud800 without its "
    "other half), which is not a character: write the whole pair, or the character itself"
)


def _half_pair(value: Any) -> bool:
    """Whether a string anywhere in `value` (names included) holds an unpaired surrogate."""
    pending = [value]
    while pending:
        item = pending.pop()
        if type(item) is str:
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif type(item) is dict:
            pending.extend(item)
            pending.extend(item.values())
        elif type(item) is list:
            pending.extend(item)
    return False


def _decode_lines(data: bytes, offset: int, newline: int) -> Iterator[tuple[str | _BadLine, int]]:
    """(text, byte length) per line; a line that is not UTF-8 comes as a _BadLine."""
    for line in data.split(b"\n"):
        try:
            yield line.decode("utf-8"), len(line)
        except UnicodeDecodeError as exc:
            yield _BadLine(_not_utf8(line, exc, offset)), len(line)
        offset += len(line) + newline


def _duplicate(key: str, first: int) -> str:
    return f"duplicate key {_show(key)} (first on line {first}); keys must be unique"


def _show(key: str, limit: int = 60) -> str:
    text = json.dumps(key, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 4] + '..."'


def _not_utf8(line: bytes, exc: UnicodeDecodeError, offset: int) -> str:
    hint = "save the file as UTF-8"
    if b"\x00" in line:
        hint = "it looks like UTF-16; save the file as UTF-8"
    return (
        f"not valid UTF-8 at byte {exc.start + 1} of the line (file offset {offset + exc.start}): "
        f"{hint}"
    )


def _bad_json(line: str, exc: json.JSONDecodeError, lineno: int) -> str:
    message = f"invalid JSON at column {exc.colno}: {exc.msg}"
    if lineno == 1 and line.strip() in ("{", "["):
        return (
            message
            + " (the file looks like pretty-printed JSON; JSONL needs one whole object per line)"
        )
    if "\x00" in line:
        return message + " (the file looks like UTF-16; save it as UTF-8)"
    return message + "; each line must be one complete JSON object"


def _too_large(lineno: int, size: int, limit: int) -> str:
    return (
        f"line {lineno} is {size} bytes; one request cannot exceed the task size limit "
        f"({limit} bytes)"
    )


class _BackgroundHash:
    """sha256 of the blocks in a helper thread: hashlib lets go of the GIL on big buffers,
    so hashing runs beside the JSON parsing instead of adding to it. At most one block
    waits, so memory stays flat."""

    def __init__(self, head: bytes) -> None:
        self._sha = hashlib.sha256(head)
        self.size = len(head)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="gembatch-sha256")
        self._pending: Future[None] | None = None

    def update(self, block: bytes) -> None:
        if self._pending is not None:
            self._pending.result()
        self._pending = self._pool.submit(self._sha.update, block)
        self.size += len(block)

    def hexdigest(self) -> str:
        self.close()
        return self._sha.hexdigest()

    def close(self) -> None:
        pending, self._pending = self._pending, None
        self._pool.shutdown()  # waits for the block being hashed
        if pending is not None:
            pending.result()


def _open_input(path: StrPath, display: str) -> BinaryIO | InputProblem:
    """Open a request file, or say in user terms why it cannot be."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    except FileNotFoundError:
        return InputProblem(display, None, "no such file; check the path")
    except IsADirectoryError:
        return InputProblem(
            display,
            None,
            f"is a directory; pass its files, e.g. `gembatch submit {display.rstrip('/')}/*.jsonl`",
        )
    except PermissionError:
        return InputProblem(
            display, None, "cannot be read (permission denied); check the file's permissions"
        )
    except OSError as exc:
        return InputProblem(display, None, f"cannot be opened: {exc.strerror or exc}")
    info = os.fstat(handle.fileno())
    if stat.S_ISDIR(info.st_mode):
        handle.close()
        return InputProblem(
            display,
            None,
            f"is a directory; pass its files, e.g. `gembatch submit {display.rstrip('/')}/*.jsonl`",
        )
    if not stat.S_ISREG(info.st_mode):
        handle.close()
        return InputProblem(
            display,
            None,
            "is not a regular file (a pipe or device); save the requests to a file first",
        )
    return handle


def validate_file(
    path: StrPath, limits: SplitLimits = SplitLimits(), *, max_problems: int = MAX_LISTED
) -> ValidatedInput:
    """Check a request file in one streaming pass; raise InputInvalid listing what is wrong.

    Keeps at most `max_problems` problems and counts the rest. Blank lines are skipped
    (they still count in line numbers); a UTF-8 BOM is accepted and left out of the tasks.
    """
    display = os.fspath(path)
    opened = _open_input(path, display)
    if isinstance(opened, InputProblem):
        raise InputInvalid([opened])
    with opened as handle:
        head = handle.read(4)
        for bom, name in _OTHER_BOMS.items():
            if head.startswith(bom):
                raise InputInvalid(
                    [InputProblem(display, None, f"is {name}-encoded; save it as UTF-8")]
                )
        start = 3 if head.startswith(_UTF8_BOM) else 0
        sha = _BackgroundHash(head[:start])
        scan = _Scan(display, limits, max_problems, start)
        try:
            for buf, lo, hi, base in iter_line_chunks(
                handle, start, on_block=sha.update, max_line=limits.max_bytes
            ):
                if buf is None:
                    scan.oversize(hi, base)
                else:
                    scan.chunk(buf, lo, hi, base)
            digest = sha.hexdigest()
        except OSError as exc:
            raise InputInvalid(
                [InputProblem(display, None, f"read failed: {exc.strerror or exc}")]
            ) from exc
        finally:
            sha.close()
    if scan.count == 0:
        what = "is empty" if sha.size == 0 else "has only blank lines"
        scan.problem(
            None,
            f'{what}; it needs one JSON request per line, like {{"key": "k1", "request": {{...}}}}',
        )
    if scan.problems or scan.omitted:
        raise InputInvalid(scan.problems, scan.omitted)
    return ValidatedInput(
        path=Path(path).resolve(),
        display=display,
        size_bytes=sha.size,  # what was read and hashed, even if the file grew meanwhile
        sha256=digest,
        count=scan.count,
        estimated_tokens=scan.tokens,
        tasks=scan.planner.finish(),
    )


def validate_files(
    paths: Sequence[StrPath], limits: SplitLimits = SplitLimits()
) -> list[ValidatedInput]:
    """Validate every file (not just up to the first bad one); one InputInvalid for all.

    Many large files are checked by several processes at once (one per core): checking
    is CPU-bound, and it happens before the first upload, so it is time the user waits
    (1 GB in 100 files: 5.3 s in one process on 2 cores, 3 s in two)."""
    results: list[ValidatedInput] = []
    problems: list[InputProblem] = []
    omitted = 0
    seen: dict[Path, str] = {}
    for outcome in _validate_all(paths, limits):
        if isinstance(outcome, InputInvalid):
            problems += outcome.problems
            omitted += outcome.omitted
            continue
        item = outcome
        if item.path in seen:
            problems.append(
                InputProblem(
                    item.display, None, f"is the same file as {seen[item.path]}; pass it once"
                )
            )
            continue
        seen[item.path] = item.display
        results.append(item)
    if problems or omitted:
        raise InputInvalid(problems, omitted)
    return results


PARALLEL_MIN_BYTES = 64 * 1024 * 1024  # below this, starting processes costs more


def _validate_all(
    paths: Sequence[StrPath], limits: SplitLimits
) -> Iterator[ValidatedInput | InputInvalid]:
    """validate_file of each path, in order: in this process, or spread over worker
    processes when there are several large files and several cores."""
    workers = min(len(paths), _cores(), 8)
    if workers < 2 or _total_size(paths) < PARALLEL_MIN_BYTES:
        for path in paths:
            yield _validate_one(path, limits)
        return
    import multiprocessing
    import threading
    from concurrent.futures import ProcessPoolExecutor

    # fork is cheapest, and safe while this process has no other thread (a fork keeps
    # only the forking thread; a lock another thread held would stay held for ever).
    method = "fork" if threading.active_count() == 1 else "spawn"
    context = multiprocessing.get_context(method)
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        yield from pool.map(_validate_one, paths, [limits] * len(paths))


def _validate_one(path: StrPath, limits: SplitLimits) -> ValidatedInput | InputInvalid:
    try:
        return validate_file(path, limits)
    except InputInvalid as exc:
        return exc


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _total_size(paths: Sequence[StrPath]) -> int:
    total = 0
    for path in paths:
        try:
            total += os.stat(path).st_size
        except OSError:
            pass  # validate_file reports it
    return total


# -- reading validated files back ------------------------------------------------------


def iter_keys(path: StrPath, start: int = 0, end: int | None = None) -> Iterator[str]:
    """The keys of the request lines in bytes [start, end) of a validated file, in order."""
    for _, line in iter_lines(path, start, end):
        if line.isspace():
            continue
        key = line_key(line)
        if key is None:
            raise ValueError(
                f"{os.fspath(path)}: a line at or after byte {start} has no key; "
                "validate the file first"
            )
        yield key


def write_subset(path: StrPath, keys: Collection[str], dest: Path) -> int:
    """Copy the request lines whose key is in `keys`, in input order, to `dest`
    (atomically, creating its directory); the number of lines written."""
    wanted = keys if isinstance(keys, set | frozenset | dict) else set(keys)
    count = 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    with fsutil.atomic_writer(dest, "wb") as out:
        for _, line in iter_lines(path):
            if line.isspace() or line_key(line) not in wanted:
                continue
            out.write(line if line.endswith(b"\n") else line + b"\n")
            count += 1
    return count


class _RangeReader(io.RawIOBase):
    """A read-only, seekable view of bytes [start, end) of a file; offsets are relative
    to `start`, so the view looks like a whole file of its own to an uploader."""

    mode = "rb"

    def __init__(self, path: StrPath, start: int, end: int) -> None:
        super().__init__()
        self.name = os.fspath(path)
        self._fd = -1  # close() must be safe even when opening failed
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        size = os.fstat(fd).st_size
        if not 0 <= start <= end <= size:
            os.close(fd)
            raise ValueError(f"range [{start}, {end}) is outside {self.name} ({size} bytes)")
        self._fd = fd
        self._start, self._length, self._pos = start, end - start, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._checkClosed()
        origin = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        if origin + offset < 0:
            raise ValueError("negative seek position")
        self._pos = origin + offset
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        self._checkClosed()
        remaining = max(0, self._length - self._pos)
        want = remaining if size is None or size < 0 else min(size, remaining)
        parts: list[bytes] = []
        while want > 0:  # pread may return less than asked (e.g. above 2 GiB per call)
            data = os.pread(self._fd, want, self._start + self._pos)
            if not data:
                break  # the file shrank under us: report what there is
            parts.append(data)
            self._pos += len(data)
            want -= len(data)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(memoryview(buffer)))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
        super().close()


def open_range(path: StrPath, start: int, end: int) -> io.RawIOBase:
    """A seekable binary file object over bytes [start, end) of `path` (what google-genai's
    `files.upload(file=...)` needs to upload one task's share of a file without copying it)."""
    return _RangeReader(path, start, end)
