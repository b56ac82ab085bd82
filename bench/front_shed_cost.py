"""What refusing a request costs the front end's event loop, per way of refusing it, and what serving one
costs it (issue 15, item 4).

    python -m bench.front_shed_cost --out $OUT        # CPU; ~1 minute

Under overload the one front-end process answers every arrival, accepted or not; what a refusal costs it
is CPU the accepted requests' answers wait behind. The server refuses an overloaded request in one of
three places; this measures the app's own CPU per request for each, on the server's real app (the shipped
fashion-class model, CPU, engine in a thread, idle) made to look overloaded (its engine measured at 0.5 s
per full step with 1,000 full steps owed):

- ``door``: the request-counting middleware's door (``RequestManager.door_verdict``): 503 before the body
  is read;
- ``admission``: the same request with the door off: body read, JSON parsed, validated, resolved, then
  refused by ``RequestManager.submit`` (503): what every shed request cost before the door;
- ``invalid``: a body that fails validation (422), for scale;
- ``served``: the same request admitted and answered 200 (``Accept: image/png``), the engine's client
  replaced by one that reports the request started, sampled and finished on the next loop turn (a 32×32
  image): the front end's whole share of a served request — validation, admission, the engine's events,
  PNG encoding, the response — without a model. Under overload this, times the admitted rate, is what
  the one front-end process must fit into a core (run 22d: 92% of one on the H200 host; 22e: 75%).

Requests go straight into the ASGI app (``app(scope, receive, send)``) from one asyncio loop, one at a
time: the numbers are the app's CPU from the middleware in. Socket I/O and HTTP parsing (uvicorn,
httptools), the same for every row, are not in them. Columns: CPU µs per request (``time.process_time``,
median of ``--rounds`` rounds of ``--n`` requests) and the ratio to the door's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench import common

BODY = {
    "model": "fashion-class", "class_label": 3, "seed": 1, "num_inference_steps": 20, "sampler": "dpmpp_2m",
    "guidance_scale": 5.0,
}  # fmt: skip
INVALID = {**BODY, "num_inference_steps": "twenty"}


async def call(app: Any, body: bytes) -> int:
    """One POST /generate through the ASGI app (the PNG itself asked for); returns the status."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/generate", "raw_path": b"/generate", "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"accept", b"image/png")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    sent: list[dict[str, Any]] = []
    read, answered = [False], asyncio.Event()

    async def receive() -> dict[str, Any]:
        if not read[0]:  # the body once; then, like a client still waiting, nothing until the answer is out
            read[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    answered.set()
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def instant_engine(manager: Any, engine: Any, loop: asyncio.AbstractEventLoop) -> Any:
    """A ``send`` for ``engine.client`` that answers every AddRequest on the next loop turn, as one engine
    turn's outputs: started, sampled, finished with a 32×32 gray image, and one 2-row step."""
    import numpy as np

    from server.messages import AddRequest, EngineOutputs, Finished, Sampled, Started, StepStats

    image = np.full((1, 32, 32, 1), 128, np.uint8)

    def send(message: Any) -> bool:
        if isinstance(message, AddRequest):
            rid = message.request_id
            events = [Started(rid, time.monotonic()), Sampled(rid), Finished(rid, image)]
            step = StepStats(0.004, 0.004, 2, 2, (("fashion-class", 2),))
            loop.call_soon(manager.on_outputs, EngineOutputs(events=list(events), steps=[step]), engine)
        return True

    return send


async def measure(app: Any, body: bytes, n: int, rounds: int, expect: int) -> dict[str, float]:
    for _ in range(min(n, 50)):  # warm the path
        assert await call(app, body) == expect
    per_round = []
    for _ in range(rounds):
        c0 = time.process_time()
        for _ in range(n):
            status = await call(app, body)
        per_round.append((time.process_time() - c0) / n)
        assert status == expect, status
    return {"cpu_us": 1e6 * statistics.median(per_round), "min_us": 1e6 * min(per_round)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--n", type=int, default=500, help="requests per round")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.rounds = 50, 2
    from tests.server.conftest import start_server

    report = common.Report("front_shed_cost", common.env_info(common.pick_device("cpu")), args)
    live = start_server(Path(args.weights_dir), models=["fashion-class"], max_inference_steps=200)
    rows = []
    try:
        manager = live.state.engine
        (engine,) = manager.engines
        engine.period_ewma, engine.work = 0.5, 1000.0 * manager.max_rows  # 500 s of work owed
        door = manager.door_verdict
        valid, invalid = json.dumps(BODY).encode(), json.dumps(INVALID).encode()

        async def row(name: str, body: bytes, expect: int) -> None:
            rows.append({"answered at": name, **await measure(live.app, body, args.n, args.rounds, expect)})

        async def run() -> None:
            await row("door (503, body unread)", valid, 503)
            manager.door_verdict = lambda timeout: None  # the door off: admission refuses it
            try:
                await row("admission (503, body parsed and validated)", valid, 503)
                await row("validation (422)", invalid, 422)
            finally:
                manager.door_verdict = door
            engine.period_ewma, engine.work = None, 0.0  # nothing owed: admitted
            real_send = engine.client.send
            engine.client.send = instant_engine(manager, engine, asyncio.get_running_loop())
            try:
                await row("served (200, an instant engine)", valid, 200)
            finally:
                engine.client.send = real_send

        asyncio.run(run())
    finally:
        live.stop()
    base = rows[0]["cpu_us"]
    for r in rows:
        r["x door"] = r["cpu_us"] / base
    columns = ["answered at", "cpu_us", "min_us", "x door"]
    report.table("the app's CPU per POST /generate, refused or served (µs)", rows, columns)
    report.note("in-process ASGI calls, one at a time: socket I/O and HTTP parsing are not included")
    report.print_all()
    if args.out:
        report.save()
    return {"rows": rows}


if __name__ == "__main__":
    main()
