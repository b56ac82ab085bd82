"""SD ControlNets against diffusers (CPU fp32, tiny random pipelines written by diffusers itself).

- ControlNetModel alone with SD's layout (3-channel control image at pixel resolution, an embedder that
  downsamples by 8): residuals within 1e-5.
- StableDiffusionControlNetPipeline with one ControlNet and with a MultiControlNetModel of two: final images
  within 1e-4 (same folder, prompts, control images, scales, guidance start/end and initial latents), through
  model.pipeline.load_pipelines, MultiControlNet, pack_controls and our sampler loop.
- Pairing: a ControlNet folder named in a base model's unet_server.json; paths leaving the weights
  directory, and a ControlNet that does not fit the U-Net, are refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from model import load_controlnet  # noqa: E402
from model.denoiser import cfg_combine  # noqa: E402
from model.pipeline import Pipeline, PipelineError, load_pipelines  # noqa: E402
from model.samplers import get_sampler  # noqa: E402
from model.sd_controlnet import ControlInput, MultiControlNet, guidance_keep, pack_controls  # noqa: E402
from tests.model.helpers import perturb, rel_err  # noqa: E402
from tests.model.sd_helpers import build_tiny_sd  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/model/conftest.py

TOL_IMAGE = 1e-4
TOL_NET = 1e-5
PROMPT = "a photo of an astronaut riding a horse on mars"
EMBED = (4, 8, 8, 16)  # conditioning_embedding_out_channels: 3 stride-2 convs, pixel -> latent (factor 8)
SIZE = 64  # pixels (latent 8 x 8)

# our sampler -> (diffusers scheduler class, config overrides, steps); see test_sd_pipeline_parity.py
SAMPLERS = {
    "euler": ("EulerDiscreteScheduler", {}, 8),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}, 10),
}


def _controlnet(unet, seed: int, order: str = "rgb"):
    torch.manual_seed(seed)
    cn = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBED)
    if order == "bgr":
        cn.register_to_config(controlnet_conditioning_channel_order="bgr")
    return perturb(cn, seed=seed)  # zero convs perturbed: the residuals matter


def _control_image(seed: int) -> Image.Image:
    """An edge-map-like RGB picture (uint8), the kind of image a ControlNet request carries."""
    g = np.random.default_rng(seed)
    a = (g.random((SIZE, SIZE, 3)) > 0.7).astype(np.uint8) * 255
    a[:, :, 1] = g.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    return Image.fromarray(a, mode="RGB")


def _as_cond(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]  # (1, 3, H, W)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """weights/: tiny-sd (plain), tiny-sd-cn (one ControlNet), tiny-sd-multi (MultiControlNetModel of two),
    cn-a (a standalone ControlNet folder named by tiny-sd's unet_server.json)."""
    root = tmp_path_factory.mktemp("weights")
    build_tiny_sd(root / "tiny-sd")
    base = diffusers.StableDiffusionPipeline.from_pretrained(root / "tiny-sd")
    cn_a, cn_b = _controlnet(base.unet, 11), _controlnet(base.unet, 12, order="bgr")
    parts = {k: v for k, v in base.components.items() if k not in ("safety_checker", "feature_extractor")}
    for name, cn in [("tiny-sd-cn", cn_a), ("tiny-sd-multi", diffusers.MultiControlNetModel([cn_a, cn_b]))]:
        pipe = diffusers.StableDiffusionControlNetPipeline(
            **parts, controlnet=cn, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
        pipe.save_pretrained(root / name, safe_serialization=True)
        shutil.rmtree(root / name / "tokenizer")
        shutil.copytree(root / "tiny-sd" / "tokenizer", root / name / "tokenizer")  # vocab.json + merges
    cn_a.save_pretrained(root / "cn-a", safe_serialization=True)
    (root / "tiny-sd" / "unet_server.json").write_text(json.dumps({"controlnets": ["cn-a"]}))
    return root


@pytest.fixture(scope="module")
def ours(weights) -> dict[str, Pipeline]:
    return load_pipelines(weights, ["tiny-sd", "tiny-sd-cn", "tiny-sd-multi"])


def test_controlnet_alone_matches_diffusers(weights, tmp_path) -> None:
    """ControlNetModel with SD's control path (3-channel image at 8x the latent) in both channel orders."""
    for name in ("controlnet", "controlnet_1"):  # rgb, bgr
        ref = diffusers.ControlNetModel.from_pretrained(weights / "tiny-sd-multi" / name).eval()
        cn = load_controlnet(weights / "tiny-sd-multi" / name)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(3, 4, 8, 8, generator=g)
        t = torch.tensor([1.0, 400.5, 999.0])
        ctx = torch.randn(3, 77, 32, generator=g)
        cond = torch.rand(3, 3, SIZE, SIZE, generator=g)
        scale = torch.tensor([0.0, 0.6, 1.3])
        with torch.no_grad():
            down, mid = ref(x, t, ctx, cond, conditioning_scale=0.6, return_dict=False)
            res = cn(x, t, cond, context=ctx, scale=scale)
        assert len(res.down) == len(down) and res.mid.abs().max() > 0
        for a, b in zip(res.down, down, strict=True):
            assert rel_err(a[1:2], b[1:2]) <= TOL_NET  # row 1 at 0.6 as diffusers
            assert torch.equal(a[0], torch.zeros_like(a[0]))  # scale 0: exactly zero
            assert rel_err(a[2:], b[2:] * (1.3 / 0.6)) <= TOL_NET
        assert rel_err(res.mid[1:2], mid[1:2]) <= TOL_NET


def _run_ours(
    p: Pipeline,
    sampler_name: str,
    steps: int,
    latents: torch.Tensor,
    controls: list[ControlInput],
    guidance: float = 7.5,
) -> np.ndarray:
    context = torch.cat([p.text_encoder.encode([PROMPT]), p.text_encoder.encode([""])])  # (2, 77, D)
    sampler = get_sampler(sampler_name, p.schedule.kind)
    state = sampler.init(latents, sampler.make_sigmas(p.schedule, steps))
    multi = p.controlnet
    assert isinstance(multi, MultiControlNet)
    denoiser = multi.denoiser_for(p.denoiser, [c.name for c in controls])
    sub = denoiser.controlnet
    with torch.no_grad():
        while not sampler.done(state):
            x, sigma = sampler.next_input(state)
            rows = [(controls, state.i, steps)] * 2  # the cond row and the uncond row
            cond, scale = pack_controls(sub, rows, (SIZE, SIZE))  # (2, ΣC, H, W), (2, K)
            sig = torch.as_tensor([float(sigma)] * 2, dtype=torch.float64)
            x0 = denoiser(torch.cat([x, x]), sig, context=context, control_cond=cond, control_scale=scale)
            sampler.advance(state, cfg_combine(x0[:1], x0[1:], guidance))
        images = p.vae.decode(sampler.result(state))  # (1, 3, 64, 64) in [-1, 1]
    return (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _run_theirs(
    folder: Path,
    sampler_name: str,
    steps: int,
    latents: torch.Tensor,
    images,
    scales,
    starts,
    ends,
    guidance: float = 7.5,
) -> np.ndarray:
    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False
    )
    cls_name, overrides, _ = SAMPLERS[sampler_name]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **overrides)
    single = len(images) == 1
    out = pipe(
        PROMPT,
        image=images[0] if single else images,
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=latents.clone(),
        controlnet_conditioning_scale=scales[0] if single else scales,
        control_guidance_start=starts[0] if single else starts,
        control_guidance_end=ends[0] if single else ends,
        output_type="np",
    )
    return out.images


def _check(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape == (1, SIZE, SIZE, 3)
    assert ((want > 0.001) & (want < 0.999)).mean() > 0.5 and want.std() > 0.02  # not clamped flat
    assert np.abs(got - want).max() <= TOL_IMAGE


@pytest.mark.parametrize(
    ("sampler_name", "start", "end"),
    [("euler", 0.0, 1.0), ("dpmpp_2m", 0.2, 0.7)],
    ids=["euler", "dpm-window"],
)
def test_one_controlnet_matches_diffusers(weights, ours, sampler_name, start, end) -> None:
    p = ours["tiny-sd-cn"]
    assert p.control and p.control["controlnets"] == ["controlnet"]
    steps = SAMPLERS[sampler_name][2]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(42))
    img = _control_image(1)
    controls = [ControlInput("controlnet", _as_cond(img), 0.8, start, end)]
    got = _run_ours(p, sampler_name, steps, latents, controls)
    want = _run_theirs(weights / "tiny-sd-cn", sampler_name, steps, latents, [img], [0.8], [start], [end])
    _check(got, want)
    # the control mattered: scale 0 gives another image
    off = _run_ours(p, sampler_name, steps, latents, [ControlInput("controlnet", _as_cond(img), 0.0)])
    assert np.abs(off - got).max() > 1e-2


def test_two_controlnets_match_diffusers_multicontrolnet(weights, ours) -> None:
    p = ours["tiny-sd-multi"]
    assert p.control and p.control["controlnets"] == ["controlnet", "controlnet_1"]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    imgs = [_control_image(2), _control_image(3)]
    scales, starts, ends = [0.9, 0.6], [0.0, 0.25], [0.75, 1.0]
    controls = [
        ControlInput(n, _as_cond(i), s, a, b)
        for n, i, s, a, b in zip(["controlnet", "controlnet_1"], imgs, scales, starts, ends, strict=True)
    ]
    got = _run_ours(p, "euler", 8, latents, controls)
    want = _run_theirs(weights / "tiny-sd-multi", "euler", 8, latents, imgs, scales, starts, ends)
    _check(got, want)
    one = _run_ours(p, "euler", 8, latents, controls[:1])  # the second net mattered
    assert np.abs(one - got).max() > 1e-2


def test_guidance_keep_is_diffusers_rule() -> None:
    steps = 10
    for start, end in [(0.0, 1.0), (0.2, 0.7), (0.35, 0.36), (0.5, 0.5)]:
        want = [1.0 - float(i / steps < start or (i + 1) / steps > end) for i in range(steps)]
        assert [float(guidance_keep(i, steps, start, end)) for i in range(steps)] == want


def test_rows_without_control_get_zero_residuals_and_unchanged_output(ours) -> None:
    """In one packed batch a row without control gives bitwise its output without any ControlNet."""
    p = ours["tiny-sd-multi"]
    multi = p.controlnet
    assert isinstance(multi, MultiControlNet)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 4, 8, 8, generator=g)
    sigma = torch.tensor([14.0, 3.0, 0.5, 3.0], dtype=torch.float64)
    ctx = torch.randn(4, 77, 32, generator=g)
    c = [
        ControlInput("controlnet", torch.rand(1, 3, SIZE, SIZE, generator=g), 1.0),
        ControlInput("controlnet_1", torch.rand(1, 3, SIZE, SIZE, generator=g), 0.5),
    ]
    rows = [(c, 0, 4), ([], 0, 4), (c[1:], 1, 4), (c[:1], 3, 4)]
    cond, scale = pack_controls(multi, rows, (SIZE, SIZE))
    assert scale.tolist() == [[1.0, 0.5], [0.0, 0.0], [0.0, 0.5], [1.0, 0.0]]
    with torch.no_grad():
        res = multi(x, p.denoiser.timesteps(sigma), cond, context=ctx, scale=scale)
        assert all(torch.equal(d[1], torch.zeros_like(d[1])) for d in res.down) and not res.mid[1].any()
        both = p.denoiser(x, sigma, context=ctx, control_cond=cond, control_scale=scale)
        plain = p.denoiser(x, sigma, context=ctx)
    assert torch.equal(both[1], plain[1])
    assert (both[[0, 2, 3]] - plain[[0, 2, 3]]).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_controlnet_named_in_unet_server_json(weights, ours) -> None:
    """tiny-sd pairs with cn-a (a plain ControlNetModel folder); the same weights as tiny-sd-cn's own."""
    p = ours["tiny-sd"]
    assert p.control and p.control["controlnets"] == ["cn-a"] and p.control["channels"] == 3
    own = ours["tiny-sd-cn"].controlnet
    assert isinstance(p.controlnet, MultiControlNet) and isinstance(own, MultiControlNet)
    a, b = p.controlnet.net("cn-a").state_dict(), own.net("controlnet").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pairing_is_confined_and_checked(weights, tmp_path) -> None:
    root = tmp_path / "w"
    root.mkdir()
    shutil.copytree(weights / "tiny-sd", root / "sd")
    outside = tmp_path / "outside-cn"
    shutil.copytree(weights / "cn-a", outside)
    (root / "escape").symlink_to(outside)
    (root / "sd" / "unet_server.json").write_text(json.dumps({"controlnets": ["escape"]}))
    with pytest.raises(PipelineError, match="outside the weights directory"):
        load_pipelines(root, ["sd"])
    (root / "sd" / "unet_server.json").write_text(json.dumps({"controlnets": ["../outside-cn"]}))
    with pytest.raises(PipelineError, match="not a folder name"):
        load_pipelines(root, ["sd"])
    # a ControlNet made for another U-Net (other widths) is refused, naming the field
    torch.manual_seed(0)
    other = diffusers.ControlNetModel(
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        layers_per_block=1, norm_num_groups=4, attention_head_dim=2, cross_attention_dim=32,
        conditioning_embedding_out_channels=EMBED,
    )  # fmt: skip
    other.save_pretrained(root / "other", safe_serialization=True)
    (root / "sd" / "unet_server.json").write_text(json.dumps({"controlnets": ["other"]}))
    with pytest.raises(PipelineError, match="block_out_channels"):
        load_pipelines(root, ["sd"])


def _graph_inputs(p: Pipeline, rows: int, device: str):
    multi = p.controlnet
    assert isinstance(multi, MultiControlNet)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 4, 8, 8, generator=g)
    sigma = torch.linspace(0.3, 14.0, rows, dtype=torch.float64)
    ctx = torch.randn(rows, 77, 32, generator=g)
    c = [
        ControlInput("controlnet", torch.rand(1, 3, SIZE, SIZE, generator=g), 0.9),
        ControlInput("controlnet_1", torch.rand(1, 3, SIZE, SIZE, generator=g), 0.4, 0.5),
    ]
    rows_spec = [(c[: r % 3], r % 4, 4) for r in range(rows)]  # none, one or two nets; steps 0..3 of 4
    cond, scale = pack_controls(multi, rows_spec, (SIZE, SIZE))
    return [t.to(device) for t in (x, sigma, ctx, cond, scale)]


def test_graphed_denoiser_pads_multicontrolnet_rows(ours) -> None:
    """The worker's path: GraphedDenoiser (eager on CPU) pads rows into a bucket; same x0 as a direct call."""
    from model.cuda_graphs import GraphedDenoiser

    p = ours["tiny-sd-multi"]
    x, sigma, ctx, cond, scale = _graph_inputs(p, 3, "cpu")
    runner = GraphedDenoiser(p.denoiser, buckets=(4,), use_graphs=False)
    with torch.no_grad():
        got = runner(x, sigma, context=ctx, control_cond=cond, control_scale=scale)
        want = p.denoiser(x, sigma, context=ctx, control_cond=cond, control_scale=scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    mask = torch.tensor([True, True, False])  # a control_mask folds into every net's scale of its row
    with torch.no_grad():
        masked = runner(x, sigma, context=ctx, control_cond=cond, control_scale=scale, control_mask=mask)
        off = scale.clone()
        off[2] = 0  # row 2 uses both nets
        want = p.denoiser(x, sigma, context=ctx, control_cond=cond, control_scale=off)
    torch.testing.assert_close(masked, want, rtol=1e-5, atol=1e-5)
    assert (masked[2] - got[2]).abs().max() > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_with_multicontrolnet_matches_eager(weights) -> None:
    from model.cuda_graphs import GraphedDenoiser

    p = load_pipelines(weights, ["tiny-sd-multi"], device="cuda", dtype=torch.float16)["tiny-sd-multi"]
    x, sigma, ctx, cond, scale = _graph_inputs(p, 8, "cuda")
    runner = GraphedDenoiser(p.denoiser, buckets=(2, 8))
    runner.warmup(x=x, sigma=sigma, context=ctx, control_cond=cond, control_scale=scale)
    assert runner.captured() == [2, 8]
    for rows in (1, 5, 8):
        xb, sb, cb, kb, scb = _graph_inputs(p, rows, "cuda")
        with torch.no_grad():
            out = runner(xb, sb, context=cb, control_cond=kb, control_scale=scb)
            ref = p.denoiser(xb, sb, context=cb, control_cond=kb, control_scale=scb)
        assert torch.isfinite(out).all() and (out - ref).norm() / ref.norm() < 2e-3


# -- SDXL ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xl_folder(tmp_path_factory) -> Path:
    """A tiny StableDiffusionXLControlNetPipeline folder (the SDXL test pipeline plus a ControlNet whose
    encoder takes SDXL's added conditioning)."""
    from tests.model.sdxl_helpers import _save, build_tiny_sdxl

    root = tmp_path_factory.mktemp("xl")
    build_tiny_sdxl(root / "tiny-sdxl")
    base = diffusers.StableDiffusionXLPipeline.from_pretrained(root / "tiny-sdxl")
    cn = _controlnet(base.unet, 31)
    assert cn.config.addition_embed_type == "text_time"
    parts = {k: v for k, v in base.components.items() if k not in ("image_encoder", "feature_extractor")}
    pipe = diffusers.StableDiffusionXLControlNetPipeline(
        **parts, controlnet=cn, force_zeros_for_empty_prompt=True
    )
    return _save(pipe, root / "tiny-sdxl-cn")


@pytest.mark.parametrize(("start", "end"), [(0.0, 1.0), (0.3, 0.8)])
def test_sdxl_controlnet_matches_diffusers(xl_folder, start, end) -> None:
    from model.sdxl import conditioning_rows, time_ids, zero_uncond

    p = load_pipelines(xl_folder.parent, [xl_folder.name])[xl_folder.name]
    assert p.control and p.control["controlnets"] == ["controlnet"]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    img = _control_image(8)
    controls = [ControlInput("controlnet", _as_cond(img), 0.7, start, end)]
    enc = p.text_encoder.encode_with_info([PROMPT, ""])
    context, added = conditioning_rows(
        (enc.states[0], enc.pooled[0]), (enc.states[1], enc.pooled[1]), time_ids(SIZE, SIZE), 1,
        zeros=zero_uncond(None, p.force_zeros_for_empty_prompt),
    )  # fmt: skip
    sampler = get_sampler("euler", p.schedule.kind)
    state = sampler.init(latents, sampler.make_sigmas(p.schedule, 6))
    multi = p.controlnet
    assert isinstance(multi, MultiControlNet)
    with torch.no_grad():
        while not sampler.done(state):
            x, sigma = sampler.next_input(state)
            cond, scale = pack_controls(multi, [(controls, state.i, 6)] * 2, (SIZE, SIZE))
            sig = torch.as_tensor([float(sigma)] * 2, dtype=torch.float64)
            x0 = p.denoiser(
                torch.cat([x, x]),
                sig,
                context=context,
                control_cond=cond,
                control_scale=scale,
                added_cond=added,
            )
            sampler.advance(state, cfg_combine(x0[:1], x0[1:], 5.0))
        got = (p.vae.decode(sampler.result(state)) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        theirs = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(xl_folder)
        assert type(theirs.scheduler).__name__ == "EulerDiscreteScheduler"  # the folder's, as p.defaults
        want = theirs(
            PROMPT, image=img, height=SIZE, width=SIZE, num_inference_steps=6, guidance_scale=5.0,
            latents=latents.clone(), controlnet_conditioning_scale=0.7, control_guidance_start=start,
            control_guidance_end=end, output_type="np",
        ).images  # fmt: skip
    _check(got, want)


def test_controlnet_pairs_with_a_9_channel_inpainting_unet(weights, tmp_path) -> None:
    """The ControlNet sees the 4-channel latents; the inpainting U-Net's extra mask/masked-image channels go
    to the U-Net only (as diffusers' StableDiffusionControlNetInpaintPipeline)."""
    from tests.model.img2img_helpers import build_tiny_inpaint

    build_tiny_inpaint(tmp_path / "inpaint")
    shutil.copytree(weights / "cn-a", tmp_path / "cn-a")
    (tmp_path / "inpaint" / "unet_server.json").write_text(json.dumps({"controlnets": ["cn-a"]}))
    p = load_pipelines(tmp_path, ["inpaint"])["inpaint"]
    assert p.unet.config.in_channels == 9 and p.control and p.control["controlnets"] == ["cn-a"]
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    concat = torch.randn(2, 5, 8, 8, generator=g)  # mask + masked-image latent
    sigma = torch.tensor([3.0, 3.0], dtype=torch.float64)
    assert isinstance(p.controlnet, MultiControlNet)
    c = [ControlInput("cn-a", torch.rand(1, 3, SIZE, SIZE, generator=g), 1.0)]
    cond, scale = pack_controls(p.controlnet, [(c, 0, 4), ([], 0, 4)], (SIZE, SIZE))
    with torch.no_grad():
        got = p.denoiser(x, sigma, context=ctx, control_cond=cond, control_scale=scale, x_concat=concat)
        plain = p.denoiser(x, sigma, context=ctx, x_concat=concat)
    assert torch.equal(got[1], plain[1]) and (got[0] - plain[0]).abs().max() > 1e-3


# -- the server's row path (server.worker.Worker) ------------------------------------------------------


def _worker_request(p: Pipeline, img: Image.Image, seed: int, start: float, end: float, **kw):
    from server.request import ControlNetInput, ResolvedRequest

    cn = ControlNetInput("controlnet", np.asarray(img, dtype=np.float32) / 255.0, 0.7, start, end)
    return ResolvedRequest(
        model=p.name, prompt=PROMPT, negative_prompt=None, class_label=None, control=None, control_scale=1.0,
        num_inference_steps=6, sampler="euler", guidance_scale=5.0, seed=seed, num_images=1, width=SIZE,
        height=SIZE, guided=True, controlnets=(cn,), **kw,
    )  # fmt: skip


def _images(p: Pipeline, worker, state) -> np.ndarray:
    with torch.no_grad():
        x = p.vae.decode(state.sampler.result(state.states[0])).float()
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_worker_rows_match_diffusers_and_batching(weights, ours, xl_folder, kind) -> None:
    """A ControlNet request through the worker (prepare, packed steps) matches diffusers; packed with a
    request without control and one using the net in another window, its bytes do not change."""
    from model.noise import RequestNoise
    from server.worker import Worker

    if kind == "sd":
        p, folder = ours["tiny-sd-cn"], weights / "tiny-sd-cn"
        cls = diffusers.StableDiffusionControlNetPipeline
    else:
        p = load_pipelines(xl_folder.parent, [xl_folder.name])[xl_folder.name]
        folder, cls = xl_folder, diffusers.StableDiffusionXLControlNetPipeline
    img = _control_image(5)
    # buckets of 4+ rows: CPU GEMMs of 2 and 8 rows round differently even without ControlNets
    w = Worker({p.name: p}, buckets=[4, 8])
    alone = w.prepare(_worker_request(p, img, 11, 0.0, 0.8))
    while not w.step([alone])[0]:
        pass
    got = _images(p, w, alone)
    theirs = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    theirs.scheduler = diffusers.EulerDiscreteScheduler.from_config(theirs.scheduler.config)
    with torch.no_grad():
        want = theirs(
            PROMPT, image=img, height=SIZE, width=SIZE, num_inference_steps=6, guidance_scale=5.0,
            latents=RequestNoise(11).initial((1, 4, 8, 8)), controlnet_conditioning_scale=0.7,
            control_guidance_start=0.0, control_guidance_end=0.8, output_type="np",
        ).images  # fmt: skip
    _check(got, want)
    # the same request packed with others: byte-identical
    plain = _worker_request(p, img, 12, 0.0, 1.0)
    plain.controlnets = ()
    states = [w.prepare(_worker_request(p, img, 11, 0.0, 0.8)), w.prepare(plain),
              w.prepare(_worker_request(p, _control_image(6), 13, 0.5, 1.0))]  # fmt: skip
    while not all(w.step(states)):
        pass
    assert np.array_equal(_images(p, w, states[0]), got)
