"""The independent judge: a small CNN trained on the real Fashion-MNIST training split.

It sees the colour-free view of an image (`data.intensity`: max over channels, scaled so the brightest
pixel is 1,
mapped to [-1, 1]), so gray and tinted garments are judged alike. Its 128-d penultimate features are the
space of
the Fréchet distances. Trained with fixed steps (plus a time cap), seeded.

    python -m training.classifier --out runs/x/classifier [--smoke]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from training.data import DeviceData, intensity, load_split, to_model
from training.loop import log, seed_all, write_json


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Classifier(nn.Module):
    """(B, C, 32, 32) images in [0, 1] -> logits (B, 10); `features` -> (B, 128)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.body = nn.Sequential(
            *_block(1, w),
            *_block(w, w),
            nn.MaxPool2d(2),
            *_block(w, 2 * w),
            *_block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *_block(2 * w, 4 * w),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(4 * w * 16, 128),
            nn.ReLU(inplace=True),
        )
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(128, 10)
        self.width = width

    def features(self, images01: torch.Tensor) -> torch.Tensor:
        return self.body(to_model(intensity(images01)))  # (B, 128)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.features(images01)))  # (B, 10)


@torch.no_grad()
def predict(
    model: Classifier, images01: torch.Tensor, batch: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels (N,), features (N, 128)) in eval mode."""
    model.eval()
    labels, feats = [], []
    for i in range(0, len(images01), batch):
        f = model.features(images01[i : i + batch].float())
        feats.append(f.float())
        labels.append(model.head(f).argmax(1))
    return torch.cat(labels), torch.cat(feats)


def save(model: Classifier, path: str | Path, info: dict) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {
        k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype).contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(sd, path / "model.safetensors")
    write_json(
        path / "config.json",
        {
            "architecture": "training.classifier.Classifier",
            "width": model.width,
            "input": "intensity (max over channels, per-image max-normalised)",
            "weights_dtype": "float16",
            **info,
        },
    )


def load(path: str | Path, device: str | torch.device = "cpu") -> Classifier:
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    model = Classifier(cfg["width"])
    sd = load_file(path / "model.safetensors")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return model.to(device).eval()


def augment(x: torch.Tensor, gen: np.random.Generator, flip: torch.Tensor) -> torch.Tensor:
    """Random horizontal flips (per image), a random shift of up to 2 px (per batch, host-drawn: no sync)."""
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dx, dy = gen.integers(-2, 3, size=2)
    return torch.roll(x, shifts=(int(dy), int(dx)), dims=(2, 3))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=60.0, help="time cap")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.batch = min(args.steps, 5), min(args.batch, 64)
    seed_all(args.seed)
    device = torch.device(args.device)
    limit = 1000 if args.smoke else None
    train = DeviceData(*load_split("train", limit=limit), device, args.seed)
    test_x, test_y = load_split("test", limit=limit)
    model = Classifier(16 if args.smoke else 32).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.15)
    gen = np.random.default_rng(args.seed)
    t0 = time.monotonic()
    step = 0
    while step < args.steps and time.monotonic() - t0 < args.seconds:
        x, y = train.batch(args.batch)
        x = augment(x, gen, train.rand(args.batch) < 0.5)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        if step % 500 == 0:
            log(f"classifier step {step} loss {loss.item():.4f}")
    seconds = time.monotonic() - t0
    xt = torch.from_numpy(test_x).to(device).unsqueeze(1).float() / 255.0
    yt = torch.from_numpy(test_y).to(device)
    pred, _ = predict(model, xt)
    acc = (pred == yt).float().mean().item()
    log(f"classifier: {step} steps in {seconds:.0f}s, test accuracy {acc:.4f}")
    save(
        model,
        args.out,
        {
            "steps": step,
            "batch": args.batch,
            "seconds": seconds,
            "seed": args.seed,
            "test_accuracy_gray": acc,
            "num_params": sum(p.numel() for p in model.parameters()),
        },
    )


if __name__ == "__main__":
    main()
