"""Make docs/examples/edges.png, the control map of the README's ControlNet example.

The edge map of the first dress (class 3) in Fashion-MNIST's test split, made by the same edge detector the
ControlNet was trained on (training.data.edges): white 1-px edges on black, 32x32 grayscale.

    .venv/bin/python docs/examples/make_edges.py        # needs the dataset (Debian: dataset-fashion-mnist)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training.data import edges, load_split

DRESS = 3
OUT = Path(__file__).resolve().parent / "edges.png"


def main() -> None:
    images, labels = load_split("test")  # (N, 32, 32) uint8, zero-padded
    index = int(np.flatnonzero(labels == DRESS)[0])
    x = torch.from_numpy(images[index]).float().div(255).view(1, 1, 32, 32)  # (1, 1, H, W) in [0, 1]
    e = edges(x)[0, 0]  # (H, W) in {0, 1}
    Image.fromarray((e.numpy() * 255).astype(np.uint8), mode="L").save(OUT, optimize=True)
    print(f"{OUT}: test image {index}, {int(e.sum())} edge pixels")


if __name__ == "__main__":
    main()
