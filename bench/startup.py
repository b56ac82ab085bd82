"""Server start-to-ready: ``python -m server`` started from scratch, per engine mode, a few times each.

    python -m bench.startup --out $OUT                 # CUDA, shipped fashion-class
    python -m bench.startup --device cpu --repeats 1   # CPU smoke test

Start-to-ready is the time from spawning the process to the first 200 from /health/ready (models loaded,
every bucket warmed, CUDA graphs captured). The first start of a fresh machine also pays cold file caches;
the table shows every start, in order, and the median per mode.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench import common
from bench.server_load import ServerProcess


async def one_start(label: str, flags: dict[str, Any], work: Path, timeout: float) -> float:
    import httpx

    server = ServerProcess(label, flags, work)
    try:
        async with httpx.AsyncClient() as client:
            return await server.wait_ready(client, timeout)
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(p)
    p.add_argument("--modes", default="thread,process", help="UNET_SERVER_ENGINE_MODE values to compare")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default="fashion-class")
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    device = common.pick_device(args.device)
    report = common.Report("startup", common.env_info(device), args)
    work = Path(tempfile.mkdtemp(prefix="unet_startup_"))
    flags = {"weights_dir": args.weights_dir, "models": args.models, "device": device.type,
             "log_level": "warning"}  # fmt: skip
    rows: list[dict[str, Any]] = []
    times: dict[str, list[float]] = {}
    for i in range(args.repeats):
        for mode in args.modes.split(","):  # interleaved, so cache warm-up does not favour one mode
            s = asyncio.run(one_start(f"{mode}-{i}", {**flags, "engine_mode": mode}, work, args.timeout))
            times.setdefault(mode, []).append(s)
            rows.append({"mode": mode, "start": i + 1, "start_to_ready_s": s})
            print(f"  {mode} start {i + 1}: {s:.2f} s", flush=True)
    for mode, ts in times.items():
        rows.append({"mode": mode, "start": "median", "start_to_ready_s": statistics.median(ts)})
    report.note(f"models: {args.models}; `python -m server --engine-mode MODE` with the flags {flags}")
    report.table("start-to-ready", rows, ["mode", "start", "start_to_ready_s"])
    report.print_all()


if __name__ == "__main__":
    main()
