"""The forwarding responder: each request sent to an OpenAI-compatible chat endpoint.

Why: the same batch files can then run against a local model server (or any hosted
OpenAI-compatible API), with gembatch's whole flow unchanged; the upstream's answers,
errors and usage are translated into Gemini's shapes.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import httpx

from gembatch.emulator.config import ResponderConfig
from gembatch.emulator.request import (
    as_int,
    content_parts,
    generation_config,
    part_text,
    request_error,
)
from gembatch.emulator.responders.base import Reply
from gembatch.emulator.schema_gen import gemini_schema_to_json_schema
from gembatch.emulator.wire import GRPC_CODES, HTTP_TO_STATUS, get_field

_FINISH_FROM_OPENAI = {"stop": "STOP", "length": "MAX_TOKENS", "content_filter": "SAFETY"}
_BACKOFF_SECONDS = 0.2
_MAX_RETRY_AFTER = 5.0


class OpenAIResponder:
    """Forwards each request to an OpenAI-compatible /chat/completions endpoint."""

    def __init__(self, config: ResponderConfig) -> None:
        if not config.url:
            raise ValueError("responder.url is required for the openai responder")
        self._config = config
        self._url = _chat_url(config.url)
        key = config.api_key or (os.environ.get(config.api_key_env) if config.api_key_env else None)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        connections = max(1, config.concurrency) * 2
        self._client = httpx.Client(
            timeout=config.timeout_seconds,
            headers=headers,
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )
        self._closed = threading.Event()

    def predict_error(self, request: Any) -> bool:
        return request_error(request) is not None

    def reply(self, request: Any, model: str) -> Reply:
        try:
            if error := request_error(request):
                return Reply(error=error)
            upstream_model = self._config.model or model.removeprefix("models/")
            body = _to_openai_request(request or {}, upstream_model)
            return self._post(body)
        except Exception as exc:  # one bad line must not take the worker thread down
            return Reply(error={"code": 13, "message": f"Internal error encountered. ({exc!r})"})

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._client.close()

    def _post(self, body: dict[str, Any]) -> Reply:
        attempts = max(0, self._config.max_retries) + 1
        failure = Reply(error={"code": 14, "message": f"upstream {self._url} unreachable"})
        delay = 0.0
        for attempt in range(attempts):
            if attempt:
                time.sleep(max(delay, _BACKOFF_SECONDS * 2 ** (attempt - 1)))
            delay = 0.0
            try:
                response = self._client.post(self._url, json=body)
            except (httpx.ReadTimeout, httpx.WriteTimeout) as exc:
                # The upstream got the request and is slow: a retry would double the wait.
                message = f"upstream {self._url} timed out after {self._config.timeout_seconds:g}s"
                return Reply(error={"code": 4, "message": f"{message}: {exc!r}"})
            except httpx.TransportError as exc:
                message = f"upstream {self._url} unreachable: {exc!r}"
                failure = Reply(error={"code": 14, "message": message})
                continue
            if response.status_code == 429 or response.status_code >= 500:
                failure = Reply(error=_http_error(self._url, response))
                delay = min(_retry_after(response), _MAX_RETRY_AFTER)
                continue
            if response.status_code >= 300:
                return Reply(error=_http_error(self._url, response))
            return _parse_openai_response(response, body["model"])
        return failure


def _chat_url(base: str) -> str:
    base = base.rstrip("/")
    return base if base.endswith("/chat/completions") else f"{base}/chat/completions"


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", "0")))
    except ValueError:
        return 0.0


def _http_error(url: str, response: httpx.Response) -> dict[str, Any]:
    status = response.status_code
    name = HTTP_TO_STATUS.get(status)
    if name is not None:
        code = GRPC_CODES[name][0]
    else:
        code = 13 if status >= 500 else 3 if status >= 400 else 2
    return {"code": code, "message": f"upstream {url} answered HTTP {status}: {_excerpt(response)}"}


def _excerpt(response: httpx.Response, limit: int = 300) -> str:
    text = response.text
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        message = error.get("message") if isinstance(error, dict) else error
        if isinstance(message, str) and message:
            text = message
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _to_openai_request(request: dict[str, Any], model: str) -> dict[str, Any]:
    """The chat-completions body equivalent to a (valid) GenerateContentRequest."""
    messages: list[dict[str, Any]] = []
    system = get_field(request, "systemInstruction")
    system_texts = [t for p in content_parts(system) if (t := part_text(p)) is not None]
    if system_texts:
        messages.append({"role": "system", "content": "\n".join(system_texts)})
    for content in get_field(request, "contents") or []:
        role = "assistant" if get_field(content, "role") == "model" else "user"
        message_content = _openai_content(content_parts(content))
        if message_content is not None:
            messages.append({"role": role, "content": message_content})
    body: dict[str, Any] = {"model": model, "messages": messages}
    body.update(_openai_options(generation_config(request)))
    return body


def _openai_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]] | None:
    """A message's content: a string, or items when images are present; None when empty."""
    items: list[dict[str, Any]] = []
    for part in parts:
        if get_field(part, "thought") is True:
            continue  # earlier turns' thought summaries are not part of the conversation
        text = part_text(part)
        blob = get_field(part, "inlineData")
        mime = str(get_field(blob, "mimeType") or "")
        if text is not None:
            items.append({"type": "text", "text": text})
        elif mime.startswith("image/") and isinstance(get_field(blob, "data"), str):
            url = f"data:{mime};base64,{get_field(blob, 'data')}"
            items.append({"type": "image_url", "image_url": {"url": url}})
    if not items:
        return None
    if all(item["type"] == "text" for item in items):
        return "\n".join(item["text"] for item in items)
    return items


_OPENAI_OPTIONS = (
    ("temperature", "temperature"),
    ("topP", "top_p"),
    ("maxOutputTokens", "max_tokens"),
    ("stopSequences", "stop"),
    ("candidateCount", "n"),
    ("seed", "seed"),
    ("presencePenalty", "presence_penalty"),
    ("frequencyPenalty", "frequency_penalty"),
)


def _openai_options(config: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for gemini_name, openai_name in _OPENAI_OPTIONS:
        value = get_field(config, gemini_name)
        if gemini_name in ("maxOutputTokens", "candidateCount"):
            value = as_int(value) or None  # proto3: 0 means unset
        if value is not None:
            out[openai_name] = value
    mime = str(get_field(config, "responseMimeType") or "").lower()
    if mime == "application/json":
        json_schema = get_field(config, "responseJsonSchema")
        schema = get_field(config, "responseSchema")
        if json_schema is None and isinstance(schema, dict):
            json_schema = gemini_schema_to_json_schema(schema)
        if json_schema is not None:
            out["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "response", "schema": json_schema},
            }
        else:
            out["response_format"] = {"type": "json_object"}
    return out


def _parse_openai_response(response: httpx.Response, sent_model: str) -> Reply:
    try:
        data = response.json()
    except ValueError:
        return _malformed(f"not JSON: {_excerpt(response, 200)}")
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        return _malformed(f"no 'choices' list: {_excerpt(response, 200)}")
    candidates = []
    for position, choice in enumerate(data["choices"]):
        if not isinstance(choice, dict):
            return _malformed(f"choice {position} is not an object")
        message = choice.get("message")
        if not isinstance(message, dict):
            message = {}
        index = choice.get("index")
        reason = choice.get("finish_reason")
        finish = _FINISH_FROM_OPENAI.get(reason, "OTHER") if isinstance(reason, str) else "OTHER"
        candidates.append(
            {
                "content": {"parts": [{"text": _message_text(message)}], "role": "model"},
                "finishReason": finish,
                "index": index if isinstance(index, int) else position,
            }
        )
    out: dict[str, Any] = {"candidates": candidates}
    usage = _usage_from_openai(data.get("usage"))
    if usage:
        out["usageMetadata"] = usage
    out["modelVersion"] = str(data.get("model") or sent_model)
    if data.get("id"):
        out["responseId"] = str(data["id"])
    return Reply(response=out)


def _malformed(why: str) -> Reply:
    return Reply(error={"code": 13, "message": f"upstream returned malformed JSON: {why}"})


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # some servers answer with content items
        return "".join(i.get("text", "") for i in content if isinstance(i, dict))
    return ""


def _usage_from_openai(usage: Any) -> dict[str, Any]:
    if not isinstance(usage, dict):
        return {}
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    total = usage.get("total_tokens")
    details = usage.get("completion_tokens_details")
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    # OpenAI counts reasoning inside completion tokens; Gemini reports thoughts apart.
    thoughts = 0
    if isinstance(completion, int) and isinstance(reasoning, int) and 0 < reasoning <= completion:
        thoughts = reasoning
    out: dict[str, Any] = {}
    if isinstance(prompt, int):
        out["promptTokenCount"] = prompt
    if isinstance(completion, int):
        out["candidatesTokenCount"] = completion - thoughts
    if isinstance(total, int):
        out["totalTokenCount"] = total
    if isinstance(prompt, int):
        out["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
    if thoughts:
        out["thoughtsTokenCount"] = thoughts
    return out
