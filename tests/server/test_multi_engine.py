"""Several engine cores behind one HTTP front (``UNET_SERVER_DEVICES``), on CPU: device resolution, routing
by load and batch compatibility, the same bytes as one engine, and a dead engine failing only its own
requests while the others keep serving."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from server.devices import DevicesError, engine_devices
from server.lifecycle import RequestManager
from server.messages import AddRequest, EngineOutputs, Started, StepStats, ToCore
from server.metrics import Metrics
from server.request import ResolvedRequest
from server.settings import Settings
from tests.server.conftest import SIZE, start_server
from tests.server.test_batching import metric

pytestmark = pytest.mark.timeout(240)


# -- which devices ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "devices", "gpus", "expected"),
    [
        ("auto", "auto", 0, ["cpu"]),
        ("auto", "auto", 2, ["cuda:0", "cuda:1"]),
        ("cuda:1", "auto", 2, ["cuda:1"]),
        ("cpu", "auto", 4, ["cpu"]),
        ("auto", "all", 4, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]),
        ("auto", "3", 2, ["cuda:0", "cuda:1", "cuda:0"]),  # more engines than cards: they share
        ("cpu", "2", 8, ["cpu", "cpu"]),
        ("auto", "cuda:0,cuda:2", 4, ["cuda:0", "cuda:2"]),
        ("auto", "cuda:0, cuda:0", 1, ["cuda:0", "cuda:0"]),
        ("auto", "cuda", 1, ["cuda:0"]),
    ],
)
def test_engine_devices(device: str, devices: str, gpus: int, expected: list[str]) -> None:
    assert engine_devices(Settings(device=device, devices=devices), gpus=gpus) == expected


@pytest.mark.parametrize(
    ("devices", "gpus", "message"),
    [
        ("all", 0, "no GPU"),
        ("cuda:2", 2, "does not exist"),
        ("gpu0", 1, "not a device"),
        ("0", 1, "at least"),
    ],
)
def test_engine_devices_refuses(devices: str, gpus: int, message: str) -> None:
    with pytest.raises(DevicesError, match=message):
        engine_devices(Settings(devices=devices), gpus=gpus)


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.devices import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert visible_gpus() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,-1,1")  # CUDA stops at the first invalid entry
    assert visible_gpus() == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == 0


# -- routing (the serving side alone, engines faked) --------------------------------------------------


class FakeClient:
    """An engine client that records what it is sent; outputs are fed by the test."""

    def __init__(self) -> None:
        self.sent: list[ToCore] = []
        self.alive = True

    def load(self) -> Any:
        raise NotImplementedError

    def start(self, loop: asyncio.AbstractEventLoop, sink: Any) -> None:
        self.sink = sink

    def send(self, message: ToCore) -> bool:
        self.sent.append(message)
        return self.alive

    async def stop(self) -> None:
        self.alive = False

    def kill(self) -> None:
        self.alive = False

    @property
    def serving(self) -> bool:
        return self.alive

    @property
    def failure(self) -> str | None:
        return None


def request(model: str = "tiny-class", steps: int = 10, images: int = 1, size: int = SIZE) -> ResolvedRequest:
    return ResolvedRequest(
        model=model, prompt=None, negative_prompt=None, class_label=0, control=None, control_scale=1.0,
        num_inference_steps=steps, sampler="ddim", guidance_scale=1.0, seed=0, num_images=images, width=size,
        height=size, guided=False,
    )  # fmt: skip


def manager(n: int, max_rows: int = 8) -> tuple[RequestManager, list[FakeClient]]:
    clients = [FakeClient() for _ in range(n)]
    m = RequestManager(clients, Metrics(), max_queue_size=100, max_rows=max_rows, devices=["cpu"] * n)
    return m, clients


def test_routing_spreads_load_and_prefers_compatible_batches() -> None:
    async def body() -> None:
        m, clients = manager(2)
        m.start(asyncio.get_running_loop())
        tasks = [m.submit(request(), "generate", 60.0) for _ in range(4)]
        # a compatible batch with room takes the next request for free, then load decides: 0, 0, 1, 1
        assert [t.engine.index for t in tasks] == [0, 0, 1, 1]  # type: ignore[union-attr]
        # another model's request goes where the fewest rows are (a tie: the lower index)
        other = m.submit(request(model="tiny-text"), "generate", 60.0)
        assert other.engine is m.engines[0]
        # each engine got exactly its own requests
        for i, c in enumerate(clients):
            ids = [msg.request_id for msg in c.sent if isinstance(msg, AddRequest)]
            assert ids == [t.id for t in tasks + [other] if t.engine is m.engines[i]]
        # queue positions count the requests ahead on the same engine
        assert [m.queue_position(t.id) for t in tasks] == [0, 1, 0, 1]

    asyncio.run(body())


def test_routing_weighs_measured_step_time() -> None:
    """An engine measured slower per step (e.g. two engines sharing a card) gets fewer rows."""

    async def body() -> None:
        m, clients = manager(2, max_rows=4)
        m.start(asyncio.get_running_loop())
        slow, fast = StepStats(0.4, 0.4, 4, 4, ()), StepStats(0.1, 0.1, 4, 4, ())
        m.on_outputs(EngineOutputs(steps=[slow]), m.engines[0])
        m.on_outputs(EngineOutputs(steps=[fast]), m.engines[1])
        # different shapes, so no batch sharing: rows x period decides
        placed = [m.submit(request(size=8 * (i + 1), images=2), "generate", 600.0).engine for i in range(5)]
        counts = [placed.count(e) for e in m.engines]
        assert counts == [1, 4], counts

    asyncio.run(body())


def test_a_lost_engine_fails_only_its_requests() -> None:
    async def body() -> None:
        m, clients = manager(2)
        m.start(asyncio.get_running_loop())
        tasks = [m.submit(request(size=8 * (i + 1)), "generate", 60.0) for i in range(4)]
        on = [t.engine.index for t in tasks]  # type: ignore[union-attr]
        assert sorted(on) == [0, 0, 1, 1]
        m.on_outputs(EngineOutputs(events=[Started(tasks[on.index(1)].id, time.monotonic())]), m.engines[1])
        clients[1].alive = False
        m.on_lost("the engine process exited", "abc123", m.engines[1])
        for t, i in zip(tasks, on, strict=True):
            assert (t.status == "failed") == (i == 1)
            if i == 1:
                assert t.error_status == 500 and "abc123" in (t.error_message or "")
        # the survivor takes everything new; readiness-style state names the dead one
        assert all(m.submit(request(), "generate", 60.0).engine is m.engines[0] for _ in range(3))
        states = {s["engine"]: s["state"] for s in m.engine_states()}
        assert states == {0: "serving", 1: "restarting"} and m.running and m.failure is None
        # an engine's outputs about another engine's request are ignored
        m.on_outputs(EngineOutputs(events=[Started(tasks[on.index(0)].id, 1.0)]), m.engines[1])
        assert tasks[on.index(0)].status == "queued"

    asyncio.run(body())


# -- through the real server: two engine processes on the CPU ----------------------------------------

MIXED: list[dict[str, Any]] = [
    *({"model": "tiny-class", "class_label": s % 3, "num_inference_steps": 4 + s % 3, "seed": s,
       "sampler": ["ddim", "euler", "dpmpp_2m", "euler_a"][s % 4]} for s in range(20)),
    *({"model": "tiny-text", "prompt": f"a bag {s}", "num_inference_steps": 4, "seed": 100 + s,
       "sampler": ["dpmpp_2m", "ddim"][s % 2], "guidance_scale": 3.0} for s in range(12)),
]  # fmt: skip


# Two buckets keep the three engines' warm-up short on two CPU cores.
SMALL: dict[str, Any] = {
    "models": ["tiny-class", "tiny-text"],
    "max_batch_rows": 16,
    "batch_buckets": [8, 16],
}


@pytest.fixture(scope="module")
def two_engines(weights_dir: Path) -> Any:
    server = start_server(weights_dir, engine_mode="process", devices="2", max_queue_size=128, **SMALL)
    yield server
    server.stop()


def _generate(url: str, body: dict[str, Any]) -> list[str]:
    """The request's PNGs (base64)."""
    import httpx

    r = httpx.post(url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["images"]


def test_two_engines_spread_requests_with_the_same_bytes(weights_dir: Path, two_engines: Any) -> None:
    with two_engines.client() as c:
        ready = c.get("/health/ready").json()
        assert [(e["engine"], e["device"], e["state"]) for e in ready["engines"]] == [
            (0, "cpu", "serving"),
            (1, "cpu", "serving"),
        ]
        before = c.get("/metrics").text
    with concurrent.futures.ThreadPoolExecutor(len(MIXED)) as pool:
        together = list(pool.map(lambda b: _generate(two_engines.url, b), MIXED))
    with two_engines.client() as c:
        after = c.get("/metrics").text
    name = "unet_server_rows_per_forward"
    passes = [
        metric(after, name, name + "_count", engine=str(i))
        - metric(before, name, name + "_count", engine=str(i))
        for i in range(2)
    ]
    assert all(p > 0 for p in passes), f"forward passes per engine: {passes}"
    one = start_server(weights_dir, engine_mode="thread", **SMALL)
    try:
        alone = [_generate(one.url, b) for b in MIXED]
    finally:
        one.stop()
    assert together == alone


def test_a_killed_engine_fails_only_its_requests(two_engines: Any) -> None:
    engine = two_engines.engine
    procs = [c._proc for c in two_engines.state.clients]
    with two_engines.client() as c:
        # Long jobs until both engines hold some. Where each lands depends on the engines' measured step
        # periods (timing), so the test does not fix the split; the router's spreading has its own test.
        jobs: list[str] = []
        on: dict[str, int] = {}
        for s in range(8):
            body = {"model": "tiny-class", "class_label": 1, "num_inference_steps": 900, "seed": s}
            jobs.append(c.post("/v1/jobs", json=body).json()["id"])
            on[jobs[-1]] = engine.jobs[jobs[-1]].engine.index
            if set(on.values()) == {0, 1}:
                break
        assert set(on.values()) == {0, 1}, on
        victim = procs[1].pid
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not all(c.get(f"/v1/jobs/{j}").json()["status"] == "failed" for j in jobs if on[j] == 1):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for j in jobs:
            info = c.get(f"/v1/jobs/{j}").json()
            if on[j] == 1:
                assert (
                    info["error"]["status_code"] == 500
                    and "engine process exited" in info["error"]["message"]
                )
            else:
                assert info["status"] in ("queued", "running"), info
        # the other engine keeps serving while the dead one is replaced
        r = c.post("/generate", json={"model": "tiny-class", "class_label": 0, "num_inference_steps": 4})
        assert r.status_code == 200
        assert c.get("/health/ready").status_code == 200
        for j in jobs:
            if on[j] == 0:
                assert c.post(f"/v1/jobs/{j}/cancel").status_code == 200
        deadline = time.monotonic() + 90
        while [e["state"] for e in c.get("/health/ready").json()["engines"]] != ["serving", "serving"]:
            assert time.monotonic() < deadline, "the killed engine was not replaced"
            time.sleep(0.1)
        assert two_engines.state.clients[1]._proc.pid != victim


@pytest.mark.gpu
def test_gpu_engines_sharing_a_card_and_one_per_card_match_one_engine(weights_dir: Path) -> None:
    """On CUDA with graphs: two engines sharing one card (and, with two or more cards, one engine per card)
    give one engine's images for requests sent one at a time, and concurrent requests all complete on both
    engines."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    layouts = ["auto", "cuda:0,cuda:0"] + (["2"] if torch.cuda.device_count() >= 2 else [])
    bodies = [b for b in MIXED[::4]]
    images: dict[str, list[list[str]]] = {}
    for devices in layouts:
        server = start_server(weights_dir, device="cuda", engine_mode="process", devices=devices, **SMALL)
        try:
            with server.client() as c:
                images[devices] = [c.post("/generate", json=b).json()["images"] for b in bodies]
                before = c.get("/metrics").text
                with concurrent.futures.ThreadPoolExecutor(16) as pool:
                    codes = list(pool.map(lambda b: c.post("/generate", json=b).status_code, MIXED))
                assert codes == [200] * len(codes)
                after = c.get("/metrics").text
            name = "unet_server_rows_per_forward"
            engines = len(server.engine.engines)
            passes = [
                metric(after, name, name + "_count", engine=str(i))
                - metric(before, name, name + "_count", engine=str(i))
                for i in range(engines)
            ]
            assert all(p > 0 for p in passes), f"{devices}: forward passes per engine {passes}"
        finally:
            server.stop()
    for devices in layouts[1:]:
        assert images[devices] == images["auto"], devices  # same graphs, same kernels: the same bytes


def test_the_deadline_counts_from_arrival() -> None:
    """Time a request waited before admission (a busy event loop) counts against its deadline: one that
    arrives already past it is shed at the door, and the core is told the arrival time."""
    from server.lifecycle import Overloaded

    async def body() -> None:
        m, clients = manager(1)
        m.start(asyncio.get_running_loop())
        now = time.monotonic()
        with pytest.raises(Overloaded, match="deadline"):
            m.submit(request(), "generate", 5.0, arrived=now - 6.0)
        task = m.submit(request(), "generate", 5.0, arrived=now - 1.0)
        sent = [msg for msg in clients[0].sent if isinstance(msg, AddRequest)]
        assert len(sent) == 1 and sent[0].created == task.created == now - 1.0
        assert m.metrics.shed_requests_total._value.get() == 1  # noqa: SLF001

    asyncio.run(body())
