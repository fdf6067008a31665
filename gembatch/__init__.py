"""gembatch: run thousands of Gemini requests through the Gemini Batch API, safely."""

__version__ = "0.4.0.dev0"
