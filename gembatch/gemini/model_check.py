"""Asking the API whether it serves a model, before anything is uploaded (SPEC §10).

Why: an unknown model used to surface only at batches.create, after the whole input was
uploaded (and then deleted again). One `models.get` per distinct model, made before any
upload or ledger write, turns it into a clear refusal that leaves nothing behind. The
command line and the service share this check and its policy for answers that say
nothing about the model (network trouble, 5xx, 429, a bad key).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gembatch.gemini.errors import classify
from gembatch.jobs import DEFAULT_RETRY_ON, ErrorClass

CHECK_TIMEOUT = 20.0  # seconds per models.get: a check must not hold a submit for minutes
RETRY_DELAY = 1.0  # seconds before the one retry (or the server's Retry-After, capped)
MAX_RETRY_DELAY = 5.0


@dataclass(frozen=True)
class ModelCheck:
    """What the API said about one model.

    known: True when it serves the model, False when it answered 404 (or the SDK refused
    the name itself), None when the check could not tell (see `check_model`)."""

    model: str
    known: bool | None
    message: str = ""  # the API's (scrubbed) answer when known is not True
    code: str | None = None  # "404 NOT_FOUND", "503 UNAVAILABLE", "ConnectError", ...
    error_class: ErrorClass | None = None
    warning: str | None = None  # served, but not listed as supporting batch mode

    @property
    def refusal(self) -> str:
        """Why the model is refused (for known False): the API's 404, or the SDK's own
        refusal of the name."""
        if self.code and self.code.startswith("404"):
            what = f"unknown model {self.model!r}: the Gemini API answered {self.code}"
        else:  # the SDK refused the name before sending anything
            what = f"invalid model name {self.model!r}"
        return f"{what} ({self.message})"

    @property
    def transient(self) -> bool:
        """The check failed for a reason that says nothing about the model."""
        return self.error_class in DEFAULT_RETRY_ON


async def check_model(
    remote: Any,
    model: str,
    *,
    attempts: int = 2,
    retry_delay: float = RETRY_DELAY,
    timeout: float | None = CHECK_TIMEOUT,
) -> ModelCheck:
    """models.get for `model`, with the policy for answers that are not about the model.

    Only a 404 (or a name the SDK itself refuses) is proof that the model is unknown. A
    transient failure (network, timeout, 5xx, 429) is retried once; if it persists the
    answer is None and the caller goes on: the check is an early warning, not a gate,
    and blocking every submission while models.get is unreachable would make an outage
    worse. The create then decides, with the engine's own retries, reconciliation and a
    NOT_FOUND failure recorded in the job if the model really is unknown. Any other error
    (a bad API key, 403) is not retried and also answers None: the first real call fails
    with the same error and the engine reports and records it as it always has.
    """
    last = None
    for attempt in range(max(1, attempts)):
        try:
            found = await remote.get_model(model, timeout=timeout)
        except Exception as exc:
            last = classify(exc)
            if last.http_status == 404 or (
                last.error_class is ErrorClass.INVALID_INPUT and last.http_status is None
            ):
                return ModelCheck(model, False, last.message, last.code, last.error_class)
            if last.error_class not in DEFAULT_RETRY_ON or attempt + 1 >= attempts:
                break
            delay = retry_delay if last.retry_after is None else last.retry_after
            await asyncio.sleep(min(max(0.0, delay), MAX_RETRY_DELAY))
            continue
        methods = list(getattr(found, "supported_actions", None) or [])
        warning = None
        if methods and "batchGenerateContent" not in methods:
            warning = (
                f"model {model!r} does not list batchGenerateContent among its supported "
                f"methods ({', '.join(methods)}); the batch may be refused"
            )
        return ModelCheck(model, True, warning=warning)
    assert last is not None
    return ModelCheck(model, None, last.message, last.code, last.error_class)


async def check_models(remote: Any, models: Iterable[str], **kwargs: Any) -> list[ModelCheck]:
    """`check_model` once for each distinct model, in the order given."""
    return [await check_model(remote, model, **kwargs) for model in dict.fromkeys(models)]
