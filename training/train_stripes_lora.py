"""Train the ``stripes`` LoRA for the shipped ``fashion-text`` model: garments drawn with horizontal stripes.

The base model never saw a striped garment (Fashion-MNIST, tinted one colour). The adapter is trained with
the base model's own objective (rectified flow, velocity target, logit-normal t, 10% empty captions) on
the same tinted, captioned images, striped (``training.stripes``: every other 2-pixel band darkened), so
the captions keep meaning what they meant and the adapter only adds the stripes. Rank ``--rank`` LoRA on
every linear layer of the U-Net (attention, feed-forward, projections, time-embedding projections) and its
3x3 convolutions (LoCon), the base weights frozen; saved in diffusers' PEFT format
(``unet.<module>.lora_A/lora_B.weight`` with ``lora_adapter_metadata``), which both this server and
diffusers' ``load_lora_weights`` read.

    python -m training.train_stripes_lora --out weights/loras/stripes.safetensors --steps 400
    python -m training.train_stripes_lora --evaluate weights/loras/stripes.safetensors   # the judge only

The evaluation samples ``--eval-images`` images per setting with the server's own path (model.lora_batched
bank, the model's default sampler and steps) for fixed prompts and seeds, at scales 0 (no adapter), 0.5 and
1, and reports ``training.stripes.stripe_score`` (mean, and the share of images above 0.3) for each.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.stripes import stripe, stripe_score

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "weights" / "fashion-text"
PROMPTS = ["a red dress", "a blue shirt", "a green trouser", "a yellow bag", "a white sneaker",
           "a purple coat", "an orange pullover", "a pink sandal"]  # fmt: skip


class TrainLora(nn.Module):
    """Trainable low-rank updates hooked onto a frozen U-Net's layers: y = base(x) + (alpha/r)·B(A(x))."""

    def __init__(self, unet: nn.Module, rank: int, alpha: float, convs: bool) -> None:
        super().__init__()
        from model.lora import adaptable_layers

        self.rank, self.alpha = rank, alpha
        self.names: list[str] = []
        self.down = nn.ParameterList()
        self.up = nn.ParameterList()
        self.kinds: list[tuple[str, Any]] = []
        self._handles = []
        for name, layer in adaptable_layers(unet, "unet").items():
            if isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1) and not convs:
                continue
            w = layer.weight
            down = torch.empty(rank, *w.shape[1:])
            nn.init.kaiming_uniform_(down.view(rank, -1), a=math.sqrt(5))
            self.down.append(nn.Parameter(down))
            self.up.append(nn.Parameter(torch.zeros(w.shape[0], rank)))
            self.names.append(name)
            i = len(self.names) - 1
            self._handles.append(layer.register_forward_hook(self._hook(i, layer)))

    def _hook(self, i: int, layer: nn.Module) -> Any:
        scale = self.alpha / self.rank

        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            down, up = self.down[i], self.up[i]
            if isinstance(layer, nn.Conv2d):
                h = F.conv2d(x, down, None, layer.stride, layer.padding, layer.dilation)  # (B, r, H', W')
                return out + scale * torch.einsum("or,brhw->bohw", up, h)
            return out + scale * F.linear(F.linear(x, down), up)

        return hook

    def save(self, path: Path) -> None:
        """diffusers' PEFT format (what ``load_lora_weights`` and this server read)."""
        from safetensors.torch import save_file

        from model.lora import METADATA_KEY

        tensors = {}
        for name, down, up in zip(self.names, self.down, self.up, strict=True):
            conv = down.dim() == 4
            tensors[f"unet.{name}.lora_A.weight"] = down.detach().half().contiguous()
            b = up.detach().half()
            tensors[f"unet.{name}.lora_B.weight"] = (b[:, :, None, None] if conv else b).contiguous()
        meta = {"unet.r": self.rank, "unet.lora_alpha": self.alpha, "unet.target_modules": sorted(self.names)}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={
            "format": "pt", METADATA_KEY: json.dumps(meta),
            "modelspec.title": "stripes",
            "modelspec.description": "horizontal stripes on fashion-text garments",
        })  # fmt: skip


def train(args: argparse.Namespace) -> None:
    from model.loading import load_unet
    from training.captions import COLOUR_NAMES
    from training.data import DeviceData, load_split, tint, to_model
    from training.text_states import CaptionTable

    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    unet = load_unet(MODEL / "unet", device=device, dtype=torch.float32).requires_grad_(False).eval()
    lora = TrainLora(unet, args.rank, args.alpha, convs=True)
    params = sum(p.numel() for p in lora.parameters())
    print(f"stripes LoRA: {len(lora.names)} layers, {params / 1e3:.0f}k parameters", flush=True)
    data = DeviceData(*load_split("train", limit=args.limit), device, args.seed)
    table = CaptionTable(device, small=False, dtype=torch.float32)
    opt = torch.optim.AdamW(lora.parameters(), lr=args.lr, weight_decay=0.0)
    t0 = time.monotonic()
    losses = []
    for step in range(1, args.steps + 1):
        x01, y = data.batch(args.batch)
        colours = data.randint(len(COLOUR_NAMES), args.batch)
        striped = stripe(tint(x01, colours), phase=data.randint(4, args.batch))
        x0 = to_model(striped)  # (B, 3, 32, 32)
        ctx = table.context(table.ids(y, colours, data.randint(table.per_pair, args.batch)),
                            data.rand(args.batch) < 0.1)  # fmt: skip
        u = data.rand(args.batch)
        t = torch.where(data.rand(args.batch) < 0.7, torch.sigmoid(data.randn(args.batch)), u).clamp(
            1e-3, 1.0
        )
        eps = data.randn(*x0.shape)
        tt = t[:, None, None, None]
        xt = (1 - tt) * x0 + tt * eps
        loss = F.mse_loss(unet(xt, t * 1000.0, context=ctx).float(), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == args.steps:
            print(f"step {step}: loss {sum(losses[-25:]) / len(losses[-25:]):.4f} "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)  # fmt: skip
    out = Path(args.out)
    lora.save(out)
    (out.with_suffix(".train.json")).write_text(json.dumps({
        "steps": args.steps, "batch": args.batch, "lr": args.lr, "rank": args.rank, "alpha": args.alpha,
        "seed": args.seed, "images": data.n, "layers": len(lora.names), "parameters": params,
        "seconds": round(time.monotonic() - t0, 1), "final_loss": sum(losses[-25:]) / len(losses[-25:]),
    }, indent=1))  # fmt: skip
    print(f"saved {out} ({out.stat().st_size} bytes)", flush=True)


@torch.no_grad()
def evaluate(
    path: Path, images: int, seed: int = 0, scales: tuple[float, ...] = (0.0, 0.5, 1.0)
) -> dict[str, Any]:
    """Stripe scores of images sampled at ``scales`` through the server's per-row LoRA path (a
    ``model.lora_batched.LoraBank`` on the loaded model, the model's default sampler, steps, guidance)."""
    from model.denoiser import cfg_combine
    from model.lora import layer_specs, load_lora
    from model.lora_batched import LoraBank
    from model.pipeline import load_pipelines
    from model.samplers import get_sampler, sample

    p = load_pipelines(MODEL.parent, [MODEL.name])[MODEL.name]
    specs = layer_specs({"unet": p.unet})
    adapter = load_lora(path, specs)
    rows = 2 * images
    bank = LoraBank({"unet": p.unet}, pages=2, page_rank=adapter.rank, row_pages=1, max_rows=rows)
    bank.write([1], adapter)
    d = p.defaults
    sampler = get_sampler(d.sampler, p.schedule.kind)
    sigmas = sampler.make_sigmas(p.schedule, d.num_inference_steps)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(images)]
    cond = p.text_encoder.encode(prompts)
    uncond = p.text_encoder.encode([""]).expand(images, -1, -1)
    context = torch.cat([cond, uncond])  # (2N, L, D): cond rows, then uncond rows
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(images, 3, d.height, d.width, generator=g)
    out: dict[str, Any] = {"images": images, "sampler": d.sampler, "steps": d.num_inference_steps,
                           "guidance_scale": d.guidance_scale, "scales": {}}  # fmt: skip
    pictures = {}
    for scale in scales:
        bank.fill(torch.ones(rows, 1, dtype=torch.long), torch.full((rows, 1), scale))

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            with bank.rows():
                x0 = p.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), context=context)
            return cfg_combine(x0[:images], x0[images:], d.guidance_scale)

        x = sample(denoise, noise * sigmas[0], sigmas, sampler).clamp(-1, 1)
        x01 = (x + 1) / 2
        s = stripe_score(x01)
        above = (s > 0.3).float().mean().item()
        out["scales"][str(scale)] = {"mean": round(s.mean().item(), 4), "above_0.3": round(above, 4)}
        pictures[scale] = x01
    bank.remove()
    return {"result": out, "pictures": pictures}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "weights" / "loras" / "stripes.safetensors"))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="training images (default: all 60,000)")
    ap.add_argument("--evaluate", default=None, help="only evaluate this adapter file")
    ap.add_argument("--eval-images", type=int, default=32)
    ap.add_argument("--grid", default=None, help="write a PNG grid: rows scale 0, 0.5, 1")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.evaluate is None:
        train(args)
    path = Path(args.evaluate or args.out)
    ev = evaluate(path, args.eval_images)
    print(json.dumps(ev["result"], indent=1), flush=True)
    path.with_suffix(".eval.json").write_text(json.dumps(ev["result"], indent=1))
    if args.grid:
        from PIL import Image

        pics = torch.cat([ev["pictures"][s][:8] for s in (0.0, 0.5, 1.0)])  # (24, 3, 32, 32)
        grid = pics.view(3, 8, 3, 32, 32).permute(0, 3, 1, 4, 2).reshape(96, 256, 3)
        Image.fromarray((grid * 255).round().byte().numpy()).resize((512, 192), Image.NEAREST).save(args.grid)


if __name__ == "__main__":
    main()
