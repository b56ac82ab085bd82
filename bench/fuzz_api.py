"""Schema fuzzer for the HTTP API (issue 15): seeded mutations of valid requests against a live server.

    python -m bench.fuzz_api --requests 20000 --seed 1 --out bench/results/cpu-fuzz  # starts python -m server
    python -m bench.fuzz_api --requests 2000 --seed 3 --url http://127.0.0.1:8000   # a server already running

Without ``--url`` it starts ``python -m server`` on CPU with the shipped weights (adapters from a temporary
copy of weights/loras, so uploads and deletes never touch the shipped folder) and stops it afterwards.

Every case starts from a valid request for one endpoint (the models, samplers and adapters the server lists
at start; ``num_inference_steps`` <= 4 so that a 200 is cheap) and, in most cases, mutates 1-3 things:
wrong types, null, NaN/±Inf/huge/negative numbers, empty/huge/unicode strings, deep and wide nesting,
unknown fields, over-long lists, broken images (base64 garbage, truncated, 16-bit, palette, RGBA, 1x1, huge
declared size in a tiny file), masks without images, strengths at and past the bounds, ControlNets and LoRA
adapters unknown/duplicated/out of range, SDXL fields on SD models; multipart bodies with missing,
duplicated, oversized or mistyped parts; malformed JSON and wrong content types. Cases are a pure function of
(seed, index): the same seed sends the same requests (follow-ups on jobs use the ids the server returned).

Each response is checked: no 5xx; no "Traceback" or Python source path in any body; every error a JSON
object with a non-empty ``message`` (a 422's ``detail`` entries each with ``loc`` and ``msg``); JSON where
JSON is expected; every image of a 200 (JSON base64, a PNG body, a finished job's result) decodes as a PNG.
At the end: GET /health/ready must be 200 and the server process (or thread) alive.

``tests/server/test_fuzz_fields.py`` runs the same generator in-process against the test server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import random
import re
import shutil
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# -- cases ------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One HTTP request: method, path, body (JSON value, raw bytes or multipart parts) and what it mutated."""

    endpoint: str  # the route, e.g. "POST /generate" (the histogram key)
    method: str
    path: str
    json_body: Any = None  # serialized with NaN/Infinity literals allowed (Python's json.loads reads them)
    content: bytes | None = None  # raw body (wins over json_body)
    headers: dict[str, str] = field(default_factory=dict)
    mutations: list[str] = field(default_factory=list)
    follow: str | None = None  # jobs: "poll" | "cancel" | "events" after a 202

    @property
    def valid(self) -> bool:
        return not self.mutations

    def body_bytes(self) -> bytes | None:
        if self.content is not None:
            return self.content
        if self.json_body is None:
            return None
        return json.dumps(self.json_body, allow_nan=True).encode()

    def summary(self, limit: int = 600) -> str:
        """The request in one line, images and long strings cut."""
        body = self.json_body if self.content is None else self.content[:200]
        text = _short(body)
        return f"{self.method} {self.path} [{'; '.join(self.mutations) or 'valid'}] {text}"[:limit]


def _short(value: Any, depth: int = 0) -> Any:
    if depth > 4:
        return "…"
    if isinstance(value, dict):
        return {str(k)[:40]: _short(v, depth + 1) for k, v in list(value.items())[:20]}
    if isinstance(value, list):
        return [_short(v, depth + 1) for v in value[:6]] + (["…"] if len(value) > 6 else [])
    if isinstance(value, str) and len(value) > 60:
        return f"<str {len(value)}: {value[:30]!r}…>"
    if isinstance(value, bytes):
        return f"<bytes {len(value)}: {value[:40]!r}>"
    return value


# -- images -----------------------------------------------------------------------------------------------


def png_bytes(width: int, height: int, mode: str = "RGB", seed: int = 0, fmt: str = "PNG") -> bytes:
    """A small image of random pixels in ``mode`` (L, RGB, RGBA, LA, P, I;16, 1, CMYK), encoded as ``fmt``."""
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(seed)
    if mode == "I;16":
        img = Image.fromarray(g.integers(0, 65535, (height, width), dtype=np.uint16))
    else:
        img = Image.fromarray(g.integers(0, 255, (height, width, 3), dtype=np.uint8), "RGB")
        if mode == "RGBA":
            img = img.convert("RGBA")
            a = g.integers(0, 2, (height, width), dtype=np.uint8) * 255
            img.putalpha(Image.fromarray(a, "L"))
        elif mode == "P":
            img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        elif mode != "RGB":
            img = img.convert(mode)
    buf = io.BytesIO()
    save: dict[str, Any] = {"format": fmt}
    if fmt == "GIF" and mode not in ("P", "L"):
        img = img.convert("P")
    if fmt == "JPEG" and img.mode not in ("L", "RGB", "CMYK"):
        img = img.convert("RGB")
    img.save(buf, **save)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def huge_declared_png(width: int = 60000, height: int = 60000) -> bytes:
    """A ~100-byte PNG whose header declares width x height (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- nasty values -----------------------------------------------------------------------------------------

UNICODE = [
    "Ω≈ç√∫˜µ≤≥÷",
    "😀" * 30,
    "a\u0000b",
    "\u202eevil",
    "e\u0301" * 20,
    "\ufeffbom",
    "日本語のプロンプト",
    "\ud800",
    "a\udfffb",
    "\x1b[31mred",
    "\r\n\t",
    "²",
    "١٢",
    "٣",
    "Ⅻ",
    "¹0",
    "\u00a0 7 \u00a0",
    "𝟕",
    "7\u200b",
]


def deep(depth: int, leaf: Any = 1, as_dict: bool = False) -> Any:
    value: Any = leaf
    for _ in range(depth):
        value = {"a": value} if as_dict else [value]
    return value


def nasty(rng: random.Random) -> Any:
    """A value of a random kind that is wrong for most fields."""
    kind = rng.randrange(9)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 1, 2, -(2**63), 2**63, 2**64 + 1, 10**40, 2**31, -(2**31) - 1, 10**300])
    if kind == 2:
        return rng.choice([1.5, -0.0, 5e-324, 1e308, -1e308, math.nan, math.inf, -math.inf, 0.1, 1e-9])
    if kind == 3:
        return rng.choice(["", " ", "0", "1", "-1", "NaN", "inf", "1e999", "true", "null", "[]", "{}", "3.5"])
    if kind == 4:
        return rng.choice(["x" * rng.choice([100, 2001, 70_000]), "a " * 500, rng.choice(UNICODE)])
    if kind == 5:
        return rng.choice([[], [1], ["a"], [None], [1, 2], [math.nan, 1], list(range(rng.choice([3, 1000])))])
    if kind == 6:
        return rng.choice([{}, {"a": 1}, {"name": "x"}, {str(i): i for i in range(200)}])
    if kind == 7:
        return deep(rng.choice([2, 5, 20, 31, 33, 200, 900]), as_dict=rng.random() < 0.5)
    return rng.choice(UNICODE)


def nasty_number(rng: random.Random, lo: float, hi: float, integer: bool) -> Any:
    """Numbers at, just past and far past the bounds [lo, hi], and non-numbers that look like numbers."""
    eps = 1 if integer else max(abs(hi), 1.0) * 1e-7
    pool: list[Any] = [
        lo,
        hi,
        lo - eps,
        hi + eps,
        -1,
        0,
        2**53 + 1,
        10**30,
        -(10**30),
        math.nan,
        math.inf,
        -math.inf,
        -0.0,
        1.0000001,
        0.5,
        str(hi),
        f"{lo}",
        True,
        None,
        [lo],
        {"v": lo},
    ]
    if integer:
        pool += [float(lo), lo + 0.5, 2**31, 2**63, 2**64]
    return rng.choice(pool)


# -- the generator ----------------------------------------------------------------------------------------

GEN_FIELDS = [
    "model",
    "prompt",
    "negative_prompt",
    "class_label",
    "control_image",
    "control_scale",
    "controlnets",
    "num_inference_steps",
    "sampler",
    "guidance_scale",
    "seed",
    "num_images",
    "width",
    "height",
    "loras",
    "preview_every",
    "image",
    "mask_image",
    "strength",
    "original_size",
    "crops_coords_top_left",
    "target_size",
]
OPENAI_FIELDS = [
    "prompt",
    "model",
    "n",
    "size",
    "response_format",
    "seed",
    "sampler",
    "num_inference_steps",
    "guidance_scale",
    "negative_prompt",
    "loras",
    "quality",
    "style",
    "user",
]
EDIT_FIELDS = [*OPENAI_FIELDS, "strength", "background", "input_fidelity"]
MAX_VALID_STEPS = 4  # valid bodies sample at most this many steps: a 200 stays cheap on CPU
UPLOAD_LIMIT_FALLBACK = 2_000_000  # the server's default max_control_image_bytes


@dataclass
class Catalog:
    """What the server serves, read once at start (GET /v1/models, /v1/samplers, /v1/loras)."""

    models: list[dict[str, Any]]
    samplers: list[dict[str, Any]]
    loras: list[dict[str, Any]]
    lora_file: bytes | None = None  # an adapter's bytes, re-uploaded under fresh names (valid uploads)
    upload_limit: int = UPLOAD_LIMIT_FALLBACK  # max_control_image_bytes of the server (oversized parts)

    def samplers_for(self, model: dict[str, Any]) -> list[str]:
        names = [s["name"] for s in self.samplers if model["schedule"] in s.get("model_kinds", [])]
        return names or [model["defaults"]["sampler"]]

    def loras_for(self, model: dict[str, Any]) -> list[str]:
        return [a["name"] for a in self.loras if model["id"] in a.get("models", [])]


class Fuzzer:
    """Cases from a seeded RNG: ``case(i)`` depends only on (seed, i) and the catalog."""

    def __init__(self, catalog: Catalog, seed: int):
        self.cat, self.seed = catalog, seed
        self.images: dict[tuple[Any, ...], bytes] = {}

    # helpers

    def image(self, w: int, h: int, mode: str = "RGB", seed: int = 0, fmt: str = "PNG") -> bytes:
        key = (w, h, mode, seed, fmt)
        if key not in self.images:
            self.images[key] = png_bytes(w, h, mode, seed, fmt)
        return self.images[key]

    def bad_image(self, rng: random.Random, w: int, h: int) -> tuple[str, bytes | str]:
        """(what, bytes or a text that is not base64 of an image)."""
        good = self.image(w, h)
        kind = rng.randrange(19)
        if kind == 0:
            return "truncated png", good[: rng.randrange(1, len(good))]
        if kind == 1:
            return "16-bit png", self.image(w, h, "I;16")
        if kind == 2:
            return "palette png", self.image(w, h, "P")
        if kind == 3:
            return "rgba png", self.image(w, h, "RGBA")
        if kind == 4:
            return "1x1 png", self.image(1, 1)
        if kind == 5:
            return "huge declared size", huge_declared_png(rng.choice([60000, 2**31 - 1, 5000]), 60000)
        if kind == 6:
            return "wrong size", self.image(w * 2 + 3, h + 5)
        if kind == 7:
            return "random bytes", rng.randbytes(rng.choice([0, 1, 7, 100, 4000]))
        if kind == 8:
            return "base64 garbage", rng.choice(
                ["!!!!", "abc", "a===", "====", "QUJD\n", "ø", " ", "data:,", "%%"]
            )
        if kind == 9:
            return "data url", "data:image/png;base64," + b64(good)
        if kind == 10:
            return "gif", self.image(w, h, "P", fmt="GIF")
        if kind == 11:
            return "bmp", self.image(w, h, fmt="BMP")
        if kind == 12:
            return "jpeg cmyk", self.image(w, h, "CMYK", fmt="JPEG")
        if kind == 13:
            return "webp", self.image(w, h, fmt="WEBP")
        if kind == 14:
            return "1-bit png", self.image(w, h, "1")
        if kind == 15:
            return "LA png", self.image(w, h, "LA")
        if kind == 16:
            return "svg text", b'<svg xmlns="http://www.w3.org/2000/svg" width="32" height="32"/>'
        if kind == 17:
            return "png header only", good[:33]
        return "tiff", self.image(w, h, fmt="TIFF")

    def pick_model(self, rng: random.Random, want: str | None = None) -> dict[str, Any]:
        models = self.cat.models
        if want == "text":
            models = [m for m in models if m["conditioning"]["text"]] or models
        return rng.choice(models)

    def valid_generate(self, rng: random.Random, m: dict[str, Any], job: bool = False) -> dict[str, Any]:
        """A request for model ``m`` that must succeed (steps <= MAX_VALID_STEPS)."""
        cond, d = m["conditioning"], m["defaults"]
        w, h = d["width"], d["height"]
        body: dict[str, Any] = {"model": m["id"], "num_inference_steps": rng.randint(1, MAX_VALID_STEPS)}
        if rng.random() < 0.5:
            body["seed"] = rng.randrange(2**32)
        if rng.random() < 0.3:
            body["sampler"] = rng.choice(self.cat.samplers_for(m))
        if rng.random() < 0.3:
            body["guidance_scale"] = rng.choice([1.0, 2.5, 7.0])
        if rng.random() < 0.2:
            body["num_images"] = rng.randint(1, 2)
        if cond.get("classes"):
            c = rng.choice(cond["classes"])
            body["class_label"] = rng.choice([c["index"], c["name"], str(c["index"])])
        if cond["text"]:
            body["prompt"] = rng.choice(["a red dress", "striped shirt", "blue sneaker", "a bag", ""])
            if rng.random() < 0.3:
                body["negative_prompt"] = "blurry"
            loras = self.cat.loras_for(m)
            if loras and rng.random() < 0.4:
                body["loras"] = [{"name": rng.choice(loras), "scale": rng.choice([0.0, 0.5, 1.0])}]
        control = cond.get("control")
        if control is not None and control.get("controlnets"):
            if rng.random() < 0.7:
                body["controlnets"] = [
                    {"name": rng.choice(control["controlnets"]), "image": b64(self.image(w, h))}
                ]
        elif control is not None:
            body["control_image"] = b64(self.image(w, h, "L", seed=rng.randrange(4)))
            if rng.random() < 0.3:
                body["control_scale"] = rng.choice([0.0, 0.5, 2.0])
        if cond.get("size_conditioning") and rng.random() < 0.5:
            body["original_size"] = [h, w]
            body["crops_coords_top_left"] = [0, 0]
        if m.get("inpainting") or rng.random() < 0.25:
            body["image"] = b64(self.image(w, h, seed=rng.randrange(4)))
            body["num_inference_steps"] = MAX_VALID_STEPS  # strength 0.8 (the default) leaves a step
            if m.get("inpainting") or rng.random() < 0.5:
                body["mask_image"] = b64(self.image(w, h, "L", seed=rng.randrange(4)))
            if rng.random() < 0.5:
                body["strength"] = rng.choice([0.5, 0.75, 1.0])
        if job and rng.random() < 0.3:
            body["preview_every"] = rng.randint(1, 2)
        return body

    def mutate_field(self, rng: random.Random, body: dict[str, Any], m: dict[str, Any]) -> str:
        """Set, delete or break one field of a /generate body; returns what it did."""
        d = m["defaults"]
        w, h = d["width"], d["height"]
        name = rng.choice(GEN_FIELDS + ["<unknown>", "<delete>", "<generic>"])
        if name == "<unknown>":
            key = rng.choice(
                [
                    "foo",
                    "Model",
                    "prompt ",
                    "__proto__",
                    "k" * 300,
                    "ünïcode",
                    "",
                    "image[]",
                    "steps",
                    "\udc80x",
                ]
            )
            body[key] = nasty(rng)
            return f"unknown field {key[:20]!r}"
        if name == "<delete>":
            if body:
                key = rng.choice(sorted(body))
                del body[key]
                return f"delete {key}"
            return "nothing to delete"
        if name == "<generic>":
            key = rng.choice(GEN_FIELDS)
            body[key] = nasty(rng)
            return f"{key}={_short(body[key])!r}"[:120]
        value: Any
        if name == "model":
            other = [x["id"] for x in self.cat.models]
            value = rng.choice(
                [*other, "nope", "", m["id"].upper(), f" {m['id']}", "../weights", "x" * 300, None]
            )
        elif name in ("prompt", "negative_prompt"):
            value = rng.choice(["x" * 2000, "x" * 2001, "word " * 400, *UNICODE, "", None, 5, ["a"]])
        elif name == "class_label":
            classes = m["conditioning"].get("classes") or [{"index": 0, "name": "x"}]
            n = len(classes)
            value = rng.choice(
                [
                    -1,
                    n,
                    n + 1,
                    n - 1,
                    "-1",
                    "--1",
                    f" {n - 1} ",
                    "7.0",
                    7.0,
                    7.5,
                    True,
                    "",
                    classes[-1]["name"].upper(),
                    "sneaker ",
                    "²",
                    "¹",
                    "١",
                    "𝟕",
                    "Ⅻ",
                    2**70,
                    "9" * 4400,
                    None,
                    [0],
                ]
            )
        elif name in ("control_image", "image", "mask_image"):
            if rng.random() < 0.15:
                value = rng.choice([None, 5, [], {"data": "x"}, ""])
            else:
                what, data = self.bad_image(rng, w, h)
                value = data if isinstance(data, str) else b64(data)
                body[name] = value
                return f"{name}: {what}"
        elif name == "control_scale":
            value = nasty_number(rng, 0.0, 4.0, integer=False)
        elif name == "controlnets":
            value = self.bad_controlnets(rng, m)
        elif name == "num_inference_steps":
            value = rng.choice(
                [0, -1, 1, 2**31, 201, 2001, 1.5, 2.0, "3", "3.0", "three", None, math.nan, 10**20]
            )
        elif name == "sampler":
            names = [s["name"] for s in self.cat.samplers] + [
                a for s in self.cat.samplers for a in s.get("aliases", [])
            ]
            value = rng.choice([*names, "nope", "", "DDIM", " ddim", "x" * 65, None, 3])
        elif name == "guidance_scale":
            value = nasty_number(rng, 0.0, 50.0, integer=False)
        elif name == "seed":
            value = nasty_number(rng, 0, 2**32 - 1, integer=True)
        elif name == "num_images":
            value = rng.choice([0, -1, 1, 2, 4, 5, 8, 9, 1000, 2**40, "2", 2.0, None])
        elif name in ("width", "height"):
            value = rng.choice(
                [0, 1, 7, 8, 16, 24, 32, 33, 40, 64, 4096, 2**31, -8, "32", 32.0, None, math.inf]
            )
        elif name == "loras":
            value = self.bad_loras(rng, m)
        elif name == "preview_every":
            value = rng.choice([0, 1, 10_000, 10_001, -1, "1", None, 1.5])
        elif name == "strength":
            value = rng.choice(
                [0, 0.0, 1, 1.0, 1.0000001, 1e-9, 0.01, 0.2, 0.5, -0.5, math.nan, math.inf, "0.5", None]
            )
            if rng.random() < 0.5 and "image" not in body:
                body["image"] = b64(self.image(w, h))
        else:  # SDXL micro-conditioning
            value = rng.choice(
                [
                    [1024, 1024],
                    [h, w],
                    [0, 0],
                    [1, 16384],
                    [16385, 1],
                    [-1, 5],
                    "1024,1024",
                    "1024x1024",
                    "[1024, 1024]",
                    "abc",
                    "",
                    [1, 2, 3],
                    [1.5, 2],
                    [True, False],
                    {"a": 1},
                    "1,,2",
                    "٣,٣",
                    "9" * 5000 + ",1",
                    [2**64, 1],
                    [None, None],
                    "1 2",
                    "(8, 8)",
                ]
            )
        body[name] = value
        return f"{name}={_short(value)!r}"[:120]

    def bad_controlnets(self, rng: random.Random, m: dict[str, Any]) -> Any:
        d = m["defaults"]
        img = b64(self.image(d["width"], d["height"]))
        control = m["conditioning"].get("control") or {}
        names = control.get("controlnets") or ["cn"]
        first = names[0]
        kind = rng.randrange(12)
        if kind == 0:
            return [{"name": "unknown-net", "image": img}]
        if kind == 1:
            return [{"name": first, "image": img}, {"name": first, "image": img}]
        if kind == 2:
            return [{"name": first, "image": img, "guidance_start": 0.8, "guidance_end": 0.2}]
        if kind == 3:
            return [{"name": first, "image": img, "guidance_start": 0.5, "guidance_end": 0.5}]
        if kind == 4:
            return [{"name": first, "image": img}] * rng.choice([5, 50])
        if kind == 5:
            return [{"name": first}]
        if kind == 6:
            return [{"name": first, "image": img, "extra": 1}]
        if kind == 7:
            return [{"name": first, "image": img, "scale": nasty_number(rng, 0.0, 4.0, integer=False)}]
        if kind == 8:
            return [{"name": None, "image": img, "guidance_end": nasty_number(rng, 0.0, 1.0, integer=False)}]
        if kind == 9:
            what, data = self.bad_image(rng, d["width"], d["height"])
            return [{"name": first, "image": data if isinstance(data, str) else b64(data)}]
        if kind == 10:
            return rng.choice(
                ["not json", "[]", json.dumps([{"name": first, "image": img}]), "{", 5, {"name": first}]
            )
        return rng.choice([[], [None], [1], ["x"], [[{"name": first}]]])

    def bad_loras(self, rng: random.Random, m: dict[str, Any]) -> Any:
        names = [a["name"] for a in self.cat.loras] or ["stripes"]
        fits = self.cat.loras_for(m)
        first = (fits or names)[0]
        kind = rng.randrange(10)
        if kind == 0:
            return [{"name": "no-such-adapter"}]
        if kind == 1:
            return [{"name": first}, {"name": first, "scale": 0.5}]
        if kind == 2:
            return [{"name": first, "scale": nasty_number(rng, -8.0, 8.0, integer=False)}]
        if kind == 3:
            return [{"name": f"a{i}"} for i in range(rng.choice([5, 100]))]
        if kind == 4:
            return [
                {
                    "name": rng.choice(
                        [
                            "../stripes",
                            "",
                            ".hidden",
                            "-x",
                            "x" * 129,
                            "a/b",
                            "stripes.safetensors",
                            "ü",
                            "con",
                            "a b",
                            "\u0000",
                        ]
                    )
                }
            ]
        if kind == 5:
            return [{"name": first, "weight": 1.0}]
        if kind == 6:
            return [{"scale": 1.0}]
        if kind == 7:
            return rng.choice(["stripes", {"name": first}, [first], 1, [None]])
        if kind == 8:
            other = [a for a in names if a not in fits]
            return [{"name": rng.choice(other or names), "scale": 1.0}]  # an adapter of another model
        return [{"name": n} for n in names] + [{"name": first}]

    # case builders

    def case(self, i: int) -> Case:
        rng = random.Random(f"{self.seed}:{i}")
        pick = rng.random()
        if pick < 0.34:
            return self.generate_case(rng, "/generate")
        if pick < 0.46:
            return self.generate_case(rng, "/v1/jobs")
        if pick < 0.60:
            return self.openai_case(rng)
        if pick < 0.72:
            return self.edits_case(rng)
        if pick < 0.82:
            return self.lora_case(rng)
        if pick < 0.92:
            return self.raw_case(rng)
        return self.misc_case(rng)

    def mutation_count(self, rng: random.Random) -> int:
        """0 (a valid request, 15%) or 1-3 mutations."""
        return 0 if rng.random() < 0.15 else rng.choice([1, 1, 2, 3])

    def generate_case(self, rng: random.Random, path: str) -> Case:
        m = self.pick_model(rng)
        job = path == "/v1/jobs"
        body = self.valid_generate(rng, m, job=job)
        muts = [self.mutate_field(rng, body, m) for _ in range(self.mutation_count(rng))]
        headers = {}
        if not job and rng.random() < 0.3:
            headers["accept"] = rng.choice(["image/png", "image/png, application/json", "*/*", "text/html"])
        follow = rng.choice(["poll", "poll", "cancel", "events", None]) if job else None
        if rng.random() < 0.25:  # the same body as multipart/form-data
            return self.multipart_generate(rng, path, body, muts, headers, follow)
        return Case(
            f"POST {path}", "POST", path, json_body=body, headers=headers, mutations=muts, follow=follow
        )

    def multipart_generate(
        self,
        rng: random.Random,
        path: str,
        body: dict[str, Any],
        muts: list[str],
        headers: dict[str, str],
        follow: str | None,
    ) -> Case:
        """Image fields as file parts, the rest as form fields (lists and objects as JSON text)."""
        parts: list[tuple[str, str | None, str | None, bytes]] = []
        for key, value in body.items():
            if (
                key in ("image", "mask_image", "control_image")
                and isinstance(value, str)
                and rng.random() < 0.7
            ):
                try:
                    data = base64.b64decode(value.partition(",")[2] if value.startswith("data:") else value)
                except ValueError:
                    data = value.encode("utf-8", "surrogatepass")
                parts.append(
                    (
                        key,
                        f"{key}.png",
                        rng.choice(
                            ["image/png", "image/png", "application/octet-stream", "text/plain", None]
                        ),
                        data,
                    )
                )
                continue
            text = value if isinstance(value, str) else json.dumps(value, allow_nan=True)
            parts.append((key, None, None, text.encode("utf-8", "surrogatepass")))
        muts = list(muts)
        if rng.random() < 0.5:
            muts.append(self.mutate_parts(rng, parts))
        boundary = "fuzzb" + str(rng.randrange(10**9))
        content, ctype = encode_multipart(parts, boundary), f"multipart/form-data; boundary={boundary}"
        if rng.random() < 0.1:
            content, ctype, what = self.break_multipart(rng, content, ctype, boundary)
            muts.append(what)
        return Case(
            f"POST {path}",
            "POST",
            path,
            content=content,
            headers={**headers, "content-type": ctype},
            mutations=muts,
            follow=follow,
        )

    def mutate_parts(self, rng: random.Random, parts: list[tuple[str, str | None, str | None, bytes]]) -> str:
        limit = self.cat.upload_limit
        kind = rng.randrange(9)
        if kind == 0 and parts:
            del parts[rng.randrange(len(parts))]
            return "multipart: part missing"
        if kind == 1 and parts:
            parts.append(rng.choice(parts))
            return "multipart: duplicate part"
        if kind == 2:
            name = rng.choice(["image", "mask_image", "control_image"])
            parts.append((name, "big.png", "image/png", b"\x89PNG" + b"\0" * (limit + rng.choice([1, 1000]))))
            return f"multipart: oversized {name} file"
        if kind == 3:
            parts.append((rng.choice(["prompt", "loras", "model", "weird"]), "f.txt", "text/plain", b"hello"))
            return "multipart: file in a text field"
        if kind == 4:
            parts.append(("", None, None, b"nameless"))
            return "multipart: part without a name"
        if kind == 5:
            parts.extend((f"f{i}", None, None, b"1") for i in range(40))
            return "multipart: 40 extra fields"
        if kind == 6:
            parts.extend(("image", f"{i}.png", "image/png", b"\x89PNG") for i in range(5))
            return "multipart: 5 files"
        if kind == 7:
            deep_json = b"[" * rng.choice([40, 5000, 200_000])
            name = rng.choice(["controlnets", "loras"])
            parts.append(
                (name, None, None, rng.choice([b"{", b"[1,2", b"\xff\xfe", b"null", b"[{}]", deep_json]))
            )
            return f"multipart: {name} not JSON"
        parts.append(
            (
                rng.choice(["seed", "num_inference_steps", "width"]),
                None,
                None,
                rng.choice([b"", b"\xff", b"1e9"]),
            )
        )
        return "multipart: bad number field"

    def break_multipart(
        self, rng: random.Random, content: bytes, ctype: str, boundary: str
    ) -> tuple[bytes, str, str]:
        kind = rng.randrange(6)
        if kind == 0:
            return content[: rng.randrange(len(content) + 1)], ctype, "multipart: truncated body"
        if kind == 1:
            return content, "multipart/form-data", "multipart: no boundary"
        if kind == 2:
            return content, "multipart/form-data; boundary=other", "multipart: wrong boundary"
        if kind == 3:
            return content.replace(b"\r\n", b"\n"), ctype, "multipart: LF line ends"
        if kind == 4:
            return rng.randbytes(300), ctype, "multipart: random bytes"
        return content, "multipart/form-data; boundary=" + "b" * 300, "multipart: long boundary"

    def openai_case(self, rng: random.Random) -> Case:
        m = self.pick_model(rng)
        cond = m["conditioning"]
        if cond["text"]:
            prompt = rng.choice(["a red dress", "a shirt", ""])
        else:
            prompt = rng.choice([c["name"] for c in cond.get("classes") or []] or ["x"])
        body: dict[str, Any] = {
            "prompt": prompt,
            "model": m["id"],
            "num_inference_steps": rng.randint(1, MAX_VALID_STEPS),
        }
        d = m["defaults"]
        if rng.random() < 0.5:
            body["size"] = rng.choice([f"{d['width']}x{d['height']}", "auto"])
        if rng.random() < 0.3:
            body["n"] = rng.randint(1, 2)
        if rng.random() < 0.3:
            body["response_format"] = "b64_json"
        if rng.random() < 0.3:
            body["quality"] = "hd"
        loras = self.cat.loras_for(m)
        if loras and rng.random() < 0.3:
            body["loras"] = [{"name": loras[0], "scale": 0.5}]
        muts = []
        for _ in range(self.mutation_count(rng)):
            key = rng.choice(OPENAI_FIELDS + ["<delete>"])
            if key == "<delete>":
                key = rng.choice(sorted(body))
                del body[key]
                muts.append(f"delete {key}")
                continue
            pool: list[Any] = [nasty(rng)]
            if key == "size":
                pool += [
                    "32x32",
                    "0x0",
                    "99999x99999",
                    "32X32",
                    " 32 x 32 ",
                    "32x",
                    "1x1",
                    "32×32",
                    "３２x３２",
                    "8x8",
                    "16x32",
                    "-32x32",
                    "auto",
                    "256x256",
                    "1024x1024",
                ]
            elif key == "response_format":
                pool += ["url", "b64_json", "B64_JSON", None]
            elif key == "n":
                pool += [0, 1, 2, 9, 10**6]
            elif key == "loras":
                pool += [self.bad_loras(rng, m)]
            elif key == "prompt":
                pool += ["x" * 2001, "", *UNICODE, None]
            value = rng.choice(pool)
            body[key] = value
            muts.append(f"{key}={_short(value)!r}"[:120])
        return Case(
            "POST /v1/images/generations", "POST", "/v1/images/generations", json_body=body, mutations=muts
        )

    def edits_case(self, rng: random.Random) -> Case:
        m = self.pick_model(rng)
        d = m["defaults"]
        w, h = d["width"], d["height"]
        cond = m["conditioning"]
        prompt = (
            "a red dress"
            if cond["text"]
            else rng.choice([c["name"] for c in cond.get("classes") or []] or ["x"])
        )
        fields: dict[str, Any] = {
            "prompt": prompt,
            "model": m["id"],
            "num_inference_steps": str(MAX_VALID_STEPS),
        }
        if rng.random() < 0.3:
            fields["strength"] = rng.choice(["0.5", "1.0", "0.75"])
        if rng.random() < 0.3:
            fields["size"] = rng.choice([f"{w}x{h}", "auto"])
        image = self.image(w, h, rng.choice(["RGB", "RGBA"]), seed=rng.randrange(3))
        mask = self.image(w, h, "RGBA", seed=7) if rng.random() < 0.5 else None
        muts = []
        for _ in range(self.mutation_count(rng)):
            kind = rng.randrange(6)
            if kind == 0:
                what, data = self.bad_image(rng, w, h)
                image = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
                muts.append(f"image: {what}")
            elif kind == 1:
                what, data = self.bad_image(rng, w, h)
                mask = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
                muts.append(f"mask: {what}")
            elif kind == 2:
                mask = rng.choice(
                    [self.image(w, h, "L"), self.image(w, h, "RGB"), self.image(w + 8, h, "RGBA")]
                )
                muts.append("mask: no alpha or wrong size")
            else:
                key = rng.choice(EDIT_FIELDS)
                pool: list[Any] = [nasty(rng)]
                if key == "strength":
                    pool += ["0", "1", "1.0000001", "1e-9", "nan", "inf", "-0.5", ""]
                elif key == "size":
                    pool += ["0x0", "64x64", "33x33", "8x8", "auto", "x"]
                elif key == "n":
                    pool += ["0", "9", "2"]
                value = rng.choice(pool)
                if value is None:
                    fields.pop(key, None)
                    muts.append(f"drop {key}")
                    continue
                fields[key] = value
                muts.append(f"{key}={_short(value)!r}"[:120])
        parts: list[tuple[str, str | None, str | None, bytes]] = []
        for key, value in fields.items():
            text = value if isinstance(value, str) else json.dumps(value, allow_nan=True)
            parts.append((key, None, None, text.encode("utf-8", "surrogatepass")))
        image_key = rng.choice(["image", "image", "image[]"])
        parts.append((image_key, "image.png", "image/png", image))
        if mask is not None:
            parts.append(("mask", "mask.png", "image/png", mask))
        if rng.random() < 0.3:
            muts.append(self.mutate_edit_parts(rng, parts))
        boundary = "fuzze" + str(rng.randrange(10**9))
        content, ctype = encode_multipart(parts, boundary), f"multipart/form-data; boundary={boundary}"
        if rng.random() < 0.08:
            content, ctype, what = self.break_multipart(rng, content, ctype, boundary)
            muts.append(what)
        elif rng.random() < 0.04:
            content, ctype = json.dumps(fields).encode(), "application/json"
            muts.append("edits as JSON")
        return Case(
            "POST /v1/images/edits",
            "POST",
            "/v1/images/edits",
            content=content,
            headers={"content-type": ctype},
            mutations=muts,
        )

    def mutate_edit_parts(
        self, rng: random.Random, parts: list[tuple[str, str | None, str | None, bytes]]
    ) -> str:
        kind = rng.randrange(6)
        if kind == 0:
            parts[:] = [p for p in parts if p[0] not in ("image", "image[]")]
            return "edits: no image"
        if kind == 1:
            parts.append(("image", "again.png", "image/png", self.image(32, 32)))
            return "edits: two images"
        if kind == 2:
            parts.append(("mask", "m2.png", "image/png", self.image(32, 32, "RGBA")))
            return "edits: two masks"
        if kind == 3:
            parts[:] = [
                (k, None, None, b64(v).encode()) if k in ("image", "image[]") else (k, f, c, v)
                for k, f, c, v in parts
            ]
            return "edits: image as a text field"
        if kind == 4:
            parts.append(("extra", "x.bin", "application/octet-stream", b"\0" * 10))
            return "edits: unexpected file"
        parts.append(("image", "big.png", "image/png", b"\x89PNG" + b"\0" * (self.cat.upload_limit + 10)))
        return "edits: oversized image"

    def lora_case(self, rng: random.Random) -> Case:
        kind = rng.random()
        if kind < 0.2:
            return Case("GET /v1/loras", "GET", "/v1/loras")
        if kind < 0.4:
            name = rng.choice(
                [
                    "no-such",
                    "..",
                    "%2E%2E",
                    "a%2Fb",
                    "x" * 200,
                    "%00",
                    "ü",
                    ".hidden",
                    f"fz-{rng.randrange(50)}",
                    "-x",
                    "a.safetensors",
                    "%F0%9F%98%80",
                    "con",
                    " ",
                ]
            )
            return Case("DELETE /v1/loras/{name}", "DELETE", f"/v1/loras/{name}", mutations=["delete"])
        name = f"fz-{rng.randrange(50)}"
        data = self.cat.lora_file or b""
        muts: list[str] = []
        if not data or rng.random() < 0.7:
            what, data = self.bad_adapter(rng)
            muts.append(f"file: {what}")
        if rng.random() < 0.3:
            name = rng.choice(
                [
                    "",
                    "../evil",
                    ".hidden",
                    "-x",
                    "x" * 129,
                    "a/b",
                    "stripes",
                    "a.safetensors",
                    "ü",
                    "a b",
                    "nul\u0000",
                    "CON",
                    "fz-1",
                ]
            )
            muts.append(f"name={name[:20]!r}")
        if rng.random() < 0.5:  # raw body, ?name=
            from urllib.parse import quote

            ctype = rng.choice(["application/octet-stream", "application/json", ""])
            path = f"/v1/loras?name={quote(name, safe='')}"
            if rng.random() < 0.1:
                path = "/v1/loras"
                muts.append("raw body without ?name=")
            return Case(
                "POST /v1/loras",
                "POST",
                path,
                content=data,
                headers={"content-type": ctype} if ctype else {},
                mutations=muts,
            )
        parts: list[tuple[str, str | None, str | None, bytes]] = [
            ("name", None, None, name.encode("utf-8", "surrogatepass"))
        ]
        file_key = rng.choice(["file", "file", "file", "adapter"])
        if file_key != "file":
            muts.append("file under another field name")
        parts.append((file_key, f"{name}.safetensors", "application/octet-stream", data))
        if rng.random() < 0.1:
            parts.append(("file", "second.safetensors", "application/octet-stream", data))
            muts.append("two files")
        if rng.random() < 0.1:
            parts = [p for p in parts if p[0] != "name"]
            muts.append("no name field")
        boundary = "fuzzl" + str(rng.randrange(10**9))
        return Case(
            "POST /v1/loras",
            "POST",
            "/v1/loras",
            content=encode_multipart(parts, boundary),
            headers={"content-type": f"multipart/form-data; boundary={boundary}"},
            mutations=muts,
        )

    def bad_adapter(self, rng: random.Random) -> tuple[str, bytes]:
        """Files that are not a usable safetensors adapter."""
        good = self.cat.lora_file or b""
        kind = rng.randrange(14)
        if kind >= 10:
            entry = rng.choice(
                [
                    '{"dtype": "F32", "shape": "ab", "data_offsets": [0, 4]}',
                    '{"dtype": ["F32"], "shape": [1]}',
                    '{"dtype": "F32", "shape": [2147483647, 2147483647, 2147483647], "data_offsets": [0, 4]}',
                    '{"dtype": "F32", "shape": [1.5, true], "data_offsets": [0, 4]}',
                    '{"dtype": "F32", "shape": [[1]]}',
                ]
            )
            key = rng.choice(
                ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "x.alpha", "a.alpha"]
            )
            if key.endswith(".alpha") and rng.random() < 0.5:
                entry = rng.choice(
                    [
                        '{"dtype": "F32", "shape": [], "data_offsets": ["a", null]}',
                        '{"dtype": "F32", "shape": [], "data_offsets": [0]}',
                        '{"dtype": "F32", "shape": [], "data_offsets": [-4, 1e400]}',
                        '{"dtype": "F32", "shape": [], "data_offsets": {"a": 1}}',
                    ]
                )
            header = f'{{"{key}": {entry}}}'.encode()
            return "bad header entry", struct.pack("<Q", len(header)) + header + b"\0" * 8
        if kind == 0:
            return "empty", b""
        if kind == 1:
            return "random bytes", rng.randbytes(rng.choice([7, 8, 100, 5000]))
        if kind == 2:
            return "huge header length", struct.pack("<Q", 2**62) + b"{}"
        if kind == 3:
            header = b'{"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 999999]}}'
            return "offsets past the end", struct.pack("<Q", len(header)) + header + b"\0" * 16
        if kind == 4:
            header = b'{"lora_unet_x.lora_down.weight": {"dtype": "F32", "shape": [-1, 2], '
            header += b'"data_offsets": [0, 8]}}'
            return "negative shape", struct.pack("<Q", len(header)) + header + b"\0" * 8
        if kind == 5:
            header = b'{"__metadata__": {"a": 1}, "x": 5}'
            return "malformed header", struct.pack("<Q", len(header)) + header
        if kind == 6:
            return "pickle", b"\x80\x04\x95" + b"\0" * 40
        if kind == 7:
            header = (
                b'{"unet.down.lora_A.weight": {"dtype": "F64", "shape": [4, 8], "data_offsets": [0, 256]}}'
            )
            return "keys match no layer", struct.pack("<Q", len(header)) + header + b"\0" * 256
        if kind == 8 and good:
            return "truncated adapter", good[: rng.randrange(8, max(9, len(good)))]
        header = b'{"x": {"dtype": "XX", "shape": [1], "data_offsets": [0, 1]}}\xff'
        return "bad dtype / non-utf8 header", struct.pack("<Q", len(header)) + header + b"\0"

    def raw_case(self, rng: random.Random) -> Case:
        """Malformed JSON, wrong content types and odd bodies on the JSON endpoints."""
        path = rng.choice(["/generate", "/v1/jobs", "/v1/images/generations"])
        m = self.pick_model(rng)
        good = json.dumps(
            self.valid_generate(rng, m) if path != "/v1/images/generations" else {"prompt": "x"}
        )
        kind = rng.randrange(16)
        ctype = "application/json"
        if kind == 0:
            content, what = good[: rng.randrange(len(good))].encode(), "truncated JSON"
        elif kind == 1:
            content, what = good.replace("}", ",}").encode(), "trailing comma"
        elif kind == 2:
            content, what = b"\xff\xfe" + good.encode("utf-16-le"), "UTF-16 body"
        elif kind == 3:
            content, what = b"\xef\xbb\xbf" + good.encode(), "UTF-8 BOM"
        elif kind == 4:
            content, what = rng.choice([b"[]", b'"x"', b"1", b"null", b"true", b"", b" "]), "not an object"
        elif kind == 5:
            content, what = ("[" * rng.choice([33, 1000, 100_000]) + "]" * 3).encode(), "deep brackets"
        elif kind == 6:
            content, what = (
                ('{"seed": ' + "9" * rng.choice([4301, 100_000]) + "}").encode(),
                "huge integer literal",
            )
        elif kind == 7:
            content, what = (
                b'{"prompt": "\\ud800\\udc00\\ud800", "model": "' + m["id"].encode() + b'"}',
                "surrogates",
            )
        elif kind == 8:
            content, what = b'{"prompt": "\xff\xfe"}', "invalid UTF-8"
        elif kind == 9:
            content, what = good.encode(), "JSON as text/plain"
            ctype = rng.choice(
                ["text/plain", "application/x-www-form-urlencoded", "", "application/xml", "image/png"]
            )
        elif kind == 10:
            content, what = b"prompt=a&model=" + m["id"].encode(), "form-urlencoded"
            ctype = "application/x-www-form-urlencoded"
        elif kind == 11:
            content, what = ('{"a": 1, ' * 3 + '"seed": 1' + "}" * 3).encode(), "duplicate / nested keys"
        elif kind == 12:
            content, what = (
                json.dumps({"prompt": "x", **{f"k{i}": i for i in range(5000)}}).encode(),
                "5000 keys",
            )
        elif kind == 13:
            n = rng.choice([64 * 1024 + 10, 9_000_000])
            content, what = json.dumps({"prompt": "x" * n}).encode(), f"{n}-char body"
        elif kind == 14:
            content, what = b'{"seed": 1, "seed": -5, "model": "' + m["id"].encode() + b'"}', "duplicate key"
        else:
            content, what = (
                b'{"guidance_scale": NaN, "strength": Infinity, "seed": -Infinity}',
                "NaN literals",
            )
        headers = {"content-type": ctype} if ctype else {}
        return Case(f"POST {path}", "POST", path, content=content, headers=headers, mutations=[what])

    def misc_case(self, rng: random.Random) -> Case:
        """Catalogue, health, jobs by id, docs assets, unknown paths and methods."""
        choices = [
            ("GET /v1/models", "GET", "/v1/models"),
            ("GET /v1/samplers", "GET", "/v1/samplers"),
            ("GET /health/live", "GET", "/health/live"),
            ("GET /health/ready", "GET", "/health/ready"),
            ("GET /metrics", "GET", "/metrics"),
        ]
        k = rng.randrange(10)
        if k < 2:
            endpoint, method, path = rng.choice(choices)
            return Case(endpoint, method, path)
        job_id = rng.choice(["nope", "0" * 32, "..", "%00", "x" * 500, "ü", "%2F", "1"])
        if k < 5:
            suffix, endpoint, method = rng.choice(
                [
                    ("", "GET /v1/jobs/{id}", "GET"),
                    ("/cancel", "POST /v1/jobs/{id}/cancel", "POST"),
                    ("/events", "GET /v1/jobs/{id}/events", "GET"),
                ]
            )
            return Case(endpoint, method, f"/v1/jobs/{job_id}{suffix}", mutations=["unknown job"])
        if k < 7:
            name = rng.choice(["swagger-ui.css", "../routes.py", "..%2Froutes.py", "nope", "%00", "LICENSE"])
            base = rng.choice(["/docs/static/", "/playground/static/"])
            return Case(f"GET {base}{{name}}", "GET", base + name, mutations=["asset name"])
        method, path = rng.choice(
            [
                ("GET", "/generate"),
                ("PUT", "/v1/loras"),
                ("PATCH", "/v1/jobs"),
                ("GET", "/nope"),
                ("DELETE", "/generate"),
                ("GET", "/v1/images/edits"),
                ("OPTIONS", "/generate"),
                ("GET", "/v1/loras/stripes"),
                ("POST", "/health/ready"),
            ]
        )
        return Case("other (method/path)", method, path, mutations=["method or path"])


def encode_multipart(parts: list[tuple[str, str | None, str | None, bytes]], boundary: str) -> bytes:
    """multipart/form-data bytes: (name, filename or None, content type or None, data) per part."""
    out = bytearray()
    for name, filename, ctype, data in parts:
        out += f"--{boundary}\r\n".encode()
        disp = f'Content-Disposition: form-data; name="{name}"'
        if filename is not None:
            disp += f'; filename="{filename}"'
        out += disp.encode("utf-8", "surrogatepass") + b"\r\n"
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)


# -- checking responses -----------------------------------------------------------------------------------

LEAK_RE = re.compile(r"Traceback \(most recent|File \"[^\"]+\.py\"|/[\w.\-/]+\.py\b|site-packages")
TEXT_OK = (
    "GET /metrics",
    "GET /docs/static/{name}",
    "GET /playground/static/{name}",
    "GET /v1/jobs/{id}/events",
)


def _png_ok(data: bytes) -> str | None:
    """None when ``data`` decodes as a PNG image, else why not."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "PNG":
                return f"not a PNG ({img.format})"
            img.load()
    except Exception as e:  # noqa: BLE001 - any failure is the finding
        return f"PNG does not decode: {type(e).__name__}: {e}"
    return None


def check_response(
    case: Case, status: int, headers: Any, body: bytes, endpoint: str | None = None
) -> list[str]:
    """What is wrong with this response (empty: nothing); ``endpoint``: a follow-up's route."""
    problems = []
    endpoint = endpoint or case.endpoint
    text = body[:200_000].decode("utf-8", "replace")
    if status >= 500:
        problems.append(f"5xx: {status}")
    sent = case.path + (case.body_bytes() or b"")[:200_000].decode("utf-8", "replace")
    if any(m.group() not in sent for m in LEAK_RE.finditer(text)):  # an echo of the request's own text is not
        problems.append("traceback or source path in the response")
    ctype = headers.get("content-type", "")
    if status == 200 and ctype.startswith("image/png"):
        why = _png_ok(body)
        if why:
            problems.append(why)
        return problems
    if (endpoint in TEXT_OK and status < 400) or 300 <= status < 400:  # redirects (e.g. a trailing slash)
        return problems
    try:
        data = json.loads(body)
    except ValueError:
        problems.append(f"not JSON ({ctype or 'no content type'}): {text[:200]!r}")
        return problems
    if status >= 400:
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("message"), str)
            or not data["message"].strip()
        ):
            problems.append(f"error without a message: {text[:300]!r}")
        elif status == 422:
            detail = data.get("detail")
            if not isinstance(detail, list) or not detail:
                problems.append(f"422 without detail entries: {text[:300]!r}")
            elif not all(
                isinstance(e, dict) and e.get("loc") and str(e.get("msg", "")).strip() for e in detail
            ):
                problems.append(f"422 detail without loc/msg: {text[:300]!r}")
        return problems
    if status == 200 and isinstance(data, dict):
        images: list[Any] = []
        if isinstance(data.get("images"), list):
            images = data["images"]
        elif isinstance(data.get("data"), list) and data.get("created") is not None:
            images = [d.get("b64_json") for d in data["data"] if isinstance(d, dict)]
        elif isinstance(data.get("result"), dict):
            images = data["result"].get("images") or []
        for img in images:
            try:
                raw = base64.b64decode(img, validate=True)
            except (ValueError, TypeError):
                problems.append("image is not base64")
                continue
            why = _png_ok(raw)
            if why:
                problems.append(why)
    return problems


# -- running ----------------------------------------------------------------------------------------------


@dataclass
class Report:
    """Counts and findings of one run."""

    statuses: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    findings: list[dict[str, Any]] = field(default_factory=list)
    cases: int = 0
    requests: int = 0
    valid_not_2xx: list[dict[str, Any]] = field(default_factory=list)
    transport_errors: Counter[str] = field(default_factory=Counter)
    transport_examples: list[str] = field(default_factory=list)
    ready_after: int | None = None
    alive_after: bool | None = None
    seconds: float = 0.0

    def record(
        self, case: Case, status: int | str, problems: list[str], body: bytes, endpoint: str | None = None
    ) -> None:
        self.requests += 1
        self.statuses[endpoint or case.endpoint][str(status)] += 1
        if problems and len(self.findings) < 500:
            self.findings.append(
                {
                    "endpoint": endpoint or case.endpoint,
                    "status": status,
                    "problems": problems,
                    "request": case.summary(),
                    "response": body[:2000].decode("utf-8", "replace"),
                }
            )

    @property
    def n_5xx(self) -> int:
        return sum(v for c in self.statuses.values() for s, v in c.items() if s.startswith("5"))

    @property
    def n_leaks(self) -> int:
        return sum(any("traceback" in p for p in f["problems"]) for f in self.findings)

    @property
    def ok(self) -> bool:
        return not self.findings and self.ready_after == 200 and self.alive_after is not False

    def table(self) -> str:
        classes = ["2xx", "4xx", "5xx", "other"]
        rows = [f"{'endpoint':34} {'sent':>6} " + " ".join(f"{c:>6}" for c in classes) + "  statuses"]
        for ep in sorted(self.statuses):
            c = self.statuses[ep]
            by = Counter()
            for s, v in c.items():
                by[f"{s[0]}xx" if s[:1] in "245" and s.isdigit() else "other"] += v
            hist = " ".join(f"{s}:{v}" for s, v in sorted(c.items()))
            rows.append(
                f"{ep:34} {sum(c.values()):>6} " + " ".join(f"{by[k]:>6}" for k in classes) + f"  {hist}"
            )
        return "\n".join(rows)

    def as_dict(self) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "requests": self.requests,
            "seconds": round(self.seconds, 1),
            "statuses": {ep: dict(sorted(c.items())) for ep, c in sorted(self.statuses.items())},
            "n_5xx": self.n_5xx,
            "n_traceback": self.n_leaks,
            "findings": self.findings,
            "valid_not_2xx": self.valid_not_2xx[:100],
            "transport_errors": dict(self.transport_errors),
            "transport_examples": self.transport_examples,
            "ready_after": self.ready_after,
            "alive_after": self.alive_after,
            "ok": self.ok,
        }


async def read_catalog(
    client: Any, lora_file: bytes | None = None, upload_limit: int | None = None
) -> Catalog:
    """The models, samplers and adapters the server lists (the valid bodies are built from them)."""
    models = (await client.get("/v1/models")).json()["data"]
    samplers = (await client.get("/v1/samplers")).json()["data"]
    loras = (await client.get("/v1/loras")).json()["data"]
    return Catalog(models, samplers, loras, lora_file, upload_limit or UPLOAD_LIMIT_FALLBACK)


async def _send(client: Any, case: Case, report: Report, timeout: float) -> Any:
    import httpx

    try:
        r = await client.request(
            case.method, case.path, content=case.body_bytes(), headers=case.headers, timeout=timeout
        )
    except httpx.HTTPError as e:
        # the server closing a connection on a broken body is not a 5xx, but is counted and shown
        report.transport_errors[f"{case.endpoint}: {type(e).__name__}"] += 1
        report.record(case, f"ERR:{type(e).__name__}", [], b"")
        if len(report.transport_examples) < 50:
            report.transport_examples.append(case.summary(300))
        return None
    problems = check_response(case, r.status_code, r.headers, r.content)
    report.record(case, r.status_code, problems, r.content)
    # a valid body may still meet a full queue (429), or an upload a name another case took (409)
    if case.valid and not 200 <= r.status_code < 300 and r.status_code not in (409, 429, 503):
        report.valid_not_2xx.append(
            {"request": case.summary(), "status": r.status_code, "response": r.text[:500]}
        )
    return r


async def _follow_job(client: Any, case: Case, job_id: str, report: Report, timeout: float) -> None:
    """After a 202: poll the job to its end (its result's PNGs checked), cancel it, or read its events."""
    import httpx

    if case.follow == "cancel":
        r = await client.post(f"/v1/jobs/{job_id}/cancel", timeout=timeout)
        ep = "POST /v1/jobs/{id}/cancel"
        report.record(
            case,
            r.status_code,
            check_response(case, r.status_code, r.headers, r.content, ep),
            r.content,
            endpoint=ep,
        )
        return
    if case.follow == "events":
        try:
            async with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=timeout) as r:
                body = b""
                async for chunk in r.aiter_bytes():
                    body += chunk
                    if re.search(rb"event: (completed|failed|cancelled)\n", body) and body.endswith(b"\n\n"):
                        break
            problems = check_response(case, r.status_code, r.headers, body, "GET /v1/jobs/{id}/events")
            if r.status_code == 200 and b"event: failed" in body:
                problems.append("job failed")
            report.record(case, r.status_code, problems, body, endpoint="GET /v1/jobs/{id}/events")
        except httpx.HTTPError as e:
            report.transport_errors[f"events: {type(e).__name__}"] += 1
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = await client.get(f"/v1/jobs/{job_id}", timeout=timeout)
        done = r.status_code != 200 or r.json().get("status") in ("completed", "failed", "cancelled")
        if done:
            problems = check_response(case, r.status_code, r.headers, r.content, "GET /v1/jobs/{id}")
            if r.status_code == 200 and r.json().get("status") == "failed":
                err = r.json().get("error") or {}
                if (err.get("status_code") or 500) >= 500:
                    problems.append(f"job failed with {err.get('status_code')}: {err.get('message')}")
            report.record(case, r.status_code, problems, r.content, endpoint="GET /v1/jobs/{id}")
            return
        await asyncio.sleep(0.05)
    report.record(case, "timeout", ["job did not finish"], b"", endpoint="GET /v1/jobs/{id}")


async def run_fuzz(
    url: str,
    requests: int,
    seed: int,
    concurrency: int = 8,
    timeout: float = 120.0,
    lora_file: bytes | None = None,
    upload_limit: int | None = None,
    progress: bool = False,
    budget_s: float | None = None,
) -> Report:
    """Send ``requests`` cases (seeded) to the server at ``url`` with at most ``concurrency`` in flight;
    no new case after ``budget_s`` seconds (the report says how many were sent)."""
    import httpx

    report = Report()
    t0 = time.monotonic()
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        catalog = await read_catalog(client, lora_file, upload_limit)
        fuzzer = Fuzzer(catalog, seed)
        next_index = 0

        async def worker() -> None:
            nonlocal next_index
            while next_index < requests and (budget_s is None or time.monotonic() - t0 < budget_s):
                i = next_index
                next_index += 1
                case = fuzzer.case(i)
                report.cases += 1
                r = await _send(client, case, report, timeout)
                if r is not None and r.status_code == 202 and case.follow:
                    try:
                        job_id = r.json()["id"]
                    except (ValueError, KeyError, TypeError):
                        continue
                    await _follow_job(client, case, job_id, report, timeout)
                if progress and report.cases % 500 == 0:
                    rate = report.cases / (time.monotonic() - t0)
                    print(
                        f"  {report.cases}/{requests} cases, {rate:.1f}/s, 5xx {report.n_5xx}, "
                        f"findings {len(report.findings)}",
                        flush=True,
                    )

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        try:
            r = await client.get("/health/ready", timeout=30)
            report.ready_after = r.status_code
        except httpx.HTTPError:
            report.ready_after = None
    report.seconds = time.monotonic() - t0
    return report


# -- the server process -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--url", default=None, help="a running server (default: start python -m server on CPU)"
    )
    parser.add_argument("--out", default=None, help="folder for fuzz_api.json")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--budget-s", type=float, default=None, help="no new request after this many seconds")
    parser.add_argument("--weights-dir", default=None, help="default: the shipped weights/")
    parser.add_argument("--upload-limit", type=int, default=None, help="the server's max_control_image_bytes")
    args = parser.parse_args(argv)

    from bench import common
    from bench.server_load import ServerProcess

    weights = Path(args.weights_dir or common.REPO / "weights")
    lora_src = weights / "loras"
    lora_file = next(iter(sorted(lora_src.glob("*.safetensors"))), None) if lora_src.is_dir() else None
    work = Path(tempfile.mkdtemp(prefix="fuzz-api-"))
    server = None
    log_lines: list[str] = []
    try:
        url = args.url
        if url is None:
            lora_dir = work / "loras"  # uploads and deletes go to a copy, never to the shipped folder
            shutil.copytree(lora_src, lora_dir) if lora_src.is_dir() else lora_dir.mkdir()
            os.environ.update(
                {"UNET_SERVER_WEIGHTS_DIR": str(weights), "UNET_SERVER_LORA_DIR": str(lora_dir)}
            )
            server = ServerProcess("fuzz", {"device": "cpu"}, work)
            import httpx

            async def ready() -> float:
                async with httpx.AsyncClient() as c:
                    return await server.wait_ready(c, 600)

            print(f"server ready in {asyncio.run(ready()):.1f}s at {server.url}", flush=True)
            url = server.url
        report = asyncio.run(
            run_fuzz(
                url,
                args.requests,
                args.seed,
                args.concurrency,
                lora_file=lora_file.read_bytes() if lora_file else None,
                upload_limit=args.upload_limit,
                progress=True,
                budget_s=args.budget_s,
            )
        )
        if server is not None:
            report.alive_after = server.proc.poll() is None
            server.log.flush()
            log = server.log_path.read_text(errors="replace")
            log_lines = [ln for ln in log.splitlines() if "Traceback" in ln or "unhandled error" in ln]
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(report.table())
    print(
        f"\n{report.cases} cases, {report.requests} requests in {report.seconds:.0f}s; 5xx: {report.n_5xx}; "
        f"tracebacks: {report.n_leaks}; findings: {len(report.findings)}; valid bodies not 2xx: "
        f"{len(report.valid_not_2xx)}; transport errors: {sum(report.transport_errors.values())}; "
        f"/health/ready after: {report.ready_after}; process alive: {report.alive_after}; "
        f"server log tracebacks: {len(log_lines)}"
    )
    for f in report.findings[:20]:
        print(
            f"- {f['endpoint']} {f['status']} {f['problems']}\n    {f['request']}\n"
            f"    -> {f['response'][:300]}"
        )
    for v in report.valid_not_2xx[:10]:
        print(f"- valid body got {v['status']}: {v['request'][:200]}\n    -> {v['response'][:200]}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result = {"args": vars(args), **report.as_dict(), "server_log_tracebacks": log_lines[:50]}
        (out / "fuzz_api.json").write_text(json.dumps(result, indent=1, default=str))
        print(f"wrote {out / 'fuzz_api.json'}")
    return 0 if report.ok and not log_lines else 1


if __name__ == "__main__":
    sys.exit(main())
