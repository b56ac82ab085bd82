"""``vae_dtype`` (UNET_SERVER_VAE_DTYPE, --vae-dtype): the dtype latent pipelines load their VAE in, and
``vae_groupnorm`` (UNET_SERVER_VAE_GROUPNORM): the VAE's GroupNorm+SiLU as Triton kernels or torch ops.

"auto" keeps the force_upcast rule; "bfloat16" decodes a few pixel levels away from fp32 and never
overflows where fp16 does; an fp16 overflow (NaN) still fails its request with a 500, not a black PNG.
The Triton GroupNorm (run in Triton's interpreter here: tests/conftest.py sets TRITON_INTERPRET=1 without a
GPU) serves the fp32 decode's images within a pixel level.
Tiny SD pipeline (diffusers-written, random weights) served by the real app on the CPU.
"""

from __future__ import annotations

import base64
import io
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from model.pipeline import load_pipelines
from server.loading import resolve_vae_dtype, use_vae_groupnorm
from server.settings import Settings
from tests.model.sd_helpers import build_tiny_sd
from tests.server.conftest import LiveServer, start_server

pytestmark = pytest.mark.timeout(180)

MODELS = ["tiny-sd", "tiny-sd-hot"]
BODY = {"prompt": "a red bag", "seed": 3, "num_inference_steps": 3}


def _init_image(side: int = 64) -> str:
    """A side² RGB PNG (base64) for image-to-image: the VAE encodes it too."""
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


IMG2IMG = {**BODY, "image": _init_image(), "strength": 0.6}
# Mean |bf16 - fp32| over the uint8 pixels of the served 64² images (torch 2.13 CPU): measured 0.35 levels
# in 255 (tiny-sd) and 0.27 (tiny-sd-hot), largest single difference 5; the bound leaves ~3x margin.
MEAN_LEVELS_BOUND = 1.0
# Image-to-image (strength 0.6; the init image is encoded in bf16 too): measured 0.54 levels (max 7).
IMG2IMG_MEAN_LEVELS_BOUND = 2.0
# fp16 VAE (rounding only, no overflow) on tiny-sd: measured 0.04 levels (max 1).
FP16_MEAN_LEVELS_BOUND = 0.5


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sd, and tiny-sd-hot: the same folder with the VAE decoder's conv_in scaled by 1e4, so its
    activations (~1e5) overflow fp16 (max 65504) while the group norm after it keeps fp32/bf16 images
    finite: the fp16 overflow of a real SD VAE in miniature."""
    root = tmp_path_factory.mktemp("vae-dtype")
    build_tiny_sd(root / "tiny-sd")
    shutil.copytree(root / "tiny-sd", root / "tiny-sd-hot")
    path = root / "tiny-sd-hot" / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    for k in ("decoder.conv_in.weight", "decoder.conv_in.bias"):
        tensors[k] = tensors[k] * 1e4
    save_file(tensors, path)
    return root


@contextmanager
def _serve(root: Path, vae_dtype: str, vae_groupnorm: str = "auto") -> Iterator[LiveServer]:
    server = start_server(
        root, models=MODELS, vae_dtype=vae_dtype, vae_groupnorm=vae_groupnorm, max_image_size=64,
        batch_buckets=[4], max_batch_rows=4,
    )  # fmt: skip
    try:
        yield server
    finally:
        server.stop()


def _generate(server: LiveServer, model: str, body: dict[str, Any] = BODY) -> tuple[int, Any]:
    """(status, uint8 image (64, 64, 3) as int32, or the error body)."""
    with server.client(timeout=120) as c:
        r = c.post("/generate", json={**body, "model": model})
    if r.status_code != 200:
        return r.status_code, r.json()
    (b64,) = r.json()["images"]
    return 200, np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))).astype(np.int32)


def _dtypes(server: LiveServer, model: str) -> tuple[set[torch.dtype], torch.dtype]:
    """(the dtypes of every VAE parameter, the U-Net's dtype) of the served pipeline."""
    p = server.core.worker.pipelines[model]
    return {t.dtype for t in p.vae.parameters()}, next(p.unet.parameters()).dtype


@pytest.fixture(scope="module")
def fp32_images(roots: Path) -> dict[str, np.ndarray]:
    """The default server ("auto": fp32 on the CPU) and its images of BODY, per model."""
    with _serve(roots, "auto") as server:
        for m in MODELS:
            assert _dtypes(server, m) == ({torch.float32}, torch.float32)
        out = {}
        for m in MODELS:
            status, out[m] = _generate(server, m)
            assert status == 200, out[m]
            assert out[m].std() > 2  # a decoded image, not a flat one
        status, out["img2img"] = _generate(server, "tiny-sd", IMG2IMG)
        assert status == 200, out["img2img"]
    return out


def test_setting_env_flag_and_bad_values_refused() -> None:
    assert Settings().vae_dtype == "auto" and resolve_vae_dtype(Settings()) is None
    for name, dtype in [("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)]:
        assert resolve_vae_dtype(Settings(vae_dtype=name)) == dtype
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNET_SERVER_VAE_DTYPE", "bfloat16")
        assert Settings().vae_dtype == "bfloat16"
        mp.setenv("UNET_SERVER_VAE_DTYPE", "bf16")
        with pytest.raises(ValidationError, match="vae_dtype"):
            Settings()
    # `python -m server --vae-dtype half` exits at once (before loading) naming the field and the choices.
    from server.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--vae-dtype", "half", "--weights-dir", "/nonexistent"])
    message = str(exc.value.code)
    assert "invalid settings" in message and "vae_dtype" in message and "'bfloat16'" in message


@pytest.mark.parametrize(
    ("unet_dtype", "force_upcast", "setting", "expected"),
    [
        (torch.float16, True, "auto", torch.float32),  # today's rule: fp16 overflows the SD VAE
        (torch.float16, False, "auto", torch.float16),
        (torch.bfloat16, True, "auto", torch.bfloat16),
        (torch.float32, True, "auto", torch.float32),
        (torch.float16, True, "bfloat16", torch.bfloat16),  # the setting overrides force_upcast
        (torch.float16, True, "float16", torch.float16),
        (torch.float32, True, "float16", torch.float16),
    ],
)
def test_loader_dtype_rule(
    roots: Path,
    tmp_path: Path,
    unet_dtype: torch.dtype,
    force_upcast: bool,
    setting: str,
    expected: torch.dtype,
) -> None:
    """The loader the server calls, with the setting resolved as load_worker resolves it (loading only)."""
    root = roots
    if not force_upcast:
        root = tmp_path
        shutil.copytree(roots / "tiny-sd", root / "tiny-sd")
        cfg = root / "tiny-sd" / "vae" / "config.json"
        cfg.write_text(cfg.read_text().replace('"force_upcast": true', '"force_upcast": false'))
        assert '"force_upcast": false' in cfg.read_text()
    vae_dtype = resolve_vae_dtype(Settings(vae_dtype=setting))
    (p,) = load_pipelines(root, ["tiny-sd"], dtype=unet_dtype, vae_dtype=vae_dtype).values()
    assert p.vae is not None and {t.dtype for t in p.vae.parameters()} == {expected}
    assert next(p.unet.parameters()).dtype == unet_dtype  # the setting touches the VAE only


def test_bfloat16_vae_served_images_are_close_to_fp32(
    roots: Path, fp32_images: dict[str, np.ndarray]
) -> None:
    with _serve(roots, "bfloat16") as server:
        for m in MODELS:
            assert _dtypes(server, m) == ({torch.bfloat16}, torch.float32)
        for m in MODELS:
            status, image = _generate(server, m)
            assert status == 200, image
            diff = np.abs(image - fp32_images[m])
            # Same latents (the U-Net runs fp32 either way), decoded in bf16: other bytes, close pixels.
            assert diff.max() > 0, f"{m}: identical to fp32 (the setting was ignored?)"
            assert diff.mean() < MEAN_LEVELS_BOUND, f"{m}: mean |bf16 - fp32| {diff.mean():.3f} levels"
        # Image-to-image: the init image is encoded in bf16 too, so the latents differ a little as well.
        status, image = _generate(server, "tiny-sd", IMG2IMG)
        assert status == 200, image
        diff = np.abs(image - fp32_images["img2img"])
        assert 0 < diff.max() and diff.mean() < IMG2IMG_MEAN_LEVELS_BOUND, f"img2img: {diff.mean():.3f}"


def test_float16_vae_overflow_fails_the_request_not_a_black_png(
    roots: Path, fp32_images: dict[str, np.ndarray]
) -> None:
    with _serve(roots, "float16") as server:
        assert _dtypes(server, "tiny-sd-hot") == ({torch.float16}, torch.float32)
        status, image = _generate(server, "tiny-sd")  # no overflow: fp16 rounding only
        assert status == 200, image
        assert np.abs(image - fp32_images["tiny-sd"]).mean() < FP16_MEAN_LEVELS_BOUND
        status, body = _generate(server, "tiny-sd-hot")
        assert status == 500 and "non-finite" in body["detail"] and body["error_id"] in body["detail"]
        with server.client() as c:
            metrics = c.get("/metrics").text
        assert 'unet_server_nonfinite_outputs_total{model="tiny-sd-hot"} 1.0' in metrics


def _fused_blocks(module: torch.nn.Module) -> tuple[int, int]:
    """(resnet blocks running the fused kernels, resnet blocks) under ``module``."""
    blocks = [m for m in module.modules() if hasattr(m, "fused_norms")]
    return sum(m.fused_norms is not None for m in blocks), len(blocks)


def test_vae_groupnorm_setting_and_where_triton_cannot_run(
    roots: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Settings().vae_groupnorm == "auto"
    monkeypatch.setenv("UNET_SERVER_VAE_GROUPNORM", "triton")
    assert Settings().vae_groupnorm == "triton"
    monkeypatch.setenv("UNET_SERVER_VAE_GROUPNORM", "cuda")
    with pytest.raises(ValidationError, match="vae_groupnorm"):
        Settings()
    monkeypatch.delenv("UNET_SERVER_VAE_GROUPNORM")
    pipes = load_pipelines(roots, ["tiny-sd"], dtype=torch.float32)
    (p,) = pipes.values()
    assert p.vae is not None
    cpu = torch.device("cpu")
    # "auto" never picks the kernels off CUDA (not even under the interpreter); "torch" never does.
    assert use_vae_groupnorm(pipes, cpu, "auto") == 0 and use_vae_groupnorm(pipes, cpu, "torch") == 0
    assert _fused_blocks(p.vae)[0] == 0
    # "triton" where the kernels cannot run fails loudly instead of decoding with torch ops.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="UNET_SERVER_VAE_GROUPNORM=triton needs CUDA"):
        use_vae_groupnorm(pipes, cpu, "triton")
    assert _fused_blocks(p.vae)[0] == 0
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    total = _fused_blocks(p.vae)[1]
    assert use_vae_groupnorm(pipes, cpu, "triton") == total > 0
    assert _fused_blocks(p.vae) == (total, total)
    assert _fused_blocks(p.unet)[0] == 0  # the VAE only


def test_triton_vae_groupnorm_serves_the_torch_images(roots: Path) -> None:
    from model.fused_groupnorm import use_fused_groupnorm

    server = start_server(  # one model and 32² images: the interpreter is slow
        roots, models=["tiny-sd"], vae_groupnorm="triton", max_image_size=64, batch_buckets=[4],
        max_batch_rows=4,
    )  # fmt: skip
    small = {**BODY, "width": 32, "height": 32, "num_inference_steps": 2}
    img2img = {**small, "image": _init_image(32), "strength": 0.6}
    try:
        vae = server.core.worker.pipelines["tiny-sd"].vae
        fused, total = _fused_blocks(vae)
        assert fused == total > 0
        triton = [_generate(server, "tiny-sd", body) for body in (small, img2img)]
        use_fused_groupnorm(vae, enabled=False)  # the same server, torch's ops
        torch_ops = [_generate(server, "tiny-sd", body) for body in (small, img2img)]
    finally:
        server.stop()
    for (status, a), (status_t, b), bound in zip(triton, torch_ops, [1, 2], strict=True):
        assert status == status_t == 200, (a, b)
        # Same latents, the same fp32 decode (and encode) with the statistics in another summation order.
        diff = np.abs(a - b)
        assert a.std() > 2, "a decoded image, not a flat one"
        assert diff.max() <= bound and diff.mean() < 0.1, f"max {diff.max()}, mean {diff.mean():.3f} levels"
