"""Emulator configuration: clock, limits, responder, faults and quirks.

Why: tests, benchmarks and users need the same emulator to behave in very different ways
(fast or realistic clocks, 429 storms, truncated downloads, a local model behind it). One
typed configuration, loaded from TOML or JSON and checked strictly, keeps those knobs
discoverable and turns a typo into a clear error instead of a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    _Config = TypeVar("_Config", bound=DataclassInstance)

# Endpoint names used by fault rules and the introspection counters.
ENDPOINTS = (
    "files.upload",
    "files.upload_chunk",
    "files.get",
    "files.list",
    "files.delete",
    "files.download",
    "batches.create",
    "batches.get",
    "batches.list",
    "batches.cancel",
    "batches.delete",
    "models.get",
    "models.list",
)

DEFAULT_MODELS = [
    "gemini-2.5-flash-lite",
    "gemini-2.5-flash",
    "gemini-2.5-pro",
    "gemini-2.0-flash",
    "gemini-2.0-flash-lite",
    "gemini-3-flash-preview",
    "gemini-3-pro-preview",
    "gemini-3.5-flash-lite",
]

# Served, but not by batchGenerateContent (embeddings have their own batch method).
DEFAULT_NON_BATCH_MODELS = ["gemini-embedding-001"]


class ConfigError(ValueError):
    """A configuration file or value that cannot be used; the message says where."""


@dataclass
class ClockConfig:
    """How long a batch spends in each state. Defaults are fast; raise them for realism."""

    pending_seconds: float = 0.5
    running_seconds: float = 2.0
    # Google expires a batch pending or running for more than 48 h, with no results.
    expire_after_seconds: float = 48 * 3600
    # Uploaded and generated files are kept for 48 h.
    file_ttl_seconds: float = 48 * 3600


@dataclass
class LimitsConfig:
    max_file_bytes: int = 2 * 1024**3
    max_inline_bytes: int = 20 * 1024**2
    max_active_batches: int = 100
    # Optional enqueued-token budget per model across active batches (Gemini tier quotas).
    max_enqueued_tokens: int | None = None
    page_size_default: int = 10
    page_size_max: int = 100


@dataclass
class AuthConfig:
    # Empty: any non-empty key is accepted. Otherwise only these keys are valid.
    api_keys: list[str] = field(default_factory=list)


@dataclass
class ResponderConfig:
    kind: str = "local"  # "local" (deterministic) or "openai" (forward to a chat endpoint)
    url: str | None = None  # OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1
    model: str | None = None  # model name sent upstream; default: the batch's model
    api_key: str | None = None
    api_key_env: str | None = None  # read the upstream key from this environment variable
    timeout_seconds: float = 120.0
    concurrency: int = 4
    max_retries: int = 2


@dataclass
class FaultRule:
    """Inject an error status and/or latency into calls of the matching endpoints."""

    endpoint: str = "*"  # an endpoint name from ENDPOINTS, or an fnmatch pattern
    status: int | None = None  # e.g. 429, 500, 503; None: latency only
    rate: float = 1.0  # probability for each matching call (deterministic under the seed)
    first: int | None = None  # only the first N matching calls
    latency_ms: float = 0.0
    # Delay AFTER the call did its work, before answering: with a client timeout or a
    # killed client this is "the create succeeded but the reply was lost".
    latency_after_ms: float = 0.0
    # The call's work goes on when its client disconnects (or times out) during
    # `latency_ms`, as a request already inside Google's servers may: "a create still in
    # flight after its sender gave up". Otherwise the call dies with its connection.
    detached: bool = False
    retry_after_seconds: float | None = None  # sent with 429 (default 1 s)
    message: str | None = None


@dataclass
class BatchFaults:
    fail_rate: float = 0.0  # batches that end FAILED (job-level failure)
    expire_rate: float = 0.0  # batches stuck PENDING until clock.expire_after_seconds
    match: str | None = None  # only batches whose display name contains this text


@dataclass
class DownloadFaults:
    truncate_rate: float = 0.0
    truncate_first: int | None = None  # truncate only the first N downloads
    # "abort": the connection closes mid-body (Content-Length promised more);
    # "silent": a shorter, well-formed body cut at a line boundary.
    mode: str = "abort"
    fraction: float = 0.5  # share of the body sent before the cut


@dataclass
class FaultsConfig:
    latency_ms: float = 0.0  # added to every API call
    rules: list[FaultRule] = field(default_factory=list)
    batches: BatchFaults = field(default_factory=BatchFaults)
    downloads: DownloadFaults = field(default_factory=DownloadFaults)


@dataclass
class QuirksConfig:
    # The real service answers batches.list without pageSize with an empty list
    # (googleapis/python-genai#1250). Kept on so clients that forget page_size find out here.
    empty_batch_list_without_page_size: bool = True
    # Google's output lines are not in input order; join on `key`.
    shuffle_output: bool = True


@dataclass
class EmulatorConfig:
    seed: int = 0
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    # Also accept any model named gemini-<digit>... (new releases) besides `models`.
    accept_any_gemini_model: bool = True
    # Models that exist (models.get answers 200) but not for Batch Mode: batches.create
    # answers 404 "not supported for batchGenerateContent", as Google does for them.
    non_batch_models: list[str] = field(default_factory=lambda: list(DEFAULT_NON_BATCH_MODELS))
    clock: ClockConfig = field(default_factory=ClockConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    responder: ResponderConfig = field(default_factory=ResponderConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    quirks: QuirksConfig = field(default_factory=QuirksConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def merged(self, overrides: dict[str, Any], where: str = "override") -> EmulatorConfig:
        """A copy with `overrides` (a nested mapping) applied on top."""
        base = self.to_dict()
        _deep_merge(base, overrides)
        return from_mapping(base, where)


def _deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> None:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


def from_mapping(data: dict[str, Any], where: str = "config") -> EmulatorConfig:
    config = _build(EmulatorConfig, data, where)
    _check(config, where)
    return config


def load_config(path: str | Path | None) -> EmulatorConfig:
    """Load a TOML (.toml) or JSON file; None gives the defaults."""
    if path is None:
        return EmulatorConfig()
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: emulator config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a .toml or .json file") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(raw)
        else:
            data = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot parse: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table/object at the top level")
    return from_mapping(data, str(path))


def _build(cls: type[_Config], data: Any, where: str) -> _Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table/object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        return [_coerce(args[0], item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string")
        return value
    return value


def _check(config: EmulatorConfig, where: str) -> None:
    def rate(value: float, name: str) -> None:
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{where}: {name} must be between 0 and 1, got {value}")

    for name in ("pending_seconds", "running_seconds", "expire_after_seconds"):
        if getattr(config.clock, name) < 0:
            raise ConfigError(f"{where}: clock.{name} must not be negative")
    if config.responder.kind not in ("local", "openai"):
        raise ConfigError(f"{where}: responder.kind must be 'local' or 'openai'")
    if config.responder.kind == "openai" and not config.responder.url:
        raise ConfigError(f"{where}: responder.url is required when responder.kind = 'openai'")
    for i, rule in enumerate(config.faults.rules):
        rate(rule.rate, f"faults.rules[{i}].rate")
        if rule.status is not None and not 400 <= rule.status <= 599:
            raise ConfigError(f"{where}: faults.rules[{i}].status must be a 4xx or 5xx code")
    rate(config.faults.batches.fail_rate, "faults.batches.fail_rate")
    rate(config.faults.batches.expire_rate, "faults.batches.expire_rate")
    rate(config.faults.downloads.truncate_rate, "faults.downloads.truncate_rate")
    if config.faults.downloads.mode not in ("abort", "silent"):
        raise ConfigError(f"{where}: faults.downloads.mode must be 'abort' or 'silent'")
    if not 0.0 <= config.faults.downloads.fraction < 1.0:
        raise ConfigError(f"{where}: faults.downloads.fraction must be in [0, 1)")
