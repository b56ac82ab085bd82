"""Every way of stopping the server drains the same: SIGTERM or SIGINT, to the server process alone
(docker stop, Kubernetes) or to its whole process group (Ctrl-C in a terminal, systemd's default KillMode),
with the engine in a thread or in its own process — the requests in flight all complete with 200."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
IN_FLIGHT = 6

pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize("target", ["group", "process"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("mode", ["thread", "process"])
def test_stop_signal_drains_in_flight_requests(weights_dir: Path, mode: str, sig: int, target: str) -> None:
    port = free_port()
    env = {
        **os.environ,
        "UNET_SERVER_WEIGHTS_DIR": str(weights_dir),
        "UNET_SERVER_MODELS": "tiny-class",
        "UNET_SERVER_DEVICE": "cpu",
        "UNET_SERVER_ENGINE_MODE": mode,
        "UNET_SERVER_MAX_BATCH_ROWS": "16",
        "UNET_SERVER_BATCH_BUCKETS": "16",
        "UNET_SERVER_LOG_LEVEL": "warning",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, start_new_session=True,  # its own process group, as a terminal or systemd gives it
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server not ready"
            time.sleep(0.1)
        body = {"class_label": 1, "num_inference_steps": 150, "sampler": "euler", "guidance_scale": 1}

        def generate(seed: int) -> int:
            return httpx.post(f"{url}/generate", json={**body, "seed": seed}, timeout=120).status_code

        with concurrent.futures.ThreadPoolExecutor(IN_FLIGHT) as pool:
            futures = [pool.submit(generate, seed) for seed in range(IN_FLIGHT)]
            while True:  # every request admitted and sampling
                metrics = httpx.get(f"{url}/metrics", timeout=5).text
                line = next(x for x in metrics.splitlines() if x.startswith("unet_server_running_requests "))
                if float(line.split()[1]) == IN_FLIGHT:
                    break
                time.sleep(0.02)
            if target == "group":
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)
            codes = [f.result(timeout=120) for f in futures]
        assert codes == [200] * IN_FLIGHT
        # uvicorn re-raises the signal it handled once shutdown is complete: a clean exit by that signal.
        assert proc.wait(timeout=60) in (0, -sig)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # No process of the server left behind (helpers such as multiprocessing's resource tracker exit once
        # they notice the server is gone: allow them a moment).
        deadline = time.monotonic() + 10
        while (alive := _alive_in_group(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert alive == [], f"left behind: {alive}"


def _alive_in_group(pgid: int) -> list[str]:
    """Processes of the group that are still running (an exited child waiting to be reaped is not)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            alive.append(f"{stat.parent.name}: {cmdline[:120]}")
    return alive
