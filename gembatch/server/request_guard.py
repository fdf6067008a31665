"""Requests a browser was made to send by some other web page: refused before any route.

Why: without tokens the service trusts whoever can connect to 127.0.0.1, and any page the
user visits can make their browser connect there. A form or a `no-cors` fetch needs no
CORS preflight when its body is text/plain, url-encoded or multipart, so it could create
or delete jobs on the user's Gemini key; and a host name the page's owner re-points at
127.0.0.1 (DNS rebinding) would let the page read the answers as well. So, before routing:

- single-user mode answers only a Host that names a loopback address (`localhost`,
  `127.0.0.1`, `[::1]`, any port): 421 otherwise, which stops DNS rebinding;
- a write (POST, PUT, PATCH, DELETE) that a browser marks as coming from another origin
  is refused (403): `Sec-Fetch-Site` other than `same-origin` (every current browser sends
  it), or, without it, an `Origin` whose host and port are not the Host the request was
  sent to (`null` included). This is what stops a cross-site multipart upload;
- a write with a body must say it is JSON, multipart or JSONL (415): a browser sends JSON
  or JSONL to another origin only after a preflight this service never grants.

Requests without `Origin` and `Sec-Fetch-Site` (curl, scripts, SDKs) are not a browser's
and pass. The scheme is not compared (as Go's CrossOriginProtection): behind a proxy that
ends TLS the service sees http while the page is https; `Sec-Fetch-Site` compares it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from gembatch.server.settings import is_loopback

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SAME_ORIGIN = frozenset({"same-origin", "none"})  # `none`: the user typed it, no page did


class RequestGuard:
    """ASGI middleware: `refusal` for every HTTP request, answered before the app runs."""

    def __init__(self, app: ASGIApp, *, single_user: bool, body_types: Iterable[str]) -> None:
        self.app = app
        self.single_user = single_user
        self.body_types = frozenset(body_types)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {
                name.decode("latin-1").lower(): value.decode("latin-1")
                for name, value in reversed(scope.get("headers") or [])
            }  # reversed: the first of repeated headers wins
            refused = refusal(scope["method"], headers, self.single_user, self.body_types)
            if refused is not None:
                await _answer(send, *refused)
                return
        await self.app(scope, receive, send)


def refusal(
    method: str, headers: Mapping[str, str], single_user: bool, body_types: Iterable[str]
) -> tuple[int, str] | None:
    """(status, detail) when the request must be refused, else None. `headers`: lower-case
    names. No I/O."""
    host = headers.get("host")
    if single_user and host is not None and not is_loopback(_hostname(host) or ""):
        return 421, (
            f"this service runs without API tokens, so it answers only requests addressed to "
            f"localhost, 127.0.0.1 or [::1], not to {host!r} (a page could point that name at "
            "this machine): open it as http://127.0.0.1:PORT/, or start it with --tokens"
        )
    if method.upper() not in UNSAFE_METHODS:
        return None
    foreign = _cross_origin(headers)
    if foreign is not None:
        return 403, (
            f"cross-origin request refused ({foreign}): jobs are created, changed and deleted "
            "only from this service's own page, or by programs that send no Origin (curl, "
            "scripts)"
        )
    media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    has_body = headers.get("content-length", "0").strip() != "0" or "transfer-encoding" in headers
    if media in body_types or (not media and not has_body):
        return None
    shown = f"Content-Type {media!r}" if media else "a body without a Content-Type"
    return 415, (
        f"{shown} is not accepted: send application/json (a JSON body), multipart/form-data "
        "(a file upload) or application/jsonl (the JSONL file itself)"
    )


def _cross_origin(headers: Mapping[str, str]) -> str | None:
    """Why the request comes from another origin (None: it does not, or says nothing)."""
    site = headers.get("sec-fetch-site")
    if site is not None:
        return None if site.lower() in SAME_ORIGIN else f"Sec-Fetch-Site: {site}"
    origin = headers.get("origin")
    if origin is None:
        return None
    if not _same_authority(origin, headers.get("host")):
        return f"Origin {origin!r} is not this service's {headers.get('host')!r}"
    return None


def _same_authority(origin: str, host: str | None) -> bool:
    """Origin's host and port against the Host header's (a port left out is the default
    port of the Origin's scheme on both sides)."""
    if host is None:
        return False
    try:
        parts = urlsplit(origin)
        origin_port = parts.port
    except ValueError:
        return False
    name = _hostname(host)
    if parts.scheme not in ("http", "https") or not parts.hostname or name is None:
        return False
    default = 443 if parts.scheme == "https" else 80
    host_port = _port(host)
    return parts.hostname == name.lower() and (origin_port or default) == (host_port or default)


def _hostname(host: str) -> str | None:
    """The name of a Host header (`[::1]:8080` -> `::1`), None when malformed."""
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else None
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _port(host: str) -> int | None:
    tail = host.rsplit("]", 1)[-1] if host.startswith("[") else host
    if tail.count(":") != 1:
        return None
    digits = tail.rsplit(":", 1)[1]
    return int(digits) if digits.isdigit() else None


async def _answer(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
