"""End to end, SD1.5 config at 512²: diffusers' StableDiffusionPipeline + compile vs our server under load.

    python -m bench.pipeline_vs_diffusers --out $OUT                  # CUDA, ~6-8 min (compiles dominate)
    python -m bench.pipeline_vs_diffusers --vae-dtype bfloat16 --out $OUT   # the server's VAE in bf16
    python -m bench.pipeline_vs_diffusers --skip server --out $OUT    # only the diffusers side
    python -m bench.pipeline_vs_diffusers --tiny                      # CPU smoke test (tiny pipeline, 64 px)

One SD1.5-config pipeline folder with random weights (the published unet/vae/text_encoder configs, fp16,
written once by diffusers' ``save_pretrained``), 20 steps DPM++ 2M, guidance 7.5, 512²:

- diffusers: ``StableDiffusionPipeline`` with ``DPMSolverMultistepScheduler`` (DPM++ 2M), fp16,
  channels_last, ``fuse_qkv_projections()``, the U-Net compiled with ``--diffusers-mode`` (default
  "reduce-overhead" = Inductor + CUDA graphs, diffusers' documented recipe that compiles in minutes; falls
  back to "default" if it fails) and ``vae.decode`` with mode "default". Serving one request at a time
  (one image per call: latency and img/s) and called with batches of ``--diffusers-batch`` (img/s). Output
  as PIL images (decoded, converted); no PNG encoding (our server's numbers include it). Its VAE decodes
  in fp16 (StableDiffusionPipeline does not upcast), which random weights can overflow: one more call
  (untimed, ``output_type="np"``) counts its images that are all finite and not all black (column
  ``images_ok``; the timed PIL images are checked for all-black too).
- ours: ``python -m server`` (engine process, ``--compile true``, CUDA graphs, buckets ``--buckets``) under
  closed-loop load at ``--clients`` (each client sends its next request when its previous one returns).
  Throughput counts the requests that finish inside the measuring window (after ``--settle-s``), so the
  ramp-up and the drain after the window do not dilute it. From /metrics: real rows per forward pass and
  the step period. ``--vae-dtype`` is passed to the server (``UNET_SERVER_VAE_DTYPE``; "auto" = fp32, as
  the VAE config's force_upcast says). A request whose image is not finite is a 500 there (column errors).
  Where the time goes (means): ``step_ms`` the engine's wall time per step (/metrics), and per request from
  the server's X-*-Seconds headers ``queue_ms`` (arrival -> first step: admission, prompt encoding, waiting
  for a batch), ``sampling_ms`` (first step -> images decoded and PNG-encoded) and ``outside_ms`` (the
  client's latency beyond the server's total: HTTP, the ~1 MB transfer, the client).
- the VAE decode's share at saturation: the server decodes finished latents in the engine's stream, between
  steps. Its share of the device time = img/s at saturation x the decode time per image, with the decode
  timed in this process on the server's VAE (same loader, the dtype the server used, same slicing) at the
  mean number of images finishing per step (no /metrics series times the decode itself; see the report).

The server starts first (in its own process) and compiles while diffusers compiles here; diffusers is timed
only after the server is ready and idle, and the server is loaded only after diffusers is freed.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from bench import common
from bench import server_load as sl

PROMPT = "a photo of object number {i}, studio light"


# --- the pipeline folder ------------------------------------------------------------------------------


def build_folder(work: Path, tiny: bool, device: torch.device) -> Path:
    """The SD1.5-config pipeline folder (random weights), made once: ``work/weights/sd15[-tiny]``."""
    root = work / "weights" / ("sd15-tiny" if tiny else "sd15")
    if (root / "model_index.json").is_file():
        return root
    from tests.model import sd_helpers as h

    # The tokenizer's BPE merges come from the open-clip-torch wheel (pip download, once, cached in
    # UNET_SERVER_TEST_CACHE); on a machine without an index fail fast: the byte-level fallback vocabulary
    # changes nothing measured here (prompts are padded to 77 tokens either way).
    os.environ.setdefault("PIP_RETRIES", "0")
    os.environ.setdefault("PIP_TIMEOUT", "5")
    if tiny:
        return h.build_tiny_sd(root, scheduler="DPMSolverMultistepScheduler")
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok_dir, _ = h.clip_tokenizer_dir("sd1")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of a minute on the host
        unet = diffusers.UNet2DConditionModel.from_config(h.SD15_UNET)
        vae = diffusers.AutoencoderKL.from_config(h.SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**h.SD15_TEXT_ENCODER))
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae.half().cpu().eval(),
        text_encoder=text_encoder.half().cpu().eval(),
        tokenizer=tokenizer,
        unet=unet.half().cpu().eval(),
        scheduler=diffusers.DPMSolverMultistepScheduler.from_config(h.SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(root, safe_serialization=True)
    h._ship_tokenizer(root, tok_dir)
    return root


# --- diffusers ----------------------------------------------------------------------------------------


def diffusers_side(
    folder: Path, args: argparse.Namespace, device: torch.device, report: common.Report
) -> dict:
    """Compile, warm up, then time one-image calls and ``--diffusers-batch``-image calls."""
    import diffusers

    from bench.models import quiet_diffusers

    quiet_diffusers()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # DPM++ 2M
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    size = args.size
    mode = args.diffusers_mode
    if device.type == "cuda":
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    pipe.fuse_qkv_projections()  # one QKV GEMM per attention (U-Net and VAE): diffusers' speed recipe
    eager_unet, eager_decode = pipe.unet, pipe.vae.decode

    def compile_with(m: str) -> None:
        if device.type != "cuda" or args.no_compile:
            return
        pipe.unet = torch.compile(eager_unet, mode=m, dynamic=False)
        pipe.vae.decode = torch.compile(eager_decode, mode="default", dynamic=False)

    counter = iter(range(10**9))
    black = [0, 0]  # timed PIL images that are all black, of all timed images

    def call(n: int) -> float:
        i = next(counter)
        g = torch.Generator(device).manual_seed(i)
        t0 = time.perf_counter()
        images = pipe(
            [PROMPT.format(i=i)] * n, height=size, width=size, num_inference_steps=args.steps,
            guidance_scale=args.guidance, generator=g, output_type="pil",
        ).images  # fmt: skip
        common.sync(device)
        elapsed = time.perf_counter() - t0
        assert len(images) == n
        black[0] += sum(max(hi for _, hi in im.getextrema()) == 0 for im in images)  # outside the timing
        black[1] += n
        return elapsed

    def check(n: int) -> str:
        """An untimed call as float arrays: images all finite and not all black, of n (a NaN from an fp16
        overflow would turn into a black PIL image)."""
        g = torch.Generator(device).manual_seed(10**6)
        # (n, H, W, 3) float in [0, 1], NaN kept
        images = pipe(
            [PROMPT.format(i=0)] * n, height=size, width=size, num_inference_steps=args.steps,
            guidance_scale=args.guidance, generator=g, output_type="np",
        ).images  # fmt: skip
        ok = sum(bool(np.isfinite(im).all() and im.max() > 0) for im in images)
        return f"{ok}/{n} finite, not black"

    t0 = time.monotonic()
    compile_with(mode)
    try:
        for n in (1, args.diffusers_batch):
            call(n)
    except Exception as e:  # noqa: BLE001 - a failing compile mode: note it and use "default"
        if mode == "default" or device.type != "cuda":
            raise
        report.note(
            f"diffusers: compile mode {mode} failed ({type(e).__name__}: {str(e)[:200]}); using default"
        )
        mode = "default"
        compile_with(mode)
        for n in (1, args.diffusers_batch):
            call(n)
    for n in (1, args.diffusers_batch):  # second call per shape: leftover lazy work (graph recording)
        call(n)
    setup_s = time.monotonic() - t0
    black[:] = [0, 0]  # count only the timed calls
    return {
        "pipe": pipe,
        "call": call,
        "check": check,
        "black": black,
        "mode": mode if device.type == "cuda" else "eager",
        "setup_s": setup_s,
        "vae_dtype": str(pipe.vae.dtype).removeprefix("torch."),
    }


def time_diffusers(d: dict, args: argparse.Namespace) -> list[dict[str, Any]]:
    one = [d["call"](1) for _ in range(args.diffusers_reps)]
    many = [d["call"](args.diffusers_batch) for _ in range(max(1, args.diffusers_reps // 2))]
    label = f"diffusers + compile({d['mode']})"
    black, total = d["black"]
    ok = f"{d['check'](args.diffusers_batch)}; timed: {black}/{total} black"
    return [
        {"side": label, "point": "1 image per call", "img_s": len(one) / sum(one),
         "p50_ms": 1e3 * statistics.median(one), "p99_ms": 1e3 * max(one), "calls": len(one),
         "images_ok": ok},
        {"side": label, "point": f"{args.diffusers_batch} images per call",
         "img_s": args.diffusers_batch * len(many) / sum(many), "p50_ms": 1e3 * statistics.median(many),
         "p99_ms": 1e3 * max(many), "calls": len(many), "images_ok": ok},
    ]  # fmt: skip


# --- our server ---------------------------------------------------------------------------------------


TIMING_HEADERS = ("queue", "sampling", "total")  # the server's X-Queue-Seconds, X-Sampling-Seconds, ...


async def closed_point(server: sl.ServerProcess, bodies: sl.Bodies, clients: int, args) -> dict[str, Any]:
    """``clients`` closed-loop clients for settle + duration seconds; stats over requests that finish in the
    window [start + settle, start + settle + duration]; /metrics deltas over the same window."""
    import httpx

    pool = sl.Clients(args.request_timeout)
    # (sent, finished, server's queue, sampling and total seconds: X-*-Seconds) of successful requests
    done: list[tuple[float, float, float, float, float]] = []
    errors: dict[str, int] = {}
    start = time.monotonic()
    w0, w1 = start + args.settle_s, start + args.settle_s + args.duration
    async with httpx.AsyncClient(timeout=30) as scraper:

        async def window_scrape(at: float) -> tuple[dict[str, float], float]:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            return await sl.scrape(scraper, server.url), time.monotonic()

        async def worker(i: int) -> None:
            client = pool.for_worker(i)
            while time.monotonic() < w1:
                t0 = time.monotonic()
                try:
                    r = await client.post(
                        server.url + "/generate", json=bodies(), headers={"accept": "image/png"}
                    )
                    key = None if r.status_code == 200 and r.content[:4] == b"\x89PNG" else str(r.status_code)
                    server_s = [float(r.headers.get(f"x-{h}-seconds", "nan")) for h in TIMING_HEADERS]
                except Exception as e:  # noqa: BLE001
                    key = type(e).__name__
                if key is None:
                    done.append((t0, time.monotonic(), *server_s))
                else:
                    errors[key] = errors.get(key, 0) + 1

        scrapes = asyncio.gather(window_scrape(w0), window_scrape(w1))
        await asyncio.gather(*(worker(i) for i in range(clients)))
        (m0, t_m0), (m1, t_m1) = await scrapes
    await pool.aclose()
    inside = [d for d in done if w0 <= d[1] <= w1]
    lat = sorted(d[1] - d[0] for d in inside)
    n = len(lat)

    def mean_ms(values: list[float]) -> float:
        values = [v for v in values if v == v]
        return 1e3 * statistics.fmean(values) if values else math.nan

    deltas = sl.metric_deltas(m0, m1)
    forwards = deltas["forwards"]
    return {
        "side": "ours (server)",
        "point": f"closed {clients}",
        "img_s": n / args.duration,
        "p50_ms": 1e3 * statistics.median(lat) if n else math.nan,
        "p99_ms": 1e3 * lat[min(n - 1, int(0.99 * n))] if n else math.nan,
        "calls": n,
        "rows_per_fwd": deltas["rows_per_fwd"],
        "step_period_ms": 1e3 * (t_m1 - t_m0) / forwards if forwards else math.nan,
        "img_per_step": n / forwards if forwards else math.nan,
        # Where a request's time goes (means): the engine's wall time per step (/metrics), and per request
        # the server's queue (arrival -> first step), sampling (first step -> images decoded and encoded)
        # and the client's latency beyond the server's total (HTTP, transfer, the client itself).
        "step_ms": deltas["step_ms"],
        "queue_ms": mean_ms([d[2] for d in inside]),
        "sampling_ms": mean_ms([d[3] for d in inside]),
        "outside_ms": mean_ms([(d[1] - d[0]) - d[4] for d in inside]),
        "errors": ",".join(f"{k}:{v}" for k, v in errors.items()) or None,
    }


async def load_server(
    server: sl.ServerProcess, args, model: str, report: common.Report
) -> list[dict[str, Any]]:
    import httpx

    bodies = sl.Bodies(argparse.Namespace(steps=args.steps, guidance=args.guidance, text=True), model)
    rows = []
    async with httpx.AsyncClient(timeout=args.request_timeout) as client:
        if server.proc.poll() is not None or not (await client.get(server.url + "/health/ready")).is_success:
            raise RuntimeError(f"server not ready:\n{server.tail()}")
        warm = sl.Clients(args.request_timeout)
        await sl.closed_loop(warm, server.url, bodies, min(8, max(args.clients)), args.warmup_s)
        await warm.aclose()
    for c in args.clients:
        row = await closed_point(server, bodies, c, args)
        print(f"    ours closed {c:>3}: {row['img_s']:6.2f} img/s  p50 {row['p50_ms']:8.0f} ms  "
              f"rows/fwd {row['rows_per_fwd']:5.1f}  errors {row['errors']}", flush=True)  # fmt: skip
        rows.append(row)
    return rows


def server_vae_dtype(folder: Path, vae_dtype: str, device: torch.device) -> torch.dtype:
    """The dtype the server loads this folder's VAE in: ``--vae-dtype``, or for "auto" the loader's rule
    applied to the server's U-Net dtype ("auto": fp16 on CUDA, fp32 on the CPU)."""
    from model.config import VAEConfig
    from model.loading import read_config
    from model.pipeline import default_vae_dtype

    if vae_dtype != "auto":
        return getattr(torch, vae_dtype)
    unet_dtype = torch.float16 if device.type == "cuda" else torch.float32
    return default_vae_dtype(unet_dtype, VAEConfig.from_dict(read_config(folder / "vae")).force_upcast)


def vae_share(
    folder: Path, sat: dict[str, Any], device: torch.device, vae_dtype: str, vae_groupnorm: str
) -> dict[str, Any]:
    """Decode time per image on the server's VAE (in the dtype and GroupNorm kernels the server used) at the
    saturation point's images per step, and its share of the device time at that throughput."""
    from model.loading import load_vae
    from server.loading import use_vae_groupnorm
    from server.worker import VAE_DECODE_MAX_ROWS

    vae = load_vae(folder / "vae", device=device, dtype=server_vae_dtype(folder, vae_dtype, device))
    fused = use_vae_groupnorm({"vae": SimpleNamespace(vae=vae)}, device, vae_groupnorm)
    k = max(1, round(sat.get("img_per_step") or 1))
    side = int(sat.get("latent") or 64)
    lat = torch.randn(k, vae.config.latent_channels, side, side, device=device)
    max_rows = VAE_DECODE_MAX_ROWS if device.type == "cuda" else 1
    with torch.no_grad():
        tm = common.time_call(
            lambda: vae.decode_sliced(lat, max_rows), device, quick=device.type != "cuda", repeats=3
        )
        finite = bool(torch.isfinite(vae.decode_sliced(lat, max_rows)).all())
    per_image = tm["median_ms"] / k
    share = sat["img_s"] * per_image / 1e3
    period = sat.get("step_period_ms") or math.nan
    return {
        "vae dtype": str(vae.dtype).replace("torch.", ""),
        "groupnorm": "triton" if fused else "torch",
        "finite": finite,  # N(0, 1) latents decoded in this dtype: no overflow
        "images per decode": k,
        "decode ms": tm["median_ms"],
        "ms per image": per_image,
        "step period ms": period,
        "decode / step period %": 100 * tm["median_ms"] / period if period == period else None,
        "share of device time %": 100 * share,
    }


# --- main ---------------------------------------------------------------------------------------------


def goals(rows: list[dict[str, Any]], args) -> list[dict[str, Any]]:
    def get(side_prefix: str, point: str, key: str) -> float | None:
        r = next((r for r in rows if r["side"].startswith(side_prefix) and r["point"] == point), None)
        return r.get(key) if r else None

    ours = [r for r in rows if r["side"].startswith("ours")]
    sat = max((r["img_s"] for r in ours), default=None)
    d1 = get("diffusers", "1 image per call", "img_s")
    db = get("diffusers", f"{args.diffusers_batch} images per call", "img_s")
    d1_ms = get("diffusers", "1 image per call", "p50_ms")
    o1_ms = get("ours", f"closed {min(args.clients)}", "p50_ms") if args.clients else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    out = [
        {"goal": "ours saturation / diffusers one at a time", "target": ">= 2", "measured": ratio(sat, d1)},
        {"goal": f"ours saturation / diffusers batches of {args.diffusers_batch}", "target": ">= 1.0",
         "measured": ratio(sat, db)},
        {"goal": f"ours p50 at {min(args.clients)} client / diffusers 1-image latency", "target": "<= 1.1",
         "measured": ratio(o1_ms, d1_ms)},
        {"goal": "ours img/s at saturation", "target": ">= 9", "measured": sat},
    ]  # fmt: skip
    for g in out:
        m, (op, lim) = g["measured"], g["target"].split()
        g["met"] = None if m is None else (m >= float(lim) if op == ">=" else m <= float(lim))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument(
        "--tiny", action="store_true", help="tiny pipeline, 2 steps, short points (CPU smoke test)"
    )
    p.add_argument("--out", default=None)
    p.add_argument("--work-dir", default="/tmp/unet_bench")
    p.add_argument("--skip", default="", help="comma list of: diffusers, server, vae")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--size", type=int, default=512)
    p.add_argument(
        "--diffusers-mode", default="reduce-overhead", help="torch.compile mode of diffusers' U-Net"
    )
    p.add_argument("--diffusers-batch", type=int, default=8)
    p.add_argument(
        "--diffusers-reps", type=int, default=6, help="one-image calls timed (half as many batched)"
    )
    p.add_argument("--no-compile", action="store_true", help="neither side compiles")
    p.add_argument(
        "--vae-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
        help="server: UNET_SERVER_VAE_DTYPE (auto: fp32, as force_upcast says); the VAE share uses it too",
    )  # fmt: skip
    p.add_argument(
        "--vae-groupnorm", default="auto", choices=["auto", "torch", "triton"],
        help="server: UNET_SERVER_VAE_GROUPNORM (auto: Triton kernels on CUDA); the VAE share uses it too",
    )  # fmt: skip
    p.add_argument(
        "--png-compress-level", type=int, default=1,
        help="server: UNET_SERVER_PNG_COMPRESS_LEVEL (0: uncompressed PNGs, ~1 ms instead of ~30 ms at 512²)",
    )  # fmt: skip
    p.add_argument("--clients", default="1,8,32,64")
    p.add_argument("--duration", type=float, default=12.0, help="measuring window per load point (s)")
    p.add_argument("--settle-s", type=float, default=4.0, help="load before each window (s)")
    p.add_argument("--warmup-s", type=float, default=4.0, help="load before the first point (s)")
    p.add_argument("--max-rows", type=int, default=64, help="server: max rows per forward pass")
    p.add_argument("--buckets", default="2,16,64", help="server: batch buckets (each compiled at start-up)")
    p.add_argument("--ready-timeout", type=float, default=420.0)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.size, args.duration, args.settle_s, args.warmup_s = 2, 64, 2.0, 1.0, 1.0
        args.clients, args.diffusers_batch, args.diffusers_reps = "1,4", 2, 2
        args.max_rows, args.buckets = min(args.max_rows, 8), "4,8"
    args.clients = [int(c) for c in args.clients.split(",") if c]
    skip = set(args.skip.split(",")) - {""}
    device = common.pick_device(args.device)
    common.setup_torch(device)
    report = common.Report("pipeline_vs_diffusers", common.env_info(device), args)
    work = Path(args.work_dir)
    t0 = time.monotonic()
    folder = build_folder(work, args.tiny, device)
    report.note(f"pipeline folder {folder} ready in {time.monotonic() - t0:.0f}s; {args.size}², {args.steps} "
                f"steps DPM++ 2M, guidance {args.guidance}")  # fmt: skip
    rows: list[dict[str, Any]] = []
    server = None
    if "server" not in skip:
        flags = {
            "weights_dir": folder.parent, "models": folder.name, "device": device.type,
            "compile": str(device.type == "cuda" and not args.no_compile).lower(), "engine_mode": "process",
            "max_batch_rows": args.max_rows, "batch_buckets": args.buckets, "log_level": "warning",
            "max_queue_size": 4096, "shed_load": "false",
            "request_timeout_seconds": args.request_timeout, "vae_dtype": args.vae_dtype,
            "vae_groupnorm": args.vae_groupnorm,
            "png_compress_level": args.png_compress_level,
        }  # fmt: skip
        server = sl.ServerProcess("pipeline", flags, work)
        report.note("server: python " + " ".join(server.cmd[1:]))
        vae = str(server_vae_dtype(folder, args.vae_dtype, device)).removeprefix("torch.")
        report.note(f"server: VAE decodes in {vae} (--vae-dtype {args.vae_dtype}, "
                    f"--vae-groupnorm {args.vae_groupnorm})")  # fmt: skip
    try:
        if "diffusers" not in skip:
            try:
                d = diffusers_side(folder, args, device, report)
                report.note(f"diffusers: compiled and warmed up in {d['setup_s']:.0f}s (mode {d['mode']}); "
                            f"its VAE decodes in {d['vae_dtype']}")  # fmt: skip
                if server is not None:  # time diffusers only once the server no longer compiles or captures
                    ready = asyncio.run(_wait_ready(server, args.ready_timeout))
                    report.note(f"server: ready {ready:.0f}s after start (compiling while diffusers did)")
                rows += time_diffusers(d, args)
                report.table("end to end (long)", rows, COLUMNS)
            except Exception as e:  # noqa: BLE001
                report.note(f"diffusers side FAILED: {type(e).__name__}: {str(e)[:400]}")
                if args.verbose:
                    traceback.print_exc()
            d = None  # type: ignore[assignment]
            torch._dynamo.reset()  # drops the compiled code and its CUDA-graph pools before the server runs
            common.free_memory()
        if server is not None:
            try:
                ready = asyncio.run(_wait_ready(server, args.ready_timeout))
                report.note(f"server: ready after {ready:.0f}s")
                rows += asyncio.run(load_server(server, args, folder.name, report))
            except Exception as e:  # noqa: BLE001
                report.note(f"server side FAILED: {type(e).__name__}: {str(e)[:400]}\n{server.tail(15)}")
                if args.verbose:
                    traceback.print_exc()
    finally:
        if server is not None:
            server.stop()
    report.tables.clear()
    report.table("end to end: SD1.5 config, random weights", rows, COLUMNS)
    ours = [r for r in rows if r["side"].startswith("ours") and r.get("calls")]
    if ours and "vae" not in skip:
        sat = max(ours, key=lambda r: r["img_s"])
        sat["latent"] = args.size // 8
        try:
            share = vae_share(folder, sat, device, args.vae_dtype, args.vae_groupnorm)
            report.table(f"VAE decode at saturation ({sat['point']}, {sat['img_s']:.2f} img/s)", [share],
                         list(share))  # fmt: skip
        except Exception as e:  # noqa: BLE001
            report.note(f"VAE share FAILED: {type(e).__name__}: {e}")
    report.table("goals (issue 17)", goals(rows, args), ["goal", "target", "measured", "met"])
    report.print_all()


async def _wait_ready(server: sl.ServerProcess, timeout: float) -> float:
    import httpx

    async with httpx.AsyncClient(timeout=10) as client:
        return await server.wait_ready(client, timeout)


COLUMNS = [
    "side", "point", "img_s", "p50_ms", "p99_ms", "calls", "rows_per_fwd", "step_period_ms", "img_per_step",
    "step_ms", "queue_ms", "sampling_ms", "outside_ms", "errors", "images_ok",
]  # fmt: skip


if __name__ == "__main__":
    main()
