"""The server's log: one format for every line (uvicorn's included), JSON as an option, no line that claims
the server is up before the models are ready, the attention probe reported once per process, and a loud
warning when it listens beyond loopback without an API key."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from server.settings import Settings
from tests.server.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \[server\] [\w.]+: \S"
)
CLAIMS = re.compile(r"running on|startup complete", re.I)


@pytest.fixture(scope="module")
def two_class_models(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-class twice: two models, so a per-model log line would show up twice."""
    root = tmp_path_factory.mktemp("two-models")
    for name in ("tiny-class", "tiny-class-2"):
        shutil.copytree(weights_dir / "tiny-class", root / name)
    return root


def _run_server(weights: Path, log_format: str) -> list[str]:
    """Start `python -m server`, wait for /health/ready, make a request, stop it; its log lines."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNET_SERVER_")}
    env.update(
        UNET_SERVER_WEIGHTS_DIR=str(weights), UNET_SERVER_DEVICE="cpu", UNET_SERVER_ENGINE_MODE="thread",
        UNET_SERVER_MAX_BATCH_ROWS="4", UNET_SERVER_BATCH_BUCKETS="4", UNET_SERVER_LOG_FORMAT=log_format,
        PYTHONUNBUFFERED="1",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--port", str(port)], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 90
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if client.get("/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            else:
                pytest.fail("server did not become ready")
            body = {"model": "tiny-class", "class_label": 1, "seed": 1}
            r = client.post("/generate", json=body, timeout=60)
            assert r.status_code == 200, r.text
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    return [line for line in out.splitlines() if line.strip()]


def _before_ready(messages: list[str]) -> list[str]:
    ready = next(i for i, m in enumerate(messages) if m.startswith("ready"))
    return messages[:ready]


def test_text_log_one_format(two_class_models: Path) -> None:
    lines = _run_server(two_class_models, "text")
    bad = [line for line in lines if not TEXT_LINE.match(line)]
    assert not bad, bad
    messages = [line.split(": ", 1)[1] for line in lines]
    assert any("uvicorn.access" in line and "/generate" in line for line in lines), lines
    early = _before_ready(messages)
    assert not [m for m in early if CLAIMS.search(m)], early
    assert any(m.startswith("listening on") for m in early), early
    said = [m for m in messages if "attention backend" in m]
    assert said and len(said) == len(set(said)), said  # once per process, not once per model


def test_json_log(two_class_models: Path) -> None:
    lines = _run_server(two_class_models, "json")
    records = []
    for line in lines:
        record = json.loads(line)  # every line is one JSON object
        assert {"time", "level", "logger", "process", "message"} <= set(record), record
        records.append(record)
    assert any(r["logger"] == "uvicorn.access" and "/generate" in r["message"] for r in records)
    early = _before_ready([r["message"] for r in records])
    assert not [m for m in early if CLAIMS.search(m)], early
    assert any(r["message"].startswith("ready") and "tiny-class-2" in r["message"] for r in records)


def test_json_formatter_keeps_tracebacks_on_one_line() -> None:
    from server.logconfig import JsonFormatter

    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("x").makeRecord("x", logging.ERROR, __file__, 1, "failed %s", ("it",),
                                                   sys.exc_info())
    line = JsonFormatter("server").format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert parsed["message"] == "failed it" and "ValueError: boom" in parsed["exc_info"]


def test_attention_probe_reported_once_per_process(caplog: pytest.LogCaptureFixture) -> None:
    from model import attention

    attention.reset_probe_log()
    with caplog.at_level(logging.INFO, logger="model.attention"):
        for _ in range(3):
            assert attention.select_backend("cpu", torch.float32, head_dims=(8,)) in ("xformers", "sdpa")
    said = [r.getMessage() for r in caplog.records if "attention backend" in r.getMessage()]
    assert said and len(said) == len(set(said)), said  # each outcome once (xformers absent, then sdpa)


@pytest.mark.parametrize(
    ("host", "key", "loud"),
    [("0.0.0.0", None, True), ("::", None, True), ("192.168.1.5", None, True), ("0.0.0.0", "k", False),
     ("127.0.0.1", None, False), ("::1", None, False), ("localhost", None, False)],
)
def test_exposed_without_api_key_warns(caplog: pytest.LogCaptureFixture, host: str, key: str | None,
                                       loud: bool) -> None:
    from server.__main__ import warn_if_exposed

    with caplog.at_level(logging.WARNING):
        warn_if_exposed(Settings(host=host, api_key=key))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert bool(warnings) == loud, caplog.text
    if loud:
        assert "UNET_SERVER_API_KEY" in warnings[0].getMessage() and host in warnings[0].getMessage()
