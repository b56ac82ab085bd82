"""Bodies built to break the JSON parser get a 422 that names the problem, never a 500 (RecursionError)."""

from __future__ import annotations

import json
import random
from typing import Any

import httpx

from server.routes import MAX_JSON_DEPTH, json_depth

ENDPOINTS = ["/generate", "/v1/jobs", "/v1/images/generations"]


def _nested(depth: int, inner: str = "1") -> str:
    """JSON text nesting ``inner`` (JSON text) ``depth`` levels deep, alternating objects and arrays (built as
    text: the standard library's encoder itself recurses)."""
    opens = "".join('{"k": ' if i % 2 else "[" for i in range(depth))
    closes = "".join("}" if i % 2 else "]" for i in reversed(range(depth)))
    return opens + inner + closes


def test_json_depth_ignores_brackets_in_strings() -> None:
    assert json_depth(b"[" * 5000 + b"]" * 5000) == 5000
    assert json_depth(json.dumps({"prompt": "[[[[" * 50 + '\\"{{{{' * 50}).encode()) == 1
    assert json_depth(_nested(40).encode()) == 40


def test_deep_nesting_is_a_422_naming_the_depth(client: httpx.Client) -> None:
    deep = b"[" * 30_000 + b"]" * 30_000  # 60 KB: under every body cap, far over Python's recursion limit
    for path in ENDPOINTS:
        r = client.post(path, content=deep, headers={"content-type": "application/json"})
        assert r.status_code == 422, (path, r.status_code, r.text[:200])
        assert "nested 30000 levels deep" in r.json()["message"] and "Traceback" not in r.text
        inside = '{"model": "tiny-class", "class_label": ' + _nested(200) + "}"
        r = client.post(path, content=inside, headers={"content-type": "application/json"})
        assert r.status_code == 422 and "levels deep" in r.json()["message"], r.text[:200]


def test_fuzzed_deep_and_wide_bodies_never_500(client: httpx.Client) -> None:
    rng = random.Random(1234)
    fields = ["model", "prompt", "class_label", "num_inference_steps", "seed", "guidance_scale", "width", "n"]
    for i in range(150):
        depth = rng.choice([1, 2, 5, MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH + 1, 100, 1000])
        width = rng.choice([1, 10, 1000, 5000])
        value: Any = rng.choice([1, -1, 1e308, "x" * rng.randint(0, 50), None, True, [0] * width])
        count = rng.randint(1, 4)
        parts = [f"\"{rng.choice(fields)}\": {_nested(depth, json.dumps(value))}" for _ in range(count)]
        if rng.random() < 0.3:
            parts += [f'"extra{j}": {j}' for j in range(width)]
        raw = ("{" + ", ".join(parts) + "}").encode()
        body = raw
        r = client.post(ENDPOINTS[i % 3], content=raw, headers={"content-type": "application/json"})
        assert r.status_code < 500, (body[:300], r.text[:300])
        if json_depth(raw) > MAX_JSON_DEPTH and r.status_code != 413:  # 413: over the body cap, unread
            assert r.status_code == 422 and "levels deep" in r.text


def test_an_integer_too_long_to_parse_is_a_422(client: httpx.Client) -> None:
    """Python refuses to parse integers of more than 4300 digits (a ValueError that is no JSONDecodeError)."""
    body = '{"seed": ' + "9" * 5000 + "}"
    r = client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.text


def test_thousands_of_errors_are_counted_not_all_listed(client: httpx.Client) -> None:
    # 5,000 unknown fields: 5,000 validation errors. Rendering each would hold the event loop for about a
    # second; the 422 lists the first MAX_422_ERRORS and counts the rest.
    from server.app import MAX_422_ERRORS

    fields = ", ".join(f'"extra{j}": {j}' for j in range(5000))
    raw = ('{"model": "m", "class_label": 1, ' + fields + "}").encode()
    r = client.post("/generate", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422
    body = r.json()
    assert len(body["detail"]) == MAX_422_ERRORS
    assert f"more errors (the first {MAX_422_ERRORS} listed)" in body["message"]
    more = int(body["message"].rsplit("; and ", 1)[1].split()[0])
    assert len(body["detail"]) + more >= 5000  # every unknown field is counted
