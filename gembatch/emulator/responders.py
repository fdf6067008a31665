"""Responders: turn one GenerateContentRequest into a GenerateContentResponse or a per-line error.

Why: the emulated batch needs answers that look like Gemini's (shape, usage, finish reasons,
structured output) and that tests can steer. LocalResponder derives them deterministically from
the prompt, model and seed; OpenAIResponder forwards to any OpenAI-compatible chat endpoint.

Directives, written anywhere in a text part of the request (system instruction included),
steer the local responder:

    [[emulator:error]]           the line fails: code 13, "Internal error encountered."
    [[emulator:error=CODE]]      ... with that gRPC code: a number (8) or name (RESOURCE_EXHAUSTED)
    [[emulator:words=N]]         the answer has exactly N whitespace-separated words (0..1,000,000)
    [[emulator:blocked]]         no candidates; promptFeedback.blockReason SAFETY
    [[emulator:blocked=REASON]]  ... with that BlockedReason (OTHER, BLOCKLIST, PROHIBITED_CONTENT)
    [[emulator:finish=REASON]]   the candidates end with that FinishReason; for the reasons that
                                 withhold output (SAFETY, RECITATION, BLOCKLIST, SPII ...) the
                                 candidate has no content, as on the real service

A malformed or unknown directive is itself an INVALID_ARGUMENT error, so typos do not pass silently.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from gembatch.emulator.config import ResponderConfig
from gembatch.emulator.schema_gen import gemini_schema_to_json_schema, generate, topic_words
from gembatch.emulator.wire import (
    GRPC_CODES,
    GRPC_NUMBER_TO_NAME,
    HTTP_TO_STATUS,
    camel,
    get_field,
    has_field,
    snake,
)


@dataclass
class Reply:
    response: dict[str, Any] | None = None  # a GenerateContentResponse, camelCase
    error: dict[str, Any] | None = None  # {"code": <gRPC code>, "message": <str>}


class Responder(Protocol):
    def predict_error(self, request: Any) -> bool: ...

    def reply(self, request: Any, model: str) -> Reply: ...

    def close(self) -> None: ...


def make_responder(config: ResponderConfig, seed: int) -> Responder:
    if config.kind == "local":
        return LocalResponder(seed)
    if config.kind == "openai":
        return OpenAIResponder(config)
    raise ValueError(f"unknown responder kind {config.kind!r}; expected 'local' or 'openai'")


# ================================================================ request validation

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


def _invalid(message: str) -> dict[str, Any]:
    return {"code": GRPC_CODES["INVALID_ARGUMENT"][0], "message": message}


def _bad_value(path: str, proto_type: str, value: Any) -> dict[str, Any]:
    excerpt = json.dumps(value, ensure_ascii=False, default=str)
    if len(excerpt) > 80:
        excerpt = excerpt[:77] + "..."
    return _invalid(
        f"Invalid JSON payload received. Invalid value at '{path}' ({proto_type}), {excerpt}"
    )


def _request_error(request: Any) -> dict[str, Any] | None:
    """The INVALID_ARGUMENT the real service would answer for this request, or None."""
    if request is None:
        request = {}
    if not isinstance(request, dict):
        return _bad_value("request", _TYPE_URL + "GenerateContentRequest", request)
    unknown = [key for key in request if key not in _KNOWN_REQUEST_KEYS]
    if unknown:
        return _invalid(
            "\n".join(
                f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.'
                for key in unknown
            )
        )
    contents = get_field(request, "contents")
    if contents is None or contents == []:
        return _invalid("* GenerateContentRequest.contents: contents is not specified\n")
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
        return _invalid("Please use a valid role: user, model.")
    parts = get_field(content, "parts")
    if parts is None or parts == []:
        if is_system:
            return None
        return _invalid(
            f"* GenerateContentRequest.{path}.parts: contents.parts must not be empty.\n"
        )
    if not isinstance(parts, list):
        return _bad_value(f"{path}.parts", _TYPE_URL + "Part", parts)
    for index, part in enumerate(parts):
        where = f"{path}.parts[{index}]"
        if not isinstance(part, dict):
            return _bad_value(where, _TYPE_URL + "Part", part)
        if not any(has_field(part, name) for name in _PART_DATA):
            return _invalid(
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
        if value is not None and _as_int(value) is None:
            return _bad_value(f"generation_config.{snake(name)}", "TYPE_INT32", value)
    count = _as_int(get_field(config, "candidateCount"))
    if count is not None and not 0 <= count <= _MAX_CANDIDATES:
        return _invalid(
            "* GenerateContentRequest.generation_config.candidate_count: "
            f"candidate_count must be between 1 and {_MAX_CANDIDATES}.\n"
        )
    limit = _as_int(get_field(config, "maxOutputTokens"))
    if limit is not None and limit < 0:
        return _invalid(
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
        if budget is not None and _as_int(budget) is None:
            return _bad_value(
                "generation_config.thinking_config.thinking_budget", "TYPE_INT32", budget
            )
    schema = get_field(config, "responseSchema")
    if schema is not None and not isinstance(schema, dict):
        return _bad_value("generation_config.response_schema", _TYPE_URL + "Schema", schema)
    return None


def _as_int(value: Any) -> int | None:
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


# ================================================================ reading requests


def _parts(content: Any) -> list[dict[str, Any]]:
    parts = get_field(content, "parts")
    return [p for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []


def _part_text(part: dict[str, Any]) -> str | None:
    text = get_field(part, "text")
    return text if isinstance(text, str) else None


def _all_texts(request: dict[str, Any]) -> list[str]:
    """Every text part, system instruction first: what prompt tokens and directives see."""
    system = _parts(get_field(request, "systemInstruction"))
    texts = [t for p in system if (t := _part_text(p)) is not None]
    for content in get_field(request, "contents") or []:
        texts.extend(t for p in _parts(content) if (t := _part_text(p)) is not None)
    return texts


def _user_texts(request: dict[str, Any]) -> list[str]:
    """Text of each user turn, oldest first."""
    out = []
    for content in get_field(request, "contents") or []:
        if get_field(content, "role") in (None, "", "user"):
            out.append("\n".join(t for p in _parts(content) if (t := _part_text(p))))
    return out


def _generation_config(request: dict[str, Any]) -> dict[str, Any]:
    config = get_field(request, "generationConfig")
    return config if isinstance(config, dict) else {}


# ================================================================ directives

_DIRECTIVE_RE = re.compile(r"\[\[emulator:([A-Za-z_-]*)(?:=([^\]]*))?\]\]")
_MAX_WORDS = 1_000_000
_FINISH_REASONS = (
    "FINISH_REASON_UNSPECIFIED", "STOP", "MAX_TOKENS", "SAFETY", "RECITATION", "LANGUAGE",
    "OTHER", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "MALFORMED_FUNCTION_CALL",
    "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_OTHER", "NO_IMAGE", "IMAGE_RECITATION",
    "UNEXPECTED_TOOL_CALL", "TOO_MANY_TOOL_CALLS", "MISSING_THOUGHT_SIGNATURE",
)  # fmt: skip
# Finish reasons after which the real service returns a candidate without any content.
_WITHHELD = frozenset(_FINISH_REASONS) - {
    "FINISH_REASON_UNSPECIFIED", "STOP", "MAX_TOKENS", "LANGUAGE", "OTHER",
}  # fmt: skip
_BLOCK_REASONS = ("SAFETY", "OTHER", "BLOCKLIST", "PROHIBITED_CONTENT", "IMAGE_SAFETY")
# google.rpc canonical messages, as Google's frontends write them.
_ERROR_MESSAGES = {
    1: "The operation was cancelled.",
    2: "Unknown error.",
    3: "Request contains an invalid argument.",
    4: "Deadline expired before operation could complete.",
    5: "Requested entity was not found.",
    6: "Requested entity already exists.",
    7: "The caller does not have permission to execute the specified operation.",
    8: "Resource has been exhausted (e.g. check quota).",
    9: "Precondition check failed.",
    10: "The operation was aborted.",
    11: "Operation was attempted past the valid range.",
    12: "Operation is not implemented, or supported, or enabled.",
    13: "Internal error encountered.",
    14: "The service is currently unavailable.",
    15: "Unrecoverable data loss or corruption.",
    16: "Request had invalid authentication credentials.",
}


@dataclass(frozen=True)
class _Directives:
    error_code: int | None = None
    words: int | None = None
    blocked: str | None = None
    finish: str | None = None


def _parse_directives(texts: list[str]) -> _Directives | dict[str, Any]:
    """The directives in `texts` (first of each kind wins), or the error a bad one causes."""
    found: dict[str, Any] = {}
    for text in texts:
        if "[[emulator:" not in text:
            continue
        for match in _DIRECTIVE_RE.finditer(text):
            name, value = match.group(1).lower(), match.group(2)
            parsed, problem = _directive_value(name, value)
            if problem is not None:
                return _invalid(f"emulator directive {match.group(0)}: {problem}")
            found.setdefault(name, parsed)
    return _Directives(
        error_code=found.get("error"),
        words=found.get("words"),
        blocked=found.get("blocked"),
        finish=found.get("finish"),
    )


def fail_first(request: Any) -> int | None:
    """N of a `[[emulator:fail-first=N]]` directive: the first N batches that contain this
    exact request get an error line for it, later ones an answer (a flaky request)."""
    if not isinstance(request, dict):
        return None
    for text in _all_texts(request):
        if "[[emulator:fail-first=" in text:
            for match in _DIRECTIVE_RE.finditer(text):
                if match.group(1).lower() == "fail-first":
                    value, problem = _directive_value("fail-first", match.group(2))
                    return value if problem is None else None
    return None


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _directive_value(name: str, value: str | None) -> tuple[Any, str | None]:
    """(value, None), or (None, why the directive is unusable)."""
    value = value.strip() if value is not None else None
    if name == "error":
        if not value:
            return GRPC_CODES["INTERNAL"][0], None
        if _is_number(value) and int(value) in GRPC_NUMBER_TO_NAME and int(value) != 0:
            return int(value), None
        if value.upper() in GRPC_CODES and value.upper() != "OK":
            return GRPC_CODES[value.upper()][0], None
        return None, "CODE must be a gRPC error code 1-16 or its name (e.g. 8, RESOURCE_EXHAUSTED)"
    if name == "words":
        if value is not None and _is_number(value) and int(value) <= _MAX_WORDS:
            return int(value), None
        return None, f"N must be a whole number from 0 to {_MAX_WORDS:,}"
    if name == "blocked":
        reason = (value or "SAFETY").upper()
        if reason in _BLOCK_REASONS:
            return reason, None
        return None, f"REASON must be one of {', '.join(_BLOCK_REASONS)}"
    if name == "finish":
        reason = (value or "").upper()
        if reason in _FINISH_REASONS:
            return reason, None
        return None, f"REASON must be a FinishReason such as {', '.join(_FINISH_REASONS[1:8])}"
    if name == "fail-first":
        # Acted on by the batch layer (it needs state across batches); accepted here.
        if value is not None and _is_number(value) and 1 <= int(value) <= 1000:
            return int(value), None
        return None, "N must be a whole number from 1 to 1000"
    return None, "unknown directive; known: error, words, blocked, finish, fail-first"


# ================================================================ local prose

_DETERMINERS = ("the", "this", "each", "every", "that", "one", "the", "the")
_ADJECTIVES = (
    "clear", "simple", "practical", "careful", "common", "useful", "small", "large", "modern",
    "reliable", "flexible", "steady", "gradual", "direct", "broad", "specific", "local",
    "general", "typical", "important", "efficient", "consistent", "basic", "complex",
    "robust", "natural", "careful", "early", "final", "central", "overall", "main",
)  # fmt: skip
_NOUNS = (
    "approach", "answer", "system", "process", "result", "method", "example", "question",
    "detail", "factor", "pattern", "context", "option", "change", "step", "goal", "source",
    "effect", "value", "idea", "model", "structure", "balance", "choice", "outcome", "record",
    "design", "plan", "review", "response", "reason", "feature", "measure", "limit",
    "benefit", "risk", "task", "tool", "point", "view", "trend", "rule", "case", "level",
    "range", "signal", "method", "practice", "summary", "principle",
)  # fmt: skip
_VERBS = (
    "shapes", "supports", "explains", "improves", "reflects", "requires", "affects",
    "highlights", "shows", "suggests", "reduces", "extends", "connects", "defines",
    "follows", "balances", "reveals", "guides", "limits", "covers", "describes", "informs",
    "strengthens", "clarifies", "changes", "involves", "includes", "favours",
)  # fmt: skip
_ADVERBS = (
    "often", "usually", "clearly", "gradually", "directly", "largely", "mostly", "rarely",
    "generally", "typically", "quietly", "steadily",
)  # fmt: skip
_PREPOSITIONS = ("in", "for", "with", "across", "within", "through", "beyond", "around", "under")
_CONNECTORS = (
    "However,", "Typically,", "Moreover,", "Overall,", "Notably,", "Meanwhile,", "Similarly,",
    "Ultimately,", "Often,", "Still,", "Therefore,", "Also,",
)  # fmt: skip
# Slots: D determiner, A adjective, N noun (sometimes a prompt word), V verb, R adverb,
# P preposition, C connector; "," glues a comma to the previous word.
_TEMPLATES = (
    "D A N V D N P D N",
    "C D N V D A N",
    "D A N R V D N P D A N",
    "N V D A N",
    "C D N P D N V D A N",
    "D N V D N , and D N R V D A N",
    "D A N V D N",
    "R , D N V D A N P D N",
)
_TEMPLATE_SLOTS = tuple(tuple(t.split()) for t in _TEMPLATES)
_LONGEST_TEMPLATE = max(len([s for s in t if s != ","]) for t in _TEMPLATE_SLOTS)
_SLOT_WORDS = {
    "D": _DETERMINERS,
    "A": _ADJECTIVES,
    "N": _NOUNS,
    "V": _VERBS,
    "R": _ADVERBS,
    "P": _PREPOSITIONS,
    "C": _CONNECTORS,
}
_RESTATEMENTS = ('Regarding "{q}":', 'You asked: "{q}".', 'On "{q}":', 'To answer "{q}":')
# Long answers reuse a pool of this many sentences: one RNG call per word would make a
# million-word answer take seconds.
_SENTENCE_POOL = 256
_PARAGRAPH = 5


# Sentences of an exact short length, to end an answer on a whole sentence.
_SHORT_SENTENCES = (
    ("Indeed.", "Certainly.", "Exactly."),
    ("Results vary.", "Context matters.", "Details differ."),
    ("This helps overall.", "Context matters here.", "That seems reasonable."),
    ("The approach works well.", "Each case differs slightly.", "This point matters most."),
)
_ADJECTIVE_ENDINGS = ("ly", "ous", "ful", "ive", "able", "ible", "ant", "ing", "ed", "less")


def _noun_like(words: list[str]) -> list[str]:
    """Prompt words that can stand in a noun slot without reading oddly."""
    return [w for w in words if not w.lower().endswith(_ADJECTIVE_ENDINGS)]


def _capitalised(words: list[str]) -> str:
    words[0] = words[0][:1].upper() + words[0][1:]
    words[-1] = words[-1].rstrip(",") + "."
    return " ".join(words)


def _exact_sentence(rng: random.Random, n: int, topic: list[str]) -> str:
    """A sentence of exactly `n` words."""
    if n <= len(_SHORT_SENTENCES):
        return rng.choice(_SHORT_SENTENCES[n - 1])

    def noun() -> str:
        return rng.choice(topic) if topic and rng.random() < 0.3 else rng.choice(_NOUNS)

    phrases = [[rng.choice(_DETERMINERS), noun()], [rng.choice(_VERBS)]]
    phrases.append([rng.choice(_DETERMINERS), noun()])
    extra = n - 5
    while extra >= 3:
        phrases.append([rng.choice(_PREPOSITIONS), rng.choice(_DETERMINERS), noun()])
        extra -= 3
    for phrase in rng.sample([p for p in phrases if len(p) > 1], k=extra):
        phrase.insert(-1, rng.choice(_ADJECTIVES))
    return _capitalised([word for phrase in phrases for word in phrase])


def _sentence(rng: random.Random, topic: list[str]) -> tuple[str, int]:
    words: list[str] = []
    for slot in rng.choice(_TEMPLATE_SLOTS):
        if slot == ",":
            words[-1] += ","
        elif slot == "and":
            words.append("and")
        elif slot == "N" and topic and rng.random() < 0.3:
            words.append(rng.choice(topic))
        else:
            words.append(rng.choice(_SLOT_WORDS[slot]))
    return _capitalised(words), len(words)


def _prose(rng: random.Random, n_words: int, prefix: str, topic: list[str]) -> str:
    """Exactly `n_words` words: `prefix`, then sentences in paragraphs."""
    prefix_words = prefix.split()
    if n_words <= len(prefix_words):
        return " ".join(prefix_words[:n_words])
    need = n_words - len(prefix_words)
    topic = _noun_like(topic)
    sentences: list[str] = []
    pool: list[tuple[str, int]] = []
    total = 0
    # Stop short of the target; _exact_sentence then lands on it with a whole sentence.
    room = need - _LONGEST_TEMPLATE
    while total < room and len(pool) < _SENTENCE_POOL:
        sentence, count = _sentence(rng, topic)
        pool.append((sentence, count))
        sentences.append(sentence)
        total += count
    while total < room:
        average = max(1, total // len(sentences))
        for sentence, count in rng.choices(pool, k=max(1, (room - total) // average)):
            sentences.append(sentence)
            total += count
            if total >= room:
                break
    while total < need:
        sentence, count = _sentence(rng, topic)
        if count > need - total:
            sentence, count = _exact_sentence(rng, need - total, topic), need - total
        sentences.append(sentence)
        total += count
    paragraphs = [
        " ".join(sentences[i : i + _PARAGRAPH]) for i in range(0, len(sentences), _PARAGRAPH)
    ]
    body = "\n\n".join(paragraphs)
    return f"{' '.join(prefix_words)} {body}" if prefix_words else body


def _restatement(rng: random.Random, question: str) -> str:
    words = _DIRECTIVE_RE.sub(" ", question).split()
    if not words:
        return ""
    quoted = " ".join(words[:12]) + ("..." if len(words) > 12 else "")
    return rng.choice(_RESTATEMENTS).format(q=quoted)


def _tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


# ================================================================ LocalResponder


@dataclass(frozen=True)
class _Candidate:
    parts: list[dict[str, Any]] | None  # None: content withheld
    finish: str
    tokens: int


class LocalResponder:
    """Deterministic answers: same request, model and seed give byte-identical output."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def predict_error(self, request: Any) -> bool:
        try:
            plan = self._plan(request)
        except Exception:  # reply() turns the same failure into an INTERNAL error
            return True
        return isinstance(plan, dict) or plan.error_code is not None

    def reply(self, request: Any, model: str) -> Reply:
        try:
            plan = self._plan(request)
            if isinstance(plan, dict):
                return Reply(error=plan)
            if plan.error_code is not None:
                code = plan.error_code
                return Reply(error={"code": code, "message": _ERROR_MESSAGES[code]})
            return Reply(response=self._respond(request, model, plan))
        except Exception as exc:  # a bug here must cost one line, not the worker thread
            return Reply(error={"code": 13, "message": f"Internal error encountered. ({exc!r})"})

    def close(self) -> None:
        return None

    def _plan(self, request: Any) -> _Directives | dict[str, Any]:
        if error := _request_error(request):
            return error
        return _parse_directives(_all_texts(request or {}))

    def _respond(self, request: Any, model: str, plan: _Directives) -> dict[str, Any]:
        request = request or {}
        model_id = model.removeprefix("models/")
        texts = _all_texts(request)
        digest = hashlib.sha256(
            "\x00".join([str(self.seed), model_id, *texts]).encode("utf-8", "surrogatepass")
        ).digest()
        prompt_tokens, prompt_details = _prompt_usage(request, texts)
        envelope_id = _response_id(digest)
        if plan.blocked is not None:
            return {
                "promptFeedback": {"blockReason": plan.blocked},
                "usageMetadata": _usage(prompt_tokens, prompt_details, 0, 0),
                "modelVersion": model_id,
                "responseId": envelope_id,
            }
        config = _generation_config(request)
        count = _as_int(get_field(config, "candidateCount")) or 1
        users = _user_texts(request)
        question = users[-1] if users else ""
        hint = "\n".join(reversed(users))
        candidates = [
            self._candidate(digest, index, config, plan, question, hint) for index in range(count)
        ]
        answer_tokens = sum(c.tokens for c in candidates)
        thoughts = _thought_tokens(digest, model_id, config, answer_tokens)
        if thoughts and get_field(get_field(config, "thinkingConfig"), "includeThoughts") is True:
            summary = _thought_summary(question)
            for candidate in candidates:
                if candidate.parts is not None:
                    candidate.parts.insert(0, {"text": summary, "thought": True})
        return {
            "candidates": [_candidate_json(c, i) for i, c in enumerate(candidates)],
            "usageMetadata": _usage(prompt_tokens, prompt_details, answer_tokens, thoughts),
            "modelVersion": model_id,
            "responseId": envelope_id,
        }

    def _candidate(
        self,
        digest: bytes,
        index: int,
        config: dict[str, Any],
        plan: _Directives,
        question: str,
        hint: str,
    ) -> _Candidate:
        seed_bytes = hashlib.sha256(digest + index.to_bytes(4, "big")).digest()
        rng = random.Random(int.from_bytes(seed_bytes, "big"))
        text = _answer_text(rng, config, plan, question, hint)
        finish = "STOP"
        stops = get_field(config, "stopSequences")
        if isinstance(stops, list):
            cuts = [text.find(s) for s in stops if isinstance(s, str) and s and s in text]
            if cuts:
                text = text[: min(cuts)]
        limit = _as_int(get_field(config, "maxOutputTokens"))
        if limit and _tokens(text) > limit:
            text = _cut(text, limit * 4)
            finish = "MAX_TOKENS"
        if plan.finish is not None:
            finish = plan.finish
        if finish in _WITHHELD:
            return _Candidate(None, finish, 0)
        return _Candidate([{"text": text}], finish, _tokens(text))


def _answer_text(
    rng: random.Random, config: dict[str, Any], plan: _Directives, question: str, hint: str
) -> str:
    mime = str(get_field(config, "responseMimeType") or "text/plain").lower()
    json_schema = get_field(config, "responseJsonSchema")
    schema = get_field(config, "responseSchema")
    if mime == "application/json":
        if json_schema is not None:
            value = generate(json_schema, rng, json_schema=True, hint=hint)
        elif isinstance(schema, dict):
            value = generate(schema, rng, json_schema=False, hint=hint)
        else:
            value = {"answer": _prose_answer(rng, plan, question, hint)}
        return json.dumps(value, ensure_ascii=False)
    if mime == "text/x.enum":
        enum = get_field(schema, "enum") if isinstance(schema, dict) else None
        if isinstance(enum, list) and enum:
            return str(rng.choice(enum))
    return _prose_answer(rng, plan, question, hint)


def _prose_answer(rng: random.Random, plan: _Directives, question: str, hint: str) -> str:
    prefix = _restatement(rng, question)
    n_words = plan.words if plan.words is not None else rng.randint(20, 80)
    return _prose(rng, n_words, prefix, topic_words(_DIRECTIVE_RE.sub(" ", hint)))


def _cut(text: str, max_chars: int) -> str:
    """`text` cut to at most `max_chars`, at a word boundary when one is close."""
    head = text[:max_chars]
    space = head.rfind(" ")
    return head[:space] if space > max_chars // 2 else head


def _prompt_usage(request: dict[str, Any], texts: list[str]) -> tuple[int, list[dict[str, Any]]]:
    text_tokens = max(1, _tokens("".join(texts)))
    details = [{"modality": "TEXT", "tokenCount": text_tokens}]
    images = 0
    for content in get_field(request, "contents") or []:
        for part in _parts(content):
            blob = get_field(part, "inlineData") or get_field(part, "fileData")
            if str(get_field(blob, "mimeType") or "").startswith("image/"):
                images += 1
    if images:
        # The real service bills a (small) image as a fixed 258 tokens.
        details.append({"modality": "IMAGE", "tokenCount": 258 * images})
    return sum(d["tokenCount"] for d in details), details


def _usage(
    prompt: int, details: list[dict[str, Any]], candidates: int, thoughts: int
) -> dict[str, Any]:
    # proto3 JSON leaves zero counts out, and so does the real service.
    usage: dict[str, Any] = {"promptTokenCount": prompt}
    if candidates:
        usage["candidatesTokenCount"] = candidates
    usage["totalTokenCount"] = prompt + candidates + thoughts
    usage["promptTokensDetails"] = details
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts
    return usage


def _thinks(model_id: str, budget: int | None) -> bool:
    name = model_id.lower()
    if re.match(r"gemini-(1\.|2\.0)", name):
        return False  # released before thinking; thinkingConfig has no effect
    if budget is not None:
        return budget != 0
    return ("pro" in name or "flash" in name) and "lite" not in name


def _thought_tokens(digest: bytes, model_id: str, config: dict[str, Any], answer: int) -> int:
    thinking = get_field(config, "thinkingConfig")
    budget = _as_int(get_field(thinking, "thinkingBudget"))
    if not _thinks(model_id, budget):
        return 0
    factor = 1 + 2 * int.from_bytes(digest[-2:], "big") / 0xFFFF
    thoughts = math.ceil(max(answer, 16) * factor)
    return min(thoughts, budget) if budget is not None and budget > 0 else thoughts


def _thought_summary(question: str) -> str:
    words = _DIRECTIVE_RE.sub(" ", question).split()
    topic = " ".join(words[:8]).rstrip(".?!") or "the request"
    return f"**Considering the request**\n\nI'm working out how best to answer: {topic}."


def _response_id(digest: bytes) -> str:
    raw = hashlib.sha256(b"responseId\x00" + digest).digest()[:16]
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _candidate_json(candidate: _Candidate, index: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if candidate.parts is not None:
        out["content"] = {"parts": candidate.parts, "role": "model"}
    out["finishReason"] = candidate.finish
    out["index"] = index
    if candidate.finish == "SAFETY":
        out["safetyRatings"] = [
            {
                "category": "HARM_CATEGORY_DANGEROUS_CONTENT",
                "probability": "HIGH",
                "blocked": True,
            }
        ]
    return out


# ================================================================ OpenAIResponder

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
        return _request_error(request) is not None

    def reply(self, request: Any, model: str) -> Reply:
        try:
            if error := _request_error(request):
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
    system_texts = [t for p in _parts(system) if (t := _part_text(p)) is not None]
    if system_texts:
        messages.append({"role": "system", "content": "\n".join(system_texts)})
    for content in get_field(request, "contents") or []:
        role = "assistant" if get_field(content, "role") == "model" else "user"
        message_content = _openai_content(_parts(content))
        if message_content is not None:
            messages.append({"role": role, "content": message_content})
    body: dict[str, Any] = {"model": model, "messages": messages}
    body.update(_openai_options(_generation_config(request)))
    return body


def _openai_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]] | None:
    """A message's content: a string, or items when images are present; None when empty."""
    items: list[dict[str, Any]] = []
    for part in parts:
        if get_field(part, "thought") is True:
            continue  # earlier turns' thought summaries are not part of the conversation
        text = _part_text(part)
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
            value = _as_int(value) or None  # proto3: 0 means unset
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
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        index = choice.get("index")
        candidates.append(
            {
                "content": {"parts": [{"text": _message_text(message)}], "role": "model"},
                "finishReason": _FINISH_FROM_OPENAI.get(choice.get("finish_reason"), "OTHER"),
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
