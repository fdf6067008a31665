"""`gembatch emulator --config FILE` with a TOML file, as the README documents it: the
settings take effect in the started process, and a bad file stops it with one clear line."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.genai import errors

from gembatch.emulator.process import EmulatorProcess
from tests.conftest import wait_for, write_requests

README = Path(__file__).resolve().parents[2] / "README.md"
TERMINAL = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"}

OBSERVABLE_TOML = """\
seed = 7

[clock]
pending_seconds = 0.2
running_seconds = 0.4

[auth]
api_keys = ["key-from-toml"]

[quirks]
empty_batch_list_without_page_size = false

[[faults.rules]]
endpoint = "files.list"
status = 503
first = 1

[faults.batches]
fail_rate = 1.0
match = "doomed"
"""


def start_with_config_file(state_dir: Path, config_file: Path) -> EmulatorProcess:
    emulator = EmulatorProcess(state_dir=state_dir)
    emulator.config_path = config_file  # started with `--config <this file>`
    return emulator.start()


def terminal(client: Any, name: str) -> Any:
    return wait_for(lambda: (b := client.batches.get(name=name)).state.name in TERMINAL and b, 30)


def test_toml_config_file_sets_auth_clock_quirks_and_faults_of_the_process(
    tmp_path: Path,
) -> None:
    config_file = tmp_path / "emulator.toml"
    config_file.write_text(OBSERVABLE_TOML)
    emulator = start_with_config_file(tmp_path / "state", config_file)
    try:
        assert "--config" in emulator.proc.args  # type: ignore[union-attr]
        assert str(config_file) in emulator.proc.args  # type: ignore[union-attr]
        # [auth]: only the key the file names is accepted.
        emulator.api_key = "some-other-key"
        stranger = emulator.sdk_client()
        with pytest.raises(errors.ClientError) as caught:
            stranger.batches.list(config={"page_size": 5})
        assert caught.value.code == 400
        emulator.api_key = "key-from-toml"
        client = emulator.sdk_client()
        # [[faults.rules]]: the first files.list is a 503, the next one is not.
        with pytest.raises(errors.ServerError) as server_error:
            list(client.files.list())
        assert server_error.value.code == 503
        assert list(client.files.list()) == []
        # [faults.batches] with [clock]: "doomed" batches fail, the others succeed.
        path = write_requests(tmp_path / "in.jsonl", ["a", "b"])
        uploaded = client.files.upload(file=path, config={"mime_type": "jsonl"})
        model = "gemini-2.5-flash-lite"
        doomed, fine = (
            client.batches.create(model=model, src=uploaded.name, config={"display_name": name})
            for name in ("doomed", "fine")
        )
        assert terminal(client, doomed.name).state.name == "JOB_STATE_FAILED"
        assert terminal(client, fine.name).state.name == "JOB_STATE_SUCCEEDED"
        # [quirks]: a list without page_size is no longer empty.
        assert sorted(b.name for b in client.batches.list()) == sorted([doomed.name, fine.name])
        stats = emulator.stats()
        assert stats["batches_created"] == 2
    finally:
        emulator.close()


def readme_config_example() -> str:
    text = README.read_text(encoding="utf-8")
    heading = r"^### Configuration \(`--config FILE`"
    found = re.search(heading + r".*?\n```toml\n(.*?)\n```", text, re.S | re.M)
    assert found, "README.md no longer has its '### Configuration (`--config FILE`' example"
    return found.group(1)


def assert_applied(documented: Any, running: Any, where: str) -> None:
    """Every value the file sets is the running process's value (tables: key by key)."""
    if isinstance(documented, dict):
        for key, value in documented.items():
            assert key in running, f"{where}.{key} is not in the running config"
            assert_applied(value, running[key], f"{where}.{key}")
    elif isinstance(documented, list) and documented and isinstance(documented[0], dict):
        assert len(running) == len(documented), where
        for n, (doc, run) in enumerate(zip(documented, running, strict=True)):
            assert_applied(doc, run, f"{where}[{n}]")
    else:
        assert running == documented, where


def test_the_readme_toml_example_starts_an_emulator_that_applies_it(tmp_path: Path) -> None:
    example = readme_config_example()
    documented = tomllib.loads(example)
    config_file = tmp_path / "readme-example.toml"
    config_file.write_text(example)
    emulator = start_with_config_file(tmp_path / "state", config_file)
    try:
        running = httpx.get(f"{emulator.base_url}/_emulator/config", timeout=10).json()
        assert_applied(documented, running, "config")
        # The documented 429 rule on batches.create is live: some creates (fixed by the
        # seed) get RESOURCE_EXHAUSTED with the documented Retry-After, the rest succeed.
        (rule,) = documented["faults"]["rules"]
        assert (rule["endpoint"], rule["status"]) == ("batches.create", 429)
        client = emulator.sdk_client()
        path = write_requests(tmp_path / "in.jsonl", ["a"])
        uploaded = client.files.upload(file=path, config={"mime_type": "jsonl"})
        statuses, retry_after = [], set()
        create = f"{emulator.base_url}/v1beta/models/gemini-2.5-flash:batchGenerateContent"
        for n in range(30):
            batch = {"displayName": f"b{n}", "inputConfig": {"fileName": uploaded.name}}
            response = httpx.post(
                create, headers={"x-goog-api-key": emulator.api_key}, json={"batch": batch}
            )
            statuses.append(response.status_code)
            if response.status_code == 429:
                assert response.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
                retry_after.add(response.headers.get("retry-after"))
        assert 0 < statuses.count(429) < len(statuses), statuses
        assert set(statuses) == {200, 429}
        assert retry_after == {str(rule["retry_after_seconds"])}
    finally:
        emulator.close()


BAD_CONFIGS = {
    "typo.toml": (
        "[clock]\npending_secnds = 1\n",
        ".clock: unknown key(s) pending_secnds; known: expire_after_seconds, "
        "file_ttl_seconds, pending_seconds, running_seconds",
    ),
    "syntax.toml": ("[clock\npending_seconds = 1\n", ": cannot parse: "),
    "rate.toml": (
        "[faults.batches]\nfail_rate = 2\n",
        ": faults.batches.fail_rate must be between 0 and 1, got 2.0",
    ),
    "type.toml": ('seed = "seven"\n', ".seed: expected an integer"),
    "status.toml": (
        "[[faults.rules]]\nstatus = 200\n",
        ": faults.rules[0].status must be a 4xx or 5xx code",
    ),
    "openai.toml": (
        '[responder]\nkind = "openai"\n',
        ": responder.url is required when responder.kind = 'openai'",
    ),
    "latin1.toml": (b"# caf\xe9\nseed = 1\n", ": cannot parse: 'utf-8' codec can't decode"),
    "bad.json": ('{"clock": {"pending_seconds": 1,}}', ": cannot parse: "),
    "missing.toml": (None, ": emulator config file not found"),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_a_bad_config_file_stops_the_emulator_with_one_clear_line_and_exit_2(
    tmp_path: Path, name: str
) -> None:
    content, expected = BAD_CONFIGS[name]
    config_file = tmp_path / name
    if isinstance(content, bytes):
        config_file.write_bytes(content)
    elif content is not None:
        config_file.write_text(content)
    command = [
        sys.executable, "-m", "gembatch", "emulator", "--port", "0",
        "--state-dir", str(tmp_path / "state"), "--config", str(config_file),
    ]  # fmt: skip
    # A config that was wrongly accepted would serve forever: the timeout fails the test.
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stdout == ""  # it never got as far as serving
    assert result.stderr.startswith(f"error: {config_file}{expected}"), result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
