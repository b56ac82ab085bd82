"""A value over a cap is told the configured cap (and the setting that sets it), not a static bound.

The shared test server runs with max_inference_steps=2000, max_images=4 and max_image_size=32 (conftest).
"""

from __future__ import annotations

import httpx
import pytest


@pytest.mark.parametrize(
    ("body", "field", "cap", "setting"),
    [
        ({"num_inference_steps": 100_000}, "num_inference_steps", "2000", "UNET_SERVER_MAX_INFERENCE_STEPS"),
        ({"num_inference_steps": 10**30}, "num_inference_steps", "2000", "UNET_SERVER_MAX_INFERENCE_STEPS"),
        ({"num_images": 5000}, "num_images", "4", "UNET_SERVER_MAX_IMAGES"),
        ({"width": 20_000}, "width", "32", "UNET_SERVER_MAX_IMAGE_SIZE"),
        ({"height": 10**9}, "height", "32", "UNET_SERVER_MAX_IMAGE_SIZE"),
    ],
)
def test_over_a_cap_names_the_configured_cap(
    client: httpx.Client, body: dict, field: str, cap: str, setting: str
) -> None:
    for path in ("/generate", "/v1/jobs"):
        r = client.post(path, json={"model": "tiny-text", "prompt": "x", **body})
        assert r.status_code == 422, r.text
        [err] = r.json()["detail"]
        assert err["loc"][-1] == field
        assert f"maximum {cap}" in err["msg"] and setting in err["msg"], err["msg"]
        for static in ("10000", "1024", "16384"):  # the old static bounds must not be what a user is told
            assert f"equal to {static}" not in err["msg"], err["msg"]


@pytest.mark.parametrize(
    ("body", "field", "cap"),
    [({"num_inference_steps": 100_000}, "num_inference_steps", "2000"), ({"n": 5000}, "n", "4"),
     ({"size": "20000x20000"}, "size", "32")],
)
def test_openai_over_a_cap_names_the_configured_cap(
    client: httpx.Client, body: dict, field: str, cap: str
) -> None:
    r = client.post("/v1/images/generations", json={"model": "tiny-text", "prompt": "x", **body})
    assert r.status_code == 422, r.text
    [err] = r.json()["detail"]
    assert err["loc"][-1] == field and f"maximum {cap}" in err["msg"], err["msg"]


def test_schema_still_documents_the_caps(client: httpx.Client) -> None:
    """The OpenAPI schema says which setting bounds each capped field (the bound itself is configured)."""
    props = client.get("/openapi.json").json()["components"]["schemas"]["GenerateRequest"]["properties"]
    assert "UNET_SERVER_MAX_INFERENCE_STEPS" in props["num_inference_steps"]["description"]
    assert "UNET_SERVER_MAX_IMAGES" in props["num_images"]["description"]
    assert "UNET_SERVER_MAX_IMAGE_SIZE" in props["width"]["description"]
