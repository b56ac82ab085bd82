"""``png_compress_level`` (UNET_SERVER_PNG_COMPRESS_LEVEL): the served PNGs' zlib level. Level 0 serves the
same pixels and parameter chunks as the default, uncompressed; bad values are refused at start-up."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.imaging import from_png
from server.pngmeta import read_parameters
from server.settings import Settings
from tests.server.conftest import LiveServer, start_server

pytestmark = pytest.mark.timeout(120)

BODY = {"model": "tiny-text", "prompt": "a red bag", "seed": 5, "num_inference_steps": 3, "num_images": 2}


def _pngs(server: LiveServer) -> list[bytes]:
    with server.client() as c:
        r = c.post("/generate", json=BODY)
        assert r.status_code == 200, r.text
        one = c.post("/generate", json={**BODY, "num_images": 1}, headers={"accept": "image/png"})
        assert one.status_code == 200 and one.headers["content-type"] == "image/png"
    return [base64.b64decode(b) for b in r.json()["images"]] + [one.content]


def _idat_bytes(png: bytes) -> int:
    """Length of the PNG's IDAT data (a stored stream is at least the raw rows)."""
    at = png.index(b"IDAT")
    return int.from_bytes(png[at - 4 : at], "big")


def test_level_0_serves_the_same_pixels_and_parameters_uncompressed(
    weights_dir: Path, live: LiveServer
) -> None:
    default = _pngs(live)
    server = start_server(weights_dir, png_compress_level=0)
    try:
        stored = _pngs(server)
    finally:
        server.stop()
    for a, b in zip(default, stored, strict=True):
        pixels = from_png(b)
        assert (pixels == from_png(a)).all()
        assert read_parameters(b) == read_parameters(a)
        raw = pixels.size + pixels.shape[0]  # + a filter byte per row
        assert _idat_bytes(b) >= raw > _idat_bytes(a)  # every byte stored; the default compresses


def test_setting_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().png_compress_level == 1
    monkeypatch.setenv("UNET_SERVER_PNG_COMPRESS_LEVEL", "0")
    assert Settings().png_compress_level == 0
    for bad in ("10", "-1", "fast"):
        monkeypatch.setenv("UNET_SERVER_PNG_COMPRESS_LEVEL", bad)
        with pytest.raises(ValidationError, match="png_compress_level"):
            Settings()
