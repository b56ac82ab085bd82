"""The OpenAI-compatible images endpoint, driven by the real `openai` Python client, unmodified."""

from __future__ import annotations

import base64

import openai
import pytest

from .conftest import FAST_STEPS, Server, decode_png

pytestmark = pytest.mark.integration


def _client(server: Server) -> openai.OpenAI:
    key = server.headers.get("Authorization", "Bearer unused").removeprefix("Bearer ")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, timeout=120, max_retries=0)


def test_openai_client_generates_images(server: Server) -> None:
    spec = server.model_with("text")
    size = f"{spec['defaults']['width']}x{spec['defaults']['height']}"
    result = _client(server).images.generate(
        model=spec["id"],
        prompt="a dark blue coat",
        n=2,
        size=size,
        response_format="b64_json",
        extra_body={"seed": 3, "num_inference_steps": FAST_STEPS},
    )
    assert len(result.data) == 2
    images = [decode_png(base64.b64decode(item.b64_json)) for item in result.data]
    assert all(im.size == (spec["defaults"]["width"], spec["defaults"]["height"]) for im in images)
    assert images[0].tobytes() != images[1].tobytes()
    assert result.created > 0


def test_openai_client_lists_models(server: Server) -> None:
    ids = [m.id for m in _client(server).models.list()]
    assert set(ids) == set(server.models)


def test_openai_client_sees_a_422_as_an_error(server: Server) -> None:
    spec = server.model_with("text")
    with pytest.raises(openai.UnprocessableEntityError) as info:
        _client(server).images.generate(model=spec["id"], prompt="a red sneaker", size="banana")
    assert "size" in info.value.response.text, info.value.response.text
