"""The front end sheds on its own lag: while the event loop runs behind (a saturated front end), a new
generation request gets 503 + Retry-After before its body is read (issue 15, item 4). It also sheds unread
when the work already admitted would by itself carry any new request past its deadline (the door)."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from server.app import FRONT_SHED_MIN_IN_FLIGHT, _CountRequests, create_app
from server.looplag import LoopLag, StallWatch
from server.metrics import Metrics
from server.settings import Settings


class Inner:
    """The app behind the middleware: reads the body, then answers 200 — at once, or once ``release`` is set
    when the body asks to be held (requests kept in flight)."""

    def __init__(self) -> None:
        self.calls = 0
        self.held = 0
        self.release = asyncio.Event()

    async def __call__(self, scope, receive, send) -> None:
        self.calls += 1
        message = await receive()
        if b"hold" in message.get("body", b""):
            self.held += 1
            await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


async def post(app, path: str = "/generate", body: bytes = b'{"model": "m"}') -> tuple[int, dict, dict, int]:
    """(status, headers, JSON body, how many times the body was read) of one POST through ``app``."""
    scope = {"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""}
    reads, sent = [0], []

    async def receive():
        reads[0] += 1
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    answer = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, json.loads(answer), reads[0]


async def stall(seconds: float, times: int) -> None:
    """Block the loop ``times`` times in a row (a saturated front end), letting each late timer fire."""
    for _ in range(times):
        time.sleep(seconds)
        for _ in range(3):
            await asyncio.sleep(0)


def test_loop_lag_tells_one_stall_from_a_loop_that_stays_behind() -> None:
    async def body() -> None:
        lag = LoopLag(interval=0.01)
        lag.start()
        await asyncio.sleep(0.06)
        assert lag.current() < 0.1 and lag.sustained() < 0.1  # an idle loop is on time
        time.sleep(0.3)  # stuck once (a large body parsed, a GC pause)
        assert lag.current() >= 0.25  # the overdue timer is seen before it can fire
        assert lag.sustained() < 0.1  # but one stall is not a loop that stays behind
        await stall(0.3, 1)
        assert lag.current() >= 0.25 and lag.sustained() < 0.1
        await stall(0.3, 3)  # behind, tick after tick
        assert lag.sustained() >= 0.25
        await asyncio.sleep(0.06)
        assert lag.current() < 0.1 and lag.sustained() < 0.1  # caught up
        await lag.stop()
        assert lag.current() == 0.0 and lag.sustained() == 0.0

    asyncio.run(body())


def test_a_loop_behind_under_load_sheds_before_reading_the_body() -> None:
    async def body() -> None:
        metrics, inner, lag = Metrics(), Inner(), LoopLag(interval=0.01)
        app = _CountRequests(inner, metrics, lag=lag, shed_lag=0.2)  # type: ignore[arg-type]
        lag.start()
        await asyncio.sleep(0.05)
        await stall(0.3, 3)
        assert (await post(app))[0] == 200  # behind, but with nothing in flight: not traffic, served

        held = [asyncio.create_task(post(app, body=b'{"hold": 1}')) for _ in range(FRONT_SHED_MIN_IN_FLIGHT)]
        while inner.held < FRONT_SHED_MIN_IN_FLIGHT:
            await asyncio.sleep(0.01)
        time.sleep(0.5)  # one stall with many in flight: not overload either
        assert (await post(app))[0] == 200

        await stall(0.3, 3)  # many in flight and the loop stays behind: shed
        status, headers, answer, reads = await post(app, "/v1/images/generations")
        assert status == 503 and reads == 0  # refused before the body was read
        assert int(headers["retry-after"]) >= 1
        assert "overloaded" in answer["message"] and "behind" in answer["message"]
        calls = inner.calls

        await asyncio.sleep(0.06)  # caught up: served again
        assert (await post(app))[0] == 200 and inner.calls == calls + 1
        inner.release.set()
        assert all(r[0] == 200 for r in await asyncio.gather(*held))
        r = metrics.registry
        assert r.get_sample_value("unet_server_front_shed_requests_total") == 1
        assert r.get_sample_value("unet_server_shed_requests_total") == 0  # admission's own count stays apart
        labels = {"model": "unknown", "endpoint": "images", "status": "503"}
        assert r.get_sample_value("unet_server_requests_total", labels) == 1
        await lag.stop()

    asyncio.run(body())


def test_only_generation_posts_are_shed() -> None:
    async def body() -> None:
        metrics, inner, lag = Metrics(), Inner(), LoopLag(interval=0.01)
        app = _CountRequests(inner, metrics, lag=lag, shed_lag=0.2)  # type: ignore[arg-type]
        app.in_flight = FRONT_SHED_MIN_IN_FLIGHT  # as if that many were in flight
        lag.start()
        await asyncio.sleep(0.05)
        await stall(0.3, 3)
        assert (await post(app, "/health/ready"))[0] == 200
        assert (await post(app, "/v1/loras"))[0] == 200
        assert (await post(app, "/v1/jobs"))[0] == 503
        await lag.stop()

    asyncio.run(body())


def test_every_timer_lateness_is_observed_and_a_stall_is_logged_once_with_its_stack(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The loop-delay histogram gets each timer's lateness; a loop blocked past the stall threshold is
    logged once per stall, naming the function that blocks it, and counted; threshold 0 watches nothing."""
    seen: list[float] = []
    stalls: list[int] = []

    def blocking_handler() -> None:  # what the log must name
        time.sleep(0.35)

    async def body() -> None:
        lag = LoopLag(interval=0.01, observe=seen.append)
        watch = StallWatch(lag, threshold=0.15, on_stall=lambda: stalls.append(1), poll=0.02)
        off = StallWatch(lag, threshold=0.0, on_stall=lambda: stalls.append(100))
        lag.start()
        watch.start()
        off.start()
        await asyncio.sleep(0.1)
        assert seen and max(seen) < 0.1 and not stalls  # on time: observed, nothing logged
        blocking_handler()
        await asyncio.sleep(0.05)
        assert stalls == [1]  # one stall, one report, however long it lasts
        assert max(seen) >= 0.3  # the late timer was observed too
        await asyncio.sleep(0.1)
        blocking_handler()  # a second stall, after the loop caught up: reported again
        await asyncio.sleep(0.05)
        assert stalls == [1, 1]
        watch.stop()
        off.stop()
        await lag.stop()

    with caplog.at_level(logging.WARNING, logger="server.looplag"):
        asyncio.run(body())
    records = [r for r in caplog.records if "event loop blocked" in r.getMessage()]
    assert len(records) == 2 and all("blocking_handler" in r.getMessage() for r in records)


def test_the_threshold_follows_the_settings() -> None:
    def shed_lag(**kw) -> float:
        app = create_app(Settings(device="cpu", engine_mode="thread", **kw))
        mw = next(m for m in app.user_middleware if m.cls is _CountRequests)
        return mw.kwargs["shed_lag"]

    assert shed_lag() == 0.5  # default
    assert shed_lag(request_timeout_seconds=1.0) == 0.2  # a fifth of a short deadline
    assert shed_lag(shed_loop_lag_seconds=0) == 0  # off
    assert shed_lag(shed_load=False) == 0  # off with admission shedding


def test_the_door_refuses_unread_with_admissions_verdict() -> None:
    async def body() -> None:
        verdicts: dict[str, tuple[int, str, int] | None] = {"generate": None, "jobs": None}
        metrics, inner = Metrics(), Inner()
        app = _CountRequests(inner, metrics, door=verdicts.get)  # type: ignore[arg-type]
        assert (await post(app))[0] == 200 and inner.calls == 1  # no verdict: through to the app
        verdicts["generate"] = (503, "the work already queued takes about 7.4 s", 6)
        status, headers, answer, reads = await post(app, body=b"not even JSON")
        assert status == 503 and reads == 0 and inner.calls == 1  # unread: not a 422, the app never ran
        assert headers["retry-after"] == "6"
        assert answer["message"] == answer["detail"] == "the work already queued takes about 7.4 s"
        assert (await post(app, "/v1/jobs"))[0] == 200  # the verdict is per endpoint (jobs: own deadline)
        verdicts["jobs"] = (429, "the request queue is full; retry later", 500)
        status, headers, _, reads = await post(app, "/v1/jobs")
        assert status == 429 and reads == 0 and headers["retry-after"] == "60"  # clamped to a minute
        assert (await post(app, "/health/ready"))[0] == 200
        r = metrics.registry
        for endpoint, code in (("generate", "503"), ("jobs", "429")):
            labels = {"model": "unknown", "endpoint": endpoint, "status": code}
            assert r.get_sample_value("unet_server_requests_total", labels) == 1
        assert r.get_sample_value("unet_server_front_shed_requests_total") == 0  # the loop was not behind

    asyncio.run(body())


def test_the_door_of_a_live_server_follows_admission(live) -> None:  # noqa: ANN001 — the conftest fixture
    manager = live.app.state.server.engine
    (engine,) = manager.engines
    saved = engine.period_ewma, engine.work
    try:
        with live.client() as c:
            bad = {"model": "tiny-class", "class_label": 0, "num_inference_steps": "many"}
            assert c.post("/generate", json=bad).status_code == 422  # nothing owed or unmeasured: no verdict
            timeout = live.app.state.server.settings.request_timeout_seconds
            engine.period_ewma = 0.5  # 0.5 s per full step, and twice the deadline's worth of full steps owed
            engine.work = 4 * timeout * manager.max_rows
            before = manager.metrics.registry.get_sample_value("unet_server_shed_requests_total")
            r = c.post("/generate", json=bad)
            assert r.status_code == 503 and f"{2 * timeout:.1f} s" in r.json()["message"], r.text
            assert manager.metrics.registry.get_sample_value("unet_server_shed_requests_total") == before + 1
            engine.work = 0.0  # nothing owed: through to validation again
            assert c.post("/generate", json=bad).status_code == 422
    finally:
        engine.period_ewma, engine.work = saved
