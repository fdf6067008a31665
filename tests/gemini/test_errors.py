"""classify(): real errors from the real SDK, httpx, httpx2 and the OS, each in its class.

The API errors come from emulator processes (faults injected by configuration), the
transport errors from real sockets, the disk-full error from /dev/full.
"""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import socket
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import httpx2
import pytest
from google import genai
from google.genai import types

from gembatch.emulator.process import EmulatorProcess
from gembatch.errors import UserError
from gembatch.gemini.errors import Classified, classify, error_info, parse_retry_after, scrub
from gembatch.gemini.remote import Remote
from gembatch.jobs import ErrorClass, now_iso
from tests.conftest import FAST_CLOCK

SECRET_KEY = "AIzaSy-emulator-secret-key-0123456789abcdef"
MODEL = "gemini-2.5-flash"


def jsonl(count: int, prefix: str = "k") -> bytes:
    lines = (
        json.dumps({"key": f"{prefix}{i}", "request": {"contents": [{"parts": [{"text": "hi"}]}]}})
        for i in range(count)
    )
    return "".join(line + "\n" for line in lines).encode()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def raised(call: Callable[[Remote], Any], emu: EmulatorProcess, **remote_args: Any) -> Classified:
    """Run one Remote call against the emulator; classify what it raised."""

    async def run() -> Classified:
        async with Remote(
            remote_args.pop("api_key", emu.api_key), remote_args.pop("base_url", emu.base_url),
            **remote_args,
        ) as remote:  # fmt: skip
            try:
                await call(remote)
            except BaseException as exc:
                return classify(exc)
        raise AssertionError("the call did not fail")

    return asyncio.run(run())


@pytest.fixture(scope="module")
def shared_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    state = tmp_path_factory.mktemp("emulator")
    with EmulatorProcess(state_dir=state, config=FAST_CLOCK) as emulator:
        yield emulator


@pytest.fixture
def api(shared_emulator: EmulatorProcess) -> EmulatorProcess:
    """One emulator for the module (a second each to start is most of these tests' time),
    its faults cleared before each test."""
    shared_emulator.set_config(
        {"faults": {"rules": [], "downloads": {"truncate_first": 0}}, "auth": {"api_keys": []}}
    )
    return shared_emulator


async def uploaded(remote: Remote, count: int = 2, name: str = "in") -> str:
    return await remote.upload(io.BytesIO(jsonl(count)), len(jsonl(count)), name)


# -- API errors, through the SDK ---------------------------------------------------------


def test_429_is_rate_limited_with_retry_after_from_the_header(api: EmulatorProcess) -> None:
    api.set_config(
        {
            "faults": {
                "rules": [{"endpoint": "batches.create", "status": 429, "retry_after_seconds": 7}]
            }
        }
    )

    async def create(remote: Remote) -> None:
        await remote.create_batch(MODEL, await uploaded(remote), "rate-limited")

    result = raised(create, api)
    assert result.error_class is ErrorClass.RATE_LIMITED
    assert result.code == "429 RESOURCE_EXHAUSTED"
    assert result.http_status == 429
    assert result.retry_after == 7.0
    assert result.definitive  # a 429 created nothing
    assert "quota" in result.message


@pytest.mark.parametrize("status, code", [(500, "500 INTERNAL"), (503, "503 UNAVAILABLE")])
def test_5xx_is_a_server_error_that_may_have_taken_effect(
    api: EmulatorProcess, status: int, code: str
) -> None:
    api.set_config(
        {
            "faults": {
                "rules": [{"endpoint": "batches.get", "status": status, "retry_after_seconds": 3}]
            }
        }
    )
    result = raised(lambda r: r.get_batch("batches/whatever"), api)
    assert result.error_class is ErrorClass.SERVER_ERROR
    assert result.code == code
    assert result.retry_after == 3.0
    assert not result.definitive


@pytest.mark.parametrize(
    "status, error_class, code",
    [
        (401, ErrorClass.AUTH, "401 UNAUTHENTICATED"),
        (403, ErrorClass.AUTH, "403 PERMISSION_DENIED"),
        (408, ErrorClass.TIMEOUT, "408"),
        (409, ErrorClass.INVALID_INPUT, "409 ABORTED"),
        (413, ErrorClass.INVALID_INPUT, "413"),
    ],
)
def test_other_client_errors_by_status(
    api: EmulatorProcess, status: int, error_class: ErrorClass, code: str
) -> None:
    api.set_config({"faults": {"rules": [{"endpoint": "batches.get", "status": status}]}})
    result = raised(lambda r: r.get_batch("batches/whatever"), api)
    assert result.error_class is error_class
    assert result.code.startswith(code)
    assert result.http_status == status
    assert result.definitive is (error_class is not ErrorClass.TIMEOUT)


def test_unknown_batch_is_not_found(api: EmulatorProcess) -> None:
    result = raised(lambda r: r.get_batch("batches/doesnotexist"), api)
    assert result.error_class is ErrorClass.NOT_FOUND
    assert result.code == "404 NOT_FOUND"


def test_unknown_model_is_not_found(api: EmulatorProcess) -> None:
    async def create(remote: Remote) -> None:
        await remote.create_batch("not-a-model", await uploaded(remote), "bad-model")

    assert raised(create, api).error_class is ErrorClass.NOT_FOUND


def test_create_from_a_missing_file_is_not_found_though_google_says_403(
    api: EmulatorProcess,
) -> None:
    # Google answers a missing or expired file with 403 PERMISSION_DENIED "... or it may
    # not exist": the file is gone (re-upload), not a credentials problem.
    result = raised(lambda r: r.create_batch(MODEL, "files/gone123", "missing"), api)
    assert result.error_class is ErrorClass.NOT_FOUND
    assert result.code == "403 PERMISSION_DENIED"
    assert "may not exist" in result.message


def test_bad_input_file_is_invalid_input(api: EmulatorProcess) -> None:
    async def create(remote: Remote) -> None:
        bad = b'{"key": "a", "request": {}}\nnot json\n'
        name = await remote.upload(io.BytesIO(bad), len(bad), "bad")
        await remote.create_batch(MODEL, name, "bad-input")

    result = raised(create, api)
    assert result.error_class is ErrorClass.INVALID_INPUT
    assert result.code == "400 INVALID_ARGUMENT"


def test_wrong_api_key_is_auth_though_google_says_400(api: EmulatorProcess) -> None:
    api.set_config({"auth": {"api_keys": ["the-good-key"]}})
    result = raised(lambda r: r.list_batches(), api, api_key=SECRET_KEY)
    assert result.error_class is ErrorClass.AUTH
    assert result.code == "400 INVALID_ARGUMENT"


def test_sdk_client_side_checks_are_invalid_input(api: EmulatorProcess) -> None:
    # The SDK refuses a batch name without "batches/" before sending anything.
    before = api.stats()["calls"].get("batches.get", 0)
    result = raised(lambda r: r.get_batch("no-prefix"), api)
    assert result.error_class is ErrorClass.INVALID_INPUT
    assert result.code == "ValueError"
    assert api.stats()["calls"].get("batches.get", 0) == before


# -- transport errors --------------------------------------------------------------------


def test_connection_refused_is_network_and_definitive(api: EmulatorProcess) -> None:
    result = raised(lambda r: r.get_batch("batches/x"), api, base_url=closed_port_url())
    assert result.error_class is ErrorClass.NETWORK
    assert result.code == "ConnectError"
    assert result.definitive  # nothing was sent: repeating a create is safe
    assert "could not connect" in result.message


def test_truncated_download_is_network_and_not_definitive(api: EmulatorProcess) -> None:
    async def download(remote: Remote) -> None:
        name = await uploaded(remote, 30)
        batch = await remote.create_batch(MODEL, name, "to-download")
        while not batch.state.terminal:
            await asyncio.sleep(0.1)
            batch = await remote.get_batch(batch.name)
        assert batch.output_file
        api.set_config({"faults": {"downloads": {"truncate_first": 1, "mode": "abort"}}})
        await remote.download(batch.output_file, io.BytesIO())

    result = raised(download, api)
    assert result.error_class is ErrorClass.NETWORK
    assert result.code == "RemoteProtocolError"
    assert not result.definitive


def test_read_timeout_is_timeout_and_not_definitive(api: EmulatorProcess) -> None:
    api.set_config({"faults": {"rules": [{"endpoint": "batches.get", "latency_ms": 3000}]}})
    result = raised(lambda r: r.get_batch("batches/slow"), api, timeout=0.5)
    assert result.error_class is ErrorClass.TIMEOUT
    assert result.code == "ReadTimeout"
    assert not result.definitive


def test_asyncio_timeout_is_timeout(api: EmulatorProcess) -> None:
    api.set_config({"faults": {"rules": [{"endpoint": "batches.get", "latency_ms": 3000}]}})
    result = raised(lambda r: asyncio.wait_for(r.get_batch("batches/slow"), 0.3), api)
    assert result.error_class is ErrorClass.TIMEOUT
    assert result.code == "TIMEOUT"
    assert not result.definitive


def test_httpx2_errors_from_the_sdks_default_transport() -> None:
    # Without our httpx client, the SDK 3.4 talks through httpx2: same classes, by name.
    client = genai.Client(
        api_key=SECRET_KEY, http_options=types.HttpOptions(base_url=closed_port_url())
    )

    async def get() -> BaseException:
        try:
            await client.aio.batches.get(name="batches/x")
        except BaseException as exc:
            return exc
        raise AssertionError("the call did not fail")

    exc = asyncio.run(get())
    assert type(exc).__module__.split(".")[0] == "httpx2"
    result = classify(exc)
    assert result.error_class is ErrorClass.NETWORK
    assert result.code == "ConnectError"
    assert result.definitive
    for timeout in (httpx2.ConnectTimeout("x"), httpx.PoolTimeout("x")):
        assert classify(timeout).error_class is ErrorClass.TIMEOUT
        assert classify(timeout).definitive  # nothing was sent
    assert not classify(httpx2.ReadTimeout("x")).definitive


def test_connection_closed_after_sending_may_have_taken_effect() -> None:
    # A server that reads the whole request, then hangs up without answering: the
    # request may have been acted on, so a create must be reconciled, not repeated.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.setblocking(False)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/v1/models/m:batchGenerateContent"

        async def post() -> BaseException:
            loop = asyncio.get_running_loop()
            async with httpx.AsyncClient() as client:
                request = asyncio.create_task(client.post(url, content=b"{}"))
                conn, _ = await loop.sock_accept(server)
                await loop.sock_recv(conn, 65536)
                conn.close()
                try:
                    await request
                except BaseException as exc:
                    return exc
            raise AssertionError("the call did not fail")

        exc = asyncio.run(post())
    result = classify(exc)
    assert result.error_class is ErrorClass.NETWORK
    assert result.code in ("RemoteProtocolError", "ReadError")
    assert not result.definitive


# -- local errors ------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_disk_full_while_downloading_is_local_io(api: EmulatorProcess) -> None:
    async def download(remote: Remote) -> None:
        batch = await remote.create_batch(MODEL, await uploaded(remote, 5), "disk-full")
        while not batch.state.terminal:
            await asyncio.sleep(0.1)
            batch = await remote.get_batch(batch.name)
        assert batch.output_file
        with open("/dev/full", "wb", buffering=0) as full:
            await remote.download(batch.output_file, full)

    result = raised(download, api)
    assert result.error_class is ErrorClass.LOCAL_IO
    assert result.code == "ENOSPC"
    assert result.definitive


@pytest.mark.parametrize("number", [errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS])
def test_local_filesystem_errors_are_local_io(number: int) -> None:
    result = classify(OSError(number, os.strerror(number), "/results/out.jsonl"))
    assert result.error_class is ErrorClass.LOCAL_IO
    assert result.code == errno.errorcode[number]
    assert "/results/out.jsonl" in result.message


def test_cancellation_is_cancelled_and_bugs_are_internal() -> None:
    assert classify(asyncio.CancelledError()).error_class is ErrorClass.CANCELLED
    assert classify(KeyboardInterrupt()).error_class is ErrorClass.CANCELLED
    internal = classify(RuntimeError("unexpected state"))
    assert internal.error_class is ErrorClass.INTERNAL
    assert internal.code == "RuntimeError"
    assert internal.message == "unexpected state"
    assert classify(UserError("no such file")).error_class is ErrorClass.INVALID_INPUT


# -- messages, Retry-After, ErrorInfo ------------------------------------------------------


def test_the_api_key_never_appears_in_any_message(api: EmulatorProcess) -> None:
    seen: list[Classified] = []
    scenarios: list[tuple[Callable[[Remote], Any], dict[str, Any], dict[str, Any]]] = [
        (lambda r: r.get_batch("batches/nope"), {}, {}),
        (lambda r: r.create_batch(MODEL, "files/nope", "x"), {}, {}),
        (lambda r: r.get_batch("batches/x"), {"base_url": closed_port_url()}, {}),
        (
            lambda r: r.get_batch("batches/x"),
            {"timeout": 0.3},
            {"faults": {"rules": [{"endpoint": "batches.get", "latency_ms": 1000}]}},
        ),
        (
            lambda r: r.list_batches(),
            {},
            {"faults": {"rules": [{"endpoint": "batches.list", "status": 429}]}},
        ),
        (
            lambda r: r.list_files(),
            {},
            {"faults": {"rules": [{"endpoint": "files.list", "status": 503}]}},
        ),
    ]
    for call, remote_args, config in scenarios:
        api.set_config(config or {"faults": {"rules": []}})
        seen.append(raised(call, api, api_key=SECRET_KEY, **remote_args))
    api.set_config({"auth": {"api_keys": ["another-key"]}, "faults": {"rules": []}})
    seen.append(raised(lambda r: r.list_batches(), api, api_key=SECRET_KEY))
    assert len({c.error_class for c in seen}) >= 5
    for result in seen:
        record = json.dumps(error_info(result, step="poll", attempt=1, task=0).to_dict())
        assert SECRET_KEY not in record and SECRET_KEY not in result.message


def test_scrub_removes_keys_from_urls_headers_and_text() -> None:
    text = (
        "GET https://host/v1/files?key=s3cret&alt=media failed; "
        "headers {'x-goog-api-key': 's3cret', 'Authorization': 'Bearer s3cret'}; "
        "x-goog-api-key: s3cret; key AIzaSyD-abcdefghijklmnopqrstuvwxyz0123"
    )
    cleaned = scrub(text)
    assert "s3cret" not in cleaned
    assert "AIza" not in cleaned
    assert "alt=media" in cleaned  # only the secrets go
    assert classify(RuntimeError(text)).message == cleaned


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=90), usegmt=True)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 2.5 ") == 2.5
    assert parse_retry_after(later, now=now.timestamp()) == 90.0
    assert parse_retry_after(format_datetime(now, usegmt=True), now=now.timestamp() + 5) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_error_info_records_class_step_attempt_and_time() -> None:
    classified = Classified(
        ErrorClass.RATE_LIMITED, "429 RESOURCE_EXHAUSTED", "quota", 429, retry_after=5.0
    )
    info = error_info(classified, step="submitting", attempt=2, task=1, now=1_700_000_000.0)
    assert info.to_dict() == {
        "code": "429 RESOURCE_EXHAUSTED",
        "message": "quota",
        "class": "RATE_LIMITED",
        "step": "submitting",
        "attempt": 2,
        "at": now_iso(1_700_000_000.0),
        "retry_after": 5.0,
        "task": 1,
    }
