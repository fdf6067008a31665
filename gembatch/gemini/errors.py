"""The one error classifier: any exception -> an ErrorClass, a code, a safe message.

Why: whether a failure is retried, and whether a create must be reconciled before it is
repeated, depends on what failed: a 429, a dropped connection, a missing file, a full
disk. The SDK, httpx, httpx2 (the SDK's fork of httpx) and the OS each raise their own
types; this module turns all of them into one `Classified` record, with secrets scrubbed,
so every caller decides the same way.
"""

from __future__ import annotations

import asyncio
import errno
import math
import re
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

from gembatch.jobs import ErrorClass, ErrorInfo, now_iso

MAX_MESSAGE_CHARS = 2000

# Local filesystem trouble: ours to fix (disk full, permissions), not the API's.
_LOCAL_IO_NAMES = (
    "ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "EIO", "EFBIG", "EMFILE", "ENFILE",
    "ENOENT", "EISDIR", "ENOTDIR",
)  # fmt: skip
_LOCAL_IO_ERRNOS = frozenset(getattr(errno, n) for n in _LOCAL_IO_NAMES if hasattr(errno, n))

# httpx and httpx2 exception class names -> (class, definitive). Matched along the MRO,
# most specific first, so both families are handled without importing either.
_TRANSPORT: dict[str, tuple[ErrorClass, bool]] = {
    # Nothing was sent: repeating is safe.
    "ConnectTimeout": (ErrorClass.TIMEOUT, True),
    "PoolTimeout": (ErrorClass.TIMEOUT, True),
    "ConnectError": (ErrorClass.NETWORK, True),
    "UnsupportedProtocol": (ErrorClass.INVALID_INPUT, True),  # a bad base URL
    "InvalidURL": (ErrorClass.INVALID_INPUT, True),
    # The request may have reached the server.
    "TimeoutException": (ErrorClass.TIMEOUT, False),
    "TransportError": (ErrorClass.NETWORK, False),
    "RequestError": (ErrorClass.NETWORK, False),
}

# Many transport errors have an empty str(); say what happened instead.
_DEFAULT_MESSAGES = {
    "ConnectError": "could not connect to the server",
    "ConnectTimeout": "timed out connecting to the server",
    "PoolTimeout": "timed out waiting for a free connection",
    "ReadTimeout": "timed out waiting for the server's answer",
    "WriteTimeout": "timed out sending the request",
    "ReadError": "the connection broke while reading the answer",
    "WriteError": "the connection broke while sending the request",
    "RemoteProtocolError": "the server closed the connection before the answer was complete",
    "TimeoutError": "timed out",
    "CancelledError": "cancelled",
}

_SECRET_PATTERNS = (
    # ?key=..., &api_key=... in URLs
    (re.compile(r"(?i)(?<![A-Za-z0-9_-])((?:api[_-]?)?key=)[^&\s'\"<>]+"), r"\1***"),
    # x-goog-api-key: value, 'x-goog-api-key': 'value', x-goog-api-key=value
    (re.compile(r"(?i)(x-goog-api-key['\"]?\s*[:=]\s*['\"]?)[^'\",\s}]+"), r"\1***"),
    (re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?bearer\s+)[^'\",\s}]+"), r"\1***"),
    # Google API keys look like this wherever they appear.
    (re.compile(r"AIza[0-9A-Za-z_\-]{20,}"), "***"),
)


@dataclass(frozen=True)
class Classified:
    """What failed, in gembatch's terms."""

    error_class: ErrorClass
    code: str  # "429 RESOURCE_EXHAUSTED", "503 UNAVAILABLE", "ConnectError", "TIMEOUT"
    message: str  # for humans; secrets scrubbed
    http_status: int | None = None
    retry_after: float | None = None  # seconds (Retry-After header or RetryInfo detail)
    # False when the request may or may not have taken effect: a non-idempotent call
    # (batches.create) must be reconciled before it is repeated.
    definitive: bool = True


def classify(exc: BaseException) -> Classified:
    """Classify any exception raised while talking to Gemini or writing locally."""
    exc = _unwrap(exc)
    if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
        return Classified(ErrorClass.CANCELLED, "CANCELLED", _text(exc) or "cancelled")
    status_code = _sdk_status(exc)
    if status_code is not None:
        return _classify_http(exc, status_code)
    transport = _transport_kind(exc)
    if transport is not None:
        error_class, definitive = transport
        return Classified(
            error_class, type(exc).__name__, _transport_message(exc), definitive=definitive
        )
    if isinstance(exc, TimeoutError):  # also asyncio.TimeoutError; before OSError
        return Classified(ErrorClass.TIMEOUT, "TIMEOUT", _message(exc), definitive=False)
    if isinstance(exc, ConnectionRefusedError):
        return Classified(ErrorClass.NETWORK, "ConnectionRefused", _message(exc))
    if isinstance(exc, ConnectionError):  # reset, aborted, broken pipe: maybe sent
        return Classified(ErrorClass.NETWORK, type(exc).__name__, _message(exc), definitive=False)
    if isinstance(exc, OSError):
        if exc.errno is not None and exc.errno in _LOCAL_IO_ERRNOS:
            code = errno.errorcode.get(exc.errno, "OSError")
            return Classified(ErrorClass.LOCAL_IO, code, _message(exc))
        if type(exc).__name__ == "gaierror":  # DNS: nothing was sent
            return Classified(ErrorClass.NETWORK, "DNS", _message(exc))
        return Classified(ErrorClass.INTERNAL, type(exc).__name__, _message(exc))
    if isinstance(exc, EOFError):  # a local source ended early (changed under us)
        return Classified(ErrorClass.LOCAL_IO, "EOF", _message(exc))
    if type(exc).__name__ == "JSONDecodeError":
        # The SDK got a 200 whose body is not JSON: the server's fault, maybe transient.
        return Classified(ErrorClass.SERVER_ERROR, "BAD_RESPONSE", _message(exc), definitive=False)
    if isinstance(exc, ValueError) or _is_user_error(exc):
        # The SDK's client-side checks (bad model name, bad batch name, pydantic).
        return Classified(ErrorClass.INVALID_INPUT, type(exc).__name__, _message(exc))
    return Classified(ErrorClass.INTERNAL, type(exc).__name__, _message(exc))


def error_info(
    classified: Classified,
    *,
    step: str | None,
    attempt: int | None,
    task: int | None,
    now: float | None = None,
) -> ErrorInfo:
    """The ErrorInfo recorded in a job (SPEC §6), stamped with the time."""
    return ErrorInfo(
        code=classified.code,
        message=classified.message,
        error_class=classified.error_class,
        step=step,
        attempt=attempt,
        at=now_iso(now),
        retry_after=classified.retry_after,
        task=task,
    )


def scrub(text: str) -> str:
    """`text` without API keys (URL `key=` parameters, x-goog-api-key values, AIza keys)."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def is_missing_file(exc: BaseException) -> bool:
    """Google's answer for a missing or expired file: 403 PERMISSION_DENIED "... may not
    exist" (not a 404)."""
    return _sdk_status(exc) == 403 and "may not exist" in (_api_message(exc) or "")


# --------------------------------------------------------------------------------------


def _classify_http(exc: BaseException, status_code: int) -> Classified:
    status = _api_status(exc, status_code)
    code = f"{status_code} {status}" if status else str(status_code)
    message = _message(exc, _api_message(exc))
    retry_after = _retry_after(exc)
    if status_code == 429:
        error_class, definitive = ErrorClass.RATE_LIMITED, True
    elif status_code == 408:
        error_class, definitive = ErrorClass.TIMEOUT, False
    elif status_code == 400 and _is_bad_api_key(exc):
        # Google answers a wrong key with 400 INVALID_ARGUMENT, reason API_KEY_INVALID.
        error_class, definitive = ErrorClass.AUTH, True
    elif status_code in (401, 403):
        error_class = ErrorClass.NOT_FOUND if is_missing_file(exc) else ErrorClass.AUTH
        definitive = True
    elif status_code == 404:
        error_class, definitive = ErrorClass.NOT_FOUND, True
    elif 400 <= status_code < 500:
        error_class, definitive = ErrorClass.INVALID_INPUT, True
    elif 500 <= status_code < 600:
        error_class, definitive = ErrorClass.SERVER_ERROR, False
    else:  # 2xx other than 200, 3xx: an answer we do not understand
        error_class, definitive = ErrorClass.INTERNAL, False
    return Classified(error_class, code, message, status_code, retry_after, definitive)


def _is_bad_api_key(exc: BaseException) -> bool:
    if "API key not valid" in (_api_message(exc) or ""):
        return True
    body = getattr(exc, "details", None)
    error = body.get("error") if isinstance(body, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    return any(
        isinstance(d, dict) and str(d.get("reason", "")).startswith("API_KEY_")
        for d in details or []
    )


def _unwrap(exc: BaseException) -> BaseException:
    """tenacity.RetryError (only with SDK retry_options) hides the real error."""
    for _ in range(5):
        last = getattr(exc, "last_attempt", None)
        if type(exc).__name__ != "RetryError" or last is None:
            break
        inner = last.exception() if callable(getattr(last, "exception", None)) else None
        if inner is None:
            break
        exc = inner
    return exc


def _sdk_status(exc: BaseException) -> int | None:
    """The HTTP status of a google.genai APIError (or an httpx HTTPStatusError)."""
    if _is_genai_api_error(exc):
        code = getattr(exc, "code", None)
        return code if isinstance(code, int) else None
    if type(exc).__name__ == "HTTPStatusError":
        response = getattr(exc, "response", None)
        code = getattr(response, "status_code", None)
        return code if isinstance(code, int) else None
    return None


def _is_genai_api_error(exc: BaseException) -> bool:
    try:
        from google.genai import errors as genai_errors
    except ImportError:  # pragma: no cover - the SDK is a dependency
        return False
    return isinstance(exc, genai_errors.APIError)


def _is_user_error(exc: BaseException) -> bool:
    from gembatch.errors import UserError

    return isinstance(exc, UserError)


def _transport_kind(exc: BaseException) -> tuple[ErrorClass, bool] | None:
    for cls in type(exc).__mro__:
        package = (cls.__module__ or "").split(".")[0]
        if package in ("httpx", "httpx2") and cls.__name__ in _TRANSPORT:
            return _TRANSPORT[cls.__name__]
    return None


def _transport_message(exc: BaseException) -> str:
    """What happened, the detail httpx gives (often empty), and where."""
    parts = [_DEFAULT_MESSAGES.get(type(exc).__name__, ""), _text(exc)]
    text = ": ".join(p for p in parts if p) or type(exc).__name__
    try:
        request = exc.request  # type: ignore[attr-defined]  # raises when unset
        text += f" ({request.method} {request.url.copy_with(query=None)})"
    except Exception:  # no request attached: say what we know
        pass
    return _message(exc, text)


def _api_status(exc: BaseException, status_code: int) -> str | None:
    status = getattr(exc, "status", None)
    if not status:
        response = getattr(exc, "response", None)
        status = getattr(response, "reason_phrase", None)
    if not isinstance(status, str) or not status:
        return None
    return status.strip().upper().replace(" ", "_")


def _api_message(exc: BaseException) -> str | None:
    message = getattr(exc, "message", None)
    return message if isinstance(message, str) and message else None


def _retry_after(exc: BaseException) -> float | None:
    """The longer of the Retry-After header and a google.rpc.RetryInfo `retryDelay`."""
    values: list[float] = []
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if headers is not None:
        try:
            header = headers.get("retry-after") or headers.get("Retry-After")
        except Exception:  # an odd headers object: the hint is optional
            header = None
        seconds = parse_retry_after(header)
        if seconds is not None:
            values.append(seconds)
    seconds = _retry_info_delay(getattr(exc, "details", None))
    if seconds is not None:
        values.append(seconds)
    return max(values) if values else None


def parse_retry_after(value: Any, now: float | None = None) -> float | None:
    """RFC 9110 Retry-After: delay-seconds or an HTTP-date."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d*)?|\.\d+)\s*s\s*$")


def _retry_info_delay(body: Any) -> float | None:
    """`retryDelay` of a google.rpc.RetryInfo detail (a protobuf Duration such as "3s")."""
    if not isinstance(body, dict):
        return None
    error = body.get("error") if isinstance(body.get("error"), dict) else body
    details = error.get("details") if isinstance(error, dict) else None
    if not isinstance(details, list):
        return None
    for detail in details:
        if not isinstance(detail, dict) or not str(detail.get("@type", "")).endswith("RetryInfo"):
            continue
        delay = detail.get("retryDelay", detail.get("retry_delay"))
        if isinstance(delay, int | float):
            return max(0.0, float(delay))
        if isinstance(delay, dict):  # {"seconds": 3, "nanos": 0}
            try:
                nanos = float(delay.get("nanos", 0) / 1e9)
                return max(0.0, float(delay.get("seconds", 0)) + nanos)
            except (TypeError, ValueError):
                return None
        match = _DURATION.match(delay) if isinstance(delay, str) else None
        if match:
            return max(0.0, float(match.group(1)))
    return None


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # a broken __str__ must not hide the error itself
        return type(exc).__name__


def _message(exc: BaseException, preferred: str | None = None) -> str:
    text = preferred or _text(exc) or _DEFAULT_MESSAGES.get(type(exc).__name__, "")
    text = text or type(exc).__name__
    text = scrub(" ".join(text.split()))
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 3] + "..."
    return text
