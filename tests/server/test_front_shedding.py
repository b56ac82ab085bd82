"""The front end sheds on its own lag: while the event loop runs behind (a saturated front end), a new
generation request gets 503 + Retry-After before its body is read (issue 15, item 4)."""

from __future__ import annotations

import asyncio
import json
import time

from server.app import _CountRequests, create_app
from server.looplag import LoopLag
from server.metrics import Metrics
from server.settings import Settings


class Inner:
    """The app behind the middleware: records that it ran, answers 200 after reading the body."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope, receive, send) -> None:
        self.calls += 1
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


async def post(app, path: str = "/generate") -> tuple[int, dict[str, str], dict, int]:
    """(status, headers, JSON body, how many times the body was read) of one POST through ``app``."""
    scope = {"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""}
    reads, sent = [0], []

    async def receive():
        reads[0] += 1
        return {"type": "http.request", "body": b'{"model": "m"}', "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, json.loads(body), reads[0]


def test_loop_lag_measures_a_blocked_loop_and_recovers() -> None:
    async def body() -> None:
        lag = LoopLag(interval=0.01)
        lag.start()
        await asyncio.sleep(0.05)
        assert lag.current() < 0.1  # an idle loop is on time
        time.sleep(0.3)  # the loop is stuck (as when it parses more requests than it can)
        assert lag.current() >= 0.25  # overdue timer: seen even before it can fire
        await asyncio.sleep(0)
        assert lag.current() >= 0.25  # the late timer fired and recorded its lateness
        await asyncio.sleep(0.05)
        assert lag.current() < 0.1  # caught up
        await lag.stop()
        assert lag.current() == 0.0

    asyncio.run(body())


def test_a_lagging_loop_sheds_before_reading_the_body() -> None:
    async def body() -> None:
        metrics, inner, lag = Metrics(), Inner(), LoopLag(interval=0.01)
        app = _CountRequests(inner, metrics, lag=lag, shed_lag=0.2)  # type: ignore[arg-type]
        lag.start()
        await asyncio.sleep(0.03)
        assert (await post(app))[0] == 200 and inner.calls == 1  # on time: served

        time.sleep(0.5)  # the loop falls 0.5 s behind
        status, headers, answer, reads = await post(app, "/v1/images/generations")
        assert status == 503 and inner.calls == 1 and reads == 0  # refused before the body was read
        assert int(headers["retry-after"]) >= 1
        assert "overloaded" in answer["message"] and "behind" in answer["message"]

        await asyncio.sleep(0.05)  # caught up: served again
        assert (await post(app))[0] == 200 and inner.calls == 2
        r = metrics.registry
        assert r.get_sample_value("unet_server_front_shed_requests_total") == 1
        assert r.get_sample_value("unet_server_shed_requests_total") == 0  # admission's own count stays apart
        labels = {"model": "unknown", "endpoint": "images", "status": "503"}
        assert r.get_sample_value("unet_server_requests_total", labels) == 1
        assert (await post(app, "/health/ready"))[0] == 200  # only generation POSTs are shed
        await lag.stop()

    asyncio.run(body())


def test_the_threshold_follows_the_settings() -> None:
    def shed_lag(**kw) -> float:
        app = create_app(Settings(device="cpu", engine_mode="thread", **kw))
        mw = next(m for m in app.user_middleware if m.cls is _CountRequests)
        return mw.kwargs["shed_lag"]

    assert shed_lag() == 0.5  # default
    assert shed_lag(request_timeout_seconds=1.0) == 0.2  # a fifth of a short deadline
    assert shed_lag(shed_loop_lag_seconds=0) == 0  # off
    assert shed_lag(shed_load=False) == 0  # off with admission shedding
