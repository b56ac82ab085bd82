"""SD ControlNets through the real server process (`python -m server`, CPU): a tiny SD folder paired with two
standalone ControlNet folders (unet_server.json "controlnets"), a StableDiffusionControlNetPipeline folder
with its own controlnet/, and a plain SD folder. Concurrent requests with and without control give the
bytes they give one at a time; the 422s name the field."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.model.sd_helpers import build_tiny_sd
from tests.server.test_sd_serving import ServerProcess

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.timeout(400)

SIZE = 64
EMBED = (4, 8, 8, 16)  # control embedder widths: pixel -> latent (factor 8)


def _b64_png(seed: int, mode: str = "RGB") -> str:
    g = np.random.default_rng(seed)
    a = ((g.random((SIZE, SIZE, 3)) > 0.7) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a, mode="RGB").convert(mode).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.model.helpers import perturb

    root = tmp_path_factory.mktemp("sd-cn-weights")
    build_tiny_sd(root / "tiny-sd")
    shutil.copytree(root / "tiny-sd", root / "plain-sd")
    base = diffusers.StableDiffusionPipeline.from_pretrained(root / "tiny-sd")
    nets = {}
    for i, name in enumerate(("cn-edges", "cn-depth")):
        net = diffusers.ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=EMBED)
        nets[name] = perturb(net, seed=21 + i)
        nets[name].save_pretrained(root / name, safe_serialization=True)
    (root / "tiny-sd" / "unet_server.json").write_text(json.dumps({"controlnets": ["cn-edges", "cn-depth"]}))
    parts = {k: v for k, v in base.components.items() if k not in ("safety_checker", "feature_extractor")}
    pipe = diffusers.StableDiffusionControlNetPipeline(
        **parts, controlnet=nets["cn-edges"], safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(root / "tiny-sd-cn", safe_serialization=True)
    shutil.rmtree(root / "tiny-sd-cn" / "tokenizer")
    shutil.copytree(root / "tiny-sd" / "tokenizer", root / "tiny-sd-cn" / "tokenizer")
    return root


@pytest.fixture(scope="module")
def server(weights: Path) -> Any:
    s = ServerProcess(weights, "tiny-sd,tiny-sd-cn,plain-sd")
    yield s
    s.stop()


def cn(name: str, seed: int, **kw: Any) -> dict[str, Any]:
    return {"name": name, "image": _b64_png(seed), **kw}


BODIES: list[dict[str, Any]] = [
    {"prompt": "a red bag", "seed": 1, "sampler": "euler", "num_inference_steps": 4},
    {"prompt": "a red bag", "seed": 1, "sampler": "euler", "num_inference_steps": 4,
     "controlnets": [cn("cn-edges", 1)]},
    {"prompt": "a blue coat", "seed": 2, "sampler": "dpmpp_2m", "num_inference_steps": 5,
     "controlnets": [cn("cn-depth", 2, scale=0.7, guidance_start=0.2, guidance_end=0.8)]},
    {"prompt": "a green shoe", "seed": 3, "sampler": "ddim", "num_inference_steps": 3, "num_images": 2,
     "controlnets": [cn("cn-edges", 3, scale=1.2), cn("cn-depth", 4, guidance_end=0.5)]},
    {"prompt": "a yellow hat", "seed": 4, "sampler": "heun", "num_inference_steps": 3, "guidance_scale": 1,
     "controlnets": [cn("cn-depth", 5)]},
    {"prompt": "a black sock", "seed": 5, "sampler": "euler_ancestral", "num_inference_steps": 4},
    {"prompt": "a grey scarf", "seed": 6, "sampler": "euler", "num_inference_steps": 4,
     "controlnets": [cn("cn-edges", 6, scale=0.0)]},
    {"prompt": "a white shirt", "seed": 7, "sampler": "dpmpp_2m", "num_inference_steps": 4,
     "negative_prompt": "red", "controlnets": [cn("cn-edges", 7, guidance_start=0.5)]},
]  # fmt: skip


async def _send(url: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        rs = await asyncio.gather(*(c.post("/generate", json={"model": "tiny-sd", **b}) for b in bodies))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    return [r.json() for r in rs]


def test_models_list_their_controlnets(server: ServerProcess) -> None:
    with server.client() as c:
        specs = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert specs["tiny-sd"]["conditioning"]["control"]["controlnets"] == ["cn-edges", "cn-depth"]
    assert specs["tiny-sd-cn"]["conditioning"]["control"]["controlnets"] == ["controlnet"]
    assert specs["plain-sd"]["conditioning"]["control"] is None


def test_concurrent_requests_with_and_without_control_match_one_at_a_time(server: ServerProcess) -> None:
    together = asyncio.run(_send(server.url, BODIES))
    with server.client() as c:
        metrics = c.get("/metrics").text
    alone = [asyncio.run(_send(server.url, [b]))[0] for b in BODIES]
    for a, b, body in zip(together, alone, BODIES, strict=True):
        assert a["images"] == b["images"], f"batched result differs for {body}"
    # the passes were shared: some forward pass carried more rows than any one request has (4)
    rows = [line for line in metrics.splitlines() if line.startswith("unet_server_rows_per_forward_sum")]
    count = [line for line in metrics.splitlines() if line.startswith("unet_server_rows_per_forward_count")]
    assert rows and count and float(rows[0].split()[-1]) / float(count[0].split()[-1]) > 4
    # control mattered (same prompt and seed, with and without cn-edges); scale 0 is no control at all
    assert together[0]["images"] != together[1]["images"]
    plain6 = asyncio.run(_send(server.url, [{k: v for k, v in BODIES[6].items() if k != "controlnets"}]))[0]
    assert plain6["images"] == together[6]["images"]


def test_control_image_shorthand_and_multipart(server: ServerProcess) -> None:
    """On a model with one ControlNet, control_image + control_scale is one controlnets entry."""
    image = _b64_png(9)
    base = {"model": "tiny-sd-cn", "prompt": "a red bag", "seed": 3, "num_inference_steps": 3}
    with server.client() as c:
        a = c.post("/generate", json={**base, "control_image": image, "control_scale": 0.8})
        b = c.post("/generate", json={**base, "controlnets": [{"image": image, "scale": 0.8}]})
        form = {k: str(v) for k, v in base.items()}
        png = ("c.png", base64.b64decode(image), "image/png")
        m = c.post("/generate", data=form | {"control_scale": "0.8"}, files={"control_image": png})
        entries = json.dumps([{"image": image, "scale": 0.8}])  # multipart: controlnets as a JSON field
        m2 = c.post("/generate", data=form, files={"controlnets": (None, entries)})
    for r in (a, b, m, m2):
        assert r.status_code == 200, r.text
    assert a.json()["images"] == b.json()["images"] == m.json()["images"] == m2.json()["images"]


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"model": "plain-sd", "control_image": "x"}, "control_image", "has no ControlNet"),
        ({"model": "plain-sd", "controlnets": [{"image": "x"}]}, "controlnets", "no Stable Diffusion"),
        ({"model": "tiny-sd", "control_image": "x"}, "control_image", "several ControlNets"),
        ({"model": "tiny-sd", "controlnets": [{"image": "x"}]}, "controlnets[0].name", "several ControlNets"),
        ({"model": "tiny-sd", "controlnets": [{"name": "canny", "image": "x"}]}, "[0].name", "unknown"),
        ({"model": "tiny-sd", "controlnets": [{"name": "cn-edges", "image": "!!"}]}, "controlnets[0].image",
         "base64"),
        ({"model": "tiny-sd", "controlnets": [cn("cn-edges", 1, guidance_start=0.6, guidance_end=0.4)]},
         "controlnets[0].guidance_end", "greater"),
        ({"model": "tiny-sd", "controlnets": [cn("cn-edges", 1), cn("cn-edges", 2)]}, "controlnets[1].name",
         "twice"),
        ({"model": "tiny-sd", "controlnets": [{"name": "cn-edges", "image": "x", "scale": 9}]}, "scale", "4"),
    ],
)  # fmt: skip
def test_422s_name_the_field(server: ServerProcess, body: dict[str, Any], field: str, words: str) -> None:
    with server.client() as c:
        r = c.post("/generate", json={"prompt": "a bag", **body})
    assert r.status_code == 422, r.text
    assert field in r.text and words in r.text, r.text
