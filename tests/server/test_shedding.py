"""Admission sheds a request that could not finish before its deadline at the measured pace (503 at the
door) instead of letting it time out in the queue; it admits again as the work drains."""

from __future__ import annotations

import asyncio

import pytest

from server.lifecycle import Overloaded, QueueFull, RequestManager
from server.messages import EngineOutputs, StepStats, ToCore
from server.metrics import Metrics
from server.request import ResolvedRequest


class FakeClient:
    """An EngineClient that accepts every message and never answers (the test feeds outputs itself)."""

    def __init__(self) -> None:
        self.sent: list[ToCore] = []

    def start(self, loop: object, sink: object) -> None: ...

    def send(self, message: ToCore) -> bool:
        self.sent.append(message)
        return True

    serving = True
    failure = None


def req(steps: int = 10) -> ResolvedRequest:
    return ResolvedRequest(
        model="m", prompt=None, negative_prompt=None, class_label=0, control=None, control_scale=1.0,
        num_inference_steps=steps, sampler="euler", guidance_scale=2.0, seed=0, num_images=1, width=8,
        height=8, guided=True,
    )  # fmt: skip


def steps(n: int, rows: int, period: float = 0.1) -> EngineOutputs:
    return EngineOutputs(steps=[StepStats(period / 2, period, rows, rows, (("m", rows),)) for _ in range(n)])


def test_sheds_what_would_miss_its_deadline_and_recovers() -> None:
    async def body() -> None:
        manager = RequestManager(FakeClient(), Metrics(), max_queue_size=100, max_rows=4)  # type: ignore[arg-type]
        manager.start(asyncio.get_running_loop())
        # Not measured yet: no shedding on a guess.
        assert manager.estimated_seconds(req()) is None
        manager.on_outputs(steps(1, 4))  # 0.1 s per busy step of 4 rows: 40 row-steps/s
        a = manager.submit(req(), "generate", timeout=1.25)  # 20 row-steps own; alone: 10 steps x 0.1 s
        assert manager.estimated_seconds(req()) == pytest.approx(1.0)  # 20 ahead + 20 own at 40/s
        b = manager.submit(req(), "generate", timeout=1.25)
        with pytest.raises(Overloaded) as exc:
            manager.submit(req(), "generate", timeout=1.25)  # 40 ahead + 20 own = 1.5 s > 0.8 x 1.25 s
        message = str(exc.value)
        assert exc.value.retry_after >= 1 and "1.5 s" in message and "1.25 s deadline" in message
        assert manager.submit(req(), "jobs", timeout=60.0, is_job=True)  # a longer deadline still fits
        manager.cancel(manager.jobs.popitem()[0])
        manager.on_outputs(steps(5, 4))  # 20 row-steps done
        assert manager.estimated_seconds(req()) == pytest.approx(1.0)  # admits again
        manager.submit(req(), "generate", timeout=1.25)
        registry = manager.metrics.registry
        assert registry.get_sample_value("unet_server_shed_requests_total") == 1
        assert not a.done and not b.done

    asyncio.run(body())


def test_a_request_slower_than_its_deadline_alone_is_shed() -> None:
    async def body() -> None:
        manager = RequestManager(FakeClient(), Metrics(), max_queue_size=100, max_rows=64)  # type: ignore[arg-type]
        manager.start(asyncio.get_running_loop())
        manager.on_outputs(steps(1, 2, period=0.05))
        with pytest.raises(Overloaded):
            manager.submit(req(steps=100), "generate", timeout=2.0)  # 100 steps x 50 ms = 5 s alone
        manager.submit(req(steps=30), "generate", timeout=2.0)  # 1.5 s: within 0.8 x 2 s

    asyncio.run(body())


def test_a_request_leaving_mid_run_takes_its_remaining_work_with_it() -> None:
    """Cancelled after about half its steps: the estimate forgets the half it will never run (the soak
    benchmark found the estimate growing with every mid-run cancel until the server shed in waves)."""
    import time

    from server.messages import Started

    async def body() -> None:
        manager = RequestManager(FakeClient(), Metrics(), max_queue_size=100, max_rows=4)  # type: ignore[arg-type]
        manager.start(asyncio.get_running_loop())
        manager.on_outputs(steps(1, 4))  # 0.1 s per step, 40 row-steps/s
        manager.submit(req(), "jobs", timeout=60.0, is_job=True)  # stays in flight: 20 row-steps
        a = manager.submit(req(), "jobs", timeout=60.0, is_job=True)  # 20 more
        half_way = time.monotonic() - 0.5  # ~5 of its 10 steps run at 0.1 s each
        manager.on_outputs(EngineOutputs(events=[Started(a.id, half_way)]))
        assert manager.estimated_seconds(req()) == pytest.approx(60 / 40)
        assert manager.cancel(a.id)
        assert manager.estimated_seconds(req()) == pytest.approx(50 / 40, abs=0.01)  # its other 5 steps left

    asyncio.run(body())


def test_the_deadline_fraction_setting_moves_the_shedding_point() -> None:
    async def body() -> None:
        outcomes = {}
        for fraction in (0.5, 0.8, 1.0):
            manager = RequestManager(
                FakeClient(), Metrics(), max_queue_size=100, max_rows=4, shed_deadline_fraction=fraction
            )  # type: ignore[arg-type]
            manager.start(asyncio.get_running_loop())
            manager.on_outputs(steps(1, 4))  # 40 row-steps/s
            manager.submit(req(), "generate", timeout=2.1)  # 20 row-steps: alone 0.5 s
            admitted = 1
            try:  # the next ones' estimates: 1.0, 1.5, 2.0, 2.5 s, against a 2.1 s deadline
                for _ in range(4):
                    manager.submit(req(), "generate", timeout=2.1)
                    admitted += 1
            except Overloaded:
                pass
            outcomes[fraction] = admitted
        # Admitted while the estimate is within fraction x 2.1 s: 1.05 s -> 0.5 and 1.0 s; 1.68 s -> up to
        # 1.5 s; 2.1 s -> up to 2.0 s.
        assert outcomes == {0.5: 2, 0.8: 3, 1.0: 4}

    asyncio.run(body())
    with pytest.raises(ValueError, match="shed_deadline_fraction"):
        RequestManager(FakeClient(), Metrics(), max_queue_size=1, shed_deadline_fraction=0.0)  # type: ignore[arg-type]


def test_door_bound_is_the_least_work_owed_and_counts_its_sheds() -> None:
    async def body() -> None:
        metrics = Metrics()
        manager = RequestManager(FakeClient(), metrics, max_queue_size=100, max_rows=4)  # type: ignore[arg-type]
        manager.start(asyncio.get_running_loop())
        assert manager.door_seconds() is None and manager.door_verdict(0.001) is None  # unmeasured
        manager.on_outputs(steps(1, 4))  # 40 row-steps/s
        assert manager.door_seconds() == 0.0
        for _ in range(3):
            manager.submit(req(), "generate", timeout=10.0)  # 20 row-steps each
        assert manager.door_seconds() == pytest.approx(1.5)  # 60 row-steps at 40/s
        # Every request's own estimate is above the bound (the bound never sheds what admission would take).
        assert manager.estimated_seconds(req(steps=1)) > manager.door_seconds()
        assert manager.door_verdict(1.875) is None  # 1.5 <= 0.8 x 1.875: not past the fraction
        status, message, retry = manager.door_verdict(1.2)  # 1.5 > 0.96
        assert status == 503 and "1.5 s" in message and "1.2 s deadline" in message and retry == 1
        assert metrics.registry.get_sample_value("unet_server_shed_requests_total") == 1
        manager.shed = False
        assert manager.door_verdict(1.0) is None  # shedding off: never

    asyncio.run(body())


def test_door_answers_a_full_queue_first_as_submit_does() -> None:
    async def body() -> None:
        manager = RequestManager(FakeClient(), Metrics(), max_queue_size=2, max_rows=4)  # type: ignore[arg-type]
        manager.start(asyncio.get_running_loop())
        manager.on_outputs(steps(1, 4))
        for _ in range(2):
            manager.submit(req(), "generate", timeout=100.0)
        # Full: 429 before the deadline test (the same order as submit: QueueFull, then Overloaded).
        status, message, retry = manager.door_verdict(0.01)
        assert status == 429 and "queue is full" in message and retry >= 1
        with pytest.raises(QueueFull):
            manager.submit(req(), "generate", timeout=0.01)
        manager.shed = False
        assert manager.door_verdict(100.0)[0] == 429  # the queue bound holds with shedding off too
        FakeClient.serving = False
        try:
            assert manager.door_verdict(100.0) is None  # no engine serving: the route says why
        finally:
            FakeClient.serving = True

    asyncio.run(body())


def test_the_engine_queue_gauge_follows_start_cancel_and_finish() -> None:
    """``unet_server_engine_queue_size`` counts the engine's requests not started yet, through every way
    a request leaves the queue (started, cancelled while queued, failed)."""
    from server.messages import Failed, Started

    async def body() -> None:
        metrics = Metrics()
        manager = RequestManager(FakeClient(), metrics, max_queue_size=100, max_rows=4, shed=False)  # type: ignore[arg-type]
        manager.start(asyncio.get_running_loop())
        (engine,) = manager.engines

        def gauge() -> float | None:
            return metrics.registry.get_sample_value(
                "unet_server_engine_queue_size", {"engine": engine.label, "device": engine.device}
            )

        a, b, c = (manager.submit(req(), "generate", timeout=10.0) for _ in range(3))
        assert gauge() == 3
        manager.on_outputs(EngineOutputs(events=[Started(a.id, 0.0)]))
        assert gauge() == 2
        assert manager.cancel(b.id)
        assert gauge() == 1
        manager.on_outputs(EngineOutputs(events=[Failed(c.id, 500, "boom", "e1")]))
        assert gauge() == 0 and engine.queued == 0
        manager.on_outputs(EngineOutputs(events=[Failed(a.id, 500, "boom", "e2")]))  # a running one leaves
        assert gauge() == 0

    asyncio.run(body())
