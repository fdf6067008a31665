"""Hostile input to `gembatch serve`: always a 4xx that names the field, never a 500, and
nothing left behind (no file in `inputs/`, no job), on SQLite and on PostgreSQL.

Each case below once answered 500, or was stored and then served as invalid JSON: deep
nesting, integers of thousands of digits, half of a UTF-16 surrogate pair, NUL, NaN, in
the JSON body, the multipart `options`, an uploaded JSONL file and `/job-operations`; a
symlink loop as `input_file`; job ids no job can have; a `Last-Event-ID` beyond any
event. Then hypothesis throws hostile JSON (the same ingredients, combined) at every write
endpoint, and the service must stay healthy. Real service processes on a real emulator and
a real PostgreSQL; the ledger's own refusal and the webhook outbox are driven in-process.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import secrets
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gembatch.ledger import UnstorableRecord
from gembatch.ledger.sql import SqlLedger
from gembatch.server.events import events_for
from gembatch.server.notify import Notifier
from gembatch.server.process import ServiceProcess
from tests.conftest import POSTGRES_URL, _postgres_reason, postgres_schema_url
from tests.server.conftest import ServiceLauncher, jsonl, request_item
from tests.server.reliability_helpers import WebhookReceiver
from tests.server.test_notify import TO_COMPLETED, advance, new_record

# Batches stay PENDING for the whole module: created jobs stay unfinished, as the
# Last-Event-ID case needs.
HELD = {"clock": {"pending_seconds": 600, "running_seconds": 1}}
GOOD = request_item("k1")
DEEP = "[" * 100_000 + "]" * 100_000
DIGITS = "9" * 5000
TEXT_LOC = ["request", "contents", 0, "parts", 0, "text"]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """None (the service's own SQLite file) or a PostgreSQL schema of this module's own."""
    if request.param == "sqlite":
        yield None
        return
    reason = _postgres_reason()
    if reason:
        if os.environ.get("GEMBATCH_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    schema = f"gbt_{secrets.token_hex(6)}"
    admin = POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield postgres_schema_url(schema)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture(scope="module")
def svc(db_url: str | None, module_service_factory: ServiceLauncher) -> Iterator[ServiceProcess]:
    service = module_service_factory(emulator_config=HELD, db_url=db_url)
    yield service
    service.stop()  # before its PostgreSQL schema is dropped


def leftovers(svc: ServiceProcess) -> set[str]:
    """What is in `inputs/` (job inputs and any spooled body)."""
    return {path.name for path in (svc.data_dir / "inputs").iterdir()}


def job_count(client: httpx.Client) -> int:
    response = client.get("/api/jobs", params={"limit": 1000})
    assert response.status_code == 200, response.text
    return response.json()["count"]


def body_with(**fields: str) -> str:
    """A create body of one good request, plus fields given as raw JSON text."""
    parts = [f'"requests": [{json.dumps(GOOD)}]'] + [f'"{k}": {v}' for k, v in fields.items()]
    return "{" + ", ".join(parts) + "}"


def text_body(text: str) -> str:
    """A create body whose one request's text is `text` (raw JSON text of a string)."""
    request = '{"contents": [{"parts": [{"text": ' + text + "}]}]}"
    return '{"requests": [{"key": "k1", "request": ' + request + "}]}"


def operation(action: str, data: str) -> str:
    return '{"action": "' + action + '", "data": ' + data + "}"


# (name, how it is sent, what is sent, status, the location the answer must name)
JSON_CASES: list[tuple[str, str, Any, int, list[Any] | None]] = [
    ("deep metadata", "json", body_with(metadata='{"x": ' + DEEP + "}"), 422,
     ["body", "metadata", "x"]),
    ("deep request", "json", text_body(DEEP), 422, ["body", "requests", 0, *TEXT_LOC]),
    ("5000-digit priority", "json", body_with(priority=DIGITS), 422, ["body", "priority"]),
    ("5000-digit metadata", "json", body_with(metadata='{"n": ' + DIGITS + "}"), 422,
     ["body", "metadata", "n"]),
    ("surrogate in request text", "json", text_body('"a \\ud800 b"'), 422,
     ["body", "requests", 0, *TEXT_LOC]),
    ("surrogate in metadata", "json", body_with(metadata='{"x": "\\udc00"}'), 422,
     ["body", "metadata", "x"]),
    ("NaN in metadata", "json", body_with(metadata='{"x": NaN}'), 422, ["body", "metadata", "x"]),
    ("Infinity priority", "json", body_with(priority="-Infinity"), 422, ["body", "priority"]),
    ("1e999 in metadata", "json", body_with(metadata='{"x": 1e999}'), 422,
     ["body", "metadata", "x"]),
    ("NUL in notify_url", "json", body_with(notify_url='"http://127.0.0.1:9/\\u0000x"'), 422,
     ["body", "notify_url"]),
    ("NUL in a metadata name", "json", body_with(metadata='{"a\\u0000b": 1}'), 422,
     ["body", "metadata"]),
    ("NUL in display_name", "json", body_with(display_name='"a\\u0000b"'), 422,
     ["body", "display_name"]),
    ("NUL in input_file", "json", '{"input_file": "a\\u0000.jsonl"}', 422, ["body", "input_file"]),
    ("huge options", "json", body_with(metadata='{"x": "' + "x" * 2_000_000 + '"}'), 422,
     ["body", "metadata", "x"]),
    ("not JSON", "json", '{"requests": [', 400, None),
    ("options: deep", "options", '{"metadata": ' + DEEP + "}", 422,
     ["body", "options", "metadata"]),
    ("options: 5000-digit priority", "options", '{"priority": ' + DIGITS + "}", 422,
     ["body", "options", "priority"]),
    ("options: surrogate", "options", '{"metadata": {"x": "\\ud800"}}', 422,
     ["body", "options", "metadata", "x"]),
    ("options: NaN", "options", '{"metadata": {"x": NaN}}', 422,
     ["body", "options", "metadata", "x"]),
    ("options: NUL notify_url", "options", '{"notify_url": "http://127.0.0.1:9/\\u0000"}', 422,
     ["body", "options", "notify_url"]),
    ("upload: surrogate", "file", '{"key": "k1", "request": {"contents": [{"parts": '
     '[{"text": "\\ud800"}]}]}}\n', 422, ["input", "line", 1]),
    ("jsonl body: NaN", "jsonl", '{"key": "k1", "request": {"contents": [{"parts": '
     '[{"text": NaN}]}]}}\n', 422, ["input", "line", 1]),
    ("createJob: surrogate", "ops",
     operation("createJob", body_with(metadata='{"x": "\\ud800"}')), 422,
     ["body", "data", "metadata", "x"]),
    ("createJob: deep request", "ops", operation("createJob", text_body(DEEP)), 422,
     ["body", "data", "requests", 0, *TEXT_LOC]),
    ("createJob: NaN priority", "ops", operation("createJob", body_with(priority="NaN")), 422,
     ["body", "data", "priority"]),
    ("updateBatchJob: NUL job id", "ops",
     operation("updateBatchJob", '{"job_id": "j\\u0000", "priority": 1}'), 422,
     ["body", "data", "job_id"]),
    ("deleteJob: NUL job id", "ops", operation("deleteJob", '{"job_id": "\\u0000"}'), 422,
     ["body", "data", "job_id"]),
    ("deleteJob: a job id no job has", "ops", operation("deleteJob", '{"job_id": "a b"}'), 404,
     None),
    ("deleteJob: requests", "ops",
     operation("deleteJob", '{"job_id": "j1", "requests": [' + json.dumps(GOOD) + "]}"), 422,
     ["body", "data", "requests"]),
]  # fmt: skip


def send(client: httpx.Client, how: str, payload: str) -> httpx.Response:
    if how == "json":
        headers = {"Content-Type": "application/json"}
        return client.post("/api/job/batch", content=payload.encode(), headers=headers)
    if how == "options":
        files = {"file": ("in.jsonl", jsonl([GOOD]))}
        return client.post("/api/job/batch", files=files, data={"options": payload})
    if how == "file":
        return client.post("/api/job/batch", files={"file": ("in.jsonl", payload)})
    if how == "jsonl":
        headers = {"Content-Type": "application/jsonl"}
        return client.post("/api/job/batch", content=payload.encode(), headers=headers)
    headers = {"Content-Type": "application/json"}
    return client.post("/job-operations", content=payload.encode(), headers=headers)


@pytest.mark.parametrize(
    ("how", "payload", "status", "loc"),
    [case[1:] for case in JSON_CASES],
    ids=[case[0] for case in JSON_CASES],
)
def test_hostile_input_is_a_4xx_naming_the_field_with_nothing_left_behind(
    svc: ServiceProcess, how: str, payload: str, status: int, loc: list[Any] | None
) -> None:
    with svc.client(timeout=60) as client:
        files, jobs = leftovers(svc), job_count(client)
        response = send(client, how, payload)
        assert response.status_code == status, response.text[:2000]
        detail = response.json()["detail"]
        if loc is not None:
            assert isinstance(detail, list), detail
            locs = [problem["loc"] for problem in detail]
            assert any(where[: len(loc)] == loc for where in locs), (loc, detail)
            assert all(problem["msg"] for problem in detail)
        assert leftovers(svc) == files
        assert job_count(client) == jobs
        assert client.get("/healthz").json()["status"] == "ok"


def test_a_file_name_with_nul_is_refused_naming_the_field(svc: ServiceProcess) -> None:
    # Sent as a raw client may (httpx and browsers would percent-encode the NUL).
    line = json.dumps(GOOD).encode() + b"\n"
    content = (
        b'--XX\r\nContent-Disposition: form-data; name="file"; filename="a\x00b.jsonl"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + line + b"\r\n--XX--\r\n"
    )
    with svc.client() as client:
        files, jobs = leftovers(svc), job_count(client)
        response = client.post(
            "/api/job/batch",
            content=content,
            headers={"Content-Type": "multipart/form-data; boundary=XX"},
        )
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["body", "file"]
        assert leftovers(svc) == files
        assert job_count(client) == jobs


def test_a_symlink_loop_named_as_input_file_is_refused_with_400(svc: ServiceProcess) -> None:
    loop = svc.data_dir / "loop.jsonl"
    if not loop.is_symlink():
        loop.symlink_to(loop.name)
    with svc.client() as client:
        files, jobs = leftovers(svc), job_count(client)
        response = client.post("/api/job/batch", json={"input_file": "loop.jsonl"})
        assert response.status_code == 400, response.text
        assert "loop.jsonl" in response.json()["detail"]
        assert leftovers(svc) == files
        assert job_count(client) == jobs


@pytest.mark.parametrize("job_id", ["j%00", "%00", "a%20b", "j" + "0" * 300, "%E2%80%AE"])
def test_a_job_id_no_job_can_have_is_not_found(svc: ServiceProcess, job_id: str) -> None:
    with svc.client() as client:
        for method, path in [
            ("GET", "/api/job/{}/status"), ("GET", "/api/job/{}/stream"),
            ("GET", "/api/job/{}/events"), ("GET", "/api/job/{}/results"),
            ("DELETE", "/api/job/{}"), ("DELETE", "/api/job/{}?force=true"),
        ]:  # fmt: skip
            response = client.request(method, path.format(job_id))
            assert response.status_code == 404, (method, path, response.text)
            assert response.json()["detail"].startswith("Job not found: ")


@pytest.mark.parametrize("last", [str(2**63), str(2**31), "9" * 5000, "1e3", "٣"])
def test_a_last_event_id_beyond_any_event_is_refused_on_an_unfinished_job(
    svc: ServiceProcess, last: str
) -> None:
    with svc.client() as client:
        response = client.post("/api/job/batch", json={"requests": [GOOD]})
        assert response.status_code == 200, response.text
        job_id = response.json()["job_id"]  # pending or running for the whole module
        answer = client.get(f"/api/job/{job_id}/stream", headers={"Last-Event-ID": last.encode()})
        assert answer.status_code == 400, answer.text
        assert "Last-Event-ID" in answer.json()["detail"]
        # The largest id that can be one still streams: the job is not ended.
        with client.stream(
            "GET", f"/api/job/{job_id}/stream", headers={"Last-Event-ID": str(2**31 - 1)}
        ) as ok:
            assert ok.status_code == 200
        assert client.get("/healthz").json()["status"] == "ok"


# -- hostile JSON, combined, at every write endpoint -----------------------------------------

NAMES = st.sampled_from(
    ["requests", "metadata", "priority", "model", "display_name", "notify_url", "input_file",
     "retry_config", "resource_limits", "max_task_requests", "key", "request", "job_id",
     "status", "force", "a\x00b", "\ud800", "x" * 600]
)  # fmt: skip
LEAVES = st.one_of(
    st.sampled_from(["null", "true", "0", "-1", '""', "[]", "{}", "1.5", "-0.0", "1e-400"]),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", str(2**63), DIGITS]),
    st.sampled_from(['"\\ud800"', '"\\udfff x"', '"a\\u0000b"', '"\\\\ud800"', '"\\ud83d\\ude00"',
                     '"\\ud83d"', '"\\ud83d\\\\ude00"']),
    st.text(st.characters(codec=None), max_size=20).map(json.dumps),  # surrogates, NUL, ...
    st.just(DEEP),
    st.just('"' + "y" * 1_500_000 + '"'),
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(lambda f: json.dumps(f)),  # nan, inf as Python writes them
)  # fmt: skip


def _arrays(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.lists(children, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]")


def _objects(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.lists(st.tuples(NAMES, children), max_size=4).map(
        lambda pairs: "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in pairs) + "}"
    )


HOSTILE = st.recursive(LEAVES, lambda c: st.one_of(_arrays(c), _objects(c)), max_leaves=8)
OBJECTS = st.one_of(_objects(HOSTILE), HOSTILE)
PATH_IDS = st.one_of(
    st.text(st.characters(codec=None), min_size=1, max_size=20),
    st.sampled_from(["\x00", "j\x00", "../x", "%", "j" * 500, "\ud800"]),
)


@st.composite
def write_requests(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    """(method, path, httpx keyword arguments) of one hostile write."""
    kind = draw(st.sampled_from(["create", "create-field", "text", "options", "ops", "ops-field",
                                 "delete", "cleanup"]))  # fmt: skip
    json_headers = {"Content-Type": "application/json"}
    if kind == "create":
        return "POST", "/api/job/batch", {"content": draw(OBJECTS), "headers": json_headers}
    if kind == "create-field":
        fields = {draw(NAMES).replace('"', ""): draw(HOSTILE)}
        return "POST", "/api/job/batch", {"content": body_with(**fields), "headers": json_headers}
    if kind == "text":
        return "POST", "/api/job/batch", {"content": text_body(draw(HOSTILE)),
                                          "headers": json_headers}  # fmt: skip
    if kind == "options":
        files = {"file": ("in.jsonl", jsonl([GOOD]))}
        return "POST", "/api/job/batch", {"files": files, "data": {"options": draw(OBJECTS)}}
    action = draw(st.sampled_from(["createJob", "updateBatchJob", "deleteJob", "nope"]))
    if kind == "ops":
        return "POST", "/job-operations", {"content": operation(action, draw(OBJECTS)),
                                           "headers": json_headers}  # fmt: skip
    if kind == "ops-field":
        data = body_with(**{draw(NAMES).replace('"', ""): draw(HOSTILE)})
        return "POST", "/job-operations", {"content": operation(action, data),
                                           "headers": json_headers}  # fmt: skip
    if kind == "delete":
        job_id = urllib.parse.quote(draw(PATH_IDS), safe="", errors="surrogatepass")
        force = draw(st.sampled_from(["", "?force=true", "?force=%00", "?force=2"]))
        return "DELETE", f"/api/job/{job_id}{force}", {}
    hours = draw(st.sampled_from(["nan", "inf", "-inf", "1e999", DIGITS, "-1", "%00", "\ud800"]))
    query = urllib.parse.quote(hours, safe="", errors="surrogatepass")
    return "POST", f"/api/job/cleanup?max_age_hours={query}", {}


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
)  # fmt: skip
@given(write=write_requests())
def test_hostile_json_at_every_write_endpoint_never_gets_a_server_error(
    svc: ServiceProcess, write: tuple[str, str, dict[str, Any]]
) -> None:
    method, path, kwargs = write
    if isinstance(kwargs.get("content"), str):
        kwargs = {**kwargs, "content": kwargs["content"].encode("utf-8", "surrogatepass")}
    with svc.client(timeout=60) as client:
        response = client.request(method, path, **kwargs)
        assert response.status_code < 500, (method, path, response.text[:2000])
        assert response.status_code in (200, 400, 404, 409, 413, 422), response.text[:2000]
        if response.status_code != 200:
            assert response.json()["detail"], response.text
        assert not [name for name in leftovers(svc) if name.startswith(".")]
        assert client.get("/healthz").json()["status"] == "ok"


def test_after_the_fuzzing_every_input_file_belongs_to_a_job(svc: ServiceProcess) -> None:
    with svc.client() as client:
        jobs = client.get("/api/jobs", params={"limit": 1000}).json()["jobs"]
        ids = {job["job_id"] for job in jobs}
    assert {name.removesuffix(".jsonl") for name in leftovers(svc)} <= ids


# -- the ledger refuses too (a second line), and one bad row stops no other ----------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'gembatch.db'}"
    return str(request.getfixturevalue("postgresql_url"))


@pytest.mark.parametrize(
    "bad",
    [{"metadata": {"x": math.nan}}, {"metadata": {"x": math.inf}}, {"notify_url": "http://a/\x00"},
     {"metadata": {"x\x00": 1}}, {"metadata": {"x": "\ud800"}}, {"display_name": "\udfff"}],
)  # fmt: skip
def test_the_sql_ledger_refuses_what_it_cannot_store_and_writes_nothing(
    any_db_url: str, bad: dict[str, Any]
) -> None:
    with SqlLedger(any_db_url) as ledger:
        ledger.add_many([new_record("jgood")])
        with pytest.raises(UnstorableRecord):
            ledger.add_many([new_record("jother"), {**new_record("jbad"), **bad}])
        assert ledger.get("jbad") is None and ledger.get("jother") is None
        result = ledger.apply({"jgood": lambda record: {**record, **bad}})
        assert isinstance(result.errors["jgood"], UnstorableRecord)
        assert ledger.get("jgood") == new_record_stored(ledger, "jgood")
        # Keys no row can have are simply not there.
        assert ledger.get("j\x00") is None and ledger.status_view("j\x00") is None
        assert ledger.last_seq("j\x00") is None and ledger.events_after("j\x00", 0) == []
        assert ledger.events_after("jgood", 2**63) == []


def new_record_stored(ledger: SqlLedger, job_id: str) -> Any:
    record = ledger.get(job_id)
    assert record is not None and "x" not in (record.get("metadata") or {})
    return record


def test_a_webhook_url_the_database_cannot_store_does_not_stop_the_others(
    postgresql_url: str,
) -> None:
    """A job whose `notify_url` holds NUL (written before the edge refused it) used to fail
    every notification round, so no job of any user was notified again."""
    receiver = WebhookReceiver().start()
    try:
        with SqlLedger(postgresql_url, on_change=events_for) as ledger:
            ledger.add_many([new_record("jbad", "http://127.0.0.1:9/placeholder")])
            with psycopg.connect(postgresql_url.replace("+psycopg", "")) as conn:
                conn.execute(  # json can hold the escape; text columns cannot hold NUL
                    "UPDATE jobs SET record = replace(record::text, 'placeholder', "
                    "'bad\\u0000url')::json WHERE id = 'jbad'"
                )
            assert "\x00" in ledger.get("jbad")["notify_url"]
            advance(ledger, "jbad", TO_COMPLETED)
            ledger.add_many([new_record("jgood", receiver.url("/hook"))])
            advance(ledger, "jgood", TO_COMPLETED)
            notifier = Notifier(
                ledger, settle_seconds=0, max_delay=0.1, base_delay=0.05, allow_private=True
            )

            async def rounds() -> None:
                deadline = time.monotonic() + 20
                while not receiver.received() and time.monotonic() < deadline:
                    await notifier.run_once()
                    await asyncio.sleep(0.05)
                await notifier.aclose()

            asyncio.run(rounds())
        posts = receiver.received()
        assert [post["body"]["job"]["job_id"] for post in posts] == ["jgood"], posts
    finally:
        receiver.stop()
