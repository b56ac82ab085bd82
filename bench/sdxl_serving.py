"""SDXL served end to end: an SDXL-config pipeline folder (real configs, random weights, fp16 files) through
the real server process at 1024², one 20-step image against diffusers' StableDiffusionXLPipeline, then
images/s and latency at 1 / 8 / 16 closed-loop clients, with the card's name.

    python -m bench.sdxl_serving --out $OUT                 # CUDA: the real SDXL configs at 1024²
    python -m bench.sdxl_serving --tiny --out /tmp/sdxl     # CPU smoke test: a tiny SDXL folder at 64²

Steps: (1) build the folder once into --work-dir (tests/model/sdxl_helpers.py; ~3.5 B parameters, a few
minutes of CPU; the CLIP tokenizer cache as for bench/sd15_serving.sh: UNET_SERVER_TEST_CACHE); (2) start
``python -m server`` on it (CUDA graphs per bucket, fp16 U-Net, fp32 VAE as its config's force_upcast says);
(3) one /generate request (seed 0, Euler, 20 steps, guidance 5.0) vs diffusers with the same initial latents
(the request's seeded generator), in fp16 on CUDA (fp32 on CPU): max and mean |Δ| in uint8 levels, and
diffusers fp16 vs fp32 for scale; (4) closed loop at each --clients level for --duration seconds. Writes
sdxl_serving.json and sdxl_serving.md to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of an astronaut riding a horse on mars"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build(work: Path, tiny: bool) -> Path:
    """The SDXL folder (built once; a marker file says it is complete)."""
    sys.path.insert(0, str(ROOT))
    from tests.model.sdxl_helpers import build_sdxl_random, build_tiny_sdxl

    folder = work / ("tiny-sdxl" if tiny else "sdxl")
    if not (folder / ".complete").is_file():
        t0 = time.perf_counter()
        build_tiny_sdxl(folder) if tiny else build_sdxl_random(folder, variant="fp16")
        (folder / ".complete").write_text("")
        print(f"built {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


class Server:
    """``python -m server`` on a free loopback port, stopped with SIGTERM."""

    def __init__(self, folder: Path, device: str, max_rows: int, buckets: str, ready_timeout: float) -> None:
        self.url = f"http://127.0.0.1:{_free_port()}"
        env = {
            **os.environ,
            "UNET_SERVER_WEIGHTS_DIR": str(folder.parent),
            "UNET_SERVER_MODELS": folder.name,
            "UNET_SERVER_DEVICE": device,
            "UNET_SERVER_MAX_BATCH_ROWS": str(max_rows),
            "UNET_SERVER_BATCH_BUCKETS": buckets,
            "UNET_SERVER_LOG_LEVEL": "warning",
            "UNET_SERVER_REQUEST_TIMEOUT_SECONDS": "600",
        }
        port = self.url.rsplit(":", 1)[1]
        cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", port]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
        import httpx

        t0, deadline = time.perf_counter(), time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server not ready in time")
            time.sleep(0.5)
        self.ready_seconds = time.perf_counter() - t0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _pixels(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))).astype(np.int16)


def parity(server: Server, folder: Path, size: int, steps: int, device: str) -> dict[str, Any]:
    """One served image vs diffusers' pipeline (same weights, prompt, initial latents), uint8 levels."""
    import diffusers
    import httpx

    from model.noise import RequestNoise

    body = {"prompt": PROMPT, "seed": 0, "num_inference_steps": steps, "guidance_scale": 5.0,
            "sampler": "euler", "width": size, "height": size}  # fmt: skip
    t0 = time.perf_counter()
    r = httpx.post(server.url + "/generate", json=body, timeout=600)
    r.raise_for_status()
    served_s = time.perf_counter() - t0
    ours = _pixels(r.json()["images"][0])
    latents = RequestNoise(0).initial((1, 4, size // 8, size // 8), torch.device("cpu"))

    def theirs(dtype: torch.dtype) -> np.ndarray:
        variant = "fp16" if (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file() else None
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, dtype=dtype, variant=variant)
        pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            img = pipe(PROMPT, num_inference_steps=steps, guidance_scale=5.0, height=size, width=size,
                       latents=latents.to(device, dtype), output_type="np").images[0]  # fmt: skip
        del pipe
        if device == "cuda":
            torch.cuda.empty_cache()
        return np.round(img * 255).astype(np.int16)

    ref = theirs(torch.float16 if device == "cuda" else torch.float32)
    out = {
        "served_seconds": served_s,
        "ours_vs_diffusers_max_levels": int(np.abs(ours - ref).max()),
        "ours_vs_diffusers_mean_levels": float(np.abs(ours - ref).mean()),
        "image_std_levels": float(ref.std()),
        "finite": bool(np.isfinite(ours).all()),
    }
    if device == "cuda":  # the scale of fp16 rounding: diffusers fp16 vs diffusers fp32 on the same inputs
        ref32 = theirs(torch.float32)
        out["ours_vs_diffusers_fp32_mean_levels"] = float(np.abs(ours - ref32).mean())
        out["diffusers_fp16_vs_fp32_mean_levels"] = float(np.abs(ref - ref32).mean())
    return out


async def closed_loop(url: str, clients: int, duration: float, warmup: float, body: dict) -> dict[str, Any]:
    """``clients`` clients, each sending its next request when the previous returns; counts completions
    after ``warmup`` seconds for ``duration`` seconds."""
    import httpx

    latencies: list[float] = []
    done_in_window = 0
    start = time.perf_counter()
    t_begin, t_end = start + warmup, start + warmup + duration

    async def client(k: int, c: httpx.AsyncClient) -> None:
        nonlocal done_in_window
        i = 0
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            r = await c.post("/generate", json={**body, "seed": 1000 * k + i})
            r.raise_for_status()
            t1 = time.perf_counter()
            i += 1
            if t_begin <= t1 <= t_end:
                done_in_window += 1
                latencies.append(t1 - t0)

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as c:
        await asyncio.gather(*(client(k, c) for k in range(clients)))
    lat = sorted(latencies)
    return {
        "clients": clients,
        "images_per_s": done_in_window / duration,
        "completed": done_in_window,
        "p50_s": statistics.median(lat) if lat else None,
        "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--work-dir", default="/tmp/sdxl-work")
    p.add_argument("--tiny", action="store_true", help="a tiny SDXL folder at 64² (CPU smoke test)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=None, help="default 1024 (64 with --tiny)")
    p.add_argument("--clients", default="1,8,16")
    p.add_argument("--duration", type=float, default=40.0, help="seconds per load point")
    p.add_argument("--warmup-s", type=float, default=10.0)
    p.add_argument("--max-rows", type=int, default=32, help="16 clients x 2 CFG rows")
    p.add_argument("--buckets", default="2,4,8,16,32")
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("--skip-parity", action="store_true")
    p.add_argument("--build-only", action="store_true")
    args = p.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size or (64 if args.tiny else 1024)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = build(Path(args.work_dir), args.tiny)
    if args.build_only:
        return
    card = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    result: dict[str, Any] = {
        "card": card, "model": folder.name, "size": size, "steps": args.steps, "sampler": "euler",
        "guidance_scale": 5.0, "torch": torch.__version__,
    }  # fmt: skip
    server = Server(folder, device, args.max_rows, args.buckets, args.ready_timeout)
    result["ready_seconds"] = server.ready_seconds
    print(f"server ready in {server.ready_seconds:.0f} s ({card})", flush=True)
    try:
        if not args.skip_parity:
            result["parity"] = parity(server, folder, size, args.steps, device)
            print("parity:", json.dumps(result["parity"]), flush=True)
        body = {"prompt": PROMPT, "num_inference_steps": args.steps, "guidance_scale": 5.0,
                "width": size, "height": size}  # fmt: skip
        result["load"] = []
        for clients in (int(c) for c in args.clients.split(",")):
            point = asyncio.run(closed_loop(server.url, clients, args.duration, args.warmup_s, body))
            result["load"].append(point)
            print("load:", json.dumps(point), flush=True)
    finally:
        server.stop()
    (out / "sdxl_serving.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# SDXL serving ({card}), {folder.name} {size}², {args.steps} steps Euler, guidance 5.0",
        "",
        f"server ready (load + warm-up + graph capture): {result['ready_seconds']:.0f} s",
        "",
    ]
    if "parity" in result:
        lines += ["parity vs diffusers StableDiffusionXLPipeline (uint8 levels): "
                  + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in result["parity"].items()), ""]  # fmt: skip
    lines += ["| clients | images/s | p50 s | p99 s | completed |", "|---:|---:|---:|---:|---:|"]
    for pt in result["load"]:
        p50 = f"{pt['p50_s']:.2f}" if pt["p50_s"] is not None else "-"
        p99 = f"{pt['p99_s']:.2f}" if pt["p99_s"] is not None else "-"
        lines.append(f"| {pt['clients']} | {pt['images_per_s']:.3f} | {p50} | {p99} | {pt['completed']} |")
    (out / "sdxl_serving.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
