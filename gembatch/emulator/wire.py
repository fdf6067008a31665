"""Wire-format helpers: field casing, timestamps, ids and Google's error envelope.

Why: the real service parses proto3 JSON, which accepts camelCase and snake_case for every
field, always answers in camelCase, writes int64 as strings and timestamps in RFC 3339
with nanoseconds. Keeping those rules in one place keeps every handler faithful.
"""

from __future__ import annotations

import functools
import re
import secrets
import string
from datetime import UTC, datetime
from typing import Any

_ID_ALPHABET = string.ascii_lowercase + string.digits
_CAMEL_RE = re.compile(r"_([a-z0-9])")
_SNAKE_RE = re.compile(r"(?<!^)([A-Z])")

# google.rpc.Code: name -> (number, HTTP status)
GRPC_CODES: dict[str, tuple[int, int]] = {
    "OK": (0, 200),
    "CANCELLED": (1, 499),
    "UNKNOWN": (2, 500),
    "INVALID_ARGUMENT": (3, 400),
    "DEADLINE_EXCEEDED": (4, 504),
    "NOT_FOUND": (5, 404),
    "ALREADY_EXISTS": (6, 409),
    "PERMISSION_DENIED": (7, 403),
    "RESOURCE_EXHAUSTED": (8, 429),
    "FAILED_PRECONDITION": (9, 400),
    "ABORTED": (10, 409),
    "OUT_OF_RANGE": (11, 400),
    "UNIMPLEMENTED": (12, 501),
    "INTERNAL": (13, 500),
    "UNAVAILABLE": (14, 503),
    "DATA_LOSS": (15, 500),
    "UNAUTHENTICATED": (16, 401),
}
HTTP_TO_STATUS: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
GRPC_NUMBER_TO_NAME = {number: name for name, (number, _) in GRPC_CODES.items()}


@functools.lru_cache(maxsize=4096)
def camel(name: str) -> str:
    """`display_name` -> `displayName`; camelCase input is returned unchanged."""
    return _CAMEL_RE.sub(lambda m: m.group(1).upper(), name)


@functools.lru_cache(maxsize=4096)
def snake(name: str) -> str:
    """`displayName` -> `display_name`; snake_case input is returned unchanged."""
    return _SNAKE_RE.sub(lambda m: "_" + m.group(1).lower(), name)


def get_field(obj: Any, name: str, default: Any = None) -> Any:
    """Read a proto field in either spelling (`inputConfig` or `input_config`)."""
    if not isinstance(obj, dict):
        return default
    for candidate in _SPELLINGS(name):
        if candidate in obj:
            return obj[candidate]
    return default


@functools.lru_cache(maxsize=4096)
def _SPELLINGS(name: str) -> tuple[str, ...]:
    """camelCase first, then snake_case (as before the cache), each once."""
    return tuple(dict.fromkeys((camel(name), snake(name))))


def has_field(obj: Any, name: str) -> bool:
    return isinstance(obj, dict) and any(candidate in obj for candidate in _SPELLINGS(name))


def new_id(length: int) -> str:
    """A random resource id of lowercase letters and digits, as Google's are."""
    # One call to the OS for the whole id (one per character was a visible cost).
    return "".join(_ID_ALPHABET[b % 36] for b in secrets.token_bytes(length))


def timestamp(epoch: float) -> str:
    """RFC 3339 with nanoseconds and `Z`, as the real service writes it."""
    whole = int(epoch)
    nanos = round((epoch - whole) * 1e9)
    if nanos >= 1_000_000_000:
        whole, nanos = whole + 1, nanos - 1_000_000_000
    base = datetime.fromtimestamp(whole, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{base}.{nanos:09d}Z"


def int64(value: int) -> str:
    """int64 fields travel as JSON strings on the real wire."""
    return str(int(value))


class ApiError(Exception):
    """An error answered in Google's `google.rpc.Status` envelope."""

    def __init__(
        self,
        http_status: int,
        message: str,
        status: str | None = None,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.message = message
        self.status = status or HTTP_TO_STATUS.get(http_status, "UNKNOWN")
        self.details = details or []
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "code": self.http_status,
            "message": self.message,
            "status": self.status,
        }
        if self.details:
            error["details"] = self.details
        return {"error": error}


def invalid_argument(message: str, field: str | None = None) -> ApiError:
    details = None
    if field:
        details = [
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [{"field": field, "description": message}],
            }
        ]
    return ApiError(400, message, "INVALID_ARGUMENT", details)


def file_permission_denied(file_id: str) -> ApiError:
    return ApiError(
        403,
        f"You do not have permission to access the File {file_id} or it may not exist.",
        "PERMISSION_DENIED",
    )


def not_found(message: str = "Requested entity was not found.") -> ApiError:
    return ApiError(404, message, "NOT_FOUND")


def resource_exhausted(message: str | None = None, retry_after: float | None = None) -> ApiError:
    text = message or (
        "You exceeded your current quota, please check your plan and billing details. "
        "For more information on this error, head to: "
        "https://ai.google.dev/gemini-api/docs/rate-limits."
    )
    details = [
        {
            "@type": "type.googleapis.com/google.rpc.Help",
            "links": [
                {
                    "description": "Learn more about Gemini API quotas",
                    "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                }
            ],
        }
    ]
    headers = {}
    if retry_after is not None:
        headers["Retry-After"] = str(max(0, round(retry_after)))
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.RetryInfo",
                "retryDelay": f"{max(0.0, retry_after):g}s",
            }
        )
    return ApiError(429, text, "RESOURCE_EXHAUSTED", details, headers)


def server_error(http_status: int) -> ApiError:
    messages = {
        500: (
            "An internal error has occurred. Please retry or report in "
            "https://developers.generativeai.google/guide/troubleshooting"
        ),
        502: "Bad Gateway",
        503: "The model is overloaded. Please try again later.",
        504: "Deadline exceeded.",
    }
    return ApiError(http_status, messages.get(http_status, "Server error."))
