"""The local responder: answers derived from the prompt, model and seed, no network.

Why: tests and demos need answers with Gemini's shape (candidates, usageMetadata, finish
reasons, thoughts, JSON fitting a responseSchema) that are byte-identical from run to run,
so a test can assert on them and a benchmark measures gembatch, not a model.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import re
from dataclasses import dataclass
from typing import Any

from gembatch.emulator.directives import WITHHELD, Directives, parse_directives, strip_directives
from gembatch.emulator.prose import prose, restatement
from gembatch.emulator.request import (
    all_texts,
    as_int,
    content_parts,
    generation_config,
    request_error,
    user_texts,
)
from gembatch.emulator.responders.base import Reply
from gembatch.emulator.schema_gen import generate, topic_words
from gembatch.emulator.wire import get_field

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


def _tokens(text: str) -> int:
    return math.ceil(len(text) / 4)


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

    def _plan(self, request: Any) -> Directives | dict[str, Any]:
        if error := request_error(request):
            return error
        return parse_directives(all_texts(request or {}))

    def _respond(self, request: Any, model: str, plan: Directives) -> dict[str, Any]:
        request = request or {}
        model_id = model.removeprefix("models/")
        texts = all_texts(request)
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
        config = generation_config(request)
        count = as_int(get_field(config, "candidateCount")) or 1
        users = user_texts(request)
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
        plan: Directives,
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
        limit = as_int(get_field(config, "maxOutputTokens"))
        if limit and _tokens(text) > limit:
            text = _cut(text, limit * 4)
            finish = "MAX_TOKENS"
        if plan.finish is not None:
            finish = plan.finish
        if finish in WITHHELD:
            return _Candidate(None, finish, 0)
        return _Candidate([{"text": text}], finish, _tokens(text))


def _answer_text(
    rng: random.Random, config: dict[str, Any], plan: Directives, question: str, hint: str
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


def _prose_answer(rng: random.Random, plan: Directives, question: str, hint: str) -> str:
    prefix = restatement(rng, question)
    n_words = plan.words if plan.words is not None else rng.randint(20, 80)
    return prose(rng, n_words, prefix, topic_words(strip_directives(hint)))


def _cut(text: str, max_chars: int) -> str:
    """`text` cut to at most `max_chars`, at a word boundary when one is close."""
    head = text[:max_chars]
    space = head.rfind(" ")
    return head[:space] if space > max_chars // 2 else head


def _prompt_usage(request: dict[str, Any], texts: list[str]) -> tuple[int, list[dict[str, Any]]]:
    text_tokens = max(1, _tokens("".join(texts)))
    details: list[dict[str, Any]] = [{"modality": "TEXT", "tokenCount": text_tokens}]
    images = 0
    for content in get_field(request, "contents") or []:
        for part in content_parts(content):
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
    budget = as_int(get_field(thinking, "thinkingBudget"))
    if not _thinks(model_id, budget):
        return 0
    factor = 1 + 2 * int.from_bytes(digest[-2:], "big") / 0xFFFF
    thoughts = math.ceil(max(answer, 16) * factor)
    return min(thoughts, budget) if budget is not None and budget > 0 else thoughts


def _thought_summary(question: str) -> str:
    words = strip_directives(question).split()
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
