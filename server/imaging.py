"""Images in and out: uint8 arrays -> PNG bytes, and control-map decoding with size limits.

Control-map policy: the upload (PNG, JPEG or WebP) is checked against ``max_bytes`` before it is parsed and
against ``max_pixels`` from its header before any pixel is decoded (so a decompression bomb is rejected
unread); it is converted to grayscale (ITU-R 601 luma; alpha ignored), then resized to the request's
width x height with Pillow's antialiased bilinear filter when its size differs (aspect ratio is not kept —
send maps at the target size to avoid distortion), and mapped to [0, 1] float32, white = edge.
These functions are CPU-bound: call them off the event loop (``run_in_threadpool``).
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")


class ImageDecodeError(ValueError):
    """The control image is not decodable or breaks a size limit; the message says which."""


def to_png(image: np.ndarray, pnginfo: PngImagePlugin.PngInfo | None = None) -> bytes:
    """PNG bytes of one uint8 image, (H, W) or (H, W, C) with C in {1, 3}; ``pnginfo``: text chunks."""
    if image.dtype != np.uint8:
        raise TypeError(f"expected uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]  # (H, W)
    mode = "L" if image.ndim == 2 else "RGB"
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode=mode).save(
        buf, format="PNG", compress_level=1, pnginfo=pnginfo
    )
    return buf.getvalue()


def to_pngs(images: np.ndarray, pnginfos: list[PngImagePlugin.PngInfo] | None = None) -> list[bytes]:
    """PNG bytes of each image in a uint8 batch (N, H, W, C), with ``pnginfos[i]``'s chunks when given."""
    infos = pnginfos if pnginfos is not None else [None] * len(images)
    return [to_png(img, info) for img, info in zip(images, infos, strict=True)]


def from_png(data: bytes) -> np.ndarray:
    """Decode PNG bytes to a uint8 array (H, W) or (H, W, 3); for tests and clients."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


def decode_base64(text: str, max_bytes: int) -> bytes:
    """Strict base64 (a ``data:...;base64,`` prefix is allowed) with a size check before decoding."""
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    if len(text) > (max_bytes * 4) // 3 + 4:
        raise ImageDecodeError(f"control image is larger than {max_bytes} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageDecodeError("control image is not valid base64") from exc


def decode_control_image(
    data: bytes, *, width: int, height: int, max_bytes: int, max_pixels: int, mode: str = "L"
) -> np.ndarray:
    """Decode a control map to float32 (height, width) in [0, 1], or with ``mode="RGB"`` (SD ControlNets'
    control images, alpha dropped as Pillow's convert does) (height, width, 3); raises ImageDecodeError."""
    if len(data) > max_bytes:
        raise ImageDecodeError(f"control image is {len(data)} bytes; the limit is {max_bytes}")
    if not data:
        raise ImageDecodeError("control image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)  # reads the header only
            w, h = img.size
            if w < 1 or h < 1 or w * h > max_pixels:
                raise ImageDecodeError(f"control image is {w}x{h} pixels; the limit is {max_pixels} pixels")
            img.load()
            gray = img.convert(mode)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"control image has too many pixels (limit {max_pixels})") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"control image could not be decoded as {'/'.join(ALLOWED_FORMATS)}") from exc
    if gray.size != (width, height):
        gray = gray.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(gray, dtype=np.float32) / 255.0  # (H, W) or (H, W, 3)
