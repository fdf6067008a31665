"""Building the google-genai client from the environment.

Why: the API key and endpoint come from the environment (GEMINI_API_KEY,
GOOGLE_GEMINI_BASE_URL) or from `--local`; checking them once, up front, turns a missing
key into a clear message before any work starts instead of an SDK error halfway through.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from gembatch.errors import UserError

if TYPE_CHECKING:
    from google import genai

BASE_URL_ENV = "GOOGLE_GEMINI_BASE_URL"


def api_key_from_env() -> str | None:
    for name in ("GEMINI_API_KEY", "GOOGLE_API_KEY"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def require_api_key() -> str:
    key = api_key_from_env()
    if not key:
        raise UserError(
            "GEMINI_API_KEY is not set: export GEMINI_API_KEY=<your key> "
            "(https://aistudio.google.com/apikey), or add --local to use the built-in emulator."
        )
    return key


def make_client(
    api_key: str | None = None,
    base_url: str | None = None,
    timeout_seconds: float | None = None,
) -> genai.Client:
    """A google-genai client for the Gemini Developer API or the emulator."""
    from google import genai
    from google.genai import types

    key = api_key or require_api_key()
    base_url = base_url or os.environ.get(BASE_URL_ENV) or None
    options = types.HttpOptions(
        base_url=base_url,
        timeout=int(timeout_seconds * 1000) if timeout_seconds else None,
    )
    return genai.Client(api_key=key, http_options=options)
