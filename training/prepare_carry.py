"""Prepare `.carry/` (git-ignored) for the GPU run: the pruned fp16 text encoder and the Fashion-MNIST files.

    python -m training.prepare_carry

The device tool carries at most 64 MiB (working tree included); this checks the total.
"""

from __future__ import annotations

import os
from pathlib import Path

from training import data
from training.export_text_encoder import export

LIMIT_MIB = 60.0  # leaves room for the working tree under the tool's 64 MiB


def size_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    carry = Path(".carry")
    export(carry / "minilm")
    data.copy_to(carry / "fashion-mnist")
    total = size_mib(carry)
    print(
        f".carry: minilm {size_mib(carry / 'minilm'):.1f} MiB, fashion-mnist "
        f"{size_mib(carry / 'fashion-mnist'):.1f} "
        f"MiB, total {total:.1f} MiB"
    )
    if total > LIMIT_MIB:
        raise SystemExit(f".carry is {total:.1f} MiB, above {LIMIT_MIB} MiB")


if __name__ == "__main__":
    main()
