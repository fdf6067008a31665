"""Responders: turn one GenerateContentRequest into a GenerateContentResponse or a per-line error.

Why: the emulated batch needs answers that look like Gemini's (shape, usage, finish reasons,
structured output) and that tests can steer (gembatch.emulator.directives). LocalResponder
(local.py) derives them deterministically from the prompt, model and seed; OpenAIResponder
(openai.py) forwards to any OpenAI-compatible chat endpoint.
"""

from __future__ import annotations

from gembatch.emulator.config import ResponderConfig
from gembatch.emulator.responders.base import Reply, Responder
from gembatch.emulator.responders.local import LocalResponder
from gembatch.emulator.responders.openai import OpenAIResponder

__all__ = ["LocalResponder", "OpenAIResponder", "Reply", "Responder", "make_responder"]


def make_responder(config: ResponderConfig, seed: int) -> Responder:
    if config.kind == "local":
        return LocalResponder(seed)
    if config.kind == "openai":
        return OpenAIResponder(config)
    raise ValueError(f"unknown responder kind {config.kind!r}; expected 'local' or 'openai'")
