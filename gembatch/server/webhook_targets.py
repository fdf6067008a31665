"""Where a webhook may go: public addresses only, checked when the URL is given and again
at the moment of sending, on the very address the POST then connects to.

Why: a `notify_url` is a URL a caller chooses and the service fetches. Pointed at
127.0.0.1, a private network or a cloud metadata address, it would make the service reach
what the caller cannot (SSRF). So every address the host name resolves to must be public
(not loopback, private, link-local, multicast, unspecified or reserved, IPv4 inside IPv6
included), unless the operator allows private targets (`--notify-allow-private`, for
tests and intranets). A name that resolves to a public address at create time may
resolve to 127.0.0.1 later (DNS rebinding): the sender resolves again, checks, and
connects to the address it checked, sending the original name as Host and TLS SNI.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# host, port -> the addresses the name resolves to (as text); a test swaps DNS with this.
Resolver = Callable[[str, int], Awaitable[list[str]]]
ALLOW_FLAG = "--notify-allow-private"
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # the well-known NAT64 prefix, RFC 6052


class TargetRefused(ValueError):
    """The URL may not receive webhooks (its message says why and what to do); retrying
    does not change that."""


def url_problem(url: str) -> str | None:
    """What is wrong with `url` as a webhook URL (None: nothing). No I/O."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not parts.hostname:
        return "has no host name"
    if any(c.isspace() for c in url):
        return "must not contain spaces"
    if _ip(parts.hostname) is None:
        problem = _host_name_problem(parts.hostname)
        if problem is not None:
            return problem
    return None


def _host_name_problem(host: str) -> str | None:
    """What no resolver would take in a host name (DNS: labels of at most 63 bytes, 253
    in all, in IDNA form); the resolver itself raises UnicodeError for these."""
    try:
        encoded = host.encode("idna")
    except UnicodeError as exc:
        return f"has a host name DNS cannot carry ({exc})"
    if len(encoded.rstrip(b".")) > 253:
        return "has a host name longer than DNS allows (253 characters)"
    return None


def address_problem(address: IPAddress) -> str | None:
    """Why a webhook may not go to `address` (None: it may). No I/O."""
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:a.b.c.d is a.b.c.d, nothing else
    for ip in [mapped] if mapped else [address, _embedded_ipv4(address)]:
        if ip is None:
            continue
        if ip.is_unspecified:
            return "an unspecified address (it means this machine)"
        if ip.is_loopback:
            return "a loopback address (this machine)"
        if ip.is_link_local:
            return "a link-local address (where cloud metadata services answer)"
        if ip.is_multicast:
            return "a multicast address"
        if ip.is_private:
            return "a private address"
        if ip.is_reserved or not ip.is_global:
            return "a reserved address, not reachable on the internet"
    return None


async def addresses_for(
    url: str, *, allow_private: bool, resolver: Resolver | None = None
) -> list[IPAddress]:
    """Every address `url`'s host resolves to, each one allowed. Raises TargetRefused
    when the URL or any of its addresses is refused (one private address among public
    ones refuses the URL: the connection could land on it), and OSError (socket.gaierror)
    when the name does not resolve."""
    problem = url_problem(url)
    if problem is not None:
        raise TargetRefused(f"{safe_url(url)} {problem}")
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    literal = _ip(host)
    if literal is not None:
        found = [literal]
    else:
        found = [ip for text in await (resolver or resolve)(host, port) if (ip := _ip(text))]
        if not found:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} has no address")
    if not allow_private:
        for ip in found:
            reason = address_problem(ip)
            if reason is not None:
                target = safe_url(url) + ("" if literal is not None else f" (resolved to {ip})")
                raise TargetRefused(
                    f"{target} is {reason}: webhooks go only to public addresses. Use a "
                    f"public URL, or start the service with {ALLOW_FLAG} (tests, intranets)"
                )
    return found


async def target_problem(
    url: str, *, allow_private: bool, resolver: Resolver | None = None, timeout: float = 5.0
) -> str | None:
    """What a client is told about a webhook URL it gives (None: accepted). A name that
    does not exist is refused; a resolver that cannot answer now (no network, slow) is
    not: the sender checks every address again before each POST."""
    try:
        await asyncio.wait_for(
            addresses_for(url, allow_private=allow_private, resolver=resolver), timeout
        )
    except TargetRefused as exc:
        return str(exc)
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            host = urlsplit(url).hostname
            return f"{safe_url(url)}: the host name {host} does not resolve; check the URL"
    except (OSError, TimeoutError):
        pass
    return None


def check_target_now(url: str, *, allow_private: bool) -> str | None:
    """`target_problem` outside an event loop (the service's own `--notify-url`, at start)."""
    return asyncio.run(target_problem(url, allow_private=allow_private))


async def resolve(host: str, port: int) -> list[str]:
    """The system resolver (without blocking the event loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def safe_url(url: str) -> str:
    """`url` as it may appear in logs, errors and messages: no user:password@, no query."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:  # IPv6
            host = f"[{host}]"
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:
        return "<invalid URL>"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (6to4, NAT64), which is where a
    connection to it may end up."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.sixtofour is not None:
        return address.sixtofour
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None
