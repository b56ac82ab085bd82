"""/docs works offline (every asset from this server) and the OpenAPI document describes what is served:
request bodies, error responses with their body model, /metrics as text."""

from __future__ import annotations

import re
from urllib.parse import urljoin, urlsplit

import httpx
import pytest


def _refs(html: str) -> list[str]:
    """Every URL an HTML page makes the browser load or call: src/href attributes and quoted url: values."""
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    urls += re.findall(r"""\burl\s*:\s*["']([^"']+)["']""", html)
    return urls


def test_docs_page_loads_only_same_origin_assets(client: httpx.Client) -> None:
    r = client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = _refs(r.text)
    assert any(u.endswith(".js") for u in urls) and any(u.endswith(".css") for u in urls), urls
    base = str(client.base_url).rstrip("/") + "/docs"
    for url in urls:
        parts = urlsplit(url)
        assert not parts.scheme and not parts.netloc, f"/docs loads {url} from another origin"
        asset = client.get(urljoin(base, url))
        assert asset.status_code == 200, (url, asset.status_code)
        if url.endswith(".js"):
            assert "javascript" in asset.headers["content-type"] and len(asset.content) > 100_000
            assert b"SwaggerUIBundle" in asset.content
        if url.endswith(".css"):
            assert asset.headers["content-type"].startswith("text/css") and b".swagger-ui" in asset.content


def test_swagger_assets_keep_their_licence() -> None:
    from server.routes import SWAGGER_DIR

    assert "Apache License" in (SWAGGER_DIR / "LICENSE").read_text()
    assert "swagger-ui" in (SWAGGER_DIR / "NOTICE").read_text()


def test_docs_assets_cannot_leave_their_folder(client: httpx.Client) -> None:
    for name in ("../routes.py", "..%2Froutes.py", "LICENSEX", "%2e%2e/app.py"):
        assert client.get(f"/docs/static/{name}").status_code == 404, name


def test_no_page_loads_a_cdn(client: httpx.Client) -> None:
    for path in ("/docs", "/redoc"):
        r = client.get(path)
        if r.status_code == 200:
            assert not re.search(r"https?://", " ".join(_refs(r.text))), path


@pytest.fixture()
def spec(client: httpx.Client) -> dict:
    return client.get("/openapi.json").json()


def _resolve(spec: dict, schema: dict) -> dict:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    assert ref.startswith("#/components/schemas/"), ref
    return spec["components"]["schemas"][ref.rsplit("/", 1)[1]]


def test_request_bodies_are_documented(spec: dict) -> None:
    body = spec["paths"]["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]
    props = _resolve(spec, body["schema"])["properties"]
    assert {"prompt", "n", "size", "response_format", "seed", "num_inference_steps"} <= set(props)
    for path in ("/generate", "/v1/jobs"):
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert {"prompt", "class_label", "num_images"} <= set(
            _resolve(spec, content["application/json"]["schema"])["properties"]
        )
        multipart = _resolve(spec, content["multipart/form-data"]["schema"])
        assert multipart["properties"]["control_image"]["format"] == "binary"


@pytest.mark.parametrize("path", ["/generate", "/v1/images/generations", "/v1/jobs"])
def test_error_responses_are_documented_with_their_body(spec: dict, path: str) -> None:
    responses = spec["paths"][path]["post"]["responses"]
    codes = {"422", "429", "503", "500"} | ({"504"} if path != "/v1/jobs" else set())
    assert codes <= set(responses), sorted(responses)
    for code in codes:
        schema = _resolve(spec, responses[code]["content"]["application/json"]["schema"])
        assert {"detail", "message"} <= set(schema["properties"]), (code, schema)
    fault = _resolve(spec, responses["500"]["content"]["application/json"]["schema"])
    assert "error_id" in fault["properties"]
    assert "Retry-After" in responses["429"].get("headers", {})
    loc = _resolve(spec, responses["422"]["content"]["application/json"]["schema"])["properties"]["detail"]
    assert loc["type"] == "array"


def test_metrics_is_documented_as_text(spec: dict, client: httpx.Client) -> None:
    content = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(content) == ["text/plain"], content
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")


def test_events_are_documented_as_an_event_stream(spec: dict) -> None:
    content = spec["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    assert list(content) == ["text/event-stream"], content
