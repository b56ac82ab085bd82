"""The shared training loop: bf16 autocast, fused AdamW, foreach EMA, optional torch.compile, time budget.

No per-step host syncs: losses accumulate on the device and are read every `log_every` steps; the stop test
uses
the host clock. The learning rate warms up linearly and then stays constant (the EMA does the averaging),
so a run
stopped by its time budget has a well-defined recipe: rerun with `--steps N` to reproduce it exactly.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn


def add_args(ap: argparse.ArgumentParser, seconds: float, batch: int, lr: float) -> None:
    ap.add_argument("--out", required=True, help="run folder of this model")
    ap.add_argument("--seconds", type=float, default=seconds, help="training time budget (incl. compile)")
    ap.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: time budget only)")
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--ema", type=float, default=0.9995)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", type=int, default=1, help="torch.compile the model (CUDA only; falls back)")
    ap.add_argument("--log-every", type=int, default=200)
    ap.add_argument("--save-every", type=float, default=150.0, help="seconds between EMA checkpoints")
    ap.add_argument("--smoke", action="store_true", help="tiny model, few steps, CPU-sized data")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start(args: argparse.Namespace) -> torch.device:
    """Common start of a training script: smoke-run limits, seeds, TF32 for fp32 leftovers; the device."""
    if args.smoke:
        args.steps, args.batch, args.log_every = args.steps or 3, min(args.batch, 16), 1
    seed_all(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return torch.device(args.device)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def maybe_compile(module: nn.Module, enabled: bool, device: torch.device) -> nn.Module:
    if not enabled or device.type != "cuda":
        return module
    try:
        return torch.compile(module)
    except Exception as e:  # noqa: BLE001 - compile is an optimisation; eager always works
        log(f"torch.compile unavailable ({e!r}); eager")
        return module


class Trainer:
    """Runs `loss_fn(model_call) -> loss` steps on `params` until the budget is spent; keeps an EMA copy.

    `module` is the trained nn.Module (its EMA twin is `self.ema_module`); `forward` is the callable the
    loss uses
    (the compiled module when compile works).
    """

    def __init__(self, module: nn.Module, args: argparse.Namespace, name: str) -> None:
        self.module = module
        self.args = args
        self.name = name
        self.device = torch.device(args.device)
        self.params = [p for p in module.parameters() if p.requires_grad]
        fused = self.device.type == "cuda"
        self.opt = torch.optim.AdamW(
            self.params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0, fused=fused
        )
        self.ema_module = copy.deepcopy(module).eval().requires_grad_(False)
        pairs = zip(self.ema_module.parameters(), module.parameters(), strict=True)
        self.ema_params = [p for p, q in pairs if q.requires_grad]
        self.forward = maybe_compile(module, bool(args.compile), self.device)
        self.step = 0
        self.history: list[dict] = []

    def _one_step(self, loss_fn: Callable) -> torch.Tensor:
        a = self.args
        for g in self.opt.param_groups:
            g["lr"] = a.lr * min(1.0, (self.step + 1) / max(1, a.warmup))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = loss_fn(self.forward)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0, foreach=True)
        self.opt.step()
        decay = min(a.ema, (1 + self.step) / (10 + self.step))
        torch._foreach_lerp_(self.ema_params, self.params, 1.0 - decay)
        self.step += 1
        return loss.detach()

    def run(self, loss_fn: Callable, on_save: Callable[[], None] | None = None) -> dict:
        a = self.args
        t0 = time.monotonic()
        if self.forward is not self.module:  # probe the compiled step once; fall back to eager on any failure
            try:
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    loss_fn(self.forward).backward()
                self.opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                log(f"{self.name}: compiled in {time.monotonic() - t0:.1f}s")
            except Exception as e:  # noqa: BLE001
                log(f"{self.name}: torch.compile failed ({type(e).__name__}: {str(e)[:300]}); eager")
                self.forward = self.module
                self.opt.zero_grad(set_to_none=True)
        t_start = time.monotonic()
        acc = torch.zeros((), device=self.device)
        last_t, last_step, last_save = t_start, 0, t_start
        while True:
            acc += self._one_step(loss_fn)
            done = (a.steps and self.step >= a.steps) or time.monotonic() - t0 >= a.seconds
            if self.step % a.log_every == 0 or done:
                mean = (acc / max(1, self.step - last_step)).item()  # the one sync per log interval
                now = time.monotonic()
                sps = (self.step - last_step) / max(now - last_t, 1e-9)
                self.history.append({"step": self.step, "loss": mean, "steps_per_s": sps, "t": now - t0})
                log(
                    f"{self.name} step {self.step} loss {mean:.4f} {sps:.1f} steps/s "
                    f"{sps * a.batch:.0f} img/s "
                    f"t={now - t0:.0f}s"
                )
                acc.zero_()
                last_t, last_step = now, self.step
                if on_save is not None and now - last_save >= a.save_every and not done:
                    on_save()
                    last_save = time.monotonic()
            if done:
                break
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        train_s = time.monotonic() - t_start
        return {
            "steps": self.step,
            "batch": a.batch,
            "images_seen": self.step * a.batch,
            "lr": a.lr,
            "warmup_steps": a.warmup,
            "ema_decay": a.ema,
            "seed": a.seed,
            "seconds_total": time.monotonic() - t0,
            "seconds_training": train_s,
            "steps_per_s": self.step / max(train_s, 1e-9),
            "images_per_s": self.step * a.batch / max(train_s, 1e-9),
            "compiled": self.forward is not self.module,
            "final_loss": self.history[-1]["loss"] if self.history else None,
            "history": self.history,
            "device": torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            **_gpu_shared(),
        }


def _gpu_shared() -> dict:
    """{"gpu_shared": bool} when run_all.sh says whether another training process shares the GPU."""
    env = os.environ.get("TRAINING_GPU_SHARED")
    return {"gpu_shared": env == "1"} if env in ("0", "1") else {}


def write_json(path: str | Path, obj: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
