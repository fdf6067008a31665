"""Which models the emulator knows, and the Model resources `models.get`/`list` answer.

Why: `batches.create` and `models.get` must agree on what a known model is (a client that
checks a model with `models.get` before uploading would otherwise be told yes, then see
the create fail), so both ask `is_known`; the create also asks `supports_batch`, false
for models that exist but not in Batch Mode (their supportedGenerationMethods say so).
The resource follows the Gemini API's Model (`name`, `displayName`, `version`, token
limits, `supportedGenerationMethods`), the fields the google-genai SDK reads into
`types.Model`.
"""

from __future__ import annotations

import re
from typing import Any

from gembatch.emulator.config import EmulatorConfig
from gembatch.emulator.wire import ApiError

_GEMINI_MODEL = re.compile(r"^gemini-\d[0-9a-z.\-]*$")
_GENERATION_METHODS = [
    "generateContent",
    "countTokens",
    "createCachedContent",
    "batchGenerateContent",
]


def short_name(model: str) -> str:
    """`models/gemini-2.5-flash` -> `gemini-2.5-flash`."""
    return model.removeprefix("models/")


def is_known(config: EmulatorConfig, model: str) -> bool:
    """Whether the emulator serves `model` (models.get answers 200): a tuned model, a
    configured model (`models`, `non_batch_models`), or (with accept_any_gemini_model)
    any name shaped like a Gemini release (`gemini-<digit>...`)."""
    if model.startswith("tunedModels/"):
        return True
    short = short_name(model)
    return (
        short in config.models
        or short in config.non_batch_models
        or bool(config.accept_any_gemini_model and _GEMINI_MODEL.match(short))
    )


def supports_batch(config: EmulatorConfig, model: str) -> bool:
    """Whether batches.create accepts `model`: served, and not one of non_batch_models."""
    return is_known(config, model) and short_name(model) not in config.non_batch_models


def model_not_found(model: str, version: str, method: str) -> ApiError:
    """The real service's 404 for a model it does not serve (or not for `method`)."""
    return ApiError(
        404,
        f"models/{short_name(model)} is not found for API version {version}, or is not "
        f"supported for {method}. Call ListModels to see the list of available models and "
        "their supported methods.",
        "NOT_FOUND",
    )


def model_resource(config: EmulatorConfig, model: str) -> dict[str, Any]:
    """The Model JSON for a known model, camelCase as the real service writes it."""
    if model.startswith("tunedModels/"):
        return {
            "name": model,
            "displayName": model.removeprefix("tunedModels/"),
            "supportedGenerationMethods": list(_GENERATION_METHODS),
        }
    short = short_name(model)
    if not supports_batch(config, model):
        return {
            "name": f"models/{short}",
            "version": "001",
            "displayName": _display_name(short),
            "description": f"{_display_name(short)}, served by the gembatch emulator.",
            "inputTokenLimit": 2_048,
            "outputTokenLimit": 1,
            "supportedGenerationMethods": [
                "embedContent",
                "countTextTokens",
                "countTokens",
                "asyncBatchEmbedContent",
            ],
        }
    older = short.startswith(("gemini-1", "gemini-2.0"))
    body: dict[str, Any] = {
        "name": f"models/{short}",
        "version": "001",
        "displayName": _display_name(short),
        "description": f"{_display_name(short)}, served by the gembatch emulator.",
        "inputTokenLimit": 1_048_576,
        "outputTokenLimit": 8_192 if older else 65_536,
        "supportedGenerationMethods": list(_GENERATION_METHODS),
        "temperature": 1.0,
        "topP": 0.95,
        "topK": 40 if older else 64,
        "maxTemperature": 2.0,
    }
    if not older:
        body["thinking"] = True
    return body


def _display_name(short: str) -> str:
    """`gemini-2.5-flash-lite` -> `Gemini 2.5 Flash-Lite`, as Google spells them."""
    head, _, rest = short.partition("-")
    version, _, variant = rest.partition("-")
    words = [head.capitalize()] + ([version] if version else [])
    if variant:
        words.append("-".join(part.capitalize() for part in variant.split("-")))
    return " ".join(words)
