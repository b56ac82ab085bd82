"""GraphedCallable / GraphedUNet: padded bucket execution returns the eager result for the real rows."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.cuda_graphs import GraphedCallable, GraphedUNet, default_buckets

diffusers = pytest.importorskip("diffusers")


def tiny_unet() -> torch.nn.Module:
    """A class-conditional diffusers UNet2DModel with attention; fp32, eval, fixed seed."""
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
        num_class_embeds=3,
    )
    return net.eval()


def eager(net, x, t, class_labels):
    with torch.no_grad():
        return net(x, t, class_labels=class_labels).sample


def inputs(rows: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 1, 8, 8, generator=g)
    t = torch.rand(rows, generator=g) * 999
    y = torch.randint(0, 3, (rows,), generator=g)
    return x, t, y


def test_default_buckets():
    assert default_buckets(1) == (1,)
    assert default_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    assert default_buckets(64) == (1, 2, 4, 8, 16, 32, 64)


@pytest.mark.parametrize("rows", [1, 3, 5, 8])
def test_padded_bucket_equals_eager(rows):
    net = tiny_unet()
    graphed = GraphedCallable(lambda x, t, y: net(x, t, class_labels=y).sample, buckets=(1, 2, 4, 8))
    x, t, y = inputs(8, seed=7)
    graphed.warmup(x=x, t=t, y=y)  # fills every padding row with valid rows
    x, t, y = inputs(rows, seed=rows)
    out = graphed(x=x, t=t, y=y)
    assert out.shape == (rows, 1, 8, 8)
    ref = eager(net, x, t, y)
    # Same function, only the batch is padded: the real rows agree to float32 rounding of a different
    # batch size's kernels (exactly on most CPU builds).
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_row_counts_in_multiples_of_4_are_bitwise_on_cpu():
    """What the server's CPU batch-invariance relies on (its buckets are multiples of 4): padding 4, 8 or
    12 real rows up to a bucket gives exactly the unpadded eager result (fp32 GEMMs block rows by 4)."""
    net = tiny_unet()
    graphed = GraphedCallable(lambda x, t, y: net(x, t, class_labels=y).sample, buckets=(4, 8, 16))
    for rows in (4, 8, 12):
        x, t, y = inputs(rows, seed=rows)
        assert torch.equal(graphed(x=x, t=t, y=y), eager(net, x, t, y))


def test_padding_rows_cannot_leak():
    """Poison the padding rows with NaN and huge values: the real rows must be bitwise unchanged."""
    net = tiny_unet()
    graphed = GraphedCallable(lambda x, t, y: net(x, t, class_labels=y).sample, buckets=(4, 8))
    x, t, y = inputs(3)
    clean = graphed(x=x, t=t, y=y).clone()  # padding rows: tiled copies of the real rows

    poison = torch.full((8, 1, 8, 8), float("nan"))
    poison[::2] = 1e30
    graphed(x=poison, t=torch.full((8,), 500.0), y=torch.zeros(8, dtype=torch.long))
    out = graphed(x=x, t=t, y=y)  # rows 3..7 of the static buffers now hold the poison
    assert torch.isfinite(out).all()
    assert torch.equal(out, clean)


def test_leak_check_has_teeth():
    """A function that mixes rows (batch statistics) must fail the same check."""
    mixing = GraphedCallable(lambda x: x - x.mean(dim=0, keepdim=True), buckets=(4,))
    x = torch.randn(3, 5)
    clean = mixing(x=x).clone()
    mixing(x=torch.full((4, 5), 1e6))
    assert not torch.equal(mixing(x=x), clean)


@dataclasses.dataclass
class Residuals:  # shaped like model.controlnet.ControlResiduals
    down: list
    mid: torch.Tensor


def test_structured_inputs_and_outputs():
    """Optional inputs (None), a dataclass of tensor lists, and a dict output all pass through."""

    def fn(x, scale, control=None):
        out = x * scale[:, None]
        if control is not None:
            out = out + control.down[0] + control.down[1] * 2 + control.mid
        return {"out": out, "pair": (out.sum(1), scale)}

    graphed = GraphedCallable(fn, buckets=(2, 4))
    x, s = torch.randn(3, 6), torch.rand(3)
    res = Residuals(down=[torch.randn(3, 6), torch.randn(3, 6)], mid=torch.randn(3, 6))
    got = graphed(x=x, scale=s, control=res)
    want = fn(x, s, res)
    torch.testing.assert_close(got["out"], want["out"])
    torch.testing.assert_close(got["pair"][0], want["pair"][0])
    # Without control: a separate structure, its own buffers.
    torch.testing.assert_close(graphed(x=x[:1], scale=s[:1])["out"], x[:1] * s[:1, None])
    assert len(graphed._signatures) == 2


def test_errors():
    graphed = GraphedCallable(lambda x: x + 1, buckets=(2, 4))
    assert graphed.bucket_for(3) == 4
    with pytest.raises(ValueError, match="exceed the largest bucket"):
        graphed(x=torch.zeros(5, 2))
    with pytest.raises(ValueError, match="same number of rows"):
        GraphedCallable(lambda x, y: x + y)(x=torch.zeros(2, 2), y=torch.zeros(3, 2))


def test_outputs_are_views_until_next_call_unless_cloned():
    graphed = GraphedCallable(lambda x: x * 2, buckets=(4,))
    first = graphed(x=torch.ones(2, 3))
    graphed(x=torch.full((2, 3), 5.0))
    assert torch.equal(first, torch.full((2, 3), 10.0))  # the static output was reused
    cloning = GraphedCallable(lambda x: x * 2, buckets=(4,), clone_outputs=True)
    first = cloning(x=torch.ones(2, 3))
    cloning(x=torch.full((2, 3), 5.0))
    assert torch.equal(first, torch.full((2, 3), 2.0))


class _DiffusersAdapter(torch.nn.Module):
    """Gives a diffusers UNet2DModel the project's U-Net call signature."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, class_labels=None, context=None, control=None):
        return self.net(x, t, class_labels=class_labels).sample


def test_graphed_unet_signature_on_cpu():
    net = _DiffusersAdapter(tiny_unet())
    graphed = GraphedUNet(net, buckets=(1, 2, 4))
    x, t, y = inputs(4)
    graphed.warmup(x=x, t=t, class_labels=y)
    assert graphed.captured() == []  # CPU: eager on the padded bucket, no graphs
    out = graphed(x[:3], 250.0, class_labels=y[:3])  # a python number t is broadcast per row
    ref = eager(net.net, x[:3], torch.full((3,), 250.0), y[:3])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_matches_eager():
    net = _DiffusersAdapter(tiny_unet()).cuda().half()
    graphed = GraphedUNet(net, buckets=(1, 2, 4, 8))
    x, t, y = inputs(8)
    x, t, y = x.cuda().half(), t.cuda(), y.cuda()
    graphed.warmup(x=x, t=t, class_labels=y)
    assert graphed.captured() == [1, 2, 4, 8]
    for rows in (1, 3, 8):
        xb, tb, yb = inputs(rows, seed=10 + rows)
        xb, tb, yb = xb.cuda().half(), tb.cuda(), yb.cuda()
        out = graphed(xb, tb, class_labels=yb).float()
        ref = eager(net.net, xb, tb, yb).float()
        assert torch.isfinite(out).all()
        assert (out - ref).norm() / ref.norm() < 2e-3


def _our_denoiser(with_control: bool):
    from model import ControlNet, ControlNetConfig, UNet, UNetConfig
    from model.denoiser import Denoiser
    from model.schedules import Schedule

    cfg = UNetConfig(
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=2,
        cross_attention_dim=8,
    )
    torch.manual_seed(0)
    unet = UNet(cfg).eval()
    cn = None
    if with_control:
        cn = ControlNet(
            ControlNetConfig.from_unet_config(
                cfg, conditioning_channels=1, conditioning_embedding_out_channels=(8,)
            )
        ).eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # the zero convs must carry signal for the comparison to mean anything
            for p in cn.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    schedule = Schedule.from_config(
        {
            "_class_name": "DDIMScheduler",
            "num_train_timesteps": 1000,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
        }
    )
    return Denoiser(unet, schedule, controlnet=cn)


def _denoiser_inputs(rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(rows, 1, 8, 8, generator=g) * 3,
        sigma=torch.rand(rows, generator=g, dtype=torch.float64) * 10 + 0.05,
        context=torch.randn(rows, 5, 8, generator=g),
    )


@pytest.mark.parametrize("with_control", [False, True], ids=["plain", "control"])
def test_graphed_denoiser_matches_denoiser(with_control):
    from model.cuda_graphs import GraphedDenoiser

    den = _our_denoiser(with_control)
    graphed = GraphedDenoiser(den, buckets=(4, 8))
    example = _denoiser_inputs(8, seed=0)
    if with_control:
        example.update(control_cond=torch.zeros(8, 1, 8, 8), control_scale=torch.ones(8))
    graphed.warmup(**example)
    for rows in (3, 8):
        inp = _denoiser_inputs(rows, seed=rows)
        if with_control:
            g = torch.Generator().manual_seed(5)
            inp.update(
                control_cond=(torch.rand(rows, 1, 8, 8, generator=g) > 0.7).float(),
                control_scale=torch.full((rows,), 0.8),
                control_mask=torch.arange(rows) % 2 == 0,
            )  # the worker's mixed batch
        out = graphed(**inp)
        ref = den(**inp)  # the Denoiser's own masked path: ControlNet on the masked rows only
        assert out.dtype == torch.float32 and out.shape == (rows, 1, 8, 8)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if with_control:  # the mask mattered: rows without a map differ from running it everywhere
        full = den(**{k: v for k, v in inp.items() if k != "control_mask"})
        assert not torch.allclose(full[1::2], ref[1::2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphed_denoiser_with_control_matches_eager():
    """The whole Denoiser (σ→t, ControlNet, U-Net, x0) captures and replays; fp16 U-Net on CUDA."""
    from model.cuda_graphs import GraphedDenoiser

    den = _our_denoiser(with_control=True)
    den.unet.cuda().half()
    den.controlnet.cuda().half()
    graphed = GraphedDenoiser(den, buckets=(2, 4, 8))
    cuda = lambda d: {k: v.cuda() for k, v in d.items()}
    example = cuda(_denoiser_inputs(8, seed=0))
    example.update(
        control_cond=torch.zeros(8, 1, 8, 8, device="cuda"), control_scale=torch.ones(8, device="cuda")
    )
    graphed.warmup(**example)
    assert graphed.captured() == [2, 4, 8]
    for rows in (1, 3, 8):
        inp = cuda(_denoiser_inputs(rows, seed=rows))
        inp.update(
            control_cond=(torch.rand(rows, 1, 8, 8, device="cuda") > 0.7).float(),
            control_scale=torch.full((rows,), 0.8, device="cuda"),
        )
        out, ref = graphed(**inp), den(**inp)
        assert torch.isfinite(out).all()
        assert (out - ref).norm() / ref.norm() < 2e-3
