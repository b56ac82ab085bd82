"""OpenAI's /v1/images/edits through the real `openai` client against the real app (CPU): a mask whose
transparent pixels are edited (the same pixels as /generate with the equivalent white-on-black mask), the
image's own transparency without a mask, a whole-image edit (image-to-image), the 9-channel inpainting
model, and the refusals the client shows."""

from __future__ import annotations

import base64
import io
import shutil
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from tests.model.img2img_helpers import build_tiny_inpaint, make_image, make_mask
from tests.model.sd_helpers import build_tiny_sd
from tests.server.conftest import LiveServer, start_server

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("edits-weights")
    build_tiny_sd(root / "tiny-sd")
    build_tiny_inpaint(root / "tiny-inpaint")
    server = start_server(root, max_image_size=64, max_control_image_bytes=200_000, batch_buckets=[4, 8])
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", timeout=120, max_retries=0)


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def openai_mask() -> Image.Image:
    """OpenAI's convention for make_mask(): opaque black everywhere, transparent where white (= edit)."""
    alpha = 255 - np.asarray(make_mask())
    rgba = np.zeros((*alpha.shape, 4), np.uint8)
    rgba[..., 3] = alpha
    return Image.fromarray(rgba, "RGBA")


EXTRA = {"seed": 5, "num_inference_steps": 4, "sampler": "euler"}


def test_edit_with_a_mask_is_inpainting(client: openai.OpenAI, live: LiveServer) -> None:
    raw = client.images.with_raw_response.edit(
        image=("image.png", png(make_image()), "image/png"),
        mask=("mask.png", png(openai_mask()), "image/png"),
        prompt="a red bag", model="tiny-sd", n=2, size="64x64", response_format="b64_json", extra_body=EXTRA,
    )  # fmt: skip
    assert raw.headers["x-inpaint-mode"] == "latent_blend" and raw.headers["x-strength"] == "1.0"
    result = raw.parse()
    assert len(result.data) == 2 and all(d.b64_json for d in result.data)
    assert pixels(result.data[0].b64_json).shape == (64, 64, 3)
    # the same request on /generate with the white-on-black mask: the same pixels (the seed reached it)
    body = {"model": "tiny-sd", "prompt": "a red bag", "num_images": 2, **EXTRA,
            "image": base64.b64encode(png(make_image())).decode(),
            "mask_image": base64.b64encode(png(make_mask())).decode()}  # fmt: skip
    with live.client() as c:
        direct = c.post("/generate", json=body).json()
    for ours, theirs in zip(result.data, direct["images"], strict=True):
        assert np.array_equal(pixels(ours.b64_json), pixels(theirs))


def test_the_images_own_transparency_is_the_mask(client: openai.OpenAI) -> None:
    rgba = make_image().convert("RGBA")
    rgba.putalpha(openai_mask().getchannel("A"))
    with_alpha = client.images.with_raw_response.edit(
        image=("image.png", png(rgba), "image/png"), prompt="a red bag", model="tiny-sd", extra_body=EXTRA
    )
    with_mask = client.images.edit(
        image=("i.png", png(make_image()), "image/png"), mask=("m.png", png(openai_mask()), "image/png"),
        prompt="a red bag", model="tiny-sd", extra_body=EXTRA,
    )  # fmt: skip
    assert with_alpha.headers["x-inpaint-mode"] == "latent_blend"
    # the image's RGB is the same as make_image() (alpha dropped), so both edits are the same inpainting
    assert with_alpha.parse().data[0].b64_json == with_mask.data[0].b64_json


def test_an_opaque_image_without_a_mask_is_image_to_image(client: openai.OpenAI) -> None:
    raw = client.images.with_raw_response.edit(
        image=("image.png", png(make_image()), "image/png"), prompt="a red bag", model="tiny-sd",
        extra_body={**EXTRA, "strength": 0.5},
    )  # fmt: skip
    assert "x-inpaint-mode" not in raw.headers and raw.headers["x-strength"] == "0.5"
    assert len(raw.parse().data) == 1


def test_an_image_the_model_cannot_take_is_resized_to_its_default_size(client: openai.OpenAI) -> None:
    odd = make_image(60).crop((0, 0, 60, 56))  # not a multiple of 8: /generate would refuse it
    result = client.images.edit(image=("i.png", png(odd), "image/png"), prompt="a bag", model="tiny-sd",
                                extra_body=EXTRA)  # fmt: skip
    assert pixels(result.data[0].b64_json).shape == (64, 64, 3)


def test_the_inpainting_model(client: openai.OpenAI) -> None:
    raw = client.images.with_raw_response.edit(
        image=("i.png", png(make_image()), "image/png"), mask=("m.png", png(openai_mask()), "image/png"),
        prompt="a cat", model="tiny-inpaint", extra_body=EXTRA,
    )  # fmt: skip
    assert raw.headers["x-inpaint-mode"] == "inpainting_unet"


def test_refusals_name_the_field(client: openai.OpenAI) -> None:
    opaque_mask = ("mask.png", png(make_mask()), "image/png")  # grayscale: no alpha channel
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.images.edit(image=("i.png", png(make_image()), "image/png"), mask=opaque_mask, prompt="x",
                           model="tiny-sd")  # fmt: skip
    assert err.value.body["detail"][0]["loc"] == ["body", "mask"] and "alpha" in err.value.message
    small = ("mask.png", png(openai_mask().resize((32, 32))), "image/png")
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.images.edit(image=("i.png", png(make_image()), "image/png"), mask=small, prompt="x",
                           model="tiny-sd")  # fmt: skip
    assert err.value.body["detail"][0]["loc"] == ["body", "mask"] and "32x32" in err.value.message
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.images.edit(image=("i.png", png(make_image()), "image/png"), prompt="x", model="tiny-sd",
                           extra_body={"strength": 2})  # fmt: skip
    assert err.value.body["detail"][0]["loc"] == ["body", "strength"]
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.images.edit(image=("i.png", b"not an image", "image/png"), prompt="x", model="tiny-sd")
    assert err.value.body["detail"][0]["loc"] == ["body", "image"]
