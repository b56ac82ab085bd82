"""Per-row LoRA behind a ``GraphedDenoiser``: a graph captured inside ``bank.rows()`` reads the rows that
``bank.fill`` writes before each replay, and adapters written into pages after the capture.

CPU runs the same padded path eagerly; on CUDA (``-m gpu``) the graphs are captured and replayed. Each row
is compared with the denoiser run eagerly on that row alone with that row's adapters.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from model.cuda_graphs import GraphedDenoiser  # noqa: E402
from model.lora import layer_specs, load_lora  # noqa: E402
from model.lora_batched import LoraBank  # noqa: E402
from model.pipeline import load_pipelines  # noqa: E402
from tests.model.lora_helpers import random_layers, write_kohya, write_peft  # noqa: E402
from tests.model.sd_helpers import build_tiny_sd  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("lora-graphs") / "tiny-sd")


def _check(folder: Path, device: str) -> None:
    p = load_pipelines(folder.parent, [folder.name], device=device)[folder.name]
    specs = layer_specs({"unet": p.unet})
    bank = LoraBank({"unet": p.unet}, pages=4, page_rank=4, row_pages=2, max_rows=8)
    d = folder.parent
    a = load_lora(
        write_peft(d / "a.safetensors", random_layers(specs, 4, 1, text=(), std=0.6), 4, 4.0, specs), specs
    )
    b = load_lora(
        write_kohya(d / "b.safetensors", random_layers(specs, 4, 2, text=(), std=0.6), 2.0, specs), specs
    )
    bank.write([1], a)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 8, 8, generator=g).to(device)
    sigma = torch.linspace(0.5, 8.0, 6, dtype=torch.float64).to(device)
    context = torch.randn(6, 77, 32, generator=g).to(device)
    runner = GraphedDenoiser(p.denoiser, buckets=(4, 8), device=device)
    with bank.rows():  # zero pages at capture; b is written after it
        runner.warmup(x=x[:1], sigma=sigma[:1], context=context[:1])
    bank.write([2], b)

    def check(rows: list[list[tuple[list[int], float]]]) -> None:
        index, scale = bank.row_tensors(rows, device)
        bank.fill(index, scale)
        with bank.rows():
            out = runner(x, sigma, context=context)  # (6, 4, 8, 8): one replay for all rows
        for i in range(6):
            with bank.rows(index[i : i + 1], scale[i : i + 1]):
                ref = p.denoiser(x[i : i + 1], sigma[i : i + 1], context=context[i : i + 1])
            assert (out[i : i + 1] - ref).abs().max() <= 1e-4, (i, rows[i])
        plain = p.denoiser(x, sigma, context=context)
        carries = [bool(r) and any(s for _, s in r) for r in rows]
        for i in range(6):  # an adapter with a nonzero scale changes its row, others are the base model
            changed = (out[i] - plain[i]).abs().max() > 1e-3
            assert changed == carries[i], (i, rows[i])

    check([[([1], 1.0)], [([2], 0.8)], [], [([1], 0.5), ([2], -1.0)], [([2], 0.0)], [([1], 1.0)]])
    check(
        [[], [([1], 1.0), ([2], 1.0)], [([2], 1.0)], [], [([1], -0.7)], [([2], 0.3)]]
    )  # new rows, same graph
    bank.remove()


def test_rows_through_the_padded_runner_cpu(folder: Path) -> None:
    _check(folder, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rows_through_cuda_graphs(folder: Path) -> None:
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # fp32 convolutions: rows alone and batched agree to 1e-4
    try:
        _check(folder, "cuda")
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
