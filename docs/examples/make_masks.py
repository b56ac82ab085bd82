"""Make docs/examples/mask.png and mask_alpha.png, the masks of the README's inpainting examples.

Both mark the lower half of a 32x32 image (rows 16-31) as the region to repaint, in the two conventions the
server takes: mask.png for /generate's ``mask_image`` (grayscale, white = repaint, black = keep) and
mask_alpha.png for OpenAI's /v1/images/edits ``mask`` (RGBA, transparent = edit, opaque = keep).

    .venv/bin/python docs/examples/make_masks.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
SIZE, FIRST_ROW = 32, 16


def main() -> None:
    repaint = np.zeros((SIZE, SIZE), dtype=np.uint8)
    repaint[FIRST_ROW:] = 255  # (H, W): 255 where the image is repainted
    Image.fromarray(repaint, mode="L").save(HERE / "mask.png", optimize=True)
    rgba = np.zeros((SIZE, SIZE, 4), dtype=np.uint8)
    rgba[..., 3] = 255 - repaint  # alpha 0 (transparent) where the image is edited
    Image.fromarray(rgba, mode="RGBA").save(HERE / "mask_alpha.png", optimize=True)
    print(f"{HERE / 'mask.png'}, {HERE / 'mask_alpha.png'}: rows {FIRST_ROW}-{SIZE - 1} repainted")


if __name__ == "__main__":
    main()
