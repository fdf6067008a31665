"""Directives: test steering written into a request's own text.

Why: a test (or a user's pipeline test) needs a given line of a batch to fail, be blocked,
stop early or have an exact length, without configuring the emulator per request. Written
anywhere in a text part of the request (system instruction included), they steer the
local responder:

    [[emulator:error]]           the line fails: code 13, "Internal error encountered."
    [[emulator:error=CODE]]      ... with that gRPC code: a number (8) or name (RESOURCE_EXHAUSTED)
    [[emulator:words=N]]         the answer has exactly N whitespace-separated words (0..1,000,000)
    [[emulator:blocked]]         no candidates; promptFeedback.blockReason SAFETY
    [[emulator:blocked=REASON]]  ... with that BlockedReason (OTHER, BLOCKLIST, PROHIBITED_CONTENT)
    [[emulator:finish=REASON]]   the candidates end with that FinishReason; for the reasons that
                                 withhold output (SAFETY, RECITATION, BLOCKLIST, SPII ...) the
                                 candidate has no content, as on the real service
    [[emulator:fail-first=N]]    the first N batches holding this exact request get an error
                                 line for it, later ones an answer (acted on by the batch layer)

A malformed or unknown directive is itself an INVALID_ARGUMENT error, so typos do not pass silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gembatch.emulator.request import all_texts, invalid
from gembatch.emulator.wire import GRPC_CODES, GRPC_NUMBER_TO_NAME

_DIRECTIVE_RE = re.compile(r"\[\[emulator:([A-Za-z_-]*)(?:=([^\]]*))?\]\]")
_MAX_WORDS = 1_000_000
_FINISH_REASONS = (
    "FINISH_REASON_UNSPECIFIED", "STOP", "MAX_TOKENS", "SAFETY", "RECITATION", "LANGUAGE",
    "OTHER", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "MALFORMED_FUNCTION_CALL",
    "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_OTHER", "NO_IMAGE", "IMAGE_RECITATION",
    "UNEXPECTED_TOOL_CALL", "TOO_MANY_TOOL_CALLS", "MISSING_THOUGHT_SIGNATURE",
)  # fmt: skip
# Finish reasons after which the real service returns a candidate without any content.
WITHHELD = frozenset(_FINISH_REASONS) - {
    "FINISH_REASON_UNSPECIFIED", "STOP", "MAX_TOKENS", "LANGUAGE", "OTHER",
}  # fmt: skip
_BLOCK_REASONS = ("SAFETY", "OTHER", "BLOCKLIST", "PROHIBITED_CONTENT", "IMAGE_SAFETY")


@dataclass(frozen=True)
class Directives:
    error_code: int | None = None
    words: int | None = None
    blocked: str | None = None
    finish: str | None = None


def parse_directives(texts: list[str]) -> Directives | dict[str, Any]:
    """The directives in `texts` (first of each kind wins), or the error a bad one causes."""
    found: dict[str, Any] = {}
    for text in texts:
        if "[[emulator:" not in text:
            continue
        for match in _DIRECTIVE_RE.finditer(text):
            name, value = match.group(1).lower(), match.group(2)
            parsed, problem = _directive_value(name, value)
            if problem is not None:
                return invalid(f"emulator directive {match.group(0)}: {problem}")
            found.setdefault(name, parsed)
    return Directives(
        error_code=found.get("error"),
        words=found.get("words"),
        blocked=found.get("blocked"),
        finish=found.get("finish"),
    )


def fail_first(request: Any) -> int | None:
    """N of a `[[emulator:fail-first=N]]` directive: the first N batches that contain this
    exact request get an error line for it, later ones an answer (a flaky request)."""
    if not isinstance(request, dict):
        return None
    for text in all_texts(request):
        if "[[emulator:fail-first=" in text:
            for match in _DIRECTIVE_RE.finditer(text):
                if match.group(1).lower() == "fail-first":
                    value, problem = _directive_value("fail-first", match.group(2))
                    return value if problem is None else None
    return None


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _directive_value(name: str, value: str | None) -> tuple[Any, str | None]:
    """(value, None), or (None, why the directive is unusable)."""
    value = value.strip() if value is not None else None
    if name == "error":
        if not value:
            return GRPC_CODES["INTERNAL"][0], None
        if _is_number(value) and int(value) in GRPC_NUMBER_TO_NAME and int(value) != 0:
            return int(value), None
        if value.upper() in GRPC_CODES and value.upper() != "OK":
            return GRPC_CODES[value.upper()][0], None
        return None, "CODE must be a gRPC error code 1-16 or its name (e.g. 8, RESOURCE_EXHAUSTED)"
    if name == "words":
        if value is not None and _is_number(value) and int(value) <= _MAX_WORDS:
            return int(value), None
        return None, f"N must be a whole number from 0 to {_MAX_WORDS:,}"
    if name == "blocked":
        reason = (value or "SAFETY").upper()
        if reason in _BLOCK_REASONS:
            return reason, None
        return None, f"REASON must be one of {', '.join(_BLOCK_REASONS)}"
    if name == "finish":
        reason = (value or "").upper()
        if reason in _FINISH_REASONS:
            return reason, None
        return None, f"REASON must be a FinishReason such as {', '.join(_FINISH_REASONS[1:8])}"
    if name == "fail-first":
        # Acted on by the batch layer (it needs state across batches); accepted here.
        if value is not None and _is_number(value) and 1 <= int(value) <= 1000:
            return int(value), None
        return None, "N must be a whole number from 1 to 1000"
    return None, "unknown directive; known: error, words, blocked, finish, fail-first"


def strip_directives(text: str) -> str:
    """`text` with every directive blanked out: what the answer may quote or draw on."""
    return _DIRECTIVE_RE.sub(" ", text)
