"""A local Gemini Files + Batch API that the unmodified google-genai SDK talks to.

Why: nothing here (tests, demos, users' own pipelines) should need an API key or a bill
to exercise the whole batch flow. The emulator follows reference/gemini-wire.md: the same
routes, headers, status codes and JSON shapes as Google, with a clock, responders and
fault injection on top. gembatch itself reaches it only over HTTP.
"""

from gembatch.emulator.config import EmulatorConfig, load_config

__all__ = ["EmulatorConfig", "load_config"]
