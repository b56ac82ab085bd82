"""Train `fashion-class`: class-conditional U-Net (UNet2DModel layout), VP cosine schedule, v-prediction.

Labels are replaced by the null row 10 in 10% of samples (classifier-free guidance). EMA weights are saved in
fp16 to `<out>/unet/`, with `<out>/train.json` (the recipe and measured speed).

    python -m training.train_class --out runs/x/fashion-class --seconds 450 [--smoke]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from model.schedules import Schedule
from training import nets
from training.data import DeviceData, load_split, to_model
from training.loop import Trainer, add_args, log, start, write_json

NULL_CLASS = 10


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    add_args(ap, seconds=450, batch=512, lr=1e-3)
    ap.add_argument("--cond-drop", type=float, default=0.1)
    args = ap.parse_args(argv)
    device = start(args)
    data = DeviceData(*load_split("train", limit=512 if args.smoke else None), device, args.seed)
    cfg = nets.config_for("class", smoke=args.smoke)
    net = nets.build_unet(cfg).to(device).train()
    log(f"fashion-class: {nets.num_params(net) / 1e6:.2f}M parameters, backend {net.impl}, device {device}")
    sched = Schedule.from_config(nets.CLASS_SCHEDULER)
    abar = sched.alphas_cumprod.to(device)  # (1000,) fp32, the same table the samplers use

    def loss_fn(forward) -> torch.Tensor:
        x01, y = data.batch(args.batch)
        x0 = to_model(x01)  # (B, 1, 32, 32)
        y = torch.where(data.rand(args.batch) < args.cond_drop, torch.full_like(y, NULL_CLASS), y)
        t = data.randint(sched.num_train_timesteps, args.batch)
        a = abar[t].sqrt()[:, None, None, None]
        s = (1 - abar[t]).sqrt()[:, None, None, None]
        eps = data.randn(*x0.shape)
        v = a * eps - s * x0  # v-prediction target (Salimans & Ho 2022)
        pred = forward(a * x0 + s * eps, t.float(), class_labels=y)
        return F.mse_loss(pred.float(), v)

    trainer = Trainer(net, args, "fashion-class")

    def save() -> None:
        nets.save_fp16(trainer.ema_module.inner, f"{args.out}/unet", net.impl)

    info = trainer.run(loss_fn, on_save=save)
    save()
    info.update(
        {
            "model": "fashion-class",
            "num_params": nets.num_params(net),
            "backend": net.impl,
            "config": cfg,
            "scheduler": nets.CLASS_SCHEDULER,
            "cond_drop": args.cond_drop,
            "objective": "v-prediction, VP squaredcos_cap_v2, uniform integer t",
            "smoke": args.smoke,
        }
    )
    write_json(f"{args.out}/train.json", info)
    log(f"fashion-class: done, {info['steps']} steps, {info['steps_per_s']:.1f} steps/s")


if __name__ == "__main__":
    main()
