"""Responders: the local deterministic answers and the OpenAI-compatible forwarder.

The forwarder is tested against a real HTTP server (Starlette under uvicorn, in a thread) that
plays an OpenAI /v1/chat/completions endpoint and records what it receives.
"""

from __future__ import annotations

import json
import math
import random
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import pytest
import uvicorn
from google.genai import types
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from gembatch.emulator.config import ResponderConfig
from gembatch.emulator.responders import (
    LocalResponder,
    OpenAIResponder,
    Reply,
    make_responder,
)
from gembatch.emulator.schema_gen import gemini_schema_to_json_schema, generate

MODEL = "models/gemini-2.5-flash"
DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def ask(text: str, *, config: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    request: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
    if config is not None:
        request["generationConfig"] = config
    request.update(extra)
    return request


def answer(reply: Reply, index: int = 0) -> str:
    assert reply.error is None, reply.error
    assert reply.response is not None
    parts = reply.response["candidates"][index]["content"]["parts"]
    return "".join(p["text"] for p in parts if not p.get("thought"))


def local(request: Any, model: str = MODEL, seed: int = 0) -> Reply:
    return LocalResponder(seed).reply(request, model)


# ================================================================ local: basics


def test_same_request_gives_byte_identical_response() -> None:
    request = ask("What are the main causes of inflation in small economies?")
    first = json.dumps(local(request).response, sort_keys=False)
    second = json.dumps(LocalResponder(0).reply(json.loads(json.dumps(request)), MODEL).response)
    assert first == second


def test_seed_and_model_change_the_answer() -> None:
    request = ask("What are the main causes of inflation in small economies?")
    base = answer(local(request, seed=0))
    assert answer(local(request, seed=1)) != base
    assert answer(local(request, model="models/gemini-2.5-pro")) != base
    # The `models/` prefix is spelling, not a different model.
    assert answer(local(request, model="gemini-2.5-flash")) == base


def test_answer_restates_and_echoes_the_prompt() -> None:
    prompt = "Why do glaciers move downhill so slowly?"
    text = answer(local(ask(prompt)))
    assert prompt in text  # short prompts are quoted whole at the start
    assert text.index(prompt) < 30
    long_prompt = "Describe how volcanoes form " + "and erupt " * 20
    text = answer(local(ask(long_prompt)))
    assert "Describe how volcanoes form and erupt" in text
    assert "volcanoes" in text.lower()


def test_default_answer_length_is_20_to_80_words() -> None:
    lengths = {
        len(answer(local(ask(f"Question number {i} about rivers?"))).split()) for i in range(30)
    }
    assert min(lengths) >= 20
    assert max(lengths) <= 80
    assert len(lengths) > 5  # the hash picks varied lengths


def test_response_shape_and_usage_arithmetic() -> None:
    system = "You are a terse geography tutor."
    prompt = "Name three rivers in Portugal."
    request = ask(prompt, systemInstruction={"parts": [{"text": system}]})
    response = local(request, model="models/gemini-2.5-flash-lite").response
    assert response is not None
    assert list(response) == ["candidates", "usageMetadata", "modelVersion", "responseId"]
    (candidate,) = response["candidates"]
    assert candidate["content"]["role"] == "model"
    assert candidate["finishReason"] == "STOP"
    assert candidate["index"] == 0
    text = candidate["content"]["parts"][0]["text"]
    usage = response["usageMetadata"]
    prompt_tokens = math.ceil((len(system) + len(prompt)) / 4)
    assert usage["promptTokenCount"] == prompt_tokens
    assert usage["promptTokensDetails"] == [{"modality": "TEXT", "tokenCount": prompt_tokens}]
    assert usage["candidatesTokenCount"] == math.ceil(len(text) / 4)
    assert usage["totalTokenCount"] == prompt_tokens + usage["candidatesTokenCount"]
    assert "thoughtsTokenCount" not in usage  # lite models do not think by default
    assert response["modelVersion"] == "gemini-2.5-flash-lite"
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", response["responseId"])


def test_snake_case_request_fields_are_read() -> None:
    request = {
        "contents": [{"role": "user", "parts": [{"text": "Summarise the water cycle."}]}],
        "system_instruction": {"parts": [{"text": "Be brief."}]},
        "generation_config": {"max_output_tokens": 3, "candidate_count": 2},
    }
    response = local(request).response
    assert response is not None
    assert len(response["candidates"]) == 2
    assert all(c["finishReason"] == "MAX_TOKENS" for c in response["candidates"])
    assert response["usageMetadata"]["promptTokenCount"] == math.ceil(
        len("Summarise the water cycle.Be brief.") / 4
    )


def test_sdk_parses_the_response() -> None:
    reply = local(ask("Tell me about owls.", config={"thinkingConfig": {"includeThoughts": True}}))
    parsed = types.GenerateContentResponse.model_validate(reply.response)
    assert parsed.text == answer(reply)
    assert parsed.candidates and parsed.candidates[0].finish_reason == types.FinishReason.STOP
    assert parsed.candidates[0].content.parts[0].thought is True
    assert parsed.usage_metadata and parsed.usage_metadata.thoughts_token_count


# ================================================================ local: thinking


@pytest.mark.parametrize(
    ("model", "config", "thinks"),
    [
        ("models/gemini-2.5-flash", None, True),
        ("models/gemini-2.5-pro", None, True),
        ("models/gemini-3-pro-preview", None, True),
        ("models/gemini-2.5-flash", {"thinkingConfig": {"thinkingBudget": 0}}, False),
        ("models/gemini-2.5-flash-lite", None, False),
        ("models/gemini-2.5-flash-lite", {"thinkingConfig": {"thinkingBudget": 4096}}, True),
        ("models/gemini-2.0-flash", None, False),
    ],
)
def test_thinking_tokens(model: str, config: dict[str, Any] | None, thinks: bool) -> None:
    usage = local(ask("Plan a three day trip to Kyoto.", config=config), model=model).response[
        "usageMetadata"
    ]
    thoughts = usage.get("thoughtsTokenCount", 0)
    answer_tokens = usage["candidatesTokenCount"]
    if thinks:
        assert answer_tokens <= thoughts <= 3 * max(answer_tokens, 16) + 1
    else:
        assert thoughts == 0
    assert usage["totalTokenCount"] == usage["promptTokenCount"] + answer_tokens + thoughts


def test_thinking_budget_caps_thoughts() -> None:
    config = {"thinkingConfig": {"thinkingBudget": 10}}
    usage = local(ask("Plan a three day trip to Kyoto.", config=config)).response["usageMetadata"]
    assert usage["thoughtsTokenCount"] == 10


# ================================================================ local: directives


@pytest.mark.parametrize(
    ("directive", "code", "message"),
    [
        ("[[emulator:error]]", 13, "Internal error encountered."),
        ("[[emulator:error=8]]", 8, "Resource has been exhausted (e.g. check quota)."),
        (
            "[[emulator:error=RESOURCE_EXHAUSTED]]",
            8,
            "Resource has been exhausted (e.g. check quota).",
        ),
        ("[[emulator:error=invalid_argument]]", 3, "Request contains an invalid argument."),
        ("[[emulator:error=5]]", 5, "Requested entity was not found."),
    ],
)
def test_error_directive(directive: str, code: int, message: str) -> None:
    reply = local(ask(f"Please answer {directive} now"))
    assert reply.response is None
    assert reply.error == {"code": code, "message": message}


def test_directive_in_system_instruction_counts() -> None:
    request = ask("hello", systemInstruction={"parts": [{"text": "[[emulator:error=14]]"}]})
    assert local(request).error == {"code": 14, "message": "The service is currently unavailable."}


@pytest.mark.parametrize(
    "directive",
    [
        "[[emulator:error=0]]",
        "[[emulator:error=99]]",
        "[[emulator:error=NOPE]]",
        "[[emulator:words=-3]]",
        "[[emulator:words=2000001]]",
        "[[emulator:finish=DONE]]",
        "[[emulator:blocked=MAYBE]]",
        "[[emulator:explode]]",
    ],
)
def test_bad_directive_is_invalid_argument(directive: str) -> None:
    reply = local(ask(f"text {directive}"))
    assert reply.error is not None
    assert reply.error["code"] == 3
    assert directive in reply.error["message"]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 17, 50, 333, 5000])
def test_words_directive_gives_exactly_n_words(n: int) -> None:
    text = answer(local(ask(f"Write about the sea. [[emulator:words={n}]]")))
    assert len(text.split()) == n


def test_words_directive_is_fast_for_large_answers() -> None:
    started = time.perf_counter()
    text = answer(local(ask("Write a long essay. [[emulator:words=200000]]")))
    elapsed = time.perf_counter() - started
    assert len(text.split()) == 200_000
    print(f"200,000 words in {elapsed:.3f} s")


def test_blocked_directive() -> None:
    response = local(ask("something bad [[emulator:blocked]]")).response
    assert response is not None
    assert "candidates" not in response
    assert response["promptFeedback"] == {"blockReason": "SAFETY"}
    usage = response["usageMetadata"]
    assert usage["totalTokenCount"] == usage["promptTokenCount"]
    parsed = types.GenerateContentResponse.model_validate(response)
    assert parsed.text is None
    other = local(ask("x [[emulator:blocked=PROHIBITED_CONTENT]]")).response
    assert other["promptFeedback"] == {"blockReason": "PROHIBITED_CONTENT"}


def test_finish_directive_withholding_reason() -> None:
    response = local(ask("tell me a story [[emulator:finish=SAFETY]]")).response
    (candidate,) = response["candidates"]
    assert candidate["finishReason"] == "SAFETY"
    assert "content" not in candidate
    assert candidate["safetyRatings"][0]["blocked"] is True
    assert "candidatesTokenCount" not in response["usageMetadata"]


@pytest.mark.parametrize("reason", ["MAX_TOKENS", "OTHER", "STOP"])
def test_finish_directive_keeping_text(reason: str) -> None:
    reply = local(ask(f"tell me a story [[emulator:finish={reason.lower()}]]"))
    assert reply.response["candidates"][0]["finishReason"] == reason
    assert answer(reply)


# ================================================================ local: generation config


def test_max_output_tokens_cuts_the_answer() -> None:
    full = answer(local(ask("Explain tides. [[emulator:words=120]]")))
    reply = local(ask("Explain tides. [[emulator:words=120]]", config={"maxOutputTokens": 20}))
    cut = answer(reply)
    assert reply.response["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert full.startswith(cut)
    assert 0 < len(cut) <= 80
    assert reply.response["usageMetadata"]["candidatesTokenCount"] <= 20
    roomy = local(ask("Explain tides. [[emulator:words=120]]", config={"maxOutputTokens": 5000}))
    assert roomy.response["candidates"][0]["finishReason"] == "STOP"
    assert answer(roomy) == full


def test_candidate_count_gives_distinct_candidates() -> None:
    request = ask("Suggest a name for a bakery.", config={"candidateCount": 3})
    response = local(request).response
    candidates = response["candidates"]
    assert [c["index"] for c in candidates] == [0, 1, 2]
    texts = [answer(local(request), i) for i in range(3)]
    assert len(set(texts)) == 3
    assert texts[0] == answer(local(ask("Suggest a name for a bakery.")))
    total = sum(math.ceil(len(t) / 4) for t in texts)
    assert response["usageMetadata"]["candidatesTokenCount"] == total


def test_stop_sequences_end_the_answer_early() -> None:
    full = answer(local(ask("Describe a forest. [[emulator:words=60]]")))
    stop = full.split()[10]
    text = answer(
        local(ask("Describe a forest. [[emulator:words=60]]", config={"stopSequences": [stop]}))
    )
    assert stop not in text
    assert full.startswith(text)


def test_json_without_schema_is_an_answer_object() -> None:
    text = answer(local(ask("Capital of Peru?", config={"responseMimeType": "application/json"})))
    value = json.loads(text)
    assert list(value) == ["answer"]
    assert "Capital of Peru?" in value["answer"]


def test_enum_mime_type_answers_one_value() -> None:
    schema = {"type": "STRING", "enum": ["positive", "negative", "neutral"]}
    config = {"responseMimeType": "text/x.enum", "responseSchema": schema}
    seen = {answer(local(ask(f"Review {i}: great food", config=config))) for i in range(20)}
    assert seen <= {"positive", "negative", "neutral"}
    assert len(seen) > 1


# ================================================================ local: structural errors


@pytest.mark.parametrize(
    ("request_value", "fragment"),
    [
        ({}, "GenerateContentRequest.contents: contents is not specified"),
        ({"contents": []}, "contents is not specified"),
        (None, "contents is not specified"),
        ({"contents": "hello"}, "Invalid value at 'contents'"),
        ({"contents": ["hello"]}, "Invalid value at 'contents[0]'"),
        ({"contents": [{"role": "user"}]}, "contents[0].parts: contents.parts must not be empty"),
        ({"contents": [{"parts": "hi"}]}, "Invalid value at 'contents[0].parts'"),
        ({"contents": [{"parts": [{}]}]}, "required oneof field 'data'"),
        ({"contents": [{"parts": [{"text": 5}]}]}, "'contents[0].parts[0].text' (TYPE_STRING), 5"),
        ({"contents": [{"role": "bot", "parts": [{"text": "x"}]}]}, "valid role: user, model"),
        (["not", "an", "object"], "Invalid value at 'request'"),
        ("just text", "Invalid value at 'request'"),
        (
            {
                "contents": [{"parts": [{"text": "x"}]}],
                "generationConfig": {"maxOutputTokens": "x"},
            },
            "generation_config.max_output_tokens",
        ),
        (
            {"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"candidateCount": 99}},
            "candidate_count",
        ),
    ],
)
def test_structural_errors(request_value: Any, fragment: str) -> None:
    responder = LocalResponder()
    reply = responder.reply(request_value, MODEL)
    assert reply.response is None
    assert reply.error is not None
    assert set(reply.error) == {"code", "message"}
    assert reply.error["code"] == 3
    assert fragment in reply.error["message"]
    assert responder.predict_error(request_value) is True


def test_unknown_top_level_field() -> None:
    request = {**ask("hi"), "response_format": {"type": "json"}}
    reply = local(request)
    message = 'Invalid JSON payload received. Unknown name "response_format": Cannot find field.'
    assert reply.error == {"code": 3, "message": message}


def test_every_known_field_spelling_is_accepted() -> None:
    request = {
        "model": MODEL,
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
        "tools": [],
        "tool_config": {},
        "safetySettings": [],
        "system_instruction": {"parts": [{"text": "be kind"}]},
        "generation_config": {},
        "cachedContent": "cachedContents/abc",
        "labels": {"team": "a"},
    }
    assert local(request).error is None


def test_predict_error_agrees_with_reply() -> None:
    requests: list[Any] = [
        ask("plain question"),
        ask("boom [[emulator:error]]"),
        ask("quota [[emulator:error=RESOURCE_EXHAUSTED]]"),
        ask("bad [[emulator:error=banana]]"),
        ask("blocked [[emulator:blocked]]"),
        ask("safety [[emulator:finish=SAFETY]]"),
        ask("words [[emulator:words=12]]"),
        ask("typo [[emulator:wrods=12]]"),
        {"contents": []},
        {"contents": [{"parts": [{"text": "x"}]}], "extra": 1},
        [1, 2, 3],
        42,
        None,
        ask("json", config={"responseMimeType": "application/json"}),
        ask("many", config={"candidateCount": 4, "maxOutputTokens": 3}),
        ask("bad count", config={"candidateCount": "lots"}),
    ]
    responder = LocalResponder(seed=7)
    for request in requests:
        reply = responder.reply(request, MODEL)
        assert responder.predict_error(request) is (reply.error is not None), request
        assert (reply.error is None) is (reply.response is not None)


def test_concurrent_replies_match_sequential_ones() -> None:
    responder = LocalResponder(seed=3)
    requests = [ask(f"Question {i}: how do bees navigate?") for i in range(40)]
    expected = [json.dumps(responder.reply(r, MODEL).response) for r in requests]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda r: json.dumps(responder.reply(r, MODEL).response), requests))
    assert got == expected


# ================================================================ structured output

PEOPLE = {
    "type": "OBJECT",
    "properties": {
        "people": {
            "type": "ARRAY",
            "items": {
                "type": "OBJECT",
                "properties": {
                    "name": {"type": "STRING"},
                    "age": {"type": "NUMBER"},
                    "job": {"type": "STRING"},
                },
                "required": ["name", "age", "job"],
                "propertyOrdering": ["name", "age", "job"],
            },
        }
    },
    "required": ["people"],
}
REVIEW = {
    "type": "object",  # lower case is accepted too
    "properties": {
        "sentiment": {
            "type": "STRING",
            "enum": ["positive", "negative", "mixed"],
            "format": "enum",
        },
        "stars": {"type": "INTEGER", "minimum": 1, "maximum": 5},
        "summary": {"type": "STRING", "description": "One sentence."},
    },
    "required": ["sentiment", "stars", "summary"],
    "propertyOrdering": ["summary", "stars", "sentiment"],
}
MATRIX = {
    "type": "OBJECT",
    "properties": {
        "grid": {
            "type": "ARRAY",
            "minItems": "2",  # int64 travels as a string on the proto3 wire
            "maxItems": 4,
            "items": {"type": "ARRAY", "items": {"type": "INTEGER", "minimum": -5, "maximum": 5}},
        },
        "tags": {"type": "ARRAY", "items": {"type": "STRING"}, "maxItems": 1},
    },
    "required": ["grid", "tags"],
}
TEMPERATURES = {
    "type": "ARRAY",
    "minItems": 3,
    "maxItems": 3,
    "items": {
        "type": "OBJECT",
        "properties": {
            "city": {"type": "STRING"},
            "celsius": {"type": "NUMBER", "minimum": -40.5, "maximum": 55.25},
            "year": {"type": "INTEGER", "minimum": 1900, "maximum": 1999},
        },
        "required": ["city", "celsius", "year"],
    },
}
EVENT = {
    "type": "OBJECT",
    "properties": {
        "title": {"type": "STRING"},
        "starts_at": {"type": "STRING", "format": "date-time"},
        "location": {"type": "STRING", "nullable": True},
        "attendees": {"type": "INTEGER", "nullable": True, "minimum": 0},
        "organizer": {
            "type": "OBJECT",
            "nullable": True,
            "properties": {"email": {"type": "STRING"}, "phone": {"type": "STRING"}},
            "required": ["email"],
        },
        "kind": {"anyOf": [{"type": "STRING", "enum": ["talk", "workshop"]}, {"type": "BOOLEAN"}]},
    },
    "required": ["title", "starts_at", "location", "attendees", "organizer", "kind"],
}
GEMINI_SCHEMAS = {
    "people": PEOPLE,
    "review": REVIEW,
    "matrix": MATRIX,
    "temps": TEMPERATURES,
    "event": EVENT,
}


def structured(schema: dict[str, Any], prompt: str, seed: int, *, json_schema: bool) -> Any:
    key = "responseJsonSchema" if json_schema else "responseSchema"
    config = {"responseMimeType": "application/json", key: schema}
    reply = LocalResponder(seed).reply(ask(prompt, config=config), MODEL)
    return json.loads(answer(reply))


@pytest.mark.parametrize("name", sorted(GEMINI_SCHEMAS))
def test_gemini_schema_output_validates(name: str) -> None:
    schema = GEMINI_SCHEMAS[name]
    validator = jsonschema.Draft202012Validator(gemini_schema_to_json_schema(schema))
    outputs = [
        structured(schema, f"Give me data about Lisbon, case {s}", s, json_schema=False)
        for s in range(25)
    ]
    for value in outputs:
        validator.validate(value)
    assert len({json.dumps(v) for v in outputs}) > 1  # values vary with the seed


def test_gemini_schema_values_are_plausible_and_ordered() -> None:
    value = structured(PEOPLE, "List three people who live in Oslo.", 0, json_schema=False)
    for person in value["people"]:
        assert list(person) == ["name", "age", "job"]
        first, last = person["name"].split()
        assert first[0].isupper() and last[0].isupper()
        assert 18 <= person["age"] <= 85
    review = structured(REVIEW, "Review: the soup was cold.", 1, json_schema=False)
    assert list(review) == ["summary", "stars", "sentiment"]
    assert review["summary"].endswith(".")


def test_gemini_schema_without_ordering_is_alphabetical() -> None:
    schema = {
        "type": "OBJECT",
        "properties": {
            "zeta": {"type": "STRING"},
            "alpha": {"type": "STRING"},
            "mid": {"type": "STRING"},
        },
        "required": ["zeta", "alpha", "mid"],
    }
    assert list(structured(schema, "x", 0, json_schema=False)) == ["alpha", "mid", "zeta"]


def test_gemini_nullable_and_date_time() -> None:
    nulls: set[str] = set()
    for seed in range(60):
        value = structured(EVENT, "Plan a meetup", seed, json_schema=False)
        assert DATE_TIME.match(value["starts_at"])
        nulls.update(k for k, v in value.items() if v is None)
    assert {"location", "attendees", "organizer"} <= nulls  # nullable fields are null sometimes


def test_gemini_schema_conversion() -> None:
    converted = gemini_schema_to_json_schema(EVENT)
    assert converted["type"] == "object"
    props = converted["properties"]
    assert props["location"] == {"type": ["string", "null"]}
    assert props["starts_at"] == {"type": "string", "format": "date-time"}
    assert props["attendees"] == {"type": ["integer", "null"], "minimum": 0}
    assert props["kind"]["anyOf"][0] == {"type": "string", "enum": ["talk", "workshop"]}
    assert gemini_schema_to_json_schema(MATRIX)["properties"]["grid"]["minItems"] == 2
    review = gemini_schema_to_json_schema(REVIEW)
    assert list(review["properties"]) == ["summary", "stars", "sentiment"]
    assert "format" not in review["properties"]["sentiment"]


LIBRARY = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$defs": {
        "author": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 3},
                "email": {"type": "string", "format": "email"},
                "born": {"type": "string", "format": "date"},
            },
            "required": ["name", "email"],
            "additionalProperties": False,
        },
        "isbn": {"type": "string", "pattern": "^97[89]-\\d{10}$"},
    },
    "properties": {
        "id": {"type": "string", "format": "uuid"},
        "books": {
            "type": "array",
            "minItems": 2,
            "maxItems": 5,
            "uniqueItems": True,
            "items": {
                "type": "object",
                "properties": {
                    "title": {"type": "string", "maxLength": 40},
                    "isbn": {"$ref": "#/$defs/isbn"},
                    "author": {"$ref": "#/$defs/author"},
                    "format": {"enum": ["hardcover", "paperback", "ebook"]},
                    "subtitle": {"type": ["string", "null"]},
                    "pages": {"type": "integer", "minimum": 10, "exclusiveMaximum": 2000},
                    "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 99.99},
                    "rating": {"type": "number", "minimum": 0, "maximum": 5, "multipleOf": 0.5},
                    "link": {"anyOf": [{"type": "string", "format": "uri"}, {"type": "null"}]},
                },
                "required": ["title", "isbn", "author", "format", "subtitle", "pages"],
                "additionalProperties": False,
            },
        },
        "status": {"const": "ok"},
        "meta": {
            "oneOf": [
                {
                    "type": "object",
                    "properties": {"count": {"type": "integer"}},
                    "required": ["count"],
                },
                {"type": "string", "maxLength": 3},
            ]
        },
        "audit": {
            "allOf": [
                {"type": "object", "properties": {"by": {"type": "string"}}, "required": ["by"]},
                {
                    "properties": {"at": {"type": "string", "format": "date-time"}},
                    "required": ["at"],
                },
            ]
        },
    },
    "required": ["id", "books", "status", "meta", "audit"],
}
TREE = {
    "definitions": {
        "node": {
            "type": "object",
            "properties": {
                "label": {"type": "string"},
                "children": {"type": "array", "items": {"$ref": "#/definitions/node"}},
            },
            "required": ["label", "children"],
        }
    },
    "$ref": "#/definitions/node",
}
OPEN_MAP = {
    "type": "object",
    "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 9},
    "minProperties": 2,
}


@pytest.mark.parametrize("schema", [LIBRARY, TREE, OPEN_MAP], ids=["library", "tree", "open-map"])
def test_json_schema_output_validates(schema: dict[str, Any]) -> None:
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    for seed in range(25):
        validator.validate(
            structured(schema, "Catalogue some classic novels", seed, json_schema=True)
        )


def test_json_schema_pattern_and_formats_are_honoured() -> None:
    value = structured(LIBRARY, "books", 4, json_schema=True)
    for book in value["books"]:
        assert re.fullmatch(r"97[89]-\d{10}", book["isbn"])
        assert re.fullmatch(r"[a-z]+\.[a-z]+@example\.com", book["author"]["email"])
    assert re.fullmatch(
        r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", value["id"]
    )
    assert DATE_TIME.match(value["audit"]["at"])


def test_strings_echo_the_prompt() -> None:
    schema = {"type": "object", "properties": {"topic": {"type": "string"}}, "required": ["topic"]}
    words = {
        structured(schema, "Facts about hummingbirds and migration", s, json_schema=True)["topic"]
        for s in range(10)
    }
    assert any("hummingbirds" in w.lower() or "migration" in w.lower() for w in words)


# -------------------------------------------------------------- property test

NAMES = st.from_regex(r"[a-z][a-zA-Z_]{0,7}", fullmatch=True)


@st.composite
def number_schema(draw: st.DrawFn) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": draw(st.sampled_from(["NUMBER", "INTEGER", "number"]))}
    if draw(st.booleans()):
        low, high = sorted(draw(st.lists(st.integers(-500, 500), min_size=2, max_size=2)))
        if draw(st.booleans()):
            schema["minimum"] = low
        if draw(st.booleans()):
            schema["maximum"] = high
    return schema


@st.composite
def string_schema(draw: st.DrawFn) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": draw(st.sampled_from(["STRING", "string"]))}
    choice = draw(st.sampled_from(["plain", "enum", "date-time", "date"]))
    if choice == "enum":
        schema["enum"] = draw(
            st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=4, unique=True)
        )
    elif choice != "plain":
        schema["format"] = choice
    return schema


LEAVES = st.one_of(number_schema(), string_schema(), st.just({"type": "BOOLEAN"}))


def with_nullable(schemas: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.tuples(schemas, st.booleans()).map(
        lambda p: {**p[0], "nullable": True} if p[1] else p[0]
    )


@st.composite
def object_schema(draw: st.DrawFn, children: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    props = draw(st.dictionaries(NAMES, children, min_size=1, max_size=4))
    schema: dict[str, Any] = {"type": "OBJECT", "properties": props}
    schema["required"] = draw(st.lists(st.sampled_from(sorted(props)), unique=True))
    if draw(st.booleans()):
        schema["propertyOrdering"] = draw(st.permutations(sorted(props)))
    return schema


@st.composite
def array_schema(draw: st.DrawFn, children: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "ARRAY", "items": draw(children)}
    low, high = sorted(draw(st.lists(st.integers(0, 5), min_size=2, max_size=2)))
    if draw(st.booleans()):
        schema["minItems"] = low
    if draw(st.booleans()):
        schema["maxItems"] = high
    return schema


GEMINI_SCHEMA = st.recursive(
    with_nullable(LEAVES),
    lambda children: st.one_of(
        with_nullable(object_schema(children)),
        with_nullable(array_schema(children)),
        st.lists(children, min_size=1, max_size=3).map(lambda branches: {"anyOf": branches}),
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=GEMINI_SCHEMA, seed=st.integers(0, 2**32))
def test_random_gemini_schemas_validate(schema: dict[str, Any], seed: int) -> None:
    value = generate(schema, random.Random(seed), json_schema=False, hint="random test prompt")
    jsonschema.Draft202012Validator(gemini_schema_to_json_schema(schema)).validate(value)
    # Structured output must survive the JSON round trip the responder applies.
    assert json.loads(json.dumps(value)) == value


@st.composite
def json_number(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["integer", "number"]))
    schema: dict[str, Any] = {"type": kind}
    low = draw(st.integers(-1000, 1000))
    high = low + draw(st.integers(2, 500))
    if draw(st.booleans()):
        schema["exclusiveMinimum" if draw(st.booleans()) else "minimum"] = low
    if draw(st.booleans()):
        schema["exclusiveMaximum" if draw(st.booleans()) else "maximum"] = high
    if kind == "integer" and draw(st.booleans()):
        schema["multipleOf"] = draw(st.sampled_from([1, 2, 5]))
    return schema


@st.composite
def json_string(draw: st.DrawFn) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    choice = draw(st.sampled_from(["lengths", "format", "pattern", "plain"]))
    if choice == "lengths":
        low = draw(st.integers(0, 30))
        schema["minLength"] = low
        schema["maxLength"] = low + draw(st.integers(0, 10))
    elif choice == "format":
        schema["format"] = draw(
            # Not "time": this jsonschema checks it with the draft-3 rule, which rejects
            # RFC 3339's "16:31:25Z".
            st.sampled_from(["date", "date-time", "email", "uuid", "uri"])
        )
    elif choice == "pattern":
        schema["pattern"] = draw(
            st.sampled_from(
                ["^[a-z]{3}$", "^\\d{4}-\\d{2}$", "^(foo|bar)_[0-9]+$", "[A-Z]", "^x+y?$"]
            )
        )
    return schema


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-9, 9), st.text(max_size=5))
JSON_LEAVES = st.one_of(
    json_number(),
    json_string(),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.just({"type": ["string", "null"]}),
    st.lists(JSON_SCALARS, min_size=1, max_size=4, unique_by=json.dumps).map(lambda e: {"enum": e}),
    JSON_SCALARS.map(lambda c: {"const": c}),
)


@st.composite
def json_object(draw: st.DrawFn, children: st.SearchStrategy[Any]) -> dict[str, Any]:
    props = draw(st.dictionaries(NAMES, children, min_size=0, max_size=4))
    schema: dict[str, Any] = {"type": "object", "properties": props}
    if props:
        schema["required"] = draw(st.lists(st.sampled_from(sorted(props)), unique=True))
    additional = draw(st.sampled_from(["absent", False, True, "schema"]))
    if additional == "schema":
        schema["additionalProperties"] = draw(children)
    elif additional != "absent":
        schema["additionalProperties"] = additional
    return schema


@st.composite
def json_array(draw: st.DrawFn, children: st.SearchStrategy[Any]) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "array", "items": draw(children)}
    low = draw(st.integers(0, 4))
    if draw(st.booleans()):
        schema["minItems"] = low
    if draw(st.booleans()):
        schema["maxItems"] = low + draw(st.integers(0, 3))
    return schema


def all_of(pair: tuple[dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
    """Both objects at once; the second's names are prefixed so the pair stays satisfiable."""
    first, second = pair
    renamed = {
        "type": "object",
        "properties": {f"b_{k}": v for k, v in second["properties"].items()},
        "required": [f"b_{k}" for k in second.get("required", [])],
    }
    return {"allOf": [{**first, "additionalProperties": True}, renamed]}


DISJOINT = st.lists(
    st.sampled_from(
        [{"type": "string"}, {"type": "integer"}, {"type": "boolean"}, {"type": "null"}]
    ),
    min_size=1,
    max_size=3,
    unique_by=lambda b: b["type"],
)
JSON_SCHEMA = st.recursive(
    JSON_LEAVES,
    lambda children: st.one_of(
        json_object(children),
        json_array(children),
        st.lists(children, min_size=1, max_size=3).map(lambda branches: {"anyOf": branches}),
        DISJOINT.map(lambda branches: {"oneOf": branches}),
        st.tuples(json_object(children), json_object(children)).map(all_of),
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=JSON_SCHEMA, seed=st.integers(0, 2**32), via_ref=st.booleans())
def test_random_json_schemas_validate(schema: dict[str, Any], seed: int, via_ref: bool) -> None:
    if via_ref:
        schema = {"$defs": {"thing": schema}, "type": "array", "items": {"$ref": "#/$defs/thing"}}
    value = generate(schema, random.Random(seed), json_schema=True, hint="a random prompt")
    checker = jsonschema.FormatChecker()
    jsonschema.Draft202012Validator(schema, format_checker=checker).validate(value)


JUNK_KEYS = (
    "type", "properties", "required", "items", "enum", "anyOf", "allOf", "$ref", "$defs",
    "minItems", "maxItems", "minimum", "maximum", "pattern", "nullable", "contents", "parts",
    "text", "role", "generationConfig", "responseSchema", "candidateCount",
)  # fmt: skip
JUNK = st.recursive(
    st.one_of(
        JSON_SCALARS,
        st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from(["object", "ARRAY", "string", "#", "#/$defs/a", "(a)+", "date-time"]),
    ),
    lambda c: st.one_of(
        st.lists(c, max_size=4),
        st.dictionaries(
            st.sampled_from(JUNK_KEYS),
            c,
            max_size=5,
        ),
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=JUNK, request=JUNK, json_schema=st.booleans())
def test_junk_never_breaks_a_reply(schema: Any, request: Any, json_schema: bool) -> None:
    responder = LocalResponder()
    key = "responseJsonSchema" if json_schema else "responseSchema"
    requests = [ask("junk", config={"responseMimeType": "application/json", key: schema}), request]
    for item in requests:
        reply = responder.reply(item, MODEL)
        assert responder.predict_error(item) is (reply.error is not None)
        if reply.response is not None and "candidates" in reply.response:
            text = answer(reply)
            if item is requests[0]:
                json.loads(text)


# ================================================================ OpenAI forwarding


class FakeOpenAI:
    """An OpenAI-compatible chat endpoint: records requests, answers from a script."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        self.script: list[Response] = []
        self.finish_reason = "stop"
        self.app = Starlette(routes=[Route("/{path:path}", self.handle, methods=["POST"])])

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.headers.clear()
            self.paths.clear()
            self.script.clear()
            self.finish_reason = "stop"

    async def handle(self, request: Request) -> Response:
        body = await request.json()
        with self.lock:
            self.requests.append(body)
            self.headers.append(dict(request.headers))
            self.paths.append(request.url.path)
            scripted = self.script.pop(0) if self.script else None
        if scripted is not None:
            return scripted
        n = body.get("n", 1)
        return JSONResponse(
            {
                "id": "chatcmpl-abc123",
                "object": "chat.completion",
                "created": 1700000000,
                "model": "upstream-llm-7b",
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": f"Upstream answer {i}"},
                        "finish_reason": self.finish_reason,
                    }
                    for i in range(n)
                ],
                "usage": {"prompt_tokens": 21, "completion_tokens": 9, "total_tokens": 30},
            }
        )


@pytest.fixture(scope="module")
def upstream_server() -> Iterator[tuple[FakeOpenAI, str]]:
    fake = FakeOpenAI()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(fake.app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "upstream test server did not start"
        time.sleep(0.01)
    yield fake, f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=5)


@pytest.fixture
def upstream(upstream_server: tuple[FakeOpenAI, str]) -> tuple[FakeOpenAI, str]:
    upstream_server[0].reset()
    return upstream_server


def forwarder(url: str, **overrides: Any) -> OpenAIResponder:
    settings_ = {
        "kind": "openai",
        "url": url,
        "timeout_seconds": 5.0,
        "max_retries": 2,
        **overrides,
    }
    return OpenAIResponder(ResponderConfig(**settings_))


def test_forwarded_request_and_mapped_response(upstream: tuple[FakeOpenAI, str]) -> None:
    fake, url = upstream
    request = {
        "systemInstruction": {
            "parts": [{"text": "You are terse."}, {"text": "Answer in English."}]
        },
        "contents": [
            {"role": "user", "parts": [{"text": "Hi"}, {"text": "Who are you?"}]},
            {"role": "model", "parts": [{"text": "An assistant."}]},
            {"parts": [{"text": "List two colours."}]},
        ],
        "generationConfig": {
            "temperature": 0.2,
            "topP": 0.9,
            "maxOutputTokens": 128,
            "stopSequences": ["END"],
            "candidateCount": 2,
            "seed": 42,
            "presencePenalty": 0.1,
            "frequencyPenalty": 0.3,
            "responseMimeType": "application/json",
            "responseSchema": PEOPLE,
        },
    }
    responder = forwarder(url)
    try:
        assert responder.predict_error(request) is False
        reply = responder.reply(request, MODEL)
    finally:
        responder.close()
    (sent,) = fake.requests
    assert fake.paths == ["/v1/chat/completions"]
    assert sent["model"] == "gemini-2.5-flash"
    assert sent["messages"] == [
        {"role": "system", "content": "You are terse.\nAnswer in English."},
        {"role": "user", "content": "Hi\nWho are you?"},
        {"role": "assistant", "content": "An assistant."},
        {"role": "user", "content": "List two colours."},
    ]
    assert sent["temperature"] == 0.2
    assert sent["top_p"] == 0.9
    assert sent["max_tokens"] == 128
    assert sent["stop"] == ["END"]
    assert sent["n"] == 2
    assert sent["seed"] == 42
    assert sent["presence_penalty"] == 0.1
    assert sent["frequency_penalty"] == 0.3
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": gemini_schema_to_json_schema(PEOPLE)},
    }
    assert "authorization" not in fake.headers[0]
    assert reply.error is None
    assert reply.response == {
        "candidates": [
            {
                "content": {"parts": [{"text": f"Upstream answer {i}"}], "role": "model"},
                "finishReason": "STOP",
                "index": i,
            }
            for i in range(2)
        ],
        "usageMetadata": {
            "promptTokenCount": 21,
            "candidatesTokenCount": 9,
            "totalTokenCount": 30,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 21}],
        },
        "modelVersion": "upstream-llm-7b",
        "responseId": "chatcmpl-abc123",
    }
    parsed = types.GenerateContentResponse.model_validate(reply.response)
    assert parsed.text == "Upstream answer 0"


def test_images_json_object_and_configured_model(upstream: tuple[FakeOpenAI, str]) -> None:
    fake, url = upstream
    request = {
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"text": "What is in this picture?"},
                    {"inline_data": {"mime_type": "image/png", "data": "iVBORw0KGgo="}},
                    {"fileData": {"mimeType": "application/pdf", "fileUri": "files/x"}},
                ],
            }
        ],
        "generation_config": {"response_mime_type": "application/json"},
    }
    responder = forwarder(f"{url}/chat/completions/", model="llava-13b")
    try:
        assert responder.reply(request, MODEL).error is None
    finally:
        responder.close()
    (sent,) = fake.requests
    assert fake.paths == ["/v1/chat/completions"]
    assert sent["model"] == "llava-13b"
    assert sent["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            ],
        }
    ]
    assert sent["response_format"] == {"type": "json_object"}


def test_json_schema_is_forwarded_unchanged(upstream: tuple[FakeOpenAI, str]) -> None:
    fake, url = upstream
    config = {"responseMimeType": "application/json", "responseJsonSchema": TREE}
    responder = forwarder(url)
    try:
        responder.reply(ask("a tree", config=config), MODEL)
    finally:
        responder.close()
    assert fake.requests[0]["response_format"]["json_schema"]["schema"] == TREE


@pytest.mark.parametrize(
    ("upstream_reason", "gemini_reason"),
    [("length", "MAX_TOKENS"), ("content_filter", "SAFETY"), ("tool_calls", "OTHER")],
)
def test_finish_reason_mapping(
    upstream: tuple[FakeOpenAI, str], upstream_reason: str, gemini_reason: str
) -> None:
    fake, url = upstream
    fake.finish_reason = upstream_reason
    responder = forwarder(url)
    try:
        reply = responder.reply(ask("hi"), MODEL)
    finally:
        responder.close()
    assert reply.response["candidates"][0]["finishReason"] == gemini_reason


def test_reasoning_tokens_become_thoughts(upstream: tuple[FakeOpenAI, str]) -> None:
    fake, url = upstream
    body = {
        "id": "r1",
        "model": "thinker",
        "choices": [{"index": 0, "message": {"content": "42"}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": 5,
            "completion_tokens": 50,
            "total_tokens": 55,
            "completion_tokens_details": {"reasoning_tokens": 40},
        },
    }
    fake.script.append(JSONResponse(body))
    responder = forwarder(url)
    try:
        usage = responder.reply(ask("meaning of life?"), MODEL).response["usageMetadata"]
    finally:
        responder.close()
    assert usage["candidatesTokenCount"] == 10
    assert usage["thoughtsTokenCount"] == 40
    assert usage["totalTokenCount"] == 55


def test_retry_after_server_error(upstream: tuple[FakeOpenAI, str]) -> None:
    fake, url = upstream
    fake.script.append(JSONResponse({"error": {"message": "boom"}}, status_code=500))
    responder = forwarder(url, max_retries=2)
    try:
        reply = responder.reply(ask("hello"), MODEL)
    finally:
        responder.close()
    assert reply.error is None
    assert answer(reply) == "Upstream answer 0"
    assert len(fake.requests) == 2


def test_persistent_429_is_resource_exhausted(upstream: tuple[FakeOpenAI, str]) -> None:
    fake, url = upstream
    for _ in range(3):
        fake.script.append(
            JSONResponse({"error": {"message": "Rate limit reached"}}, status_code=429)
        )
    responder = forwarder(url, max_retries=2)
    try:
        reply = responder.reply(ask("hello"), MODEL)
    finally:
        responder.close()
    assert reply.response is None
    assert reply.error["code"] == 8
    assert "429" in reply.error["message"]
    assert "Rate limit reached" in reply.error["message"]
    assert len(fake.requests) == 3


@pytest.mark.parametrize(("status", "code"), [(400, 3), (401, 16), (403, 7), (404, 5)])
def test_client_errors_are_not_retried(
    upstream: tuple[FakeOpenAI, str], status: int, code: int
) -> None:
    fake, url = upstream
    fake.script.append(PlainTextResponse(f"nope {status} " + "x" * 1000, status_code=status))
    responder = forwarder(url)
    try:
        reply = responder.reply(ask("hello"), MODEL)
    finally:
        responder.close()
    assert reply.error["code"] == code
    assert f"HTTP {status}" in reply.error["message"]
    assert f"nope {status}" in reply.error["message"]
    assert len(reply.error["message"]) < 500  # only an excerpt of the body
    assert len(fake.requests) == 1


def test_503_after_retries_is_unavailable(upstream: tuple[FakeOpenAI, str]) -> None:
    fake, url = upstream
    for _ in range(2):
        fake.script.append(PlainTextResponse("overloaded", status_code=503))
    responder = forwarder(url, max_retries=1)
    try:
        reply = responder.reply(ask("hello"), MODEL)
    finally:
        responder.close()
    assert reply.error["code"] == 14
    assert len(fake.requests) == 2


def test_malformed_upstream_json_is_internal(upstream: tuple[FakeOpenAI, str]) -> None:
    fake, url = upstream
    fake.script.append(PlainTextResponse("<html>gateway</html>", status_code=200))
    fake.script.append(JSONResponse({"object": "chat.completion"}))
    responder = forwarder(url)
    try:
        first = responder.reply(ask("hello"), MODEL)
        second = responder.reply(ask("hello"), MODEL)
    finally:
        responder.close()
    assert first.error["code"] == 13
    assert "malformed" in first.error["message"]
    assert second.error["code"] == 13


def test_upstream_down_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    responder = forwarder(f"http://127.0.0.1:{port}/v1", max_retries=1)
    try:
        started = time.monotonic()
        reply = responder.reply(ask("hello"), MODEL)
    finally:
        responder.close()
    assert reply.error["code"] == 14
    assert "unreachable" in reply.error["message"]
    assert time.monotonic() - started >= 0.2  # it backed off before the retry


def test_bearer_key_from_config_and_environment(
    upstream: tuple[FakeOpenAI, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, url = upstream
    responder = forwarder(url, api_key="sk-test-123")
    try:
        responder.reply(ask("hello"), MODEL)
    finally:
        responder.close()
    monkeypatch.setenv("UPSTREAM_KEY_FOR_TEST", "sk-from-env")
    responder = forwarder(url, api_key_env="UPSTREAM_KEY_FOR_TEST")
    try:
        responder.reply(ask("hello"), MODEL)
    finally:
        responder.close()
    assert fake.headers[0]["authorization"] == "Bearer sk-test-123"
    assert fake.headers[1]["authorization"] == "Bearer sk-from-env"


def test_invalid_request_is_not_forwarded(upstream: tuple[FakeOpenAI, str]) -> None:
    fake, url = upstream
    responder = forwarder(url)
    try:
        bad = {"contents": [{"parts": [{"text": "hi"}]}], "temperature": 1}
        assert responder.predict_error(bad) is True
        reply = responder.reply(bad, MODEL)
        # Directives are the local responder's business: forwarded as plain text.
        assert responder.predict_error(ask("[[emulator:error]]")) is False
    finally:
        responder.close()
    assert reply.error["code"] == 3
    assert 'Unknown name "temperature"' in reply.error["message"]
    assert fake.requests == []


def test_concurrent_forwarding(upstream: tuple[FakeOpenAI, str]) -> None:
    fake, url = upstream
    responder = forwarder(url, concurrency=4)
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            replies = list(pool.map(lambda i: responder.reply(ask(f"q{i}"), MODEL), range(24)))
    finally:
        responder.close()
    assert all(r.error is None for r in replies)
    assert sorted(m["messages"][0]["content"] for m in fake.requests) == sorted(
        f"q{i}" for i in range(24)
    )


def test_make_responder() -> None:
    assert isinstance(make_responder(ResponderConfig(), seed=5), LocalResponder)
    remote = make_responder(ResponderConfig(kind="openai", url="http://127.0.0.1:9/v1"), seed=0)
    try:
        assert isinstance(remote, OpenAIResponder)
    finally:
        remote.close()
    with pytest.raises(ValueError):
        make_responder(ResponderConfig(kind="nonsense"), seed=0)
