"""Remote: every call gembatch makes to Gemini, through the real SDK, against emulator
processes."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from gembatch.emulator.process import EmulatorProcess
from gembatch.gemini.errors import classify
from gembatch.gemini.remote import Remote, RemoteBatch
from gembatch.jobs import ErrorClass, RemoteState

MODEL = "gemini-2.5-flash"
T = TypeVar("T")


def jsonl(count: int, prefix: str = "k") -> bytes:
    lines = (
        json.dumps(
            {"key": f"{prefix}{i}", "request": {"contents": [{"parts": [{"text": f"q {i}"}]}]}}
        )
        for i in range(count)
    )
    return "".join(line + "\n" for line in lines).encode()


def run(emu: EmulatorProcess, body: Callable[[Remote], Awaitable[T]], **kwargs: Any) -> T:
    """Run `body` with a Remote on the emulator, in a fresh event loop."""

    async def main() -> T:
        async with Remote(emu.api_key, emu.base_url, **kwargs) as remote:
            return await body(remote)

    return asyncio.run(main())


async def upload_bytes(remote: Remote, data: bytes, name: str) -> str:
    return await remote.upload(io.BytesIO(data), len(data), name)


async def until_terminal(remote: Remote, name: str, timeout: float = 20.0) -> RemoteBatch:
    deadline = time.monotonic() + timeout
    while True:
        batch = await remote.get_batch(name)
        if batch.state.terminal:
            return batch
        assert time.monotonic() < deadline, f"{name} still {batch.state} after {timeout} s"
        await asyncio.sleep(0.05)


def raw_download(emu: EmulatorProcess, file_name: str) -> bytes:
    url = f"{emu.base_url}/v1beta/{file_name}:download?alt=media"
    response = httpx.get(url, headers={"x-goog-api-key": emu.api_key}, timeout=30)
    response.raise_for_status()
    return response.content


@pytest.fixture
def slow_clock(emulator_factory: Callable[..., EmulatorProcess]) -> EmulatorProcess:
    return emulator_factory({"clock": {"pending_seconds": 0.5, "running_seconds": 3}})


@pytest.fixture
def many_batches(emulator_factory: Callable[..., EmulatorProcess]) -> EmulatorProcess:
    """Batches stay pending for a minute, and up to 1,000 may be active."""
    return emulator_factory(
        {"limits": {"max_active_batches": 1000}, "clock": {"pending_seconds": 60}}
    )


# -- upload ------------------------------------------------------------------------------


def test_upload_sends_exactly_the_byte_range(emulator: EmulatorProcess, tmp_path: Path) -> None:
    first, second = jsonl(3, "a"), jsonl(5, "b")
    path = tmp_path / "input.jsonl"
    path.write_bytes(first + second + b"trailing bytes that are not ours")

    async def body(remote: Remote) -> RemoteBatch:
        with open(path, "rb") as handle:
            handle.seek(len(first))  # a byte-range view: the second part only
            name = await remote.upload(handle, len(second), "range-upload")
        assert name.startswith("files/")
        return await until_terminal(remote, (await remote.create_batch(MODEL, name, "range")).name)

    batch = run(emulator, body)
    assert batch.state is RemoteState.SUCCEEDED
    assert batch.counts.total == 5  # the five "b" lines, nothing before or after
    assert batch.output_file
    keys = {
        json.loads(line)["key"] for line in raw_download(emulator, batch.output_file).splitlines()
    }
    assert keys == {f"b{i}" for i in range(5)}
    assert emulator.stats()["upload_bytes"] == len(second)


def test_upload_of_a_source_shorter_than_its_size_fails(emulator: EmulatorProcess) -> None:
    async def body(remote: Remote) -> None:
        await remote.upload(io.BytesIO(b"only ten b"), 100, "short")

    with pytest.raises(EOFError) as caught:
        run(emulator, body)
    assert classify(caught.value).error_class is ErrorClass.LOCAL_IO
    assert emulator.stats()["uploads"] == 0  # never finalized as if complete


# -- create / get ------------------------------------------------------------------------


def test_get_batch_reports_counts_moving_while_running(slow_clock: EmulatorProcess) -> None:
    async def body(remote: Remote) -> tuple[RemoteBatch, list[RemoteBatch]]:
        name = await upload_bytes(remote, jsonl(40), "forty")
        created = await remote.create_batch(MODEL, name, "counts-move")
        seen = []
        while not (batch := await remote.get_batch(created.name)).state.terminal:
            seen.append(batch)
            await asyncio.sleep(0.1)
        seen.append(batch)
        return created, seen

    created, seen = run(slow_clock, body)
    assert created.state is RemoteState.PENDING
    assert created.display_name == "counts-move"
    assert created.model == "models/gemini-2.5-flash"
    assert created.counts.total == 40  # requestCount is known at create time
    assert created.create_time and created.create_time.endswith("+00:00")
    running = [b.counts.done for b in seen if b.state is RemoteState.RUNNING]
    assert len(set(running)) >= 3, running  # moving, not jumping from 0 to 40
    assert running == sorted(running)
    assert all(0 <= done < 40 for done in running)
    final = seen[-1]
    assert final.state is RemoteState.SUCCEEDED
    assert (final.counts.total, final.counts.succeeded, final.counts.failed) == (40, 40, 0)
    assert final.output_file == "files/batch-" + created.name.removeprefix("batches/")
    assert final.end_time is not None
    record = final.to_batch_dict()
    assert record["state"] == "JOB_STATE_SUCCEEDED"
    assert record["dest"] == {"file_name": final.output_file}
    assert record["stats"] == {"total": 40, "succeeded": 40, "failed": 0, "pending": 0}
    assert "error" not in record


def test_failed_requests_and_a_failed_batch_are_reported(
    emulator_factory: Callable[..., EmulatorProcess],
) -> None:
    emulator = emulator_factory(
        {
            "clock": {"pending_seconds": 0.1, "running_seconds": 0.3},
            "faults": {"batches": {"fail_rate": 1.0, "match": "doomed"}},
        }
    )
    lines = jsonl(3) + json.dumps({"key": "bad", "request": {}}).encode() + b"\n"

    async def body(remote: Remote) -> tuple[RemoteBatch, RemoteBatch]:
        name = await upload_bytes(remote, lines, "mixed")
        ok = await remote.create_batch(MODEL, name, "partly-failed")
        doomed = await remote.create_batch(MODEL, name, "doomed")
        return await until_terminal(remote, ok.name), await until_terminal(remote, doomed.name)

    partly, doomed = run(emulator, body)
    assert partly.state is RemoteState.SUCCEEDED
    assert (partly.counts.total, partly.counts.succeeded, partly.counts.failed) == (4, 3, 1)
    assert doomed.state is RemoteState.FAILED
    assert doomed.error and doomed.error.get("message")  # the reason the SDK drops
    assert doomed.to_batch_dict()["error"] == doomed.error


def test_cancel_batch_ends_it_cancelled(many_batches: EmulatorProcess) -> None:
    async def body(remote: Remote) -> tuple[RemoteBatch, RemoteBatch]:
        created = await remote.create_batch(
            MODEL, await upload_bytes(remote, jsonl(2), "c"), "to-cancel"
        )
        await remote.cancel_batch(created.name)
        return created, await until_terminal(remote, created.name)

    created, cancelled = run(many_batches, body)
    assert created.state is RemoteState.PENDING
    assert cancelled.state is RemoteState.CANCELLED
    assert many_batches.stats()["batches_cancelled"] == 1


def test_delete_twice_second_returns_false(emulator: EmulatorProcess) -> None:
    async def body(remote: Remote) -> list[bool]:
        name = await upload_bytes(remote, jsonl(2), "d")
        batch = await until_terminal(remote, (await remote.create_batch(MODEL, name, "d")).name)
        results = [await remote.delete_batch(batch.name), await remote.delete_batch(batch.name)]
        results += [await remote.delete_file(name), await remote.delete_file(name)]
        with pytest.raises(Exception) as caught:
            await remote.get_batch(batch.name)
        assert classify(caught.value).error_class is ErrorClass.NOT_FOUND
        return results

    assert run(emulator, body) == [True, False, True, False]


# -- listing and reconciling -------------------------------------------------------------


def test_find_batches_pages_through_more_than_100(many_batches: EmulatorProcess) -> None:
    count = 130
    inputs: list[str] = []  # the shared input, then what each create's Operation says

    async def body(remote: Remote) -> tuple[dict[str, RemoteBatch], dict[str, str], int]:
        name = await upload_bytes(remote, jsonl(3), "shared-input")
        inputs.append(name)
        created = await asyncio.gather(
            *(remote.create_batch(MODEL, name, f"job-{i:03d}") for i in range(count))
        )
        wanted = {"job-000", "job-064", "job-129", "never-created"}
        found = await remote.find_batches(wanted)
        by_name = {b.display_name: b.name for b in created if b.display_name}
        inputs.extend(str(b.input_file) for b in created)
        return found, by_name, len(await remote.list_batches())

    found, by_name, listed = run(many_batches, body)
    assert listed == count
    assert set(found) == {"job-000", "job-064", "job-129"}
    for display_name, batch in found.items():
        assert batch.name == by_name[display_name]
        assert batch.state is RemoteState.PENDING
        assert batch.counts.total == 3  # counts from the raw list pages too
        assert batch.input_file == inputs[0]  # inputConfig.fileName, from the raw list pages
    assert set(inputs) == {inputs[0]}
    assert many_batches.stats()["calls"]["batches.list"] >= 4  # two pages, twice


def test_find_files_and_list_files_page_through_everything(
    many_batches: EmulatorProcess,
) -> None:
    async def body(remote: Remote) -> tuple[dict[str, str], list[dict[str, Any]], list[str]]:
        names = await asyncio.gather(
            *(upload_bytes(remote, jsonl(1, f"f{i}-"), f"input-{i:03d}") for i in range(105))
        )
        found = await remote.find_files({"input-003", "input-104", "not-uploaded"})
        return found, await remote.list_files(), list(names)

    found, listed, names = run(many_batches, body)
    assert found == {"input-003": names[3], "input-104": names[104]}
    assert len(listed) == 105
    one = next(f for f in listed if f["name"] == names[3])
    assert one["display_name"] == "input-003"
    assert one["size_bytes"] == len(jsonl(1, "f3-"))
    assert one["source"] == "UPLOADED"
    assert one["create_time"].endswith("+00:00")


# -- download ----------------------------------------------------------------------------


def test_download_streams_into_a_file(emulator: EmulatorProcess, tmp_path: Path) -> None:
    target = tmp_path / "results.part"

    async def body(remote: Remote) -> tuple[str, int]:
        name = await upload_bytes(remote, jsonl(25), "dl")
        batch = await until_terminal(remote, (await remote.create_batch(MODEL, name, "dl")).name)
        assert batch.output_file
        with open(target, "wb") as handle:
            written = await remote.download(batch.output_file, handle)
        return batch.output_file, written

    output_file, written = run(emulator, body)
    expected = raw_download(emulator, output_file)
    assert target.read_bytes() == expected
    assert written == len(expected)
    assert sorted(json.loads(line)["key"] for line in expected.splitlines()) == sorted(
        f"k{i}" for i in range(25)
    )


def test_truncated_download_raises_instead_of_returning(emulator: EmulatorProcess) -> None:
    async def body(remote: Remote) -> tuple[BaseException, bytes, int]:
        name = await upload_bytes(remote, jsonl(50), "cut")
        batch = await until_terminal(remote, (await remote.create_batch(MODEL, name, "cut")).name)
        assert batch.output_file
        emulator.set_config({"faults": {"downloads": {"truncate_first": 1, "mode": "abort"}}})
        with pytest.raises(Exception) as caught:
            await remote.download(batch.output_file, io.BytesIO())
        again = io.BytesIO()
        written = await remote.download(batch.output_file, again)  # the next one is whole
        return caught.value, again.getvalue(), written

    error, whole, written = run(emulator, body)
    assert classify(error).error_class is ErrorClass.NETWORK
    assert not classify(error).definitive
    assert written == len(whole) and len(whole.splitlines()) == 50
    assert emulator.stats()["downloads_truncated"] == 1


# -- concurrency -------------------------------------------------------------------------


def test_200_concurrent_gets_each_return_their_own_batch(
    many_batches: EmulatorProcess,
) -> None:
    emulator = many_batches
    sizes = range(1, 41)  # batch i has i requests: a mixed-up raw body would show

    async def body(remote: Remote) -> tuple[list[RemoteBatch], list[RemoteBatch], float]:
        files = await asyncio.gather(*(upload_bytes(remote, jsonl(n), f"in-{n}") for n in sizes))
        created = await asyncio.gather(
            *(remote.create_batch(MODEL, f, f"size-{n}") for f, n in zip(files, sizes, strict=True))
        )
        emulator.set_config({"faults": {"rules": [{"endpoint": "batches.get", "latency_ms": 50}]}})
        wanted = [b for b in created for _ in range(5)]
        started = time.perf_counter()
        got = await asyncio.gather(*(remote.get_batch(b.name) for b in wanted))
        return wanted, got, time.perf_counter() - started

    wanted, got, elapsed = run(emulator, body, concurrency=32)
    print(f"200 get_batch with 50 ms latency, concurrency 32: {elapsed:.2f} s (sequential: 10 s)")
    assert len(got) == 200
    for asked, answer in zip(wanted, got, strict=True):
        assert answer.name == asked.name
        assert answer.display_name == asked.display_name
        assert answer.counts.total == int(asked.display_name.removeprefix("size-"))


def test_remote_works_after_the_sdk_client_would_be_collected(emulator: EmulatorProcess) -> None:
    # The SDK closes its transports when its Client is garbage collected; the Remote keeps
    # its client alive, so calls keep working across collections.

    async def body(remote: Remote) -> int:
        name = await upload_bytes(remote, jsonl(2), "gc")
        gc.collect()
        batch = await remote.create_batch(MODEL, name, "gc")
        gc.collect()
        return (await remote.get_batch(batch.name)).counts.total

    assert run(emulator, body) == 2


# -- models ------------------------------------------------------------------------------


def test_get_model_answers_the_model_or_a_classified_404(emulator: EmulatorProcess) -> None:
    async def body(remote: Remote) -> tuple[Any, BaseException]:
        known = await remote.get_model("gemini-2.5-flash", timeout=5)
        with pytest.raises(Exception) as caught:
            await remote.get_model("no-such-model")
        return known, caught.value

    known, error = run(emulator, body)
    assert known.name == "models/gemini-2.5-flash"
    assert "batchGenerateContent" in known.supported_actions
    classified = classify(error)
    assert classified.error_class is ErrorClass.NOT_FOUND and classified.http_status == 404
    assert "no-such-model" in classified.message
    assert emulator.stats()["calls"]["models.get"] == 2
