"""Server under load: the real server process on loopback, asyncio httpx clients, three configurations.

    python -m bench.server_load --out $OUT                      # CUDA, fashion-class (or a random stand-in)
    python -m bench.server_load --device cpu --quick            # CPU smoke test of every code path

(a) ``batched``: the server as built (step-level continuous batching), max batch rows = ``--max-rows``,
    with the settings of the first of ``--variants`` (default: the engine in its own process); further
    variants run as ``batched[...]`` (e.g. ``--variants 'engine_mode=process;engine_mode=thread'``);
(b) ``one-at-a-time``: the same server with UNET_SERVER_MAX_BATCH_ROWS = the rows of one request (2 with
    guidance) and UNET_SERVER_BATCH_BUCKETS = that, so every forward pass carries exactly one request;
(c) ``raw loop``: no server — the sampling loop in-process on the same weights (bench.sampling_loop), the
    ceiling a server can approach.

Closed loop: C clients, each sending its next request when the previous one returns. Open loop: Poisson
arrivals at fixed rates (derived from the measured saturation throughput unless ``--rates`` is given),
whatever the responses do. Per point: throughput (images/s), p50/p99 latency, and from /metrics the mean
real rows and padded rows per forward pass and the mean engine step time (unet_server_rows_per_forward,
unet_server_padded_rows_per_forward, unet_server_forward_duration_seconds; deltas over the point).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from bench import common, models

METRICS = {
    "rows": "unet_server_rows_per_forward",
    "padded": "unet_server_padded_rows_per_forward",
    "step_s": "unet_server_forward_duration_seconds",
    "queue_s": "unet_server_queue_wait_seconds",  # arrival to first forward pass (one model per run)
}
COUNTERS = {  # 503s by where they were decided (issue 15, item 4)
    "shed_admission": "unet_server_shed_requests_total",  # admission: would miss its deadline
    "shed_front": "unet_server_front_shed_requests_total",  # the event loop ran behind
    "loop_stalls": "unet_server_event_loop_stalls_total",  # blocked > loop_stall_log_seconds (logged)
}
LOOP_DELAY = "unet_server_event_loop_delay_seconds"  # per 10 ms timer: how late it fired


# --- the model folder the server loads -------------------------------------------------------------


def server_weights(args, device) -> tuple[Path, str, str]:
    """(weights_dir, model name, note): ``--model`` in ``--weights-dir`` when given, else the shipped
    fashion-class, else a random stand-in folder."""
    shipped = Path(args.weights_dir)
    if args.model:
        return shipped, args.model, f"model {args.model} from {shipped}"
    if (shipped / "fashion-class" / "unet_server.json").exists():
        return shipped, "fashion-class", "shipped fashion-class"
    root = Path(args.work_dir) / ("server-weights-quick" if args.quick else "server-weights")
    name = "fashion-standin"
    folder = root / name
    if not (folder / "unet_server.json").exists():
        src = models.make_random_folder("fashion-standin", Path(args.work_dir), args.quick, device)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(src, folder / "unet")
        (folder / "scheduler").mkdir(parents=True)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(models.DDPM_SCHEDULER))
        (folder / "model_index.json").write_text(
            json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"]})
        )
        meta = {
            "kind": "class",
            "base_model": None,
            "class_names": [f"class{i}" for i in range(10)],
            "null_class_label": 10,
            "text_encoder": None,
            "control": None,
            "image_channels": 1,
            "sample_size": 32,
            "defaults": {
                "sampler": "dpmpp_2m",
                "num_inference_steps": 20,
                "guidance_scale": 5.0,
                "width": 32,
                "height": 32,
            },
        }
        (folder / "unet_server.json").write_text(json.dumps(meta, indent=1))
    return root, name, "random stand-in shaped like fashion-class (shipped weights absent)"


# --- the server process ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m server`` as a subprocess; log in a temp file (printed when it fails)."""

    def __init__(self, label: str, flags: dict[str, Any], work: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / f"server-{label}.log"
        cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        for k, v in flags.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        self.cmd = cmd
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=common.REPO, env=env)

    async def wait_ready(self, client, timeout: float) -> float:
        """Seconds from process start to the first 200 from /health/ready."""
        while time.monotonic() - self.t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                r = await client.get(self.url + "/health/ready", timeout=2)
            except Exception:  # noqa: BLE001 - not listening yet
                r = None
            if r is not None and r.status_code == 200:
                return time.monotonic() - self.t0
            if r is not None and r.status_code == 503 and _json_status(r) == "failed":
                # loading failed for good (e.g. a model's dependency is missing): no point waiting it out
                raise RuntimeError(f"server failed to load: {r.text[:2000]}\n{self.tail()}")
            await asyncio.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU seconds used so far by (the server process, its children: the engine process): Linux
        /proc; (nan, nan) elsewhere."""
        try:
            return _proc_cpu(self.proc.pid), sum(_proc_cpu(c) for c in _children(self.proc.pid))
        except OSError:
            return float("nan"), float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _proc_cpu(pid: int) -> float:
    """utime + stime of a live process, in seconds (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the name (field 2) may contain spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def _json_status(r) -> str | None:
    """The "status" field of a JSON response, or None."""
    try:
        body = r.json()
    except ValueError:
        return None
    return body.get("status") if isinstance(body, dict) else None


async def scrape(client, url: str) -> dict[str, float]:
    """Sums and counts of the histograms in METRICS (unlabelled), from /metrics."""
    text = (await client.get(url + "/metrics", timeout=10)).text
    out = {}
    for key, name in METRICS.items():
        for part in ("sum", "count"):
            m = re.search(rf"^{name}_{part}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)
            out[f"{key}_{part}"] = float(m.group(1)) if m else float("nan")
    for key, name in COUNTERS.items():
        m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)
        out[key] = float(m.group(1)) if m else float("nan")
    buckets = re.findall(rf'^{LOOP_DELAY}_bucket{{le="([^"]+)"}} ([0-9.eE+-]+)$', text, re.M)
    out["loop_buckets"] = {float(le): float(count) for le, count in buckets}  # type: ignore[assignment]
    return out


def metric_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    def mean(key: str) -> float:
        n = after[f"{key}_count"] - before[f"{key}_count"]
        return (after[f"{key}_sum"] - before[f"{key}_sum"]) / n if n > 0 else float("nan")

    # the loop-delay histogram's new timers over the point: the least bucket bound that holds all of them
    # (the worst delay, to a bucket), and the share of them later than 0.1 s
    old = before.get("loop_buckets", {})
    new = {b: n - old.get(b, 0.0) for b, n in after.get("loop_buckets", {}).items()}
    total = new.get(float("inf"), 0.0)
    worst = min((b for b, n in new.items() if n >= total), default=float("nan")) if total else float("nan")
    late = 100.0 * (1.0 - new.get(0.1, 0.0) / total) if total else float("nan")

    n_fwd = after["rows_count"] - before["rows_count"]
    return {
        "loop_delay_max_s": worst,
        "loop_late_pct": late,
        "forwards": n_fwd,
        "rows_per_fwd": mean("rows"),
        "padded_per_fwd": mean("padded"),
        "step_ms": 1e3 * mean("step_s"),
        "queue_ms": 1e3 * mean("queue_s"),
        **{k: after[k] - before[k] for k in COUNTERS},
    }


# --- load generators ---------------------------------------------------------------------------------


class Recorder:
    def __init__(self):
        self.latencies: list[float] = []
        # The server's own clock per 200 (X-Total-Seconds: from the request's arrival at the app to its
        # images encoded), paired with latencies: what the client sees beyond it is outside the app.
        self.server_totals: list[float] = []
        self.errors: dict[str, int] = {}
        self.first_send = None
        self.client_cpu: list[float] = []  # CPU seconds per second of load, per client process
        self.client_lag: list[float] = []  # per open-loop generator process: its loop's worst timer delay
        self.last_done = None
        # Where the time outside the app goes, per 200 (httpx trace events): ``send_waits``, from the
        # request's creation to its headers going out (a free pooled connection, a new one's handshake, the
        # generator's own loop); ``beyond_app``, from its body sent to the response's headers received,
        # less the server's own clock (the server's sockets and HTTP layer before/after the app).
        self.send_waits: list[float] = []
        self.beyond_app: list[float] = []
        self.connects: list[float] = []  # seconds per new TCP connection (any request, any status)

    async def one(self, client, url: str, body: dict) -> None:
        t0 = time.monotonic()  # one clock for every client process (CLOCK_MONOTONIC is system-wide)
        self.first_send = t0 if self.first_send is None else min(self.first_send, t0)
        marks: dict[str, float] = {}

        async def trace(event: str, info: dict) -> None:
            marks.setdefault(event, time.monotonic())

        try:
            r = await client.post(
                url + "/generate", json=body, headers={"accept": "image/png"}, extensions={"trace": trace}
            )
            ok = r.status_code == 200 and r.content[:4] == b"\x89PNG"
            key = None if ok else str(r.status_code)
            server_total = float(r.headers.get("x-total-seconds", "nan"))
        except Exception as e:  # noqa: BLE001
            key = type(e).__name__
        t1 = time.monotonic()
        nan = float("nan")
        if "connection.connect_tcp.complete" in marks:
            connected = marks["connection.connect_tcp.complete"]
            self.connects.append(connected - marks["connection.connect_tcp.started"])
        if key is None:
            self.latencies.append(t1 - t0)
            self.server_totals.append(server_total)
            self.send_waits.append(marks.get("http11.send_request_headers.started", nan) - t0)
            sent = marks.get("http11.send_request_body.complete", nan)
            answered = marks.get("http11.receive_response_headers.complete", nan)
            self.beyond_app.append(answered - sent - server_total)
            self.last_done = t1 if self.last_done is None else max(self.last_done, t1)
        else:
            self.errors[key] = self.errors.get(key, 0) + 1

    def summary(self, images_per_request: int, deadline_s: float | None = None) -> dict[str, Any]:
        """``ok_past_deadline``: answered 200 later (client clock) than ``deadline_s``, when given;
        ``ok_past_deadline_server``: of those, later by the server's own clock (X-Total-Seconds);
        ``outside_ms``: mean client latency minus the server's time (sockets, the load generator)."""
        lat = sorted(self.latencies)
        n = len(lat)
        span = (self.last_done - self.first_send) if n and self.last_done else float("nan")
        server = [x for x in self.server_totals if x == x]  # a 200 without the header: nan
        outside = [c - s for c, s in zip(self.latencies, self.server_totals, strict=True) if s == s]
        return {
            "ok_past_deadline": sum(x > deadline_s for x in lat) if deadline_s else None,
            "ok_past_deadline_server": sum(x > deadline_s for x in server) if deadline_s else None,
            "outside_ms": 1e3 * statistics.fmean(outside) if outside else float("nan"),
            "send_wait_ms": _mean_ms(self.send_waits),
            "beyond_app_ms": _mean_ms(self.beyond_app),
            "connects": len(self.connects),
            "connect_max_ms": 1e3 * max(self.connects) if self.connects else float("nan"),
            "client_cpu_pct": 100.0 * max(self.client_cpu) if self.client_cpu else None,
            "client_lag_max_ms": 1e3 * max(self.client_lag) if self.client_lag else None,
            "ok": n,
            "errors": ",".join(f"{k}:{v}" for k, v in self.errors.items()) or None,
            "img_s": n * images_per_request / span if n else 0.0,
            "p50_ms": 1e3 * statistics.median(lat) if n else float("nan"),
            "p99_ms": 1e3 * lat[min(n - 1, int(0.99 * n))] if n else float("nan"),
            "mean_ms": 1e3 * statistics.fmean(lat) if n else float("nan"),
        }


def _mean_ms(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return 1e3 * statistics.fmean(xs) if xs else float("nan")


class Bodies:
    def __init__(self, args, model: str):
        self.args, self.model, self.i = args, model, 0

    def __call__(self) -> dict:
        self.i += 1
        if self.args.text:  # a text model: prompts from a small set (the prompt cache sees repeats)
            return {
                "model": self.model,
                "prompt": f"a photo of object number {self.i % 50}, studio light",
                "seed": self.i,
                "num_inference_steps": self.args.steps,
                "sampler": "dpmpp_2m",
                "guidance_scale": self.args.guidance,
            }
        return {
            "model": self.model,
            "class_label": self.i % 10,
            "seed": self.i,
            "num_inference_steps": self.args.steps,
            "sampler": "dpmpp_2m",
            "guidance_scale": self.args.guidance,
        }


class Clients:
    """Many small httpx clients for the load, not one big pool.

    One ``AsyncClient`` shared by 64 concurrent requests spends most of the client's CPU in its connection
    pool (work per request grows with the connections it holds): measured on 2 CPU cores, 64 closed-loop
    clients on one pool burned a full core for ~130 req/s and the server saw 2.6 rows per forward pass;
    one client per worker sustained twice that at 30% of a core and the server saw 100 rows per pass.
    So the load generator, not the server, was the bottleneck at high concurrency. Closed-loop worker i
    uses ``for_worker(i)`` (a client of its own, one connection); open-loop requests go round-robin over
    ``per_pool``-connection clients.
    """

    def __init__(self, timeout: float, per_pool: int = 4, pools: int = 64):
        self.timeout, self.per_pool, self.pools = timeout, per_pool, pools
        self._all: list[Any] = []
        self._workers: list[Any] = []
        self._shared: list[Any] = []
        self._next = 0

    def _new(self, connections: int):
        import httpx

        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        # verify=False: plain HTTP to loopback needs no TLS context, and building one loads the CA bundle:
        # ~46 ms per client on the CI machine, so 64 pools made lazily inside a point stalled each
        # generator's loop ~2.3 s (H200 host) and then let its piled-up arrivals out in one burst
        client = httpx.AsyncClient(limits=limits, timeout=self.timeout, verify=False)
        self._all.append(client)
        return client

    def prepare(self, workers: int = 0) -> None:
        """Make the clients a point will use before it starts (open loop: the shared pools; closed loop:
        ``workers`` clients of one connection), so that none is made while requests are being timed."""
        if workers:
            self.for_worker(workers - 1)
        elif not self._shared:
            self._shared = [self._new(self.per_pool) for _ in range(self.pools)]

    def for_worker(self, i: int):
        while i >= len(self._workers):
            self._workers.append(self._new(1))
        return self._workers[i]

    def round_robin(self):
        self.prepare()
        self._next = (self._next + 1) % len(self._shared)
        return self._shared[self._next]

    async def aclose(self) -> None:
        for c in self._all:
            await c.aclose()


async def closed_loop(
    clients: Clients, url: str, bodies: Bodies, concurrency: int, duration: float
) -> Recorder:
    rec = Recorder()
    deadline = time.monotonic() + duration
    cpu0 = time.process_time()

    async def worker(i: int):
        client = clients.for_worker(i)
        while time.monotonic() < deadline:
            await rec.one(client, url, bodies())

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    rec.client_cpu = [(time.process_time() - cpu0) / duration]
    return rec


# Closed-loop clients per load-generator process. One asyncio process driving 64 httpx clients at a few
# hundred requests/s spends most of a core in httpx, and then the client, not the server, sets the pace
# (fewer requests in flight than clients). The column `client_cpu_pct` (busiest client process) shows it.
CLIENTS_PER_PROC = 16


def _closed_proc(
    url: str,
    steps: int,
    guidance: float,
    model: str,
    text: bool,
    first: int,
    workers: int,
    start_at: float,
    duration: float,
    timeout: float,
) -> dict[str, Any]:
    """One load-generator process: ``workers`` closed-loop clients from ``start_at`` (time.monotonic)."""

    async def run() -> dict[str, Any]:
        clients = Clients(timeout)
        clients.prepare(workers)
        bodies = Bodies(argparse.Namespace(steps=steps, guidance=guidance, text=text), model)
        bodies.i = first
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        rec = await closed_loop(clients, url, bodies, workers, duration)
        await clients.aclose()
        return {
            "latencies": rec.latencies,
            "server_totals": rec.server_totals,
            "send_waits": rec.send_waits,
            "beyond_app": rec.beyond_app,
            "connects": rec.connects,
            "errors": rec.errors,
            "first": rec.first_send,
            "last": rec.last_done,
            "cpu": rec.client_cpu,
        }

    return asyncio.run(run())


def _started(_: int) -> None:
    time.sleep(0.5)  # long enough that every worker process gets one


def start_pool(procs: int) -> ProcessPoolExecutor:
    """Load-generator processes, spawned (and their imports done) before any measurement."""
    pool = ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn"))
    list(pool.map(_started, range(procs)))
    return pool


async def closed_loop_procs(
    pool, url: str, bodies: Bodies, concurrency: int, duration: float, timeout: float
) -> Recorder:
    """``closed_loop`` spread over ceil(concurrency / CLIENTS_PER_PROC) processes, started together."""
    procs = -(-concurrency // CLIENTS_PER_PROC)
    shares = [concurrency // procs + (1 if k < concurrency % procs else 0) for k in range(procs)]
    start_at = time.monotonic() + 1.0
    loop = asyncio.get_running_loop()
    futures = [
        loop.run_in_executor(
            pool,
            _closed_proc,
            url,
            bodies.args.steps,
            bodies.args.guidance,
            bodies.model,
            bodies.args.text,
            bodies.i + 1_000_000 * (k + 1),
            n,
            start_at,
            duration,
            timeout,
        )
        for k, n in enumerate(shares)
    ]
    return _merge(await asyncio.gather(*futures))


def _merge(parts: list[dict[str, Any]]) -> Recorder:
    """One Recorder from the load-generator processes' results."""
    rec = Recorder()
    for part in parts:
        rec.latencies += part["latencies"]
        rec.server_totals += part["server_totals"]
        rec.send_waits += part["send_waits"]
        rec.beyond_app += part["beyond_app"]
        rec.connects += part["connects"]
        for key, v in part["errors"].items():
            rec.errors[key] = rec.errors.get(key, 0) + v
        if part["first"] is not None:
            rec.first_send = part["first"] if rec.first_send is None else min(rec.first_send, part["first"])
        if part["last"] is not None:
            rec.last_done = part["last"] if rec.last_done is None else max(rec.last_done, part["last"])
        rec.client_cpu += part["cpu"]
        rec.client_lag += part.get("lag", [])
    return rec


# Open-loop arrivals per load-generator process: one asyncio process firing a few hundred requests/s spends
# most of a core in httpx and falls behind its schedule (the offered rate is then not what arrives). On the
# H200 host at 1.5x overload, 150/s per process kept the busiest one at 95% of a core (run 21a), 70/s at 47%
# (run 21b): a saturated generator adds its own delay to every latency it records.
OPEN_RATE_PER_PROC = 70.0


def _open_proc(
    url: str, steps: int, guidance: float, model: str, text: bool, first: int, rate: float, seed: int,
    start_at: float, duration: float, timeout: float,
) -> dict[str, Any]:  # fmt: skip
    """One load-generator process: Poisson arrivals at ``rate`` from ``start_at`` for ``duration``."""

    async def run() -> dict[str, Any]:
        clients = Clients(timeout)
        clients.prepare()
        bodies = Bodies(argparse.Namespace(steps=steps, guidance=guidance, text=text), model)
        bodies.i = first
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        cpu0 = time.process_time()
        worst = [0.0]  # this generator's own loop: the latest a 10 ms timer fired (it delays every request)

        async def watch() -> None:
            while True:
                due = time.monotonic() + 0.01
                await asyncio.sleep(0.01)
                worst[0] = max(worst[0], time.monotonic() - due)

        watcher = asyncio.ensure_future(watch())
        rec = await open_loop(clients, url, bodies, rate, duration, seed)
        watcher.cancel()
        cpu = (time.process_time() - cpu0) / duration
        await clients.aclose()
        return {"latencies": rec.latencies, "server_totals": rec.server_totals, "errors": rec.errors,
                "send_waits": rec.send_waits, "beyond_app": rec.beyond_app, "connects": rec.connects,
                "first": rec.first_send, "last": rec.last_done, "cpu": [cpu], "lag": [worst[0]]}  # fmt: skip

    return asyncio.run(run())


def open_procs(rate: float) -> int:
    return max(1, -(-int(rate) // int(OPEN_RATE_PER_PROC)))


async def open_loop_procs(
    pool, url: str, bodies: Bodies, rate: float, duration: float, timeout: float
) -> Recorder:
    """Poisson arrivals at ``rate`` split over ceil(rate / OPEN_RATE_PER_PROC) processes (the superposition of
    independent Poisson streams is Poisson at the summed rate)."""
    procs = open_procs(rate)
    start_at = time.monotonic() + 1.0
    loop = asyncio.get_running_loop()
    a = bodies.args
    futures = [
        loop.run_in_executor(
            pool,
            _open_proc,
            url,
            a.steps,
            a.guidance,
            bodies.model,
            a.text,
            bodies.i + 1_000_000 * (k + 1),
            rate / procs,
            k,
            start_at,
            duration,
            timeout,
        )  # fmt: skip
        for k in range(procs)
    ]
    return _merge(await asyncio.gather(*futures))


async def open_loop(
    clients: Clients, url: str, bodies: Bodies, rate: float, duration: float, seed: int = 0
) -> Recorder:
    rec = Recorder()
    rng = random.Random(seed)
    tasks = []
    start = time.perf_counter()
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t > duration:
            break
        delay = start + t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(rec.one(clients.round_robin(), url, bodies())))
    await asyncio.gather(*tasks)
    return rec


async def measure_point(
    client, server: ServerProcess, label: str, coro, deadline_s: float | None = None
) -> dict[str, Any]:
    before = await scrape(client, server.url)
    cpu0, t0 = server.cpu_seconds(), time.monotonic()
    rec = await coro
    cpu1, t1 = server.cpu_seconds(), time.monotonic()
    after = await scrape(client, server.url)
    row = {"point": label, **rec.summary(1, deadline_s), **metric_deltas(before, after)}
    # CPU per wall second over the point (its 1 s start-up delay for the generator processes included):
    # a front end near 100% is what keeps requests outside the app
    row["server_cpu_pct"] = 100.0 * (cpu1[0] - cpu0[0]) / (t1 - t0)
    row["engine_cpu_pct"] = 100.0 * (cpu1[1] - cpu0[1]) / (t1 - t0)
    print(
        f"    {label:<16} {row['img_s']:8.1f} img/s  p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms"
        f"  rows/fwd {row['rows_per_fwd']:6.1f}  errors {row['errors']}",
        flush=True,
    )
    return row


async def run_server(
    label: str, flags: dict, args, budget, open_rates: list[float] | None
) -> tuple[list, dict]:
    import httpx

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {"server": label}
    server = ServerProcess(label, flags, work)
    info["command"] = "python " + " ".join(server.cmd[1:])
    print(f"  [{label}] {info['command']}", flush=True)
    load = Clients(args.request_timeout)
    pool: ProcessPoolExecutor | None = None
    try:
        async with httpx.AsyncClient(timeout=args.request_timeout) as client:  # readiness and /metrics
            info["start_to_ready_s"] = await server.wait_ready(client, args.ready_timeout)
            print(f"  [{label}] ready after {info['start_to_ready_s']:.1f}s", flush=True)
            bodies = Bodies(args, flags["models"])
            await closed_loop(load, server.url, bodies, min(8, max(args.clients)), args.warmup_s)  # warm-up
            # One-at-a-time: the most concurrent point first (the 20x goal needs it if the budget runs out).
            order = args.clients if open_rates is not None else sorted(args.clients, reverse=True)
            if open_rates is not None and args.saturation_clients:  # batched servers: saturation point
                order = [*order, args.saturation_clients]
            for c in order:
                if budget.exhausted():
                    rows.append({"server": label, "point": f"closed {c}", "errors": "skipped (budget)"})
                    continue
                if c > CLIENTS_PER_PROC:
                    if pool is None:
                        pool = start_pool(-(-max(order) // CLIENTS_PER_PROC))
                    coro = closed_loop_procs(pool, server.url, bodies, c, args.duration, args.request_timeout)
                else:
                    coro = closed_loop(load, server.url, bodies, c, args.duration)
                rows.append({"server": label, **await measure_point(client, server, f"closed {c}", coro)})
            if open_rates is not None:
                sat = max((r.get("img_s", 0.0) for r in rows), default=0.0)
                rates = open_rates or [f * sat for f in args.open_fractions if f * sat > 0]
                for rate in rates:
                    if budget.exhausted():
                        rows.append(
                            {"server": label, "point": f"open {rate:.0f}/s", "errors": "skipped (budget)"}
                        )
                        continue
                    if pool is None or pool._max_workers < open_procs(rate):
                        if pool is not None:
                            pool.shutdown()
                        pool = start_pool(open_procs(rate))
                    timeout = args.request_timeout
                    coro = open_loop_procs(pool, server.url, bodies, rate, args.duration, timeout)
                    deadline = float(flags.get("request_timeout_seconds", 0)) or None  # a variant's
                    row = await measure_point(client, server, f"open {rate:.1f}/s", coro, deadline)
                    rows.append({"server": label, "offered_img_s": rate, **row})
    except Exception as e:  # noqa: BLE001
        info["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        print(f"  [{label}] FAILED: {info['error']}\n{server.tail()}", flush=True)
    finally:
        await load.aclose()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        server.stop()
    return rows, info


# --- raw loop ceiling ----------------------------------------------------------------------------------


def raw_loop(weights_dir: Path, name: str, args, device, report) -> list[dict[str, Any]]:
    """The sampling loop without a server, same weights/sampler/steps/guidance (bench.sampling_loop)."""
    from bench import sampling_loop as sl

    cases, _ = models.shipped_cases(weights_dir)
    case = next(c for c in cases if c.name == name) if name != "fashion-standin" else None
    if case is None:
        case = models.Case(
            name,
            weights_dir / name / "unet",
            1,
            32,
            num_classes=11,
            null_class=10,
            scheduler=dict(models.DDPM_SCHEDULER),
        )
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    net = models.load_ours(case, device, dtype)
    images = [1, max(args.clients)]
    buckets = sorted({2 * n for n in images})

    def example(r: int) -> dict:
        cond, uncond = sl.conditioning(case, r // 2, device, dtype)
        x = torch.randn(r, case.in_channels, case.sample_size, case.sample_size, device=device)
        sig = torch.linspace(10.0, 0.1, r, dtype=torch.float64, device=device)
        return {"x": x, "sigma": sig, **sl.cat_rows(cond, uncond)}

    rows = []
    denoise, how = sl.make_denoise(
        net, case, device.type == "cuda", buckets, device, dtype, report, example(buckets[-1])
    )
    for vectorised in (False, True):
        for n in images:
            run = sl.ours_loop(
                denoise, case, n, args.steps, args.guidance, device, dtype, vectorised=vectorised
            )
            with torch.no_grad():
                run()
                tm = common.time_call(run, device, quick=args.quick, target_ms=0, repeats=3, warmup=0)
            ms = tm["median_ms"]
            mode = "vectorised" if vectorised else "per-request"
            rows.append(
                {
                    "server": f"raw loop ({how}, {mode})",
                    "point": f"{n} images/batch",
                    "img_s": 1e3 * n / ms,
                    "p50_ms": ms,
                    "ok": n,
                }
            )
    common.free_memory()
    return rows


# --- main ----------------------------------------------------------------------------------------------

COLUMNS = [
    "server",
    "point",
    "offered_img_s",
    "img_s",
    "p50_ms",
    "p99_ms",
    "mean_ms",
    "queue_ms",
    "ok_past_deadline",
    "ok_past_deadline_server",
    "outside_ms",
    "send_wait_ms",
    "beyond_app_ms",
    "connects",
    "connect_max_ms",
    "shed_admission",
    "shed_front",
    "rows_per_fwd",
    "padded_per_fwd",
    "step_ms",
    "forwards",
    "ok",
    "errors",
    "client_cpu_pct",
    "client_lag_max_ms",
    "loop_delay_max_s",
    "loop_late_pct",
    "loop_stalls",
    "server_cpu_pct",
    "engine_cpu_pct",
]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--work-dir", default="/tmp/unet_bench")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--model", default=None, help="a model folder (or hub id) in --weights-dir instead")
    p.add_argument("--text", action="store_true", help="the model takes prompts (e.g. Stable Diffusion)")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--clients", default="1,8,64", help="closed-loop concurrency levels")
    p.add_argument("--open-fractions", default="0.5,0.9,1.2", help="x saturation throughput")
    p.add_argument("--rates", default=None, help="explicit open-loop rates (requests/s), overrides fractions")
    p.add_argument("--duration", type=float, default=4.0, help="seconds per load point")
    p.add_argument("--warmup-s", type=float, default=2.0)
    p.add_argument("--max-rows", type=int, default=128, help="batched server: UNET_SERVER_MAX_BATCH_ROWS")
    p.add_argument(
        "--buckets", default=None, help="batched server: UNET_SERVER_BATCH_BUCKETS (default: its own)"
    )
    p.add_argument("--ready-timeout", type=float, default=120.0)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--skip", default="", help="comma list of: batched, one-at-a-time, raw")
    p.add_argument(
        "--variants",
        default="engine_mode=process",
        help="batched server settings, ';'-separated variants of comma-separated key=value (server flags): "
        "the first runs as `batched` (the one the goals use), others as `batched[key=value,...]` for "
        "comparison, e.g. 'engine_mode=process;engine_mode=thread;max_steps_ahead=1'",
    )
    p.add_argument(
        "--saturation-clients",
        type=int,
        default=128,
        help="one more closed-loop point for the batched servers, with more clients than fit one forward "
        "pass so that requests always wait (saturation); 0 = none",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.duration, args.warmup_s = 2, 1.5, 0.5
        args.clients, args.open_fractions = "1,4", "0.5"
        args.max_rows = min(args.max_rows, 8)
    args.clients = [int(c) for c in args.clients.split(",")]
    args.open_fractions = [float(f) for f in args.open_fractions.split(",")]
    rates = [float(r) for r in args.rates.split(",")] if args.rates else []
    skip = set(args.skip.split(",")) - {""}

    device = common.pick_device(args.device)
    common.setup_torch(device)
    report = common.Report("server_load", common.env_info(device), args)
    budget = common.Budget(args.budget_s)
    weights_dir, name, note = server_weights(args, device)
    report.note(
        f"model: {name} ({note}); {args.steps} steps dpmpp_2m, guidance {args.guidance} (2 rows/request)"
    )
    common_flags = {
        "weights_dir": weights_dir,
        "models": name,
        "device": device.type,
        "log_level": "warning",
        "max_queue_size": 4096,
    }
    all_rows: list[dict[str, Any]] = []
    infos = []
    configs = []
    # key=value pairs; a value may itself hold commas (batch_buckets=4,8,16,64,96,128)
    variants = [dict(re.findall(r"(\w+)=(.*?)(?=,\w+=|$)", v.strip())) for v in args.variants.split(";")]
    variants = [v for v in variants if v] or [{}]
    if "batched" not in skip:
        for i, variant in enumerate(variants):
            flags = {**common_flags, "max_batch_rows": args.max_rows}
            if args.buckets:
                flags["batch_buckets"] = args.buckets
            named = ",".join(f"{k}={v}" for k, v in variant.items())
            label = "batched" if i == 0 else f"batched[{named}]"
            configs.append((label, {**flags, **variant}, rates))
    if "one-at-a-time" not in skip:  # the first variant's settings (engine mode etc.), one request per pass
        one = {**common_flags, **variants[0], "max_batch_rows": 2, "batch_buckets": 2}
        configs.append(("one-at-a-time", one, None))
    for label, flags, open_rates in configs:
        rows, info = asyncio.run(run_server(label, flags, args, budget, open_rates))
        all_rows += rows
        infos.append(info)
        report.note(
            f"{label}: start-to-ready {common.fmt(info.get('start_to_ready_s'))}s; `{info['command']}`"
            + (f"; ERROR {info['error'][:300]}" if "error" in info else "")
        )
        report.table("server load (long)", all_rows, COLUMNS)
    if "raw" not in skip:  # always (about 10 s): the ceiling every goal is measured against
        try:
            all_rows += raw_loop(weights_dir, name, args, device, report)
        except Exception as e:  # noqa: BLE001
            report.note(f"raw loop failed: {type(e).__name__}: {e}")
    report.tables.clear()
    report.table("server load", all_rows, COLUMNS)
    report.table("goals", goals(all_rows, infos, args), ["goal", "target", "measured", "met"])
    report.print_all()


def goals(rows: list[dict[str, Any]], infos: list[dict[str, Any]], args) -> list[dict[str, Any]]:
    def pick(name: str, point: str, key: str) -> float | None:
        for r in rows:
            server = r.get("server", "")
            ours = server.startswith(name) if name == "raw loop" else server == name
            if ours and r.get("point") == point and key in r:
                return r[key]
        return None

    top = max(args.clients)
    sat = max((r.get("img_s", 0.0) for r in rows if r.get("server") == "batched"), default=None)
    raw_best = max((r.get("img_s", 0.0) for r in rows if r.get("server", "").startswith("raw")), default=None)
    one64 = pick("one-at-a-time", f"closed {top}", "img_s")
    b64 = pick("batched", f"closed {top}", "img_s")
    p50_1 = pick("batched", "closed 1", "p50_ms")
    raw_1 = pick("raw loop", "1 images/batch", "p50_ms")
    ready = next((i.get("start_to_ready_s") for i in infos if i["server"] == "batched"), None)

    def ratio(a, b):
        return a / b if a and b else None

    out = [
        {"goal": "saturation throughput / raw loop", "target": ">= 0.85", "measured": ratio(sat, raw_best)},
        {"goal": f"batched / one-at-a-time, {top} clients", "target": ">= 20", "measured": ratio(b64, one64)},
        {"goal": "p50 at 1 client / raw loop (1 image)", "target": "<= 1.2", "measured": ratio(p50_1, raw_1)},
        {"goal": "start-to-ready (s)", "target": "<= 15", "measured": ready},
    ]
    limits = [(">=", 0.85), (">=", 20), ("<=", 1.2), ("<=", 15)]
    for g, (op, lim) in zip(out, limits, strict=True):
        m = g["measured"]
        g["met"] = None if m is None else (m >= lim if op == ">=" else m <= lim)
    return out


if __name__ == "__main__":
    main()
