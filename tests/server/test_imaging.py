"""PNG encoding and control-map decoding limits."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from server.imaging import ImageDecodeError, decode_base64, decode_control_image, from_png, to_png, to_pngs
from server.pngmeta import parameters_chunks, read_parameters


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_png_roundtrip_gray_and_rgb() -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (32, 32, 1), dtype=np.uint8)
    rgb = rng.integers(0, 256, (2, 16, 24, 3), dtype=np.uint8)
    assert np.array_equal(from_png(to_png(gray)), gray[:, :, 0])
    for png, img in zip(to_pngs(rgb), rgb, strict=True):
        assert np.array_equal(from_png(png), img)


def _smooth(side: int) -> np.ndarray:
    """An RGB image with large flat-ish areas (compresses like a generated image, unlike noise)."""
    small = np.random.default_rng(1).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("shape", [(24, 40), (24, 40, 1), (24, 40, 3)])
def test_stored_png_level_0_is_exact_uncompressed_and_keeps_the_parameters(shape: tuple[int, ...]) -> None:
    img = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    params = {"model": "m", "prompt": "a café, «quoted», 猫", "seed": 7, "num_inference_steps": 4}
    png = to_png(img, parameters_chunks(params), compress_level=0)
    with Image.open(io.BytesIO(png)) as im:
        im.verify()  # chunk CRCs and structure
    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == ("RGB" if len(shape) == 3 and shape[2] == 3 else "L")
    expected = img if img.ndim == 2 or img.shape[2] == 3 else img[:, :, 0]
    assert np.array_equal(from_png(png), expected)
    assert read_parameters(png) == read_parameters(to_png(img, parameters_chunks(params)))
    assert read_parameters(png)["prompt"] == params["prompt"]  # non-Latin-1 text went out as iTXt
    raw = expected.size + expected.shape[0]  # one filter byte per row
    assert len(png) >= raw  # nothing compressed
    (idat,) = [i for i in range(len(png) - 4) if png[i : i + 4] == b"IDAT"]
    rows = expected.reshape(expected.shape[0], -1)
    filtered = np.concatenate([np.zeros((rows.shape[0], 1), np.uint8), rows], 1)  # filter type 0 per row
    assert zlib.decompress(png[idat + 4 : idat + 4 + struct.unpack(">I", png[idat - 4 : idat])[0]]) == (
        filtered.tobytes()
    )


def test_png_levels_trade_bytes_for_time_and_reject_bad_levels() -> None:
    img = _smooth(128)
    sizes = {level: len(to_png(img, compress_level=level)) for level in (0, 1, 9)}
    assert sizes[0] > 1.5 * sizes[1] >= 1.5 * sizes[9]
    for level in (0, 1, 9):
        assert np.array_equal(from_png(to_png(img, compress_level=level)), img)
    for bad in (-1, 10):
        with pytest.raises(ValueError, match="compress_level"):
            to_png(img, compress_level=bad)
    with pytest.raises(ValueError, match="expected"):
        to_png(np.zeros((4, 4, 4), np.uint8), compress_level=0)


def test_control_grayscale_resize_and_range() -> None:
    img = Image.new("RGB", (64, 64), (255, 255, 255))
    out = decode_control_image(png_bytes(img), width=32, height=16, max_bytes=10**6, max_pixels=10**6)
    assert out.shape == (16, 32) and out.dtype == np.float32
    assert np.allclose(out, 1.0)
    black = decode_control_image(
        png_bytes(Image.new("L", (32, 32), 0)), width=32, height=32, max_bytes=10**6, max_pixels=10**6
    )
    assert black.max() == 0.0


def test_control_rejects_garbage_and_limits() -> None:
    with pytest.raises(ImageDecodeError, match="decoded"):
        decode_control_image(b"not an image", width=32, height=32, max_bytes=10**6, max_pixels=10**6)
    data = png_bytes(Image.new("L", (100, 100), 0))
    with pytest.raises(ImageDecodeError, match="bytes"):
        decode_control_image(data, width=32, height=32, max_bytes=10, max_pixels=10**6)
    with pytest.raises(ImageDecodeError, match="pixels"):
        decode_control_image(data, width=32, height=32, max_bytes=10**6, max_pixels=99 * 99)
    # Formats outside the allowed list (GIF) are refused.
    with pytest.raises(ImageDecodeError):
        decode_control_image(
            png_bytes(Image.new("L", (8, 8)), "GIF"), width=8, height=8, max_bytes=10**6, max_pixels=10**6
        )


def _bomb_png(side: int) -> bytes:
    """A tiny PNG whose header claims side x side pixels (IDAT of zeros compresses ~1000x)."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    raw = zlib.compress(b"\x00" * (side + 1) * 64, 9)  # only a few rows: decoding would fail later
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_decompression_bomb_rejected_before_decoding() -> None:
    data = _bomb_png(50_000)
    assert len(data) < 10_000
    with pytest.raises(ImageDecodeError, match="pixels"):
        decode_control_image(data, width=32, height=32, max_bytes=10**6, max_pixels=10**6)


def test_base64() -> None:
    raw = b"\x89PNG-something"
    assert decode_base64(base64.b64encode(raw).decode(), 100) == raw
    assert decode_base64("data:image/png;base64," + base64.b64encode(raw).decode(), 100) == raw
    with pytest.raises(ImageDecodeError, match="base64"):
        decode_base64("***", 100)
    with pytest.raises(ImageDecodeError, match="larger"):
        decode_base64(base64.b64encode(b"x" * 1000).decode(), 100)


def _filter_types(png: bytes) -> np.ndarray:
    """The filter-type byte of each row of an 8-bit PNG's (single) IDAT."""
    idat = png.index(b"IDAT")
    w, h, _, color = struct.unpack(">IIBB", png[16:26])
    data = zlib.decompress(png[idat + 4 : idat + 4 + struct.unpack(">I", png[idat - 4 : idat])[0]])
    return np.frombuffer(data, np.uint8).reshape(h, -1)[:, 0]


def test_rows_get_the_filter_that_suits_them_and_decode_exactly() -> None:
    """Each row's filter is the one with the least signed-magnitude sum: a row that repeats the row above
    takes Up (2), a left-to-right ramp takes Sub (1), the first row of noise None (0); any image decodes to
    its pixels, and Pillow's own checker accepts it."""
    ramp = np.tile(np.arange(48, dtype=np.uint8) * 5, (8, 1))  # 8 rows, each a ramp: Sub wins, then Up
    ramp[0] = np.random.default_rng(0).integers(0, 256, 48, dtype=np.uint8)  # row 0: noise, no filter helps
    ramp[1] = 3 * np.arange(48, dtype=np.uint8)  # a gentler ramp, unlike the noise above it: Sub
    types = _filter_types(to_png(ramp, compress_level=1))
    assert types[0] == 0 and types[1] == 1 and (types[3:] == 2).all()
    rng = np.random.default_rng(1)
    for img in (ramp, _smooth(40), rng.integers(0, 256, (9, 7, 3), dtype=np.uint8), _smooth(16)[:, :, 0]):
        for level in (1, 6, 9):
            png = to_png(img, compress_level=level)
            assert np.array_equal(from_png(png), img)
            with Image.open(io.BytesIO(png)) as im:
                im.verify()
