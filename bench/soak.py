"""Soak: the real server under a long run of mixed traffic; does anything grow? (issue 15, item 7)

    python -m bench.soak --out $OUT                        # GPU: 100,000 requests, a sample a minute
    python -m bench.soak --device cpu --engine-mode process --sample-s 15 --out DIR     # CPU: 20,000
    python -m bench.soak --quick                           # a few hundred requests (smoke test)

Starts ``python -m server`` (bench.server_load.ServerProcess) on the shipped models and drives it from
``--procs`` load-generator processes, ``--workers`` closed-loop clients each, with a mix of request kinds:

- ``class`` / ``text``: POST /generate on a class model (PNG body) and a text model (JSON with base64 PNGs;
  repeated and unique prompts, so the prompt cache both hits and evicts);
- ``control``: POST /generate on a ControlNet model with an edge map, as base64 JSON or a multipart upload;
- ``job_sse``: POST /v1/jobs, then its event stream read to the terminal event (some with previews);
- ``job_cancel``: POST /v1/jobs with many steps, cancelled while queued or after its first progress event;
- ``disconnect``: a raw socket sends POST /generate (many steps; sometimes only half of the body) and closes
  before the answer;
- ``openai``: POST /v1/images/generations;
- ``invalid``: bodies the server must refuse with 422 (caps, unknown fields and models, bad JSON, ...).

First a warm-up load (``--warmup`` requests), then an idle sample, then ``--requests`` requests. Every
``--sample-s`` seconds: RSS, open file descriptors and threads of the server process and of its engine
child (/proc), GPU memory, queue, running requests and outstanding rows (/metrics), and the outcome counts.
The verdict compares the last third of the samples under load with the first third: RSS flat within
max(RSS_TOL_MIB, RSS_TOL_PCT) (and GPU memory likewise), median fds and threads within FDS_TOL / THREADS_TOL,
idle fds after the run equal to idle fds after the warm-up (± IDLE_FDS_TOL), queue, running and outstanding
rows back to 0, no 5xx, no unexpected outcome. Growth is also given per 1000 requests (least squares, over
all the load samples and over the last third: a bounded cache filling up shows as growth that stops).

Load generators import no torch (this module's top level stays light: they are spawned from it).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import multiprocessing
import os
import random
import re
import statistics
import time
from pathlib import Path
from typing import Any

# Flat means (last third of the load samples vs the first third):
RSS_TOL_MIB = 20.0  # RSS grew by less than this many MiB ...
RSS_TOL_PCT = 5.0  # ... or by less than this percentage (whichever allows more)
# Open fds other than sockets (files, pipes, eventfds): median differs by at most this many. Sockets are
# left out under load (client connections come and go with the load) and compared when idle instead.
FDS_TOL = 4
THREADS_TOL = 2  # median threads likewise
IDLE_FDS_TOL = 2  # all open fds (sockets included), idle after the run vs idle after the warm-up
# After the load, seconds allowed for the server to close the clients' connections before the idle sample
# (a leaked socket stays; one the server is still closing goes within a second).
SETTLE_S = 10.0

KINDS = ("class", "text", "control", "job_sse", "job_cancel", "disconnect", "openai", "invalid")
DEFAULT_MIX = "class=25,text=15,control=12,job_sse=10,job_cancel=8,disconnect=8,openai=12,invalid=10"
# The outcomes each kind is meant to end in; anything else is "unexpected".
EXPECTED = {
    "class": {"200"},
    "text": {"200"},
    "control": {"200"},
    "openai": {"200"},
    "invalid": {"422"},
    "job_sse": {"completed"},
    "job_cancel": {"cancelled", "finished_first"},  # 409: sampling finished before the cancel arrived
    "disconnect": {"closed", "closed_partial", "answered_200"},
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROMPTS = [
    f"a {c} {t}"
    for c in ("red", "blue", "white", "black", "green", "gray")
    for t in ("t-shirt", "dress", "sneaker", "bag", "coat", "ankle boot", "trouser")
]


# --- request kinds (run in the load-generator processes) -----------------------------------------------


def edge_map_png(width: int, height: int) -> bytes:
    """A white outline on black (the control-map convention; as tests/integration/test_generate.py draws)."""
    from PIL import Image, ImageDraw

    image = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 4, height // 8, 3 * width // 4, 7 * height // 8), outline=255, width=1)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Ops:
    """The request kinds against one server, for one load-generator process. Each returns an outcome."""

    def __init__(self, plan: dict[str, Any], rng: random.Random):
        self.p = plan
        self.rng = rng
        self.url = plan["url"]
        self.host, self.port = re.match(r"https?://([^:/]+):(\d+)", self.url).groups()  # type: ignore[union-attr]
        size = plan["size"]
        self.size = {"width": size, "height": size} if size else {}
        edge = size or plan["control_size"]
        self.edges = edge_map_png(edge, edge)
        self.edges_b64 = base64.b64encode(self.edges).decode()
        self.http = 0  # HTTP requests sent (a job is two or three)

    # common parts of a body
    def _sampling(self, model: dict[str, Any], long: bool = False) -> dict[str, Any]:
        p, r = self.p, self.rng
        steps = p["long_steps"] if long else r.randint(1, p["steps"])
        body = {
            "model": model["id"],
            "seed": r.randrange(2**31),
            "num_inference_steps": steps,
            "sampler": r.choice(p["samplers"][model["schedule"]]),
            "guidance_scale": p["cfg_scale"] if r.random() < p["cfg_share"] else 1.0,
            **self.size,
        }
        return body

    def _prompt(self) -> str:
        r = self.rng
        return f"a {r.random():.6f} shirt" if r.random() < 0.3 else r.choice(PROMPTS)  # 30% cache misses

    def _class_body(self, long: bool = False) -> dict[str, Any]:
        model = self.rng.choice(self.p["models"]["class"])
        body = self._sampling(model, long)
        names = model["classes"]
        body["class_label"] = self.rng.choice([self.rng.randrange(len(names)), self.rng.choice(names)])
        return body

    def _text_body(self, long: bool = False) -> dict[str, Any]:
        body = self._sampling(self.rng.choice(self.p["models"]["text"]), long)
        body["prompt"] = self._prompt()
        if self.rng.random() < 0.2:
            body["negative_prompt"] = "blurry"
        return body

    def _any_body(self, long: bool = False) -> dict[str, Any]:
        kinds = [k for k in ("class", "text") if self.p["models"][k]]
        return self._class_body(long) if self.rng.choice(kinds) == "class" else self._text_body(long)

    @staticmethod
    def _images_ok(data: dict[str, Any], key: str = "images") -> bool:
        images = data.get(key) or []
        return bool(images) and all(base64.b64decode(i[:16])[:8] == PNG_MAGIC for i in images)

    async def op_class(self, client) -> str:
        body = self._class_body()
        if self.rng.random() < 0.2:
            body["num_images"] = 2
        self.http += 1
        if body.get("num_images", 1) == 1:
            r = await client.post(self.url + "/generate", json=body, headers={"accept": "image/png"})
            ok = r.status_code == 200 and r.content[:8] == PNG_MAGIC
        else:
            r = await client.post(self.url + "/generate", json=body)
            ok = r.status_code == 200 and len(r.json()["images"]) == 2 and self._images_ok(r.json())
        return "200" if ok else ("bad_body" if r.status_code == 200 else str(r.status_code))

    async def op_text(self, client) -> str:
        self.http += 1
        r = await client.post(self.url + "/generate", json=self._text_body())
        if r.status_code != 200:
            return str(r.status_code)
        return "200" if self._images_ok(r.json()) else "bad_body"

    async def op_control(self, client) -> str:
        model = self.rng.choice(self.p["models"]["control"])
        body = {
            **self._sampling(model),
            "prompt": self._prompt(),
            "control_scale": self.rng.choice([0.5, 1.0]),
        }
        self.http += 1
        if self.rng.random() < 0.5:
            r = await client.post(self.url + "/generate", json={**body, "control_image": self.edges_b64})
        else:  # multipart upload (the server spools the file)
            form = {k: str(v) for k, v in body.items()}
            files = {"control_image": ("edges.png", self.edges, "image/png")}
            r = await client.post(self.url + "/generate", data=form, files=files)
        if r.status_code != 200:
            return str(r.status_code)
        return "200" if self._images_ok(r.json()) else "bad_body"

    async def op_openai(self, client) -> str:
        r_ = self.rng
        kinds = [k for k in ("class", "text") if self.p["models"][k]]
        if r_.choice(kinds) == "class":
            model = r_.choice(self.p["models"]["class"])
            prompt = r_.choice(model["classes"])
        else:
            model = r_.choice(self.p["models"]["text"])
            prompt = self._prompt()
        s = self._sampling(model)
        body = {"model": model["id"], "prompt": prompt, "n": 1, "response_format": "b64_json",
                "seed": s["seed"], "num_inference_steps": s["num_inference_steps"], "sampler": s["sampler"],
                "guidance_scale": s["guidance_scale"]}  # fmt: skip
        if self.size:
            body["size"] = f"{self.size['width']}x{self.size['height']}"
        self.http += 1
        r = await client.post(self.url + "/v1/images/generations", json=body)
        if r.status_code != 200:
            return str(r.status_code)
        data = r.json()["data"]
        return "200" if self._images_ok({"images": [d["b64_json"] for d in data]}) else "bad_body"

    async def op_invalid(self, client) -> str:
        r_ = self.rng
        base = self._any_body()
        cases: list[tuple[str, Any]] = [
            ("/generate", {**base, "num_inference_steps": 100_000}),
            ("/generate", {**base, "unknown_field": 1}),
            ("/generate", {**base, "model": "no-such-model"}),
            ("/generate", {**base, "guidance_scale": -1}),
            ("/generate", {**base, "width": 4096, "height": 4096}),
            ("/generate", {**base, "num_images": 10_000}),
            ("/generate", b"{not json"),
            ("/generate", {**base, "seed": -5}),
            ("/v1/jobs", {**base, "sampler": "no-such-sampler"}),
            ("/v1/jobs", {**base, "preview_every": -1}),
            ("/v1/images/generations", {"prompt": "x", "size": "big"}),
            ("/v1/images/generations", {"prompt": "x", "n": 10_000}),
        ]
        if self.p["models"]["class"]:
            cases.append(("/generate", {**self._class_body(), "control_image": self.edges_b64}))
        path, body = r_.choice(cases)
        self.http += 1
        if isinstance(body, bytes):
            r = await client.post(self.url + path, content=body, headers={"content-type": "application/json"})
        else:
            r = await client.post(self.url + path, json=body)
        return str(r.status_code)

    async def _events(self, client, job_id: str, on_first_progress=None) -> tuple[str | None, dict]:
        """Read the job's SSE stream to its terminal event; ``on_first_progress()`` awaited once."""
        self.http += 1
        event, last, data = None, None, {}
        async with client.stream("GET", f"{self.url}/v1/jobs/{job_id}/events") as resp:
            if resp.status_code != 200:
                return f"events_{resp.status_code}", {}
            async for line in resp.aiter_lines():
                if line.startswith("event: "):
                    event = line[7:].strip()
                elif line.startswith("data: ") and event is not None:
                    if event in ("completed", "failed", "cancelled"):
                        last, data = event, json.loads(line[6:])
                        break
                    if event == "progress" and on_first_progress is not None:
                        hook, on_first_progress = on_first_progress, None
                        await hook()
        return last, data

    async def op_job_sse(self, client) -> str:
        body = self._any_body()
        if self.rng.random() < 0.2:
            body["preview_every"] = 1
        self.http += 1
        r = await client.post(self.url + "/v1/jobs", json=body)
        if r.status_code != 202:
            return f"post_{r.status_code}"
        last, data = await self._events(client, r.json()["id"])
        if last != "completed":
            return str(last)
        return "completed" if self._images_ok(data.get("result") or {}) else "bad_body"

    async def op_job_cancel(self, client) -> str:
        self.http += 1
        r = await client.post(self.url + "/v1/jobs", json=self._any_body(long=True))
        if r.status_code != 202:
            return f"post_{r.status_code}"
        job_id = r.json()["id"]
        cancel_status: list[int] = []

        async def cancel() -> None:
            self.http += 1
            c = await client.post(f"{self.url}/v1/jobs/{job_id}/cancel")
            cancel_status.append(c.status_code)

        if self.rng.random() < 0.5:  # at once (usually still queued), then the job's state
            await cancel()
            self.http += 1
            last = (await client.get(f"{self.url}/v1/jobs/{job_id}")).json()["status"]
        else:  # while it runs: after its first progress event, then the stream to its end
            last, _ = await self._events(client, job_id, cancel)
        if cancel_status == [200] and last == "cancelled":
            return "cancelled"
        if cancel_status == [409] and last == "completed":
            return "finished_first"
        return f"cancel_{cancel_status}_{last}"

    async def op_disconnect(self, client) -> str:
        """A raw socket: POST /generate (all of the body, or half of it), then close before the answer."""
        body = json.dumps(self._any_body(long=True)).encode()
        partial = self.rng.random() < 0.25
        head = (
            f"POST /generate HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nAccept: image/png\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.http += 1
        reader, writer = await asyncio.open_connection(self.host, int(self.port))
        try:
            writer.write(head + (body[: len(body) // 2] if partial else body))
            await writer.drain()
            wait = self.rng.uniform(*self.p["disconnect_after_s"])
            try:
                line = await asyncio.wait_for(reader.readline(), wait)
            except asyncio.TimeoutError:
                return "closed_partial" if partial else "closed"
            parts = line.split()
            return f"answered_{parts[1].decode()}" if len(parts) > 1 else "answered_eof"
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass


class Tally:
    """Outcome counts and latencies of one load-generator process, written to a JSON file as it goes."""

    def __init__(self, path: str):
        self.path = path
        self.ops = 0
        self.counts: dict[str, int] = {}
        self.latency: dict[str, list[float]] = {}  # kind -> [sum, count, max]

    def add(self, kind: str, outcome: str, seconds: float) -> None:
        self.ops += 1
        key = f"{kind}:{outcome}"
        self.counts[key] = self.counts.get(key, 0) + 1
        lat = self.latency.setdefault(kind, [0.0, 0, 0.0])
        lat[0] += seconds
        lat[1] += 1
        lat[2] = max(lat[2], seconds)

    def write(self, http: int, done: bool = False) -> None:
        doc = {"ops": self.ops, "http": http, "counts": self.counts, "latency": self.latency, "done": done}
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, self.path)


def load_main(plan: dict[str, Any], index: int, quota: int, status_path: str) -> None:
    """One load-generator process: ``plan['workers']`` closed-loop clients until ``quota`` requests."""
    asyncio.run(_load(plan, index, quota, status_path))


async def _load(plan: dict[str, Any], index: int, quota: int, status_path: str) -> None:
    import httpx

    rng = random.Random(plan["seed"] * 1000 + index)
    ops = Ops(plan, rng)
    tally = Tally(status_path)
    kinds = [k for k, w in plan["mix"].items() if w > 0]
    weights = [plan["mix"][k] for k in kinds]
    issued = 0
    deadline = plan["deadline"]

    async def worker() -> None:
        nonlocal issued
        # two connections: a job's cancel goes out while its event stream is open
        limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)
        async with httpx.AsyncClient(limits=limits, timeout=plan["request_timeout"]) as client:
            while issued < quota and (deadline is None or time.monotonic() < deadline):
                issued += 1
                kind = rng.choices(kinds, weights)[0]
                t0 = time.monotonic()
                try:
                    outcome = await getattr(ops, f"op_{kind}")(client)
                except Exception as e:  # noqa: BLE001 - an outcome like any other (counted as unexpected)
                    outcome = f"error_{type(e).__name__}"
                tally.add(kind, outcome, time.monotonic() - t0)

    async def flush() -> None:
        while True:
            tally.write(ops.http)
            await asyncio.sleep(0.5)

    flusher = asyncio.ensure_future(flush())
    await asyncio.gather(*(worker() for _ in range(plan["workers"])))
    flusher.cancel()
    tally.write(ops.http, done=True)


# --- what the sampler reads: /proc and /metrics -------------------------------------------------------


def proc_stats(pid: int | None) -> dict[str, float | None]:
    """RSS (MiB), open fds (all, and sockets among them) and threads of ``pid`` from /proc; None values
    when it is gone."""
    none = {"rss_mib": None, "fds": None, "sockets": None, "threads": None}
    if pid is None:
        return none
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return none
    sockets = 0
    for name in names:
        try:
            sockets += os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:")
        except OSError:  # closed since listdir
            pass
    rss = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    threads = re.search(r"^Threads:\s+(\d+)", status, re.M)
    return {
        "rss_mib": int(rss.group(1)) / 1024 if rss else None,
        "fds": len(names),
        "sockets": sockets,
        "threads": int(threads.group(1)) if threads else None,
    }


def engine_child(pid: int) -> int | None:
    """The engine process among ``pid``'s children (multiprocessing spawn, not its resource tracker)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != pid:
                continue
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, ValueError, IndexError):
            continue
        if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
            return int(entry)
    return None


GAUGES = {
    "queue": "unet_server_queue_size",
    "running": "unet_server_running_requests",
    "rows": "unet_server_outstanding_rows",
    "gpu_mib": "unet_server_gpu_memory_allocated_bytes",
    "shed": "unet_server_shed_requests_total",  # a counter: refused at admission (503) as too late
}


def parse_metrics(text: str) -> dict[str, Any]:
    """The gauges in GAUGES (gpu in MiB; None when absent) and requests_total summed per status."""
    out: dict[str, Any] = {}
    for key, name in GAUGES.items():
        m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)
        value = float(m.group(1)) if m else None
        out[key] = value / 2**20 if (key == "gpu_mib" and value is not None) else value
    by_status: dict[str, float] = {}
    for labels, v in re.findall(r"^unet_server_requests_total{([^}]*)} ([0-9.eE+-]+)$", text, re.M):
        status = re.search(r'status="([^"]*)"', labels)
        if status:
            by_status[status.group(1)] = by_status.get(status.group(1), 0.0) + float(v)
    out["server_status"] = by_status
    return out


# --- the run (main process) ------------------------------------------------------------------------------


def outcome_groups(counts: dict[str, int]) -> dict[str, int]:
    """Outcome counts grouped for the sample table."""
    g = {"ok": 0, "cancelled": 0, "disconnected": 0, "refused_422": 0, "other_expected": 0, "unexpected": 0,
         "client_5xx": 0}  # fmt: skip
    for key, n in counts.items():
        kind, outcome = key.split(":", 1)
        if outcome in ("200", "completed"):
            g["ok"] += n
        elif outcome == "cancelled":
            g["cancelled"] += n
        elif outcome.startswith("closed"):
            g["disconnected"] += n
        elif outcome == "422" and kind == "invalid":
            g["refused_422"] += n
        elif outcome in EXPECTED.get(kind, set()):
            g["other_expected"] += n
        else:
            g["unexpected"] += n
        if re.search(r"(^|_)5\d\d($|_)", outcome):
            g["client_5xx"] += n
    return g


class Loads:
    """The load-generator processes of one phase and their status files."""

    def __init__(self, plan: dict[str, Any], total: int, work: Path, phase: str):
        ctx = multiprocessing.get_context("spawn")
        procs = plan["procs"]
        quotas = [total // procs + (1 if k < total % procs else 0) for k in range(procs)]
        self.paths = [str(work / f"load-{phase}-{k}.json") for k in range(procs)]
        for path in self.paths:
            Path(path).unlink(missing_ok=True)
        self.procs = [
            ctx.Process(
                target=load_main, args=(plan, k + (1000 if phase == "load" else 0), q, path), daemon=True
            )
            for k, (q, path) in enumerate(zip(quotas, self.paths, strict=True))
        ]
        for p in self.procs:
            p.start()

    def alive(self) -> bool:
        return any(p.is_alive() for p in self.procs)

    def full(self) -> bool:
        """Every load process started and still sending (not the ramp-up or the ramp-down)."""
        return all(p.is_alive() for p in self.procs) and all(os.path.exists(p) for p in self.paths)

    def status(self) -> dict[str, Any]:
        total: dict[str, Any] = {"ops": 0, "http": 0, "counts": {}, "latency": {}}
        for path in self.paths:
            try:
                doc = json.loads(Path(path).read_text())
            except (OSError, ValueError):
                continue
            total["ops"] += doc["ops"]
            total["http"] += doc["http"]
            for k, v in doc["counts"].items():
                total["counts"][k] = total["counts"].get(k, 0) + v
            for k, (s, n, mx) in doc["latency"].items():
                cur = total["latency"].setdefault(k, [0.0, 0, 0.0])
                cur[0], cur[1], cur[2] = cur[0] + s, cur[1] + n, max(cur[2], mx)
        return total

    def stop(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
            p.join(5)


def merge_status(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    counts = dict(a["counts"])
    for k, v in b["counts"].items():
        counts[k] = counts.get(k, 0) + v
    latency = {k: list(v) for k, v in a["latency"].items()}
    for k, (s, n, mx) in b["latency"].items():
        cur = latency.setdefault(k, [0.0, 0, 0.0])
        cur[0], cur[1], cur[2] = cur[0] + s, cur[1] + n, max(cur[2], mx)
    return {"ops": a["ops"] + b["ops"], "http": a["http"] + b["http"], "counts": counts, "latency": latency}


SAMPLE_COLUMNS = [
    "phase", "t_s", "requests", "req_s", "srv_rss_mib", "srv_fds", "srv_sockets", "srv_threads",
    "eng_rss_mib", "eng_fds", "eng_threads", "gpu_mib", "queue", "running", "rows", "ok", "cancelled",
    "disconnected", "refused_422", "other_expected", "unexpected", "client_5xx", "server_5xx", "shed",
]  # fmt: skip


class Sampler:
    """Samples the server (and its engine child) into rows; prints each row as it is taken."""

    def __init__(self, server, client, device_name: str):
        self.server, self.client = server, client
        self.rows: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self.device_name = device_name
        self.engine_pids: list[int] = []
        self.last: tuple[float, int] | None = None

    async def metrics(self) -> dict[str, Any]:
        return parse_metrics((await self.client.get(self.server.url + "/metrics", timeout=30)).text)

    async def take(self, phase: str, status: dict[str, Any], full_load: bool = False) -> dict[str, Any]:
        pid = self.server.proc.pid
        child = engine_child(pid)
        if child is not None and child not in self.engine_pids:
            self.engine_pids.append(child)
        srv, eng = proc_stats(pid), proc_stats(child)
        m = await self.metrics()
        now = time.monotonic()
        rate = None
        if self.last is not None and now > self.last[0] and phase in ("warmup", "load"):
            rate = (status["ops"] - self.last[1]) / (now - self.last[0])
        self.last = (now, status["ops"])
        server_5xx = sum(v for s, v in m["server_status"].items() if s.startswith("5"))
        row = {
            "phase": phase, "t_s": now - self.t0, "requests": status["ops"], "req_s": rate,
            "srv_rss_mib": srv["rss_mib"], "srv_fds": srv["fds"], "srv_sockets": srv["sockets"],
            "srv_threads": srv["threads"], "eng_rss_mib": eng["rss_mib"], "eng_fds": eng["fds"],
            "eng_sockets": eng["sockets"], "eng_threads": eng["threads"],
            "gpu_mib": m["gpu_mib"], "queue": m["queue"], "running": m["running"], "rows": m["rows"],
            "shed": m["shed"],
            **outcome_groups(status["counts"]), "server_5xx": server_5xx,
            "counts": dict(status["counts"]), "server_status": m["server_status"], "engine_pid": child,
            "full_load": full_load,
        }  # fmt: skip
        for side in ("srv", "eng"):  # fds that are not sockets (the under-load leak check)
            fds, socks = row[f"{side}_fds"], row[f"{side}_sockets"]
            row[f"{side}_files"] = None if fds is None else fds - socks
        self.rows.append(row)
        self.print_row(row)
        return row

    def print_row(self, row: dict[str, Any]) -> None:
        from bench.common import fmt

        cols = SAMPLE_COLUMNS
        widths = [max(len(c), 7) for c in cols]
        if (len(self.rows) - 1) % 20 == 0:
            print(f"\n-- soak samples on {self.device_name} --", flush=True)
            print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)), flush=True)
        print("  ".join(fmt(row.get(c)).rjust(w) for c, w in zip(cols, widths, strict=True)), flush=True)

    async def settled(self, fds: int | None, timeout: float) -> None:
        """Waits (at most ``timeout``) until the server holds at most ``fds`` open fds, at least 1 s."""
        await asyncio.sleep(1.0)
        end = time.monotonic() + timeout
        while fds is not None and time.monotonic() < end:
            now = proc_stats(self.server.proc.pid)["fds"]
            if now is None or now <= fds:
                return
            await asyncio.sleep(0.25)

    async def until_idle(self, timeout: float) -> bool:
        """Waits until queue, running requests and outstanding rows are all 0."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = await self.metrics()
            if m["queue"] == 0 and m["running"] == 0 and m["rows"] == 0:
                return True
            await asyncio.sleep(0.5)
        return False


async def run_phase(
    sampler: Sampler, loads: Loads, phase: str, base: dict[str, Any], sample_s: float
) -> dict:
    """Samples every ``sample_s`` while ``loads`` runs; the phase's status merged onto ``base``."""
    next_at = time.monotonic() + sample_s
    while loads.alive():
        await asyncio.sleep(min(0.25, max(0.0, next_at - time.monotonic())))
        if time.monotonic() >= next_at:
            next_at += sample_s
            full = loads.full()
            await sampler.take(phase, merge_status(base, loads.status()), full_load=full)
    loads.stop()
    status = merge_status(base, loads.status())
    await sampler.take(phase, status)
    return status


def slope_per_1000(rows: list[dict[str, Any]], key: str) -> float | None:
    """Least-squares growth of ``key`` per 1000 requests over ``rows``."""
    pts = [(r["requests"], r[key]) for r in rows if r.get(key) is not None]
    if len(pts) < 3:
        return None
    mx = statistics.fmean(p[0] for p in pts)
    my = statistics.fmean(p[1] for p in pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return 1000.0 * sum((x - mx) * (y - my) for x, y in pts) / den if den else None


def verdict(samples: list[dict[str, Any]], final: dict[str, Any], extra: dict[str, Any]) -> list[dict]:
    """The rows of the verdict table (see the module docstring for the rules)."""
    load = [r for r in samples if r["phase"] == "load" and r["full_load"]]
    third = len(load) // 3
    out: list[dict[str, Any]] = []
    idle_warm = next((r for r in samples if r["phase"] == "idle after warm-up"), None)
    for key, label, agg, kind in [
        ("srv_rss_mib", "server RSS (MiB)", statistics.fmean, "rss"),
        ("eng_rss_mib", "engine RSS (MiB)", statistics.fmean, "rss"),
        ("gpu_mib", "GPU allocated (MiB)", statistics.fmean, "rss"),
        ("srv_files", "server open fds other than sockets", statistics.median, "fds"),
        ("eng_files", "engine open fds other than sockets", statistics.median, "fds"),
        ("srv_threads", "server threads", statistics.median, "threads"),
        ("eng_threads", "engine threads", statistics.median, "threads"),
    ]:
        first = [r[key] for r in load[:third] if r.get(key) is not None]
        last = [r[key] for r in load[-third:] if r.get(key) is not None] if third else []
        if not first or not last:
            if any(r.get(key) is not None for r in samples):
                need = f"needs >= 3 samples at full load ({len(load)})"
                out.append({"check": label, "flat": None, "tolerance": need})
            continue
        a, b = agg(first), agg(last)
        growth = b - a
        if kind == "rss":
            tol = max(RSS_TOL_MIB, RSS_TOL_PCT / 100 * a)
            tol_text = f"< max({RSS_TOL_MIB:.0f} MiB, {RSS_TOL_PCT:.0f}%) = {tol:.1f}"
            flat = growth < tol
        else:
            tol = FDS_TOL if kind == "fds" else THREADS_TOL
            tol_text = f"|median diff| <= {tol}"
            flat = abs(growth) <= tol
        # the slope over the last third tells a bounded fill (a cache reaching its size) from a leak
        per_1000, tail = slope_per_1000(load, key), slope_per_1000(load[-third:], key)
        out.append({"check": label, "first_third": a, "last_third": b, "growth": growth,
                    "per_1000_req": per_1000, "per_1000_last_third": tail, "tolerance": tol_text,
                    "flat": flat})  # fmt: skip
    for key, label in [("srv_fds", "server open fds, idle"), ("eng_fds", "engine open fds, idle")]:
        if idle_warm and idle_warm.get(key) is not None and final.get(key) is not None:
            growth = final[key] - idle_warm[key]
            out.append({"check": f"{label}: end vs after warm-up", "first_third": idle_warm[key],
                        "last_third": final[key], "growth": growth, "tolerance": f"|diff| <= {IDLE_FDS_TOL}",
                        "flat": abs(growth) <= IDLE_FDS_TOL})  # fmt: skip
    for key in ("queue", "running", "rows"):
        out.append({"check": f"{GAUGES[key]} at the end", "last_third": final.get(key), "tolerance": "== 0",
                    "flat": final.get(key) == 0})  # fmt: skip
    out.append({"check": "5xx seen by clients", "last_third": final["client_5xx"], "tolerance": "== 0",
                "flat": final["client_5xx"] == 0})  # fmt: skip
    out.append({"check": "5xx counted by the server (requests_total)", "last_third": final["server_5xx"],
                "tolerance": "== 0", "flat": final["server_5xx"] == 0})  # fmt: skip
    out.append({"check": "unexpected outcomes", "last_third": final["unexpected"], "tolerance": "== 0",
                "flat": final["unexpected"] == 0})  # fmt: skip
    out.append({"check": "engine processes seen (restarts + 1)", "last_third": extra["engine_pids"],
                "tolerance": "<= 1", "flat": extra["engine_pids"] <= 1})  # fmt: skip
    return out


OUTCOME_COLUMNS = ["kind", "outcome", "count", "expected", "mean_ms", "max_ms"]
VERDICT_COLUMNS = [
    "check", "first_third", "last_third", "growth", "per_1000_req", "per_1000_last_third", "tolerance",
    "flat",
]  # fmt: skip


def outcome_rows(status: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key in sorted(status["counts"]):
        kind, outcome = key.split(":", 1)
        s, n, mx = status["latency"].get(kind, [math.nan, 0, math.nan])
        rows.append({"kind": kind, "outcome": outcome, "count": status["counts"][key],
                     "expected": outcome in EXPECTED.get(kind, set()),
                     "mean_ms": 1e3 * s / n if n else None, "max_ms": 1e3 * mx})  # fmt: skip
    return rows


def server_plan(models: list[dict[str, Any]], samplers: list[dict[str, Any]]) -> dict[str, Any]:
    """Which loaded models serve which kind, and the samplers each schedule takes."""
    plan: dict[str, Any] = {"class": [], "text": [], "control": []}
    for m in models:
        entry = {"id": m["id"], "schedule": m["schedule"], "size": m["sample_size"]}
        cond = m["conditioning"]
        if cond.get("control"):
            plan["control"].append(entry)
        elif cond.get("classes"):
            plan["class"].append({**entry, "classes": [c["name"] for c in cond["classes"]]})
        elif cond.get("text"):
            plan["text"].append(entry)
    by_schedule: dict[str, list[str]] = {}
    for s in samplers:
        for kind in s["model_kinds"]:
            by_schedule.setdefault(kind, []).append(s["name"])
    return {"models": plan, "samplers": by_schedule}


async def soak(args, report, device_name: str, server_flags: dict[str, Any]) -> dict[str, Any]:
    import httpx

    from bench.server_load import ServerProcess

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    server = ServerProcess("soak", server_flags, work)
    report.note(f"server: `python {' '.join(server.cmd[1:])}`")
    result: dict[str, Any] = {}
    loads: Loads | None = None
    try:
        async with httpx.AsyncClient(timeout=60) as client:
            ready_s = await server.wait_ready(client, args.ready_timeout)
            report.note(f"ready after {ready_s:.1f} s")
            models = (await client.get(server.url + "/v1/models")).json()["data"]
            samplers = (await client.get(server.url + "/v1/samplers")).json()["data"]
            sp = server_plan(models, samplers)
            mix = dict(re.findall(r"(\w+)=([0-9.]+)", args.mix))
            mix = {k: float(v) for k, v in mix.items() if k in KINDS}
            for kind, need in [("class", "class"), ("text", "text"), ("control", "control")]:
                if not sp["models"][need]:
                    mix[kind] = 0.0
            if not sp["models"]["class"] and not sp["models"]["text"]:
                for kind in ("job_sse", "job_cancel", "disconnect", "openai", "invalid"):
                    mix[kind] = 0.0
            plan = {
                "url": server.url, "seed": args.seed, "procs": args.procs, "workers": args.workers,
                "mix": mix, "models": sp["models"], "samplers": sp["samplers"], "size": args.size,
                "control_size": (sp["models"]["control"] or [{"size": 32}])[0]["size"],
                "steps": args.steps, "long_steps": args.long_steps, "cfg_share": args.cfg_share,
                "cfg_scale": 3.0, "disconnect_after_s": (args.disconnect_min_s, args.disconnect_max_s),
                "request_timeout": args.request_timeout,
                "deadline": None if args.budget_s is None else time.monotonic() + args.budget_s,
            }  # fmt: skip
            report.note(
                f"mix {json.dumps({k: v for k, v in mix.items() if v})}; {args.procs} load processes x "
                f"{args.workers} closed-loop clients; size {args.size or 'model default'}; "
                f"steps 1-{args.steps} (cancelled and disconnected requests {args.long_steps}); "
                f"guidance 3 on {args.cfg_share:.0%} of the requests, else 1 (one row); "
                f"samplers drawn from {sp['samplers']}"
            )
            sampler = Sampler(server, client, device_name)
            empty = {"ops": 0, "http": 0, "counts": {}, "latency": {}}
            await sampler.take("ready", empty)
            loads = Loads(plan, args.warmup, work, "warmup")
            status = await run_phase(sampler, loads, "warmup", empty, args.sample_s)
            await sampler.until_idle(args.drain_timeout)
            await sampler.settled(None, 0)
            idle = await sampler.take("idle after warm-up", status)
            warm_ops = status["ops"]
            sampler.last = (time.monotonic(), warm_ops)
            loads = Loads(plan, args.requests, work, "load")
            t_load = time.monotonic()
            status = await run_phase(sampler, loads, "load", status, args.sample_s)
            load_s = time.monotonic() - t_load
            drained = await sampler.until_idle(args.drain_timeout)
            await sampler.settled(idle["srv_fds"], SETTLE_S)
            final = await sampler.take("end (idle)", status)
            result = {"samples": sampler.rows, "final": final, "status": status, "load_s": load_s,
                      "load_ops": status["ops"] - warm_ops, "drained": drained,
                      "engine_pids": len(sampler.engine_pids)}  # fmt: skip
    except Exception as e:  # noqa: BLE001 - reported with the server's log
        result["error"] = f"{type(e).__name__}: {e}"
        print(f"FAILED: {result['error']}\n{server.tail()}", flush=True)
    finally:
        if loads is not None:
            loads.stop()
        server.stop()
        log = server.log_path.read_text(errors="replace")
        result["server_log_tracebacks"] = log.count("Traceback (most recent call last)")
        result["server_log_errors"] = len(re.findall(r"\b(ERROR|CRITICAL)\b", log))
        result["server_log"] = str(server.log_path)
    return result


def device_name(info: dict[str, Any]) -> str:
    """The card's name, or the CPU's model name and core count (platform.processor() is often empty)."""
    if info["device"] not in ("", "cpu", "x86_64"):
        return info["device"]
    try:
        cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        return f"{cpu.group(1).strip() if cpu else 'CPU'} ({os.cpu_count()} cores)"
    except OSError:
        return f"CPU ({os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from bench import common

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument(
        "--requests", type=int, default=None, help="requests after the warm-up (CPU 20,000, GPU 100,000)"
    )
    p.add_argument("--warmup", type=int, default=None, help="warm-up requests (default 5%%, at least 100)")
    p.add_argument("--sample-s", type=float, default=None, help="seconds between samples (default 60)")
    p.add_argument("--engine-mode", default=None, choices=["auto", "thread", "process"],
                   help="the server's UNET_SERVER_ENGINE_MODE (default: the server's own)")  # fmt: skip
    p.add_argument(
        "--models", default=None, help="comma list of model folders (default: all in --weights-dir)"
    )
    p.add_argument(
        "--server-flags", default="", help="more server flags, e.g. 'max_queue_size=4096,shed_load=false'"
    )
    p.add_argument("--procs", type=int, default=None, help="load-generator processes (CPU 3, GPU 8)")
    p.add_argument(
        "--workers", type=int, default=None, help="closed-loop clients per process (CPU 8, GPU 16)"
    )
    p.add_argument("--mix", default=DEFAULT_MIX, help="weights of the request kinds")
    p.add_argument(
        "--size", type=int, default=None, help="width = height of every request (CPU 8, GPU: model's)"
    )
    p.add_argument("--steps", type=int, default=None, help="steps drawn from 1..N (CPU 2, GPU 8)")
    p.add_argument(
        "--long-steps",
        type=int,
        default=200,
        help="steps of the requests that get cancelled or disconnected (long enough to be mid-run then)",
    )
    p.add_argument("--cfg-share", type=float, default=0.25, help="share of requests with guidance (2 rows)")
    p.add_argument("--disconnect-min-s", type=float, default=0.05)
    p.add_argument("--disconnect-max-s", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="/tmp/unet_bench_soak")
    p.add_argument("--ready-timeout", type=float, default=900.0)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--drain-timeout", type=float, default=180.0)
    args = p.parse_args(argv)
    device = common.pick_device(args.device)
    gpu = device.type == "cuda"
    if args.quick:
        defaults = {"requests": 300, "warmup": 60, "sample_s": 1.0, "procs": 2, "workers": 6, "size": 8,
                    "steps": 2}  # fmt: skip
    elif gpu:
        defaults = {"requests": 100_000, "sample_s": 60.0, "procs": 8, "workers": 16, "steps": 8}
    else:
        defaults = {"requests": 20_000, "sample_s": 60.0, "procs": 3, "workers": 8, "size": 8, "steps": 2}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.warmup is None:
        args.warmup = max(100, args.requests // 20)

    info = common.env_info(device)
    info["device"] = device_name(info)
    report = common.Report("soak", info, args)
    flags: dict[str, Any] = {"weights_dir": args.weights_dir, "device": device.type, "log_level": "warning"}
    if args.engine_mode:
        flags["engine_mode"] = args.engine_mode
    if args.models:
        flags["models"] = args.models
    if args.quick:  # one small batch bucket: warm-up (every bucket, every model) in seconds on 2 cores
        flags.update({"max_batch_rows": 4, "batch_buckets": "4"})
    flags.update(dict(re.findall(r"(\w+)=(.*?)(?=,\w+=|$)", args.server_flags)))

    res = asyncio.run(soak(args, report, info["device"], flags))
    if "samples" in res:
        # the JSON keeps every sample's raw fields (outcome counts, server status counts, full_load)
        report.table("samples", res["samples"], SAMPLE_COLUMNS)
        report.table("outcomes", outcome_rows(res["status"]), OUTCOME_COLUMNS)
        checks = verdict(res["samples"], res["final"], res)
        report.table("verdict", checks, VERDICT_COLUMNS)
        flat = all(c["flat"] for c in checks if c["flat"] is not None)
        st = res["status"]
        report.note(
            f"{res['load_ops']} requests after the warm-up in {res['load_s']:.0f} s "
            f"({res['load_ops'] / res['load_s']:.1f}/s; {st['ops']} with the warm-up, {st['http']} HTTP "
            f"requests); drained to idle: {res['drained']}"
        )
        srv_499 = res["final"]["server_status"].get("499", 0)
        closed = res["final"]["disconnected"]
        report.note(
            f"server counted {srv_499:.0f} requests as 499 (client gone); clients closed {closed} sockets"
        )
        report.note("job table size: not exposed by the server (no metric, no listing); not sampled")
        report.note(
            f"server log: {res['server_log_tracebacks']} tracebacks, {res['server_log_errors']} ERROR lines"
        )
        report.note(f"VERDICT: {'FLAT' if flat else 'NOT FLAT'} ("
                    + "; ".join(c["check"] for c in checks if c["flat"] is False) + ")")  # fmt: skip
        res["flat"] = flat
    else:
        report.note(f"ERROR: {res.get('error')}")
    report.print_all(long_tables=True)
    if report.out is not None:
        (report.out / "soak.md").write_text(common.doc_markdown(report.doc()))
    return res


if __name__ == "__main__":
    result = main()
    # a soak that failed to run, or whose verdict is not flat, exits non-zero (scripts and CI see it)
    raise SystemExit(0 if result.get("flat") else 1)
