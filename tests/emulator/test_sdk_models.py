"""The real google-genai SDK against an emulator process: models.get and models.list."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
from google.genai import errors

from gembatch.emulator.process import EmulatorProcess


@pytest.mark.parametrize("api_version", [None, "v1beta", "v1alpha"])
def test_a_known_model_is_served_with_the_sdks_typed_fields(
    emulator: EmulatorProcess, api_version: str | None
) -> None:
    client = emulator.sdk_client(api_version)  # kept: the SDK closes a collected client
    model = client.models.get(model="gemini-2.5-flash-lite")

    assert model.name == "models/gemini-2.5-flash-lite"
    assert model.display_name == "Gemini 2.5 Flash-Lite"
    assert model.version == "001"
    assert model.input_token_limit == 1_048_576 and model.output_token_limit == 65_536
    assert "batchGenerateContent" in (model.supported_actions or [])
    assert emulator.stats()["calls"]["models.get"] == 1


def test_models_get_follows_the_same_rule_as_batches_create(emulator: EmulatorProcess) -> None:
    client = emulator.sdk_client()
    # `models/` spelled out, and a new release accepted by its shape
    assert client.models.get(model="models/gemini-2.5-pro").name == "models/gemini-2.5-pro"
    assert client.models.get(model="gemini-9.9-flash").name == "models/gemini-9.9-flash"

    with pytest.raises(errors.ClientError) as caught:
        client.models.get(model="no-such-model")
    assert caught.value.code == 404 and caught.value.status == "NOT_FOUND"
    assert "models/no-such-model is not found" in caught.value.message

    # Served, but not in Batch Mode: models.get says so, batches.create refuses it.
    embedding = client.models.get(model="gemini-embedding-001")
    assert "batchGenerateContent" not in (embedding.supported_actions or [])
    with pytest.raises(errors.ClientError) as refused:
        client.batches.create(
            model="gemini-embedding-001",
            src=[{"contents": [{"parts": [{"text": "hi"}]}]}],
        )
    assert refused.value.code == 404
    assert "not supported for batchGenerateContent" in refused.value.message
    assert emulator.stats()["calls"]["models.get"] == 4


def test_the_configured_models_decide_and_a_key_is_required(
    emulator_factory: Callable[..., EmulatorProcess],
) -> None:
    emulator = emulator_factory({"models": ["my-model"], "accept_any_gemini_model": False})
    client = emulator.sdk_client()
    assert client.models.get(model="my-model").name == "models/my-model"
    with pytest.raises(errors.ClientError) as caught:
        client.models.get(model="gemini-2.5-flash")
    assert caught.value.code == 404

    keyless = httpx.get(f"{emulator.base_url}/v1beta/models/my-model")
    assert keyless.status_code == 403
    assert keyless.json()["error"]["status"] == "PERMISSION_DENIED"


def test_models_list_pages_through_the_configured_models(emulator: EmulatorProcess) -> None:
    client = emulator.sdk_client()
    names = [m.name for m in client.models.list(config={"page_size": 3})]
    assert names[0] == "models/gemini-2.5-flash-lite"
    assert "models/gemini-embedding-001" in names
    assert len(names) == len(set(names)) == 9  # eight Gemini models and one embedding model
    assert emulator.stats()["calls"]["models.list"] == 3
