"""The OpenAI-compatible forwarding responder in a real emulator process: a batch made with
the real google-genai SDK is answered, line by line, by a chat server the test runs."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.conftest import wait_for, write_requests

TERMINAL = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"}


def upstream_answer(prompt: str) -> str:
    """What the fake chat server answers to a prompt: different for every prompt."""
    return f"upstream says {prompt.upper()[::-1]}"


class EchoingChatServer:
    """An OpenAI-compatible /v1/chat/completions that answers from the last user message."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.authorizations: list[str | None] = []
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.handle, methods=["POST"])])

    async def handle(self, request: Request) -> Response:
        body = await request.json()
        with self.lock:
            self.requests.append(body)
            self.authorizations.append(request.headers.get("authorization"))
        prompt = body["messages"][-1]["content"]
        words = len(prompt.split())
        return JSONResponse(
            {
                "id": f"chatcmpl-{len(prompt)}",
                "object": "chat.completion",
                "created": 1700000000,
                "model": "upstream-llm-7b",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": upstream_answer(prompt)},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": words,
                    "completion_tokens": 3 + words,
                    "total_tokens": 3 + 2 * words,
                },
            }
        )


@pytest.fixture
def chat_server() -> Iterator[tuple[EchoingChatServer, str]]:
    fake = EchoingChatServer()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(fake.app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the fake chat server did not start"
        time.sleep(0.01)
    yield fake, f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=5)


def test_emulator_process_with_openai_responder_returns_the_upstream_answer_for_each_key(
    emulator_factory: Any, chat_server: tuple[EchoingChatServer, str], tmp_path: Path
) -> None:
    fake, url = chat_server
    emulator = emulator_factory(
        {
            "clock": {"pending_seconds": 0.2, "running_seconds": 0.5},
            "responder": {
                "kind": "openai",
                "url": url,
                "api_key_env": "UPSTREAM_TEST_KEY",
                "timeout_seconds": 10,
                "concurrency": 3,
            },
        },
        env={"UPSTREAM_TEST_KEY": "sk-upstream-test"},
    )
    prompts = [f"question {n} about topic {n * 7}" for n in range(12)]
    path = write_requests(tmp_path / "in.jsonl", prompts)
    client = emulator.sdk_client()
    uploaded = client.files.upload(file=path, config={"mime_type": "jsonl"})
    batch = client.batches.create(
        model="gemini-2.5-flash", src=uploaded.name, config={"display_name": "forwarded"}
    )
    done = wait_for(
        lambda: (b := client.batches.get(name=batch.name)).state.name in TERMINAL and b, 60
    )
    assert done.state.name == "JOB_STATE_SUCCEEDED"

    output = client.files.download(file=done.dest.file_name)
    lines = [json.loads(line) for line in output.decode().splitlines()]
    by_key = {line["key"]: line for line in lines}
    assert len(lines) == len(by_key) == len(prompts)  # one line per key, none twice
    for n, prompt in enumerate(prompts, 1):
        response = by_key[f"k{n}"]["response"]
        (candidate,) = response["candidates"]
        assert candidate["content"]["parts"] == [{"text": upstream_answer(prompt)}]
        assert candidate["finishReason"] == "STOP"
        words = len(prompt.split())
        assert response["usageMetadata"]["promptTokenCount"] == words
        assert response["usageMetadata"]["candidatesTokenCount"] == 3 + words
        assert response["modelVersion"] == "upstream-llm-7b"

    # Each line went upstream exactly once, as a chat request for the batch's model,
    # with the key the emulator process read from its own environment.
    sent = sorted(fake.requests, key=lambda r: r["messages"][-1]["content"])
    assert [r["messages"] for r in sent] == [
        [{"role": "user", "content": prompt}] for prompt in sorted(prompts)
    ]
    assert {r["model"] for r in fake.requests} == {"gemini-2.5-flash"}
    assert set(fake.authorizations) == {"Bearer sk-upstream-test"}
