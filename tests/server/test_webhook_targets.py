"""Webhooks go only where a caller could go anyway: a `notify_url` (or `--notify-url`) at a
loopback, private, link-local, multicast, unspecified or reserved address is refused when
it is given, and again just before each POST, on the very address the POST connects to
(a name that resolved to a public address at create time may point at 127.0.0.1 by
then); `--notify-allow-private` lets tests and intranets through. The receiver's reply is
never kept: an internal server's answer must not come back to whoever chose the URL.

Real `gembatch serve` processes and a real HTTP receiver on 127.0.0.1; for the moment of
sending, the notifier in this process over a real SQLite ledger, with the system resolver
or, to play a DNS server that changes its answers, a resolver given to the notifier.
"""

from __future__ import annotations

import asyncio
import datetime
import http.server
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from gembatch.server.notify import Notifier
from gembatch.server.process import ServiceProcess
from gembatch.server.run import READY_PREFIX
from gembatch.server.webhook_targets import address_problem, resolve
from tests.server import test_notify
from tests.server.conftest import (
    FAST_EMULATOR_CONFIG,
    TERMINAL,
    ServiceLauncher,
    audit_of,
    create_job,
    eventually,
    inline_body,
    jsonl,
    request_item,
    wait_status,
)
from tests.server.test_notify import (
    TO_COMPLETED,
    Receiver,
    _audit_rows,
    advance,
    deliveries,
    drain,
    new_record,
)

REFUSED_ADDRESSES = [
    "127.0.0.1", "127.8.9.10", "::1", "0.0.0.0", "::", "10.0.0.1", "172.16.5.4",
    "192.168.1.1", "169.254.169.254", "fe80::1", "fc00::1", "fd12:3456::1", "224.0.0.1",
    "239.255.255.250", "ff02::1", "100.64.0.1", "192.0.2.1", "198.18.0.1", "240.0.0.1",
    "255.255.255.255", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002:7f00:1::1",
    "64:ff9b::a00:1", "::127.0.0.1",
]  # fmt: skip
# The webhook tests' fixtures: a real SQLite ledger, a real receiver on 127.0.0.1.
db_url, ledger, receiver = test_notify.db_url, test_notify.ledger, test_notify.receiver
PUBLIC_ADDRESSES = ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address", REFUSED_ADDRESSES)
def test_every_address_of_the_services_own_networks_is_refused(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", PUBLIC_ADDRESSES)
def test_public_addresses_are_allowed(address: str) -> None:
    assert address_problem(ipaddress.ip_address(address)) is None


# -- when the URL is given --------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(module_service_factory: ServiceLauncher) -> ServiceProcess:
    """A service without `--notify-allow-private`."""
    return module_service_factory(FAST_EMULATOR_CONFIG)


def test_a_notify_url_at_an_internal_address_is_refused_at_create_and_stores_nothing(
    guarded: ServiceProcess,
) -> None:
    svc = guarded
    port = svc.port
    internal = [
        # The service itself: this deleted every finished job of the user.
        f"http://127.0.0.1:{port}/api/job/cleanup?max_age_hours=0",
        f"http://localhost:{port}/api/jobs",  # a name that resolves to loopback
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
        "http://[::1]:9/hook",
        "http://[::ffff:127.0.0.1]:9/hook",
        "http://0.0.0.0:9/hook",
        "http://224.0.0.1/hook",
        "https://user:pw@192.168.0.10/hook?token=t",
    ]
    malformed = [
        "http://[::1",
        "http://hooks.example:99999/x",
        # Host names no resolver takes (the resolver raised UnicodeError: a 500 found
        # by schemathesis): a label over 63 bytes, a name over 253.
        "https://" + "0" * 2000,
        "https://" + "a." * 200 + "example",
    ]
    lines = jsonl([request_item("n1")])
    with svc.client() as client:
        inputs = set(os.listdir(svc.data_dir / "inputs"))
        for url in internal + malformed:
            sent = [
                ("/api/job/batch", {"json": inline_body(1, notify_url=url)}, ["body"]),
                ("/api/job/batch", {"files": {"file": ("n.jsonl", lines)},
                 "data": {"options": json.dumps({"notify_url": url})}}, ["body"]),
                ("/job-operations", {"json": {"action": "createJob",
                 "data": inline_body(1, notify_url=url)}}, ["body", "data"]),
            ]  # fmt: skip
            for path, request, where in sent:
                response = client.post(path, **request)
                assert response.status_code == 422, (url, path, response.text)
                [problem] = response.json()["detail"]
                loc = problem["loc"]
                assert loc[-1] == "notify_url" and loc[: len(where)] == where, (url, problem)
                assert "notify_url" in problem["msg"], problem
                if url in internal:
                    assert "--notify-allow-private" in problem["msg"], problem
                    assert "pw" not in problem["msg"] and "token=t" not in problem["msg"]
        assert client.get("/api/jobs").json()["jobs"] == []
        assert set(os.listdir(svc.data_dir / "inputs")) == inputs
    assert svc.emulator.stats()["batches_created"] == 0  # type: ignore[attr-defined]


def _start(tmp_path: Path, *args: str) -> tuple[int, str]:
    """`gembatch serve ARGS` until it exits (its code and output) or says it listens (a
    failure of the test: the process is killed)."""
    env = {k: v for k, v in os.environ.items() if k != "GEMBATCH_TOKENS"}
    env.update(GEMINI_API_KEY="not-used", GOOGLE_GEMINI_BASE_URL="http://127.0.0.1:9")
    command = [
        sys.executable, "-m", "gembatch", "serve", "--port", "0",
        "--db", f"sqlite:///{tmp_path / 'gembatch.db'}", "--data-dir", str(tmp_path / "data"),
        *args,
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        output = ""
        for line in proc.stdout:
            output += line
            assert READY_PREFIX not in line, f"it started with {args}: {output}"
        return proc.wait(timeout=60), output
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/hook", "http://localhost/hook", "http://[fe80::1]/x", "http://[::1"]
)
def test_an_internal_service_wide_notify_url_stops_the_service_before_it_starts(
    tmp_path: Path, url: str
) -> None:
    code, output = _start(tmp_path, "--notify-url", url)
    assert code != 0, output
    assert "--notify-url" in output and "Traceback" not in output, output
    if url != "http://[::1":
        assert "--notify-allow-private" in output, output
    assert not (tmp_path / "gembatch.db").exists(), "nothing is created before the refusal"


# -- with --notify-allow-private: delivered, and the reply is never kept ----------------------


def test_with_notify_allow_private_a_local_receiver_is_notified_and_its_reply_never_kept(
    service_factory: ServiceLauncher, receiver: Receiver
) -> None:
    receiver.fail_first["internal"] = 1000  # answers 500 {"error": "try later"}, always
    svc = service_factory(
        FAST_EMULATOR_CONFIG,
        args=[
            "--notify-allow-private", "--notify-url", receiver.url("service"),
            "--notify-attempts", "2", "--notify-max-delay", "0.2",
        ],
    )  # fmt: skip
    with svc.client() as client:
        ok = create_job(client, inline_body(1, prefix="ok", notify_url=receiver.url("job")))
        bad = create_job(client, inline_body(1, prefix="no", notify_url=receiver.url("internal")))
        for job_id in (ok, bad):
            assert wait_status(client, job_id, TERMINAL)["status"] == "completed"
        eventually(lambda: [p["job"]["job_id"] for p in receiver.received("job")] == [ok])
        eventually(lambda: len(receiver.received("service")) == 2, what="service-wide hooks")

        def gave_up() -> list[dict[str, Any]]:
            return [row for row in audit_of(client, bad) if row["action"] == "notify_failed"]

        [row] = eventually(gave_up, what="the failing hook given up")
        assert "HTTP 500" in json.dumps(row), row
        assert len(receiver.received("internal")) == 2
        shown = client.get(f"/api/job/{bad}/events").text
        assert "try later" not in shown, shown
    svc.stop()
    stored = b"".join(
        path.read_bytes() for path in svc.workdir.iterdir() if path.name.startswith("gembatch.db")
    )
    assert b"HTTP 500" in stored and b"try later" not in stored
    assert b"try later" not in svc.log_path.read_bytes()


# -- when it is sent --------------------------------------------------------------------------


class Dns:
    """A resolver for the notifier: the answers a DNS server gives now for some names (the
    system's for the others), and the names it was asked."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        if host in self.answers:
            return self.answers[host]
        return await resolve(host, port)


def test_a_stored_notify_url_whose_name_now_points_inside_is_never_posted(
    ledger: Any, receiver: Receiver
) -> None:
    """Names that passed the create-time check and point inside by the time of sending:
    `localhost` (the system resolver), and one that answers with a public and a private
    address (the connection could land on either)."""
    dns = Dns({"rebound.hooks.test": ["93.184.216.34", "127.0.0.1"]})
    port = receiver.port
    urls = {
        "jlocal": f"http://localhost:{port}/job",
        "jrebound": f"http://rebound.hooks.test:{port}/job",
    }
    ledger.add_many([new_record(job_id, url) for job_id, url in urls.items()])
    for job_id in urls:
        advance(ledger, job_id, TO_COMPLETED)

    asyncio.run(drain(Notifier(ledger, resolver=dns, max_attempts=8)))

    assert receiver.posts == []
    assert deliveries(ledger) == [], "a refused target is given up at once, not retried"
    for job_id in urls:
        [row] = [r for r in _audit_rows(ledger, job_id) if r["action"] == "notify_failed"]
        text = json.dumps(row, default=str)
        assert "refused" in text and "loopback" in text and "notify-allow-private" in text
        assert '"attempts": 1' in text, text
    assert sorted(dns.asked) == ["localhost", "rebound.hooks.test"]


def test_the_post_connects_to_the_address_checked_and_names_the_host_it_was_given(
    ledger: Any, receiver: Receiver
) -> None:
    """`hooks.pinned.test` exists only in the notifier's resolver: the POST arrives only if
    it connects to the address that resolver gave (no second lookup between the check
    and the connection), and it carries the name, not the address, as Host."""
    dns = Dns({"hooks.pinned.test": ["127.0.0.1"]})
    url = f"http://hooks.pinned.test:{receiver.port}/job"
    ledger.add_many([new_record("jpinned", url)])
    advance(ledger, "jpinned", TO_COMPLETED)

    asyncio.run(drain(Notifier(ledger, resolver=dns, allow_private=True)))

    [post] = receiver.posts
    assert post["headers"]["host"] == f"hooks.pinned.test:{receiver.port}"
    assert json.loads(post["body"])["job"]["job_id"] == "jpinned"
    assert dns.asked == ["hooks.pinned.test"]
    assert deliveries(ledger) == []


class TlsReceiver:
    """An HTTPS receiver on 127.0.0.1 with a certificate for one name only: records the
    TLS server name (SNI) and the Host of each POST."""

    def __init__(self, directory: Path, name: str) -> None:
        self.cafile = _self_signed(directory, name)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
        self.server_names: list[str | None] = []
        context.sni_callback = lambda _sock, server_name, _ctx: self.server_names.append(
            server_name
        )
        self.hosts: list[str | None] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                receiver.hosts.append(self.headers["Host"])
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _self_signed(directory: Path, name: str) -> Path:
    """cert.pem and key.pem for `name` in `directory`; the certificate is its own CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return directory / "cert.pem"


def test_an_https_post_to_the_checked_address_presents_and_verifies_the_name(
    ledger: Any, tmp_path: Path
) -> None:
    """Over TLS the name goes in SNI and the certificate is checked against it (it has no
    entry for 127.0.0.1): the POST arrives only if both name the host of the URL."""
    tls = TlsReceiver(tmp_path, "hooks.tls.test")
    try:
        dns = Dns({"hooks.tls.test": ["127.0.0.1"]})
        ledger.add_many([new_record("jtls", f"https://hooks.tls.test:{tls.port}/job")])
        advance(ledger, "jtls", TO_COMPLETED)

        async def send() -> None:
            # A client that trusts the receiver's certificate (and nothing else).
            context = ssl.create_default_context(cafile=tls.cafile)
            async with httpx.AsyncClient(verify=context) as trusting:
                await drain(Notifier(ledger, resolver=dns, allow_private=True, client=trusting))

        asyncio.run(send())
    finally:
        tls.close()
    assert tls.server_names == ["hooks.tls.test"]
    assert tls.hosts == [f"hooks.tls.test:{tls.port}"]
    assert deliveries(ledger) == []
