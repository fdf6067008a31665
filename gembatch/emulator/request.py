"""A GenerateContentRequest as the real service reads it.

Why: both responders must refuse what Gemini refuses (the same INVALID_ARGUMENT messages,
field paths and proto3 JSON rules) and read the same texts and settings from what it
accepts; one module holds both, so the local and the forwarding responder cannot drift.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gembatch.emulator.wire import GRPC_CODES, camel, get_field, has_field, snake

_REQUEST_FIELDS = (
    "model",
    "contents",
    "tools",
    "toolConfig",
    "safetySettings",
    "systemInstruction",
    "generationConfig",
    "cachedContent",
    "labels",
)
_KNOWN_REQUEST_KEYS = frozenset(
    {camel(f) for f in _REQUEST_FIELDS} | {snake(f) for f in _REQUEST_FIELDS}
)
# The members of Part's `data` oneof: a part must carry exactly one kind of payload.
_PART_DATA = (
    "text",
    "inlineData",
    "fileData",
    "functionCall",
    "functionResponse",
    "executableCode",
    "codeExecutionResult",
    "toolCall",
    "toolResponse",
)
_TYPE_URL = "type.googleapis.com/google.ai.generativelanguage.v1beta."
_MAX_CANDIDATES = 8


def invalid(message: str) -> dict[str, Any]:
    return {"code": GRPC_CODES["INVALID_ARGUMENT"][0], "message": message}


def _bad_value(path: str, proto_type: str, value: Any) -> dict[str, Any]:
    excerpt = json.dumps(value, ensure_ascii=False, default=str)
    if len(excerpt) > 80:
        excerpt = excerpt[:77] + "..."
    return invalid(
        f"Invalid JSON payload received. Invalid value at '{path}' ({proto_type}), {excerpt}"
    )


def request_error(request: Any) -> dict[str, Any] | None:
    """The INVALID_ARGUMENT the real service would answer for this request, or None."""
    if request is None:
        request = {}
    if not isinstance(request, dict):
        return _bad_value("request", _TYPE_URL + "GenerateContentRequest", request)
    unknown = [key for key in request if key not in _KNOWN_REQUEST_KEYS]
    if unknown:
        return invalid(
            "\n".join(
                f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.'
                for key in unknown
            )
        )
    contents = get_field(request, "contents")
    if contents is None or contents == []:
        return invalid("* GenerateContentRequest.contents: contents is not specified\n")
    if not isinstance(contents, list):
        return _bad_value("contents", _TYPE_URL + "Content", contents)
    for index, content in enumerate(contents):
        if error := _content_error(content, f"contents[{index}]", is_system=False):
            return error
    system = get_field(request, "systemInstruction")
    if system is not None and (
        error := _content_error(system, "system_instruction", is_system=True)
    ):
        return error
    config = get_field(request, "generationConfig")
    if config is not None:
        return _config_error(config)
    return None


def _content_error(content: Any, path: str, *, is_system: bool) -> dict[str, Any] | None:
    if not isinstance(content, dict):
        return _bad_value(path, _TYPE_URL + "Content", content)
    role = get_field(content, "role")
    if not is_system and role not in (None, "", "user", "model"):
        return invalid("Please use a valid role: user, model.")
    parts = get_field(content, "parts")
    if parts is None or parts == []:
        if is_system:
            return None
        return invalid(
            f"* GenerateContentRequest.{path}.parts: contents.parts must not be empty.\n"
        )
    if not isinstance(parts, list):
        return _bad_value(f"{path}.parts", _TYPE_URL + "Part", parts)
    for index, part in enumerate(parts):
        where = f"{path}.parts[{index}]"
        if not isinstance(part, dict):
            return _bad_value(where, _TYPE_URL + "Part", part)
        if not any(has_field(part, name) for name in _PART_DATA):
            return invalid(
                f"* GenerateContentRequest.{where}.data: "
                "required oneof field 'data' must have one initialized field\n"
            )
        text = get_field(part, "text")
        if text is not None and not isinstance(text, str):
            return _bad_value(f"{where}.text", "TYPE_STRING", text)
    return None


def _config_error(config: Any) -> dict[str, Any] | None:
    if not isinstance(config, dict):
        return _bad_value("generation_config", _TYPE_URL + "GenerationConfig", config)
    for name in ("candidateCount", "maxOutputTokens"):
        value = get_field(config, name)
        if value is not None and as_int(value) is None:
            return _bad_value(f"generation_config.{snake(name)}", "TYPE_INT32", value)
    count = as_int(get_field(config, "candidateCount"))
    if count is not None and not 0 <= count <= _MAX_CANDIDATES:
        return invalid(
            "* GenerateContentRequest.generation_config.candidate_count: "
            f"candidate_count must be between 1 and {_MAX_CANDIDATES}.\n"
        )
    limit = as_int(get_field(config, "maxOutputTokens"))
    if limit is not None and limit < 0:
        return invalid(
            "* GenerateContentRequest.generation_config.max_output_tokens: "
            "max_output_tokens must be positive.\n"
        )
    thinking = get_field(config, "thinkingConfig")
    if thinking is not None:
        if not isinstance(thinking, dict):
            return _bad_value(
                "generation_config.thinking_config", _TYPE_URL + "ThinkingConfig", thinking
            )
        budget = get_field(thinking, "thinkingBudget")
        if budget is not None and as_int(budget) is None:
            return _bad_value(
                "generation_config.thinking_config.thinking_budget", "TYPE_INT32", budget
            )
    schema = get_field(config, "responseSchema")
    if schema is not None and not isinstance(schema, dict):
        return _bad_value("generation_config.response_schema", _TYPE_URL + "Schema", schema)
    return None


def as_int(value: Any) -> int | None:
    """proto3 JSON int32: a number or a decimal string, never a bool or a fraction."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        return int(value)
    return None


# -- reading requests ---------------------------------------------------------------


def content_parts(content: Any) -> list[dict[str, Any]]:
    parts = get_field(content, "parts")
    return [p for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []


def part_text(part: dict[str, Any]) -> str | None:
    text = get_field(part, "text")
    return text if isinstance(text, str) else None


def all_texts(request: dict[str, Any]) -> list[str]:
    """Every text part, system instruction first: what prompt tokens and directives see."""
    system = content_parts(get_field(request, "systemInstruction"))
    texts = [t for p in system if (t := part_text(p)) is not None]
    for content in get_field(request, "contents") or []:
        texts.extend(t for p in content_parts(content) if (t := part_text(p)) is not None)
    return texts


def user_texts(request: dict[str, Any]) -> list[str]:
    """Text of each user turn, oldest first."""
    out = []
    for content in get_field(request, "contents") or []:
        if get_field(content, "role") in (None, "", "user"):
            out.append("\n".join(t for p in content_parts(content) if (t := part_text(p))))
    return out


def generation_config(request: dict[str, Any]) -> dict[str, Any]:
    config = get_field(request, "generationConfig")
    return config if isinstance(config, dict) else {}
