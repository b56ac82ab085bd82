"""Draw docs/request-kinds.png: what each request kind produces with the shipped models (the README's curl
examples, run through the real app in-process on the CPU).

    python docs/examples/request_kinds.py            # writes docs/request-kinds.png

Rows: text-to-image, image-to-image (strength 0.6), inpainting (mask: lower half), ControlNet (edge map),
and on the class model a sneaker repainted as a sandal; inputs on the left, the result on the right. The
32x32 images are upscaled 4x (nearest) so the pixels stay visible.
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from server.app import create_app
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"
SCALE = 4


def _image(r) -> Image.Image:
    assert r.status_code == 200, r.text
    return Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def main() -> None:
    settings = Settings(weights_dir=ROOT / "weights", device="cpu", engine_mode="thread")
    with TestClient(create_app(settings)) as c:
        deadline = time.monotonic() + 1200
        while c.get("/health/ready").status_code != 200:  # the models load in the background
            assert time.monotonic() < deadline, c.get("/health/ready").text
            time.sleep(0.2)
        mask = Image.open(EXAMPLES / "mask.png")
        edges = Image.open(EXAMPLES / "edges.png")
        coat = _image(
            c.post("/generate", json={"model": "fashion-text", "prompt": "a dark blue coat", "seed": 7})
        )
        files = {"image": ("coat.png", _png(coat), "image/png")}
        red = _image(
            c.post(
                "/generate",
                data={"model": "fashion-text", "prompt": "a red coat", "strength": "0.6", "seed": "1"},
                files=files,
            )
        )
        hem = _image(
            c.post(
                "/generate",
                data={"model": "fashion-text", "prompt": "a coat with a yellow hem", "seed": "2"},
                files={**files, "mask_image": ("mask.png", _png(mask), "image/png")},
            )
        )
        dress = _image(
            c.post(
                "/generate",
                data={"model": "fashion-text-edges", "prompt": "a yellow dress", "seed": "5"},
                files={"control_image": ("edges.png", _png(edges), "image/png")},
            )
        )
        sneaker = _image(
            c.post("/generate", json={"model": "fashion-class", "class_label": "Sneaker", "seed": 1234})
        )
        sandal = _image(
            c.post(
                "/generate",
                data={"model": "fashion-class", "class_label": "Sandal", "seed": "3"},
                files={
                    "image": ("s.png", _png(sneaker), "image/png"),
                    "mask_image": ("mask.png", _png(mask), "image/png"),
                },
            )
        )
    rows = [
        ("text-to-image: 'a dark blue coat'", [], coat),
        ("image-to-image: 'a red coat', strength 0.6", [coat], red),
        ("inpainting: 'a coat with a yellow hem'", [coat, mask], hem),
        ("ControlNet: 'a yellow dress'", [edges], dress),
        ("inpainting, class model: Sneaker -> Sandal", [sneaker, mask], sandal),
    ]
    side, pad, label_w = 32 * SCALE, 8, 300
    sheet = Image.new("RGB", (label_w + 3 * (side + pad) + pad, len(rows) * (side + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, inputs, result) in enumerate(rows):
        y = pad + i * (side + pad)
        draw.text((pad, y + side // 2 - 6), label, fill="black")
        for j, img in enumerate([*inputs, None][:2] if inputs else []):
            if img is not None:
                x0 = label_w + j * (side + pad)
                sheet.paste(img.convert("RGB").resize((side, side), Image.NEAREST), (x0, y))
                draw.rectangle((x0 - 1, y - 1, x0 + side, y + side), outline="gray")  # white masks show
        x = label_w + 2 * (side + pad)
        draw.text((x - 14, y + side // 2 - 6), "->", fill="black")
        sheet.paste(result.resize((side, side), Image.NEAREST), (x + pad, y))
    out = ROOT / "docs" / "request-kinds.png"
    sheet.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
