"""The playground's server side: the page and its assets (content types, no path escapes), and the PNG
parameter chunks (server/pngmeta.py) round-tripping through Pillow."""

from __future__ import annotations

import io
import json
import re

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image, PngImagePlugin

from server.playground import STATIC_DIR, router
from server.pngmeta import (
    image_parameters,
    parameters_chunks,
    parameters_text,
    parse_parameters_text,
    read_parameters,
)


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    app.include_router(router)
    return TestClient(app)


# -- page and assets -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/playground"])
def test_page_is_served_as_html_with_a_strict_policy(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.content == (STATIC_DIR / "index.html").read_bytes()
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    assert client.head(path).status_code == 200


def test_every_asset_the_page_names_is_served_with_its_type(client: TestClient) -> None:
    html = (STATIC_DIR / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    local = [u for u in refs if not u.startswith("data:")]
    assert local, "the page names no assets"
    types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
    for url in local:
        assert not re.match(r"^[a-z]+:|^//", url), f"{url} leaves the server"
        r = client.get("/" + url)
        assert r.status_code == 200, url
        assert r.headers["content-type"] == types[url[url.rfind("."):]]
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.content == (STATIC_DIR / url.rsplit("/", 1)[1]).read_bytes()


def test_scripts_and_styles_fetch_nothing_from_elsewhere() -> None:
    for name in ("playground.js", "playground.css", "index.html"):
        text = (STATIC_DIR / name).read_text()
        assert not re.search(r"https?://|//cdn|@import|url\(", text), name


@pytest.mark.parametrize("path", [
    "/playground/static/../playground.py",
    "/playground/static/..%2Fplayground.py",
    "/playground/static/%2e%2e%2fpngmeta.py",
    "/playground/static/..%5Cplayground.py",
    "/playground/static/%2Fetc%2Fpasswd",
    "/playground/static/.",
    "/playground/static/nothing.js",
    "/playground/static/",
])
def test_no_path_reaches_outside_the_static_folder(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 404
    assert b"import" not in r.content and b"root:" not in r.content


def test_the_app_serves_the_page_without_a_key() -> None:
    """create_app wires the router; the page loads even when the API wants a key (it then asks for it)."""
    from server.app import create_app
    from server.settings import Settings

    app = create_app(Settings(api_key="k", device="cpu"))
    c = TestClient(app)  # lifespan not run (no model loading): the page does not touch the engine
    r = c.get("/")
    assert r.status_code == 200 and b"playground.js" in r.content
    assert c.get("/v1/models").status_code == 401


# -- PNG parameters --------------------------------------------------------------------------------


def _png(pnginfo: PngImagePlugin.PngInfo | None) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), 7).save(buf, format="PNG", pnginfo=pnginfo)
    return buf.getvalue()


TEXT_PARAMS = {
    "model": "fashion-text", "prompt": "a red, warm coat: size \"M\"", "negative_prompt": "blue\nsecond line",
    "sampler": "dpmpp_2m", "num_inference_steps": 20, "guidance_scale": 3.0, "seed": 4294967295,
    "width": 32, "height": 32,
}
CLASS_PARAMS = {
    "model": "fashion-class", "class_label": 0, "class_name": "T-shirt/top", "sampler": "euler",
    "num_inference_steps": 7, "guidance_scale": 2.5, "seed": 0, "width": 32, "height": 32,
}


def test_a1111_text_has_the_expected_form() -> None:
    text = parameters_text({**TEXT_PARAMS, "negative_prompt": "blue"})
    assert text == (
        'a red, warm coat: size "M"\nNegative prompt: blue\n'
        "Steps: 20, Sampler: dpmpp_2m, CFG scale: 3.0, Seed: 4294967295, Size: 32x32, Model: fashion-text"
    )
    assert "Negative prompt" not in parameters_text({**TEXT_PARAMS, "negative_prompt": None})


@pytest.mark.parametrize("params", [TEXT_PARAMS, CLASS_PARAMS, {**TEXT_PARAMS, "prompt": "größe ☂ 雨"}])
def test_chunks_round_trip_through_pillow(params: dict) -> None:
    data = _png(parameters_chunks({**params, "control_scale": None}))
    assert read_parameters(data) == params  # the JSON chunk, exactly (None values left out)
    with Image.open(io.BytesIO(data)) as img:
        assert json.loads(img.text["unet_server"]) == params
        parsed = parse_parameters_text(img.text["parameters"])
    # The A1111 text alone also gives every field back (the class by index; its name is kept too).
    assert parsed == params


def test_non_latin1_text_goes_into_itxt_and_reads_back() -> None:
    data = _png(parameters_chunks({**TEXT_PARAMS, "prompt": "雨 coat"}))
    assert b"iTXtparameters" in data  # tEXt cannot hold it
    assert b"tEXtunet_server" in data  # the JSON is ASCII (escaped)
    # Drop the JSON chunk: the reader falls back to the parameters text.
    with Image.open(io.BytesIO(data)) as img:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", img.text["parameters"])
    assert read_parameters(_png(info))["prompt"] == "雨 coat"


def test_reads_another_tools_parameters_text() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", (
        "masterpiece, a boot\nNegative prompt: lowres\n"
        'Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 123, Size: 512x768, Model hash: abc, '
        'Model: sd15, Lora hashes: "x: 1, y: 2", Version: v1.9'
    ), zip=True)  # zTXt
    got = read_parameters(_png(info))
    assert got == {
        "prompt": "masterpiece, a boot", "negative_prompt": "lowres", "num_inference_steps": 30,
        "sampler": "DPM++ 2M Karras", "guidance_scale": 7.0, "seed": 123, "width": 512, "height": 768,
        "Model hash": "abc", "model": "sd15", "Lora hashes": "x: 1, y: 2", "Version": "v1.9",
    }


def test_prompt_only_text_and_pngs_without_parameters() -> None:
    assert parse_parameters_text("just a prompt, nothing else") == {"prompt": "just a prompt, nothing else"}
    assert read_parameters(_png(None)) == {}
    info = PngImagePlugin.PngInfo()
    info.add_text("unet_server", "not json")
    info.add_text("parameters", "a coat\nSteps: 3, Seed: 9, Sampler: euler")
    assert read_parameters(_png(info)) == {"prompt": "a coat", "num_inference_steps": 3, "seed": 9,
                                          "sampler": "euler"}
    # Fewer than three pairs is a prompt that happens to hold colons (as A1111 reads it).
    assert parse_parameters_text("style: ink, mood: dark") == {"prompt": "style: ink, mood: dark"}


def test_image_parameters_of_a_resolved_request() -> None:
    import numpy as np

    from server.request import ResolvedRequest

    req = ResolvedRequest(
        model="fashion-text-edges", prompt="a coat", negative_prompt=None, class_label=None,
        control=np.zeros((32, 32), np.float32), control_scale=0.5, num_inference_steps=9, sampler="euler",
        guidance_scale=3.0, seed=40, num_images=3, width=32, height=32, guided=True,
    )
    assert image_parameters(req, 2) == {
        "model": "fashion-text-edges", "prompt": "a coat", "sampler": "euler", "num_inference_steps": 9,
        "guidance_scale": 3.0, "seed": 42, "width": 32, "height": 32, "control_scale": 0.5,
    }
    cls = ResolvedRequest(
        model="fashion-class", prompt=None, negative_prompt=None, class_label=7, control=None,
        control_scale=1.0, num_inference_steps=5, sampler="heun", guidance_scale=2.0, seed=0, num_images=1,
        width=32, height=32, guided=True,
    )
    params = image_parameters(cls, 0, class_name="Sneaker")
    assert params["class_label"] == 7 and params["class_name"] == "Sneaker" and "control_scale" not in params
    assert read_parameters(_png(parameters_chunks(params))) == params
