"""Train `fashion-text-edges`: a ControlNet on Sobel edge maps for the (frozen) fashion-text U-Net.

The base is loaded from its saved fp16 EMA weights (exactly what ships), frozen; the ControlNet's encoder
starts
as a copy of the base encoder, its output convs at zero. Same data, captions and flow objective as the
base; the
control map is `data.edges` of the garment (1 channel, {0, 1}).

    python -m training.train_controlnet --base runs/x/fashion-text --out runs/x/fashion-text-edges [--smoke]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from training import nets
from training.captions import caption_summary
from training.data import DeviceData, edges, load_split
from training.loop import Trainer, add_args, log, start, write_json
from training.text_states import CaptionTable
from training.train_text import flow_batch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    add_args(ap, seconds=200, batch=512, lr=1e-3)
    ap.add_argument("--base", required=True, help="run folder of fashion-text (reads <base>/unet)")
    ap.add_argument("--cond-drop", type=float, default=0.1)
    args = ap.parse_args(argv)
    args.warmup = min(args.warmup, 200)
    device = start(args)
    data = DeviceData(*load_split("train", limit=512 if args.smoke else None), device, args.seed + 1)
    table = CaptionTable(device, small=args.smoke)
    base = nets.load(f"{args.base}/unet", "unet", device=device).eval().requires_grad_(False)
    control = nets.build_controlnet(base).to(device).train()
    log(f"fashion-text-edges: {nets.num_params(control) / 1e6:.2f}M parameters, backend {control.impl}")

    class Both(torch.nn.Module):  # one module so the compile covers base + ControlNet
        def __init__(self) -> None:
            super().__init__()
            self.base, self.control = base, control

        def forward(self, xt, t, ctx, cond):
            return self.base(xt, t, context=ctx, control=self.control(xt, t, cond, context=ctx))

    both = Both()

    def loss_fn(forward) -> torch.Tensor:
        xt, t, ctx, v, x01 = flow_batch(data, table, args.batch, args.cond_drop)
        return F.mse_loss(forward(xt, t * 1000.0, ctx, edges(x01)).float(), v)

    trainer = Trainer(both, args, "fashion-text-edges")

    def save() -> None:
        nets.save_fp16(trainer.ema_module.control.inner, f"{args.out}/controlnet", control.impl)

    info = trainer.run(loss_fn, on_save=save)
    save()
    info.update(
        {
            "model": "fashion-text-edges",
            "num_params": nets.num_params(control),
            "backend": control.impl,
            "base_model": "fashion-text",
            "cond_drop": args.cond_drop,
            "captions": caption_summary(small=args.smoke),
            "control": "thin Sobel edges (NMS), threshold 0.25",
            "smoke": args.smoke,
        }
    )
    write_json(f"{args.out}/train.json", info)
    log(f"fashion-text-edges: done, {info['steps']} steps, {info['steps_per_s']:.1f} steps/s")


if __name__ == "__main__":
    main()
