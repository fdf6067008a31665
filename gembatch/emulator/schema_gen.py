"""Schema-driven JSON values for the emulator's structured output.

Why: clients that ask for structured output parse the text as JSON and validate it, so prose or
JSON that breaks the schema tests nothing. This module builds, from a Gemini Schema or a JSON
Schema and a seeded RNG, a value that validates, with strings that echo property names and prompt.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import uuid
from typing import Any

from gembatch.emulator.wire import get_field

try:  # CPython's own regex parser lets us build strings for simple `pattern`s.
    import re._parser as _sre_parse  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - other interpreters: patterns are then ignored
    _sre_parse = None

_JSON_TYPES = ("string", "number", "integer", "boolean", "array", "object", "null")
# Gemini number formats (float, int64 ...) and its `enum` marker mean nothing to JSON Schema
# validators, and strict OpenAI-style endpoints reject unknown formats.
_STRING_FORMATS = ("date", "date-time", "time", "email", "uri", "url", "uuid", "duration")
# Past this depth a recursive schema ($ref to itself) gets only what it requires.
_SOFT_DEPTH = 6
_HARD_DEPTH = 40
# A schema may demand huge output (minItems: 10**9, minLength ...). Past these budgets the value
# stops growing: one request line must not stall an emulator worker.
_MAX_NODES = 50_000
_MAX_STRING = 100_000

_FIRST_NAMES = (
    "Alice", "Bruno", "Chen", "Dana", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas",
    "Kofi", "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara",
)  # fmt: skip
_LAST_NAMES = (
    "Adams", "Becker", "Costa", "Dubois", "Evans", "Fischer", "Garcia", "Hansen", "Ito",
    "Jensen", "Kim", "Lopez", "Moreau", "Nowak", "Okafor", "Patel", "Rossi", "Silva",
)  # fmt: skip
_CITIES = (
    "Lisbon", "Oslo", "Nairobi", "Osaka", "Denver", "Lyon", "Porto", "Austin", "Seoul",
    "Toronto", "Dublin", "Krakow", "Valencia", "Melbourne",
)  # fmt: skip
_COUNTRIES = (
    "Portugal", "Norway", "Kenya", "Japan", "Canada", "France", "Ireland", "Poland", "Spain",
    "Australia", "Brazil", "India",
)  # fmt: skip
_JOBS = (
    "engineer", "teacher", "nurse", "designer", "architect", "chef", "analyst", "pilot",
    "librarian", "pharmacist", "electrician", "journalist", "accountant", "biologist",
)  # fmt: skip
_COMPANIES = ("Acme Corp", "Northwind", "Globex", "Initech", "Umbrella Labs", "Hooli")
_COLORS = ("red", "blue", "green", "amber", "teal", "violet", "black", "white")
_LANGUAGES = ("English", "Spanish", "French", "German", "Japanese", "Portuguese")
_CATEGORIES = ("general", "technical", "financial", "personal", "urgent", "other")
_WORDS = (
    "balanced", "careful", "clear", "common", "direct", "early", "efficient", "flexible",
    "gradual", "key", "local", "main", "modern", "practical", "reliable", "simple", "steady",
    "approach", "benefit", "change", "detail", "effect", "factor", "goal", "method", "option",
    "pattern", "process", "result", "source", "step", "system", "value", "example", "context",
)  # fmt: skip
_SENTENCE_VERBS = ("improves", "supports", "explains", "shapes", "reflects", "requires")
_STOPWORDS = frozenset((
    "about", "above", "after", "again", "also", "another", "answer", "because", "been", "before",
    "being", "below", "between", "both", "could", "describe", "does", "doing", "during", "each",
    "explain", "from", "give", "have", "having", "here", "into", "just", "like", "list", "make",
    "more", "most", "much", "only", "other", "over", "please", "provide", "question", "same",
    "should", "show", "some", "such", "tell", "than", "that", "their", "them", "then", "there",
    "these", "they", "this", "those", "through", "under", "until", "very", "what", "when",
    "where", "which", "while", "whom", "with", "would", "write", "your",
))  # fmt: skip
_WORD_RE = re.compile(r"[A-Za-z][A-Za-z'-]{3,}")


def topic_words(text: str, limit: int = 20) -> list[str]:
    """Distinct content words of `text`, in order: what generated strings should echo."""
    seen: dict[str, str] = {}
    for match in _WORD_RE.finditer(text):
        word = match.group(0).strip("'-")
        key = word.lower()
        if len(word) >= 4 and key not in _STOPWORDS and key not in seen:
            seen[key] = word
            if len(seen) >= limit:
                break
    return list(seen.values())


# ---------------------------------------------------------------- Gemini Schema -> JSON Schema


def gemini_schema_to_json_schema(schema: Any) -> dict[str, Any]:
    """The JSON Schema that accepts exactly what a Gemini (OpenAPI-subset) Schema accepts.

    `propertyOrdering` becomes the order of `properties`; other properties keep their order.
    """
    return _convert(schema, alphabetical=False)


def _convert(schema: Any, *, alphabetical: bool) -> dict[str, Any]:
    if not isinstance(schema, dict):
        return {}
    out: dict[str, Any] = {}
    raw_type = get_field(schema, "type")
    type_name = raw_type.lower() if isinstance(raw_type, str) else None
    if type_name not in _JSON_TYPES:
        type_name = None
    nullable = get_field(schema, "nullable") is True
    enum = get_field(schema, "enum")
    if type_name is None and isinstance(enum, list):
        type_name = "string"  # Gemini enums are always strings
    if type_name is not None:
        out["type"] = [type_name, "null"] if nullable and type_name != "null" else type_name
    for key in ("title", "description", "pattern"):
        if isinstance(value := get_field(schema, key), str):
            out[key] = value
    fmt = get_field(schema, "format")
    if type_name == "string" and isinstance(fmt, str) and fmt in _STRING_FORMATS:
        out["format"] = fmt
    if isinstance(enum, list):
        out["enum"] = [*enum, None] if nullable and None not in enum else list(enum)
    # int64 and double fields may arrive as JSON strings on the proto3 wire.
    for key in ("minimum", "maximum"):
        if (number := _as_number(get_field(schema, key))) is not None:
            out[key] = number
    for key in ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties"):
        if (number := _as_number(get_field(schema, key))) is not None:
            out[key] = int(number)
    properties = get_field(schema, "properties")
    if isinstance(properties, dict):
        ordering = get_field(schema, "propertyOrdering")
        out["properties"] = {
            name: _convert(properties[name], alphabetical=alphabetical)
            for name in _ordered_names(properties, ordering, alphabetical)
        }
    required = get_field(schema, "required")
    if isinstance(required, list):
        out["required"] = [name for name in required if isinstance(name, str)]
    items = get_field(schema, "items")
    if isinstance(items, dict):
        out["items"] = _convert(items, alphabetical=alphabetical)
    prefix = get_field(schema, "prefixItems")
    if isinstance(prefix, list):
        out["prefixItems"] = [_convert(item, alphabetical=alphabetical) for item in prefix]
    any_of = get_field(schema, "anyOf")
    if isinstance(any_of, list) and any_of:
        branches = [_convert(branch, alphabetical=alphabetical) for branch in any_of]
        if nullable and type_name is None:
            branches.append({"type": "null"})
        out["anyOf"] = branches
    additional = get_field(schema, "additionalProperties")
    if isinstance(additional, bool):
        out["additionalProperties"] = additional
    elif isinstance(additional, dict):
        out["additionalProperties"] = _convert(additional, alphabetical=alphabetical)
    ref = schema.get("$ref", schema.get("ref"))
    if isinstance(ref, str):
        out["$ref"] = ref
    defs = schema.get("$defs", schema.get("defs"))
    if isinstance(defs, dict):
        out["$defs"] = {k: _convert(v, alphabetical=alphabetical) for k, v in defs.items()}
    return out


def _ordered_names(properties: dict[str, Any], ordering: Any, alphabetical: bool) -> list[str]:
    if isinstance(ordering, list):
        first = [name for name in ordering if isinstance(name, str) and name in properties]
        return first + [name for name in properties if name not in first]
    # Without propertyOrdering the real API emits a Gemini Schema's keys alphabetically.
    return sorted(properties) if alphabetical else list(properties)


def _as_number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        if not math.isfinite(number):
            return None
        return int(number) if number.is_integer() and "." not in value else number
    return None


# ---------------------------------------------------------------- value generation


def generate(
    schema: dict[str, Any], rng: random.Random, *, json_schema: bool, hint: str = ""
) -> Any:
    """A value that validates against `schema`, chosen by `rng`.

    `json_schema` False means `schema` is a Gemini Schema (responseSchema); True means standard
    JSON Schema (responseJsonSchema). `hint` is the prompt; its words flavour the strings.
    """
    root = schema if json_schema else _convert(schema, alphabetical=True)
    try:
        return _Generator(root, rng, hint).value(root, "", 0)
    except Exception:
        # Only nonsense schemas get here (bounds of 1e308, multipleOf 1e-300 ...). A null keeps
        # the answer a well-formed JSON document, and predict_error() stays exact.
        return None


class _Generator:
    def __init__(self, root: Any, rng: random.Random, hint: str) -> None:
        self.root = root
        self.rng = rng
        self.topic = topic_words(hint)
        self.nodes_left = _MAX_NODES

    # -- schema plumbing

    def value(self, schema: Any, name: str, depth: int) -> Any:
        self.nodes_left -= 1
        if depth > _HARD_DEPTH or self.nodes_left < 0:
            return None
        schema = self._resolve(schema)
        if schema is None:  # `false`: nothing validates, so say as little as possible
            return None
        if "const" in schema:
            return copy.deepcopy(schema["const"])
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return copy.deepcopy(self._pick_enum(enum, schema))
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches:
                rest = {k: v for k, v in schema.items() if k != key}
                branch = self._resolve(self._pick_branch(branches, depth))
                if branch is None:
                    return None
                return self.value(_merge(rest, branch), name, depth + 1)
        kind = self._pick_type(schema, depth)
        if kind == "null":
            return None
        if kind == "boolean":
            return self.rng.random() < 0.5
        if kind in ("integer", "number"):
            return self._number(schema, name, integer=kind == "integer")
        if kind == "array":
            return self._array(schema, name, depth)
        if kind == "object":
            return self._object(schema, depth)
        return self._string(schema, name)

    def _resolve(self, schema: Any) -> dict[str, Any] | None:
        """Follow `$ref` and fold `allOf` in, so one plain schema is left."""
        for _ in range(64):
            if schema is False:
                return None
            if not isinstance(schema, dict):
                return {}  # `true` (or junk): anything validates
            if isinstance(ref := schema.get("$ref"), str):
                target = self._lookup(ref)
                if target is False:
                    return None
                rest = {k: v for k, v in schema.items() if k != "$ref"}
                schema = _merge(target if isinstance(target, dict) else {}, rest)
                continue
            if isinstance(parts := schema.get("allOf"), list):
                merged = {k: v for k, v in schema.items() if k != "allOf"}
                deferred = []
                for part in parts:
                    part = self._resolve(part)
                    if part is None:
                        return None
                    if any(k in merged and k in part for k in ("anyOf", "oneOf")):
                        # Two alternative lists: value() picks from one, then folds this in.
                        deferred.append(part)
                    else:
                        merged = _merge(merged, part)
                if deferred:
                    merged["allOf"] = deferred
                    return merged
                schema = merged
                continue
            if schema.get("not") == {}:
                return None
            return schema
        return {}

    def _lookup(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return {}  # remote references: we cannot fetch, so anything goes
        node: Any = self.root
        for token in ref[1:].split("/")[1:]:
            token = token.replace("~1", "/").replace("~0", "~").replace("%25", "%")
            if isinstance(node, dict) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                return {}
        return node

    def _pick_enum(self, enum: list[Any], schema: dict[str, Any]) -> Any:
        allowed = _types_of(schema)
        if allowed is not None and "number" in allowed:
            allowed.append("integer")
        fitting = [v for v in enum if allowed is None or _json_type(v) in allowed]
        choices = fitting or enum
        non_null = [v for v in choices if v is not None]
        if non_null and (len(non_null) == len(choices) or self.rng.random() < 0.85):
            return self.rng.choice(non_null)
        return self.rng.choice(choices)

    def _pick_branch(self, branches: list[Any], depth: int) -> Any:
        # A branch no value can satisfy (an integer range with no multiple of its step)
        # is never the one to follow while another is left.
        possible = [b for b in branches if not _empty_number_range(b)]
        branches = possible or branches
        if depth >= _SOFT_DEPTH:
            # Deep in a recursive schema: take a branch that does not recurse again.
            for branch in branches:
                if isinstance(branch, dict) and "$ref" not in branch:
                    return branch
        non_null = [b for b in branches if not (isinstance(b, dict) and b.get("type") == "null")]
        if non_null and (len(non_null) == len(branches) or self.rng.random() < 0.85):
            return self.rng.choice(non_null)
        return self.rng.choice(branches)

    def _pick_type(self, schema: dict[str, Any], depth: int) -> str:
        types = _types_of(schema)
        if types is None:
            return _infer_type(schema)
        if not types:
            return "null"
        real = [t for t in types if t != "null"]
        if not real:
            return "null"
        if "null" in types and (depth >= _SOFT_DEPTH or self.rng.random() < 0.15):
            return "null"
        if "integer" in real and "number" in real:
            real.remove("number")
        return self.rng.choice(real)

    # -- leaves

    def _number(self, schema: dict[str, Any], name: str, *, integer: bool) -> int | float:
        lo, lo_open = _bound(schema, "minimum", "exclusiveMinimum")
        hi, hi_open = _bound(schema, "maximum", "exclusiveMaximum")
        nat_lo, nat_hi, whole = _natural_range(name, integer)
        a = nat_lo if lo is None else max(nat_lo, lo)
        b = nat_hi if hi is None else min(nat_hi, hi)
        if a > b:  # the schema's bounds lie outside the usual range for this name
            a = lo if lo is not None else b - 100
            b = hi if hi is not None else a + 100
        step = _as_number(schema.get("multipleOf"))
        if step is not None and step > 0:
            return self._multiple(step, a, b, lo, lo_open, hi, hi_open, integer)
        if integer or whole:
            low = math.ceil(a) + (1 if lo_open and math.ceil(a) == lo else 0)
            high = math.floor(b) - (1 if hi_open and math.floor(b) == hi else 0)
            if low <= high:
                return self.rng.randint(low, high)
            if integer:
                return low
        value = round(self.rng.uniform(a, b), 2)
        if not _inside(value, lo, lo_open, hi, hi_open):
            value = (a + b) / 2
        return value

    def _multiple(
        self,
        step: float,
        a: float,
        b: float,
        lo: float | None,
        lo_open: bool,
        hi: float | None,
        hi_open: bool,
        integer: bool,
    ) -> int | float:
        first, last = math.ceil(a / step), math.floor(b / step)
        candidates = [self.rng.randint(first, last) for _ in range(8)] if first <= last else []
        candidates += [first, last, first + 1]
        for k in candidates:
            value: int | float = k * step
            if integer or float(value).is_integer():
                value = round(value)
            # Validators test `value / step` for integrality, so float noise must not creep in.
            quotient = value / step
            if quotient == int(quotient) and _inside(value, lo, lo_open, hi, hi_open):
                return value
        return round(first * step) if integer else first * step

    def _string(self, schema: dict[str, Any], name: str) -> str:
        fmt = schema.get("format")
        text = self._formatted(fmt) if isinstance(fmt, str) else None
        pattern = schema.get("pattern")
        if text is None and isinstance(pattern, str):
            text = _from_pattern(pattern, self.rng)
        if text is None:
            text = self._named_string(name)
        min_len = _as_number(schema.get("minLength"))
        max_len = _as_number(schema.get("maxLength"))
        if min_len is not None:
            min_len = min(min_len, _MAX_STRING)
            words = [text] if text else []
            size = len(text)
            while size < min_len:
                word = self.rng.choice(_WORDS)
                words.append(word)
                size += len(word) + (1 if size else 0)
            text = " ".join(words)
        if max_len is not None and len(text) > max_len:
            cut = text[: int(max_len)]
            # A trailing space reads badly, but minLength outranks looks.
            stripped = cut.rstrip()
            text = stripped if len(stripped) >= (min_len or 0) and stripped else cut
        return text

    def _formatted(self, fmt: str) -> str | None:
        rng = self.rng
        date = f"{rng.randint(2015, 2025)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        clock = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"
        if fmt == "date":
            return date
        if fmt == "date-time":
            return f"{date}T{clock}Z"
        if fmt == "time":
            return f"{clock}Z"
        if fmt == "email":
            return self._email()
        if fmt in ("uri", "url", "uri-reference", "iri"):
            return f"https://example.com/{self._slug()}"
        if fmt == "uuid":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if fmt == "hostname":
            return f"{self._slug()}.example.com"
        if fmt == "ipv4":
            return f"192.0.2.{rng.randint(1, 254)}"
        if fmt == "ipv6":
            return f"2001:db8::{rng.randint(1, 0xFFFF):x}"
        if fmt == "duration":
            return f"PT{rng.randint(1, 59)}M"
        return None

    def _named_string(self, name: str) -> str:
        rng = self.rng
        key = _name_key(name)
        words = set(key.split())
        if key in ("first name", "given name", "firstname"):
            return rng.choice(_FIRST_NAMES)
        if key in ("last name", "family name", "surname", "lastname"):
            return rng.choice(_LAST_NAMES)
        if words & {"email", "mail"}:
            return self._email()
        if words & {"url", "website", "link", "homepage", "uri"}:
            return f"https://example.com/{self._slug()}"
        if words & {"phone", "telephone", "mobile"}:
            return f"+1-555-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}"
        if words & {"date", "birthday", "dob"} or key.endswith((" at", " on")):
            return self._formatted("date") or ""
        if words & {"job", "occupation", "profession", "role", "position"}:
            return rng.choice(_JOBS)
        if words & {"city", "town", "location", "place", "venue", "destination"}:
            return rng.choice(_CITIES)
        if words & {"country", "nation"}:
            return rng.choice(_COUNTRIES)
        if words & {"address", "street"}:
            return f"{rng.randint(1, 200)} {rng.choice(_LAST_NAMES)} Street, {rng.choice(_CITIES)}"
        if words & {"company", "organization", "organisation", "employer", "brand"}:
            return rng.choice(_COMPANIES)
        if words & {"name", "author", "person", "owner", "user", "username", "customer"}:
            return f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}"
        if words & {"color", "colour"}:
            return rng.choice(_COLORS)
        if words & {"language", "lang", "locale"}:
            return rng.choice(_LANGUAGES)
        if words & {"currency"}:
            return rng.choice(("USD", "EUR", "JPY", "GBP"))
        if words & {"id", "identifier", "uuid", "sku", "code", "key"}:
            return f"{(key.split() or ['id'])[0][:3]}-{rng.getrandbits(24):06x}"
        if words & {"category", "type", "kind", "genre", "tag", "label", "status", "topic"}:
            return rng.choice(self.topic or list(_CATEGORIES)).lower()
        if words & {"title", "headline", "subject", "heading"}:
            return " ".join(w.capitalize() for w in self._phrase(3))
        if words & _PROSE_NAMES:
            return self._sentence()
        return " ".join(self._phrase(rng.randint(2, 4)))

    def _phrase(self, n: int) -> list[str]:
        """`n` distinct words, most from the prompt."""
        words: list[str] = []
        for _ in range(n * 4):
            if len(words) == n:
                break
            pool = self.topic if self.topic and self.rng.random() < 0.6 else _WORDS
            word = self.rng.choice(pool)
            if word.lower() not in (w.lower() for w in words):
                words.append(word)
        return words or [self.rng.choice(_WORDS)]

    def _sentence(self) -> str:
        subject = " ".join(self._phrase(2))
        obj = " ".join(self._phrase(2))
        verb = self.rng.choice(_SENTENCE_VERBS)
        return f"The {subject} {verb} the {obj}."

    def _email(self) -> str:
        first = self.rng.choice(_FIRST_NAMES).lower()
        last = self.rng.choice(_LAST_NAMES).lower()
        return f"{first}.{last}@example.com"

    def _slug(self) -> str:
        return "-".join(w.lower() for w in self._phrase(2))

    # -- containers

    def _array(self, schema: dict[str, Any], name: str, depth: int) -> list[Any]:
        low = int(_as_number(schema.get("minItems")) or 0)
        high_raw = _as_number(schema.get("maxItems"))
        high = None if high_raw is None else int(high_raw)
        prefix = schema.get("prefixItems")
        items = schema.get("items")
        if isinstance(items, list):  # draft 4-7 tuple form
            prefix, items = items, schema.get("additionalItems", {})
        prefix = prefix if isinstance(prefix, list) else []
        if high == 0:
            return []
        floor = max(low, 1)
        if depth >= _SOFT_DEPTH:
            count = min(low, max(0, self.nodes_left))
        else:
            ceiling = max(floor, min(3, high) if high is not None else 3)
            count = min(self.rng.randint(floor, ceiling), max(0, self.nodes_left))
        if items is False or _empty_number_range(self._resolve(items)):
            count = min(count, len(prefix))  # no item can fit: only the prefix (or none)
        item_name = _singular(name)
        out: list[Any] = []
        seen: set[str] = set()
        unique = schema.get("uniqueItems") is True
        for _attempt in range(count * 6 + 6):
            if len(out) >= count:
                break
            position = len(out)
            sub = prefix[position] if position < len(prefix) else items
            value = self.value(sub if sub is not None else {}, item_name, depth + 1)
            if unique:
                marker = json.dumps(value, sort_keys=True)
                if marker in seen:
                    continue
                seen.add(marker)
            out.append(value)
        return out

    def _object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required_raw = schema.get("required")
        required = (
            [r for r in required_raw if isinstance(r, str)]
            if isinstance(required_raw, list)
            else []
        )
        additional = schema.get("additionalProperties", True)
        min_props = int(_as_number(schema.get("minProperties")) or 0)
        max_raw = _as_number(schema.get("maxProperties"))
        max_props = None if max_raw is None else int(max_raw)
        deep = depth >= _SOFT_DEPTH
        chosen = [
            n
            for n in properties
            if n in required
            or (not deep and self.rng.random() < 0.85 and self._possible(properties[n]))
        ]
        if max_props is not None:
            optional = [n for n in chosen if n not in required]
            while len(chosen) > max_props and optional:
                chosen.remove(optional.pop())
        out: dict[str, Any] = {}
        for prop in chosen:
            out[prop] = self.value(properties[prop], prop, depth + 1)
        extra_schema = additional if isinstance(additional, dict) else {}
        for prop in required:
            if prop not in out:
                out[prop] = self.value(extra_schema, prop, depth + 1)
        spare = [n for n in properties if n not in out]
        free_keys = additional is not False and not properties and not deep
        target = min(max(min_props, 1 if free_keys else 0), max(0, self.nodes_left))
        counter = 0
        while len(out) < target and counter < target + 8:
            counter += 1
            if spare:
                prop = spare.pop(0)
                out[prop] = self.value(properties[prop], prop, depth + 1)
            elif additional is not False:
                prop = self._free_key(out, counter)
                out[prop] = self.value(extra_schema, prop, depth + 1)
            else:
                break
        return out

    def _possible(self, schema: Any) -> bool:
        """False when no value can satisfy `schema` (`false`, or allOf with disjoint types)."""
        resolved = self._resolve(schema)
        return resolved is not None and resolved.get("type") != []

    def _free_key(self, taken: dict[str, Any], counter: int) -> str:
        base = self.rng.choice(self.topic or list(_WORDS)).lower()
        return base if base not in taken else f"{base}_{counter}"


_PROSE_NAMES = frozenset((
    "answer", "comment", "comments", "content", "description", "details", "explanation",
    "feedback", "message", "note", "notes", "reason", "reasoning", "rationale", "response",
    "review", "summary", "text", "body",
))  # fmt: skip


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """A schema demanding both `a` and `b` (for allOf, and $ref siblings)."""
    out = dict(a)
    for key, value in b.items():
        if key not in out:
            out[key] = value
        elif key == "properties" and isinstance(value, dict) and isinstance(out[key], dict):
            merged = dict(out[key])
            for prop, sub in value.items():
                merged[prop] = {"allOf": [merged[prop], sub]} if prop in merged else sub
            out[key] = merged
        elif key == "required" and isinstance(value, list) and isinstance(out[key], list):
            out[key] = list(dict.fromkeys([*out[key], *value]))
        elif key in ("minimum", "minLength", "minItems", "minProperties", "exclusiveMinimum"):
            out[key] = _pick(max, out[key], value)
        elif key in ("maximum", "maxLength", "maxItems", "maxProperties", "exclusiveMaximum"):
            out[key] = _pick(min, out[key], value)
        elif key == "type":
            out[key] = _intersect_types(out[key], value)
        elif key == "enum" and isinstance(value, list) and isinstance(out[key], list):
            common = [v for v in out[key] if v in value]
            out[key] = common or value
        elif key == "allOf" and isinstance(value, list) and isinstance(out[key], list):
            out[key] = [*out[key], *value]
        elif key in ("anyOf", "oneOf"):
            # Two alternative lists must both hold: keep one here, the other under allOf.
            out["allOf"] = [*out.get("allOf", []), {key: value}]
        else:
            out[key] = value
    return out


def _pick(fn: Any, x: Any, y: Any) -> Any:
    if isinstance(x, bool) or isinstance(y, bool):
        return y  # draft-4 boolean exclusive flags: keep the latest
    try:
        return fn(x, y)
    except TypeError:
        return y


def _intersect_types(x: Any, y: Any) -> Any:
    xs = [x] if isinstance(x, str) else list(x) if isinstance(x, list) else []
    ys = [y] if isinstance(y, str) else list(y) if isinstance(y, list) else []
    common = [t for t in xs if t in ys]
    if "number" in xs and "integer" in ys and "integer" not in common:
        common.append("integer")
    if "integer" in xs and "number" in ys and "integer" not in common:
        common.append("integer")
    if not xs or not ys:
        return y if ys else x
    return common  # may be empty: no value satisfies both


def _types_of(schema: dict[str, Any]) -> list[str] | None:
    kind = schema.get("type")
    if isinstance(kind, str):
        return [kind.lower()]
    if isinstance(kind, list):
        return [t.lower() for t in kind if isinstance(t, str)]
    return None


def _infer_type(schema: dict[str, Any]) -> str:
    if any(k in schema for k in ("properties", "required", "additionalProperties")):
        return "object"
    if any(k in schema for k in ("items", "prefixItems", "minItems", "maxItems")):
        return "array"
    if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "multipleOf")):
        return "number"
    return "string"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _bound(schema: dict[str, Any], inclusive: str, exclusive: str) -> tuple[float | None, bool]:
    """(bound, open?) combining draft-4 boolean and draft-6+ numeric exclusive bounds."""
    value = _as_number(schema.get(inclusive))
    flag = schema.get(exclusive)
    if isinstance(flag, bool):
        return value, flag and value is not None
    excl = _as_number(flag)
    if excl is None:
        return value, False
    if value is None:
        return excl, True
    if inclusive == "minimum":
        return (excl, True) if excl >= value else (value, False)
    return (excl, True) if excl <= value else (value, False)


def _empty_number_range(schema: Any) -> bool:
    """A numeric-only schema whose bounds and `multipleOf` leave no value at all."""
    if not isinstance(schema, dict) or schema.get("type") not in ("integer", "number"):
        return False
    lo, lo_open = _bound(schema, "minimum", "exclusiveMinimum")
    hi, hi_open = _bound(schema, "maximum", "exclusiveMaximum")
    if lo is None or hi is None:
        return False
    if lo > hi or (lo == hi and (lo_open or hi_open)):
        return True
    step = _as_number(schema.get("multipleOf"))
    if schema.get("type") == "integer" and math.floor(hi) < math.ceil(lo):
        return True
    if step is None or step <= 0:
        return False
    try:
        first, last = math.ceil(lo / step), math.floor(hi / step)
    except (OverflowError, ValueError):
        return False
    if last - first > 2:
        return False  # several multiples lie inside
    return not any(_inside(k * step, lo, lo_open, hi, hi_open) for k in range(first, last + 1))


def _inside(value: float, lo: float | None, lo_open: bool, hi: float | None, hi_open: bool) -> bool:
    if lo is not None and (value < lo or (lo_open and value == lo)):
        return False
    return not (hi is not None and (value > hi or (hi_open and value == hi)))


# Plausible ranges by property name; the first group are counted, so whole numbers read better.
_WHOLE_RANGES: tuple[tuple[frozenset[str], float, float], ...] = (
    (frozenset({"age"}), 18, 85),
    (frozenset({"year"}), 1980, 2025),
    (frozenset({"month"}), 1, 12),
    (frozenset({"day"}), 1, 28),
    (frozenset({"hour"}), 0, 23),
    (frozenset({"count", "quantity", "number", "num", "qty", "population"}), 1, 20),
)
_RANGES: tuple[tuple[frozenset[str], float, float], ...] = (
    (frozenset({"rating", "stars"}), 1, 5),
    (frozenset({"confidence", "probability"}), 0, 1),
    (frozenset({"score", "percent", "percentage"}), 0, 100),
    (frozenset({"salary", "income"}), 30000, 150000),
    (frozenset({"price", "cost", "amount", "total"}), 1, 500),
    (frozenset({"lat", "latitude"}), -90, 90),
    (frozenset({"lon", "lng", "longitude"}), -180, 180),
    (frozenset({"temperature", "temp"}), -10, 35),
    (frozenset({"height"}), 150, 200),
    (frozenset({"weight"}), 50, 100),
)


def _natural_range(name: str, integer: bool) -> tuple[float, float, bool]:
    """(low, high, whole?) for a number called `name`."""
    words = set(_name_key(name).split())
    for names, low, high in _WHOLE_RANGES:
        if words & names:
            return low, high, True
    for names, low, high in _RANGES:
        if words & names:
            return low, high, integer
    return (1, 100, True) if integer else (0, 100, False)


def _name_key(name: str) -> str:
    """`firstName` / `first_name` / `First-Name` -> `first name`."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name)
    return re.sub(r"[^a-z0-9]+", " ", spaced.lower()).strip()


def _singular(name: str) -> str:
    if name.endswith("ies") and len(name) > 4:
        return name[:-3] + "y"
    if name.endswith("s") and not name.endswith("ss") and len(name) > 3:
        return name[:-1]
    return {"people": "person", "children": "child"}.get(name, name)


# ---------------------------------------------------------------- strings for `pattern`

_CLASS_CHARS = {
    "CATEGORY_DIGIT": "0123456789",
    "CATEGORY_WORD": "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_",
    "CATEGORY_SPACE": " ",
    "CATEGORY_NOT_DIGIT": "abcdefghXYZ",
    "CATEGORY_NOT_WORD": "-.,!",
    "CATEGORY_NOT_SPACE": "abcdef012",
}
_PRINTABLE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_."


def _from_pattern(pattern: str, rng: random.Random) -> str | None:
    """A string matching `pattern`, or None when the pattern is beyond this small walker."""
    if _sre_parse is None:
        return None
    try:
        parsed = _sre_parse.parse(pattern)
        text = _emit(list(parsed), rng, {}, [_MAX_STRING])
        return text if re.search(pattern, text) else None
    except Exception:  # exotic syntax or ECMA-only features: fall back to a plain string
        return None


def _emit(tokens: list[Any], rng: random.Random, groups: dict[int, str], room: list[int]) -> str:
    """Walk the parsed pattern; `room` counts down characters left, as nested repeats explode."""
    out: list[str] = []
    for op, arg in tokens:
        room[0] -= 1
        if room[0] < 0:
            raise ValueError("pattern needs too long a string")
        kind = str(op)
        if kind == "LITERAL":
            out.append(chr(arg))
        elif kind == "NOT_LITERAL":
            out.append(next(c for c in _PRINTABLE if ord(c) != arg))
        elif kind == "ANY":
            out.append(rng.choice(_PRINTABLE))
        elif kind == "IN":
            out.append(_emit_class(arg, rng))
        elif kind == "CATEGORY":
            out.append(rng.choice(_CLASS_CHARS.get(str(arg), "a")))
        elif kind in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, high, body = arg
            count = rng.randint(low, max(low, min(high, low + 3)))
            out.extend(_emit(list(body), rng, groups, room) for _ in range(count))
        elif kind == "SUBPATTERN":
            group, _add, _del, body = arg
            text = _emit(list(body), rng, groups, room)
            if group is not None:
                groups[group] = text
            out.append(text)
        elif kind == "ATOMIC_GROUP":
            out.append(_emit(list(arg), rng, groups, room))
        elif kind == "BRANCH":
            out.append(_emit(list(rng.choice(arg[1])), rng, groups, room))
        elif kind == "GROUPREF":
            out.append(groups.get(arg, ""))
        elif kind in ("AT", "ASSERT", "ASSERT_NOT"):
            continue  # anchors and lookarounds add no characters; the final check decides
        else:
            raise ValueError(kind)
    return "".join(out)


def _emit_class(items: list[Any], rng: random.Random) -> str:
    if items and str(items[0][0]) == "NEGATE":
        excluded = _emit_pool(items[1:])
        return next(c for c in _PRINTABLE if c not in excluded)
    return rng.choice(_emit_pool(items) or "a")


def _emit_pool(items: list[Any]) -> str:
    pool: list[str] = []
    for op, arg in items:
        kind = str(op)
        if kind == "LITERAL":
            pool.append(chr(arg))
        elif kind == "RANGE":
            low, high = arg
            pool.extend(chr(c) for c in range(low, min(high, low + 200) + 1))
        elif kind == "CATEGORY":
            pool.extend(_CLASS_CHARS.get(str(arg), ""))
    return "".join(pool)
