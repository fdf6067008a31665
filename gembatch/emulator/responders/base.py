"""What every responder is: one GenerateContentRequest in, one answer or per-line error out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass
class Reply:
    response: dict[str, Any] | None = None  # a GenerateContentResponse, camelCase
    error: dict[str, Any] | None = None  # {"code": <gRPC code>, "message": <str>}


class Responder(Protocol):
    def predict_error(self, request: Any) -> bool: ...

    def reply(self, request: Any, model: str) -> Reply: ...

    def close(self) -> None: ...
