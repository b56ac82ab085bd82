"""`promtool check config` on the compose stack's Prometheus config (the scrape of a live /metrics with
`promtool check metrics` is in tests/integration/test_metrics.py)."""

from __future__ import annotations

import subprocess

from ._files import PROMETHEUS_CONFIG, load_yaml, promtool


def test_promtool_accepts_the_config() -> None:
    proc = subprocess.run(
        [promtool(), "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_server_is_scraped_often_enough_for_rate_panels() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "unet-server"]
    interval = job.get("scrape_interval", config["global"]["scrape_interval"])
    seconds = int(interval.rstrip("s"))
    # Grafana's $__rate_interval is at least 4 scrape intervals; keep it short enough for a live dashboard.
    assert seconds <= 15, interval
