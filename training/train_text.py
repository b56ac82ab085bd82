"""Train `fashion-text`: text-conditional U-Net (UNet2DConditionModel layout) on colourised Fashion-MNIST.

Each sample gets a random colour (GPU-side), is tinted (`data.tint`) and gets a random training caption of its
(class, colour) from the precomputed MiniLM caption table; 10% of captions are dropped to the empty prompt's
states. Rectified flow with velocity prediction: x_t = (1 - t)·x0 + t·ε, target v = ε - x0, the U-Net sees
t·1000; t is logit-normal (70%) or uniform (30%).

    python -m training.train_text --out runs/x/fashion-text --seconds 330 [--smoke]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from training import nets
from training.captions import COLOUR_NAMES, caption_summary
from training.data import DeviceData, load_split, tint, to_model
from training.loop import Trainer, add_args, log, start, write_json
from training.text_states import CaptionTable


def flow_batch(data: DeviceData, table: CaptionTable, batch: int, cond_drop: float):
    """(x_t, t in [0, 1], context, target v, gray images in [0, 1]) of a random colourised batch."""
    x01, y = data.batch(batch)
    colours = data.randint(len(COLOUR_NAMES), batch)
    x0 = to_model(tint(x01, colours))  # (B, 3, 32, 32)
    ctx = table.context(
        table.ids(y, colours, data.randint(table.per_pair, batch)), data.rand(batch) < cond_drop
    )
    u = data.rand(batch)
    t = torch.where(data.rand(batch) < 0.7, torch.sigmoid(data.randn(batch)), u).clamp(1e-3, 1.0)
    eps = data.randn(*x0.shape)
    tt = t[:, None, None, None]
    return (1 - tt) * x0 + tt * eps, t, ctx, eps - x0, x01


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    add_args(ap, seconds=330, batch=512, lr=1e-3)
    ap.add_argument("--cond-drop", type=float, default=0.1)
    args = ap.parse_args(argv)
    device = start(args)
    data = DeviceData(*load_split("train", limit=512 if args.smoke else None), device, args.seed)
    table = CaptionTable(device, small=args.smoke)
    cfg = nets.config_for("text", smoke=args.smoke)
    net = nets.build_unet(cfg).to(device).train()
    log(f"fashion-text: {nets.num_params(net) / 1e6:.2f}M parameters, backend {net.impl}, device {device}")

    def loss_fn(forward) -> torch.Tensor:
        xt, t, ctx, v, _ = flow_batch(data, table, args.batch, args.cond_drop)
        return F.mse_loss(forward(xt, t * 1000.0, context=ctx).float(), v)

    trainer = Trainer(net, args, "fashion-text")

    def save() -> None:
        nets.save_fp16(trainer.ema_module.inner, f"{args.out}/unet", net.impl)

    info = trainer.run(loss_fn, on_save=save)
    save()
    info.update(
        {
            "model": "fashion-text",
            "num_params": nets.num_params(net),
            "backend": net.impl,
            "config": cfg,
            "scheduler": nets.TEXT_SCHEDULER,
            "cond_drop": args.cond_drop,
            "num_captions": len(table.texts),
            "captions": caption_summary(small=args.smoke),
            "objective": "rectified flow, velocity (eps - x0), t ~ 0.7 logit-normal(0,1) + 0.3 uniform",
            "smoke": args.smoke,
        }
    )
    write_json(f"{args.out}/train.json", info)
    log(f"fashion-text: done, {info['steps']} steps, {info['steps_per_s']:.1f} steps/s")


if __name__ == "__main__":
    main()
