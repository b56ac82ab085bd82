"""bench/soak.py --quick: the soak benchmark still drives every request kind against the real server process
(engine in its own process) and samples it, so the long soak run keeps working (~50 s on 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import soak

pytestmark = pytest.mark.integration

WEIGHTS = Path(__file__).resolve().parents[2] / "weights"
SHIPPED = ("fashion-class", "fashion-text", "fashion-text-edges")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    missing = [m for m in SHIPPED if not (WEIGHTS / m / "unet_server.json").is_file()]
    if missing:
        pytest.skip(f"shipped models missing: {missing}")
    out = tmp_path_factory.mktemp("soak")
    work = tmp_path_factory.mktemp("soak-work")
    argv = [
        "--device",
        "cpu",
        "--quick",
        "--engine-mode",
        "process",
        "--out",
        str(out),
        "--work-dir",
        str(work),
    ]
    return soak.main(argv), out


def test_every_kind_reaches_its_outcome(run: tuple[dict[str, Any], Path]) -> None:
    res, _ = run
    assert "error" not in res, res.get("error")
    counts = res["status"]["counts"]
    by_kind: dict[str, int] = {}
    for key, n in counts.items():
        kind, outcome = key.split(":", 1)
        assert outcome in soak.EXPECTED[kind], f"unexpected outcome {key} x{n}: {counts}"
        by_kind[kind] = by_kind.get(kind, 0) + n
    assert set(by_kind) == set(soak.KINDS), f"kinds never sent: {set(soak.KINDS) - set(by_kind)}"
    # the mid-run kinds really happened mid-run (not all answered before the cancel / the close)
    assert counts.get("job_cancel:cancelled", 0) >= 1, counts
    assert counts.get("disconnect:closed", 0) >= 1, counts
    assert res["load_ops"] == 300 and res["status"]["ops"] == 360  # warm-up 60 + 300
    final = res["final"]
    assert final["client_5xx"] == 0 and final["unexpected"] == 0
    # the server noticed every client that closed after sending its whole request (499, cancelled)
    assert final["server_status"].get("499", 0) >= counts["disconnect:closed"], final["server_status"]


def test_samples_track_server_and_engine_process(run: tuple[dict[str, Any], Path]) -> None:
    res, _ = run
    samples = res["samples"]
    assert [s["phase"] for s in samples][:2] == ["ready", "warmup"]
    assert samples[-1]["phase"] == "end (idle)"
    assert sum(s["phase"] == "load" and s["full_load"] for s in samples) >= 3
    assert res["engine_pids"] == 1  # found via the process tree, and never restarted
    for s in samples:
        assert s["srv_rss_mib"] > 50 and s["srv_fds"] > 3 and s["srv_threads"] >= 1, s
        assert s["eng_rss_mib"] > 50 and s["eng_fds"] > 3, s  # the engine child, sampled every time
        assert s["srv_sockets"] >= 1  # the listening socket at least
    assert samples[-1]["requests"] == 360
    # back to idle at the end: nothing queued, running or outstanding
    assert (samples[-1]["queue"], samples[-1]["running"], samples[-1]["rows"]) == (0, 0, 0)
    # load was really on while sampling: something queued or running in some sample under load
    assert any((s["running"] or 0) + (s["queue"] or 0) > 0 for s in samples if s["phase"] == "load")


def test_writes_json_and_markdown_with_device(run: tuple[dict[str, Any], Path]) -> None:
    _, out = run
    doc = json.loads((out / "soak.json").read_text())
    assert [t["title"] for t in doc["tables"]] == ["samples", "outcomes", "verdict"]
    checks = {row["check"] for row in doc["tables"][2]["rows"]}
    assert {"server RSS (MiB)", "engine RSS (MiB)", "server open fds other than sockets"} <= checks
    md = (out / "soak.md").read_text()
    assert doc["env"]["device"] in md and "### verdict" in md
    assert any(n.startswith("VERDICT: ") for n in doc["notes"])


def test_no_server_5xx(run: tuple[dict[str, Any], Path]) -> None:
    res, _ = run
    assert res["final"]["server_5xx"] == 0, res["final"]["server_status"]
    assert res["server_log_tracebacks"] == 0
