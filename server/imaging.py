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
import struct
import warnings
import zlib

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")


class ImageDecodeError(ValueError):
    """The control image is not decodable or breaks a size limit; the message says which."""


def to_png(
    image: np.ndarray, pnginfo: PngImagePlugin.PngInfo | None = None, compress_level: int = 1
) -> bytes:
    """PNG bytes of one uint8 image, (H, W) or (H, W, C) with C in {1, 3}; ``pnginfo``: text chunks.

    Written here, not by Pillow: each row gets the None, Sub or Up filter (``_filter_rows``) and the IDAT
    is zlib at ``compress_level`` (1-9; 0: stored blocks, no filter). At level 1 that is the size of
    Pillow's level 1 in ~60% of its time (512² RGB: ~19 ms vs ~33 ms; 32² RGB: ~70 µs vs ~150 µs, on
    the 2-core CI machine); level 0 takes ~1 ms at 512², at twice the bytes."""
    if image.dtype != np.uint8:
        raise TypeError(f"expected uint8, got {image.dtype}")
    if not 0 <= compress_level <= 9:
        raise ValueError(f"compress_level {compress_level} is not in 0..9")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]  # (H, W)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"expected (H, W), (H, W, 1) or (H, W, 3), got {image.shape}")
    h, w = image.shape[:2]
    flat = np.ascontiguousarray(image).reshape(h, -1)
    rows = np.empty((h, 1 + flat.shape[1]), dtype=np.uint8)
    if compress_level == 0:
        rows[:, 0] = 0  # filter None
        rows[:, 1:] = flat
    else:
        _filter_rows(flat, 1 if image.ndim == 2 else 3, rows)
    color_type = 0 if image.ndim == 2 else 2  # gray, truecolour
    # pnginfo's chunks as Pillow keeps them, (type, data, after_idat): the bytes it would write itself
    extra = [(c[0], c[1], bool(c[2]) if len(c) > 2 else False) for c in (pnginfo.chunks if pnginfo else [])]
    parts = [b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0))]
    parts += [_png_chunk(kind, data) for kind, data, after in extra if not after]
    parts.append(_png_chunk(b"IDAT", zlib.compress(rows.tobytes(), compress_level)))
    parts += [_png_chunk(kind, data) for kind, data, after in extra if after]
    parts.append(_png_chunk(b"IEND", b""))
    return b"".join(parts)


def _filter_rows(flat: np.ndarray, bpp: int, out: np.ndarray) -> None:
    """PNG row filtering into ``out`` (H, 1 + W*bpp): per row the filter among None (0), Sub (1: byte minus
    the byte ``bpp`` to its left) and Up (2: minus the byte above; the first row's "above" is zeros) whose
    bytes, read as signed, have the least sum of magnitudes — the spec's recommended heuristic (libpng's,
    without Average and Paeth)."""
    sub = flat.copy()
    np.subtract(flat[:, bpp:], flat[:, :-bpp], out=sub[:, bpp:])
    up = flat.copy()
    np.subtract(flat[1:], flat[:-1], out=up[1:])
    candidates = np.stack([flat, sub, up])  # (3, H, W*bpp)
    cost = np.abs(candidates.view(np.int8).astype(np.int16)).sum(axis=2)  # (3, H)
    best = cost.argmin(axis=0)  # (H,)
    out[:, 0] = best
    out[:, 1:] = candidates[best, np.arange(flat.shape[0])]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def to_pngs(
    images: np.ndarray, pnginfos: list[PngImagePlugin.PngInfo] | None = None, compress_level: int = 1
) -> list[bytes]:
    """PNG bytes of each image in a uint8 batch (N, H, W, C), with ``pnginfos[i]``'s chunks when given."""
    infos = pnginfos if pnginfos is not None else [None] * len(images)
    return [to_png(img, info, compress_level) for img, info in zip(images, infos, strict=True)]


def from_png(data: bytes) -> np.ndarray:
    """Decode PNG bytes to a uint8 array (H, W) or (H, W, 3); for tests and clients."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


def decode_base64(text: str, max_bytes: int, what: str = "control image") -> bytes:
    """Strict base64 (a ``data:...;base64,`` prefix is allowed) with a size check before decoding; ``what``
    names the image in messages."""
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    if len(text) > (max_bytes * 4) // 3 + 4:
        raise ImageDecodeError(f"{what} is larger than {max_bytes} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageDecodeError(f"{what} is not valid base64") from exc


def decode_control_image(
    data: bytes, *, width: int, height: int, max_bytes: int, max_pixels: int, mode: str = "L"
) -> np.ndarray:
    """Decode a control map to float32 (height, width) in [0, 1], or with ``mode="RGB"`` (SD ControlNets'
    control images, alpha dropped as Pillow's convert does) (height, width, 3); raises ImageDecodeError.
    Any bit depth is accepted: a control map is converted, not refused (unlike init images and masks)."""
    img = _open_checked(data, max_bytes=max_bytes, max_pixels=max_pixels, what="control image")
    try:
        gray = img.convert(mode)
    except (OSError, ValueError) as exc:
        raise ImageDecodeError(f"control image could not be converted to {mode}") from exc
    if gray.size != (width, height):
        gray = gray.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(gray, dtype=np.float32) / 255.0  # (H, W) or (H, W, 3)


def _open_checked(
    data: bytes, *, max_bytes: int, max_pixels: int, what: str, modes: tuple[str, ...] | None = None
) -> Image.Image:
    """The decoded upload: bytes checked before parsing, pixels from the header before decoding, the mode
    against ``modes`` (None: any); raises ImageDecodeError naming ``what``."""
    if len(data) > max_bytes:
        raise ImageDecodeError(f"{what} is {len(data)} bytes; the limit is {max_bytes}")
    if not data:
        raise ImageDecodeError(f"{what} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)  # reads the header only
            w, h = img.size
            if w < 1 or h < 1 or w * h > max_pixels:
                raise ImageDecodeError(f"{what} is {w}x{h} pixels; the limit is {max_pixels} pixels")
            if modes is not None and img.mode not in modes:
                raise ImageDecodeError(
                    f"{what} has mode {img.mode} (16-bit or float pixels); send an 8-bit RGB, RGBA, "
                    "grayscale or palette image"
                )
            img.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"{what} has too many pixels (limit {max_pixels})") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"{what} could not be decoded as {'/'.join(ALLOWED_FORMATS)}") from exc
    return img


# -- image-to-image and inpainting inputs ----------------------------------------------------------
# Policy: the same byte and pixel limits as control maps (checked before any pixel is decoded); 8-bit modes
# only (16-bit and float PNG/TIFF-style modes are refused, not silently clipped); an init image is converted
# to the model's channels (RGB, alpha dropped, or grayscale) and resized to the request's width x height
# with Lanczos (as diffusers' VaeImageProcessor) when its size differs; a mask must have the image's size,
# is resized the same way, then binarised at 0.5 (diffusers' mask processor): 1 = repaint.

EIGHT_BIT_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, what: str) -> Image.Image:
    """Decode an uploaded PNG/JPEG/WebP (``what`` names the field in messages) within the limits; raises
    ImageDecodeError (too large, too many pixels, not decodable, not 8-bit)."""
    return _open_checked(data, max_bytes=max_bytes, max_pixels=max_pixels, what=what, modes=EIGHT_BIT_MODES)


def init_image_array(img: Image.Image, channels: int, width: int, height: int) -> np.ndarray:
    """An init image as the model sees it: float32 (channels, height, width) in [-1, 1] (x / 255 · 2 − 1,
    as diffusers), converted to RGB (channels 3; alpha dropped) or grayscale, resized (Lanczos) if needed."""
    img = img.convert("RGB" if channels == 3 else "L")
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.LANCZOS)
    x = np.asarray(img, dtype=np.float32) / 255.0 * 2.0 - 1.0  # (H, W, 3) or (H, W)
    return np.ascontiguousarray(x.transpose(2, 0, 1) if x.ndim == 3 else x[None])  # (C, H, W)


def has_transparency(img: Image.Image) -> bool:
    """Whether the image has an alpha channel (or palette transparency) with some pixel below 128."""
    if img.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in img.info:
        return False
    return bool(np.asarray(img.convert("RGBA").getchannel("A")).min() < 128)


def mask_array(img: Image.Image, width: int, height: int, source: str = "luma") -> np.ndarray:
    """A mask as float32 (height, width) in {0, 1}, 1 = repaint, binarised at 0.5 after resizing.

    source "luma": white = repaint (diffusers, /generate's ``mask_image``; alpha ignored). source "alpha":
    transparent = repaint (OpenAI's edits: alpha < 128 repaints)."""
    if source == "alpha":
        gray = Image.fromarray(255 - np.asarray(img.convert("RGBA").getchannel("A")), mode="L")
    else:
        gray = img.convert("L")
    if gray.size != (width, height):
        gray = gray.resize((width, height), Image.Resampling.LANCZOS)
    return (np.asarray(gray, dtype=np.float32) / 255.0 >= 0.5).astype(np.float32)  # (H, W)
