"""GPU: the SD1.5 U-Net config (random init by diffusers) loads in ours and matches diffusers in fp16.

Run on a CUDA machine: .venv/bin/python -m pytest -m gpu -s -q tests/model/test_gpu_sd15.py
"""

from __future__ import annotations

import time

import pytest
import torch

from model import load_unet
from tests.model.helpers import rel_err

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _time_ms(fn, iters: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def test_sd15_unet_fp16_matches_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    with torch.device("cuda"):  # init on the GPU: ~860M parameters
        ref32 = diffusers.UNet2DConditionModel(
            sample_size=64, cross_attention_dim=768, attention_head_dim=8
        ).eval()
    ref16 = diffusers.UNet2DConditionModel.from_config(ref32.config).to("cuda", torch.float16).eval()
    ref16.load_state_dict({k: v.half() for k, v in ref32.state_dict().items()})
    ref16.to(memory_format=torch.channels_last)
    ref16.save_pretrained(tmp_path, safe_serialization=True)

    t0 = time.perf_counter()
    ours = load_unet(tmp_path, device="cuda", dtype=torch.float16)
    load_s = time.perf_counter() - t0
    assert ours.dtype == torch.float16 and ours.device.type == "cuda"
    assert ours.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(2, 4, 64, 64, generator=g, device="cuda")
    t = torch.tensor([999.0, 10.0], device="cuda")  # one noise level per row
    ctx = torch.randn(2, 77, 768, generator=g, device="cuda")
    x16, ctx16 = x.half(), ctx.half()
    with torch.inference_mode():
        want32 = ref32(x, t, encoder_hidden_states=ctx).sample
        want = ref16(x16, t, encoder_hidden_states=ctx16).sample
        got = ours(x16, t, context=ctx16)
        ms_ours = _time_ms(lambda: ours(x16, t, context=ctx16))
        ms_ref = _time_ms(lambda: ref16(x16, t, encoder_hidden_states=ctx16))
    err, err_ours32, err_ref32 = rel_err(got, want), rel_err(got, want32), rel_err(want, want32)
    print(
        f"\n[sd15 fp16] card={torch.cuda.get_device_name()} torch={torch.__version__} "
        f"diffusers={diffusers.__version__} attention_backend={ours.attention_backend} load={load_s:.1f}s\n"
        f"  rel err ours vs diffusers fp16: {err:.2e} (limit 2e-3); vs fp32 reference: "
        f"ours {err_ours32:.2e}, diffusers {err_ref32:.2e}\n"
        f"  batch-2 forward: ours {ms_ours:.1f} ms, diffusers {ms_ref:.1f} ms"
    )
    assert torch.isfinite(got).all()
    assert err <= 2e-3
    assert err_ours32 <= 2 * err_ref32 + 1e-4  # no less accurate than diffusers' own fp16 run
