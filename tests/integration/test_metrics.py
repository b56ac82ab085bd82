"""/metrics of the live server: parsed with prometheus_client's parser, linted by `promtool check metrics`,
scraped by a real Prometheus (Debian's /usr/bin/prometheus) on loopback, which then answers queries —
every query of the Grafana dashboard included."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.test_dashboard import as_plain_promql, dashboard_exprs, exported_series

from .conftest import FAST_STEPS, Server, free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _traffic(server: Server, n: int = 4) -> None:
    """n concurrent small class-model requests, so that forward passes carry several rows."""
    spec = server.model_with("class")
    body = {"model": spec["id"], "class_label": 0, "num_inference_steps": FAST_STEPS, "seed": 7}

    def one(i: int) -> int:
        with server.client() as c:
            return c.post("/generate", json={**body, "seed": 7 + i}).status_code

    with ThreadPoolExecutor(n) as pool:
        codes = list(pool.map(one, range(n)))
    assert codes == [200] * n, codes


def _scrape(server: Server) -> str:
    r = httpx.get(f"{server.url}/metrics", timeout=30)
    assert r.status_code == 200, r.text[:500]
    assert r.headers["content-type"].startswith("text/plain"), r.headers["content-type"]
    return r.text


def _samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def test_metrics_parse_and_count_the_traffic(server: Server) -> None:
    before = _samples(_scrape(server))
    _traffic(server, 4)
    text = _scrape(server)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = _samples(text)
    assert families["unet_server_requests"].type == "counter"
    assert families["unet_server_request_duration_seconds"].type == "histogram"
    assert families["unet_server_queue_size"].type == "gauge"
    assert families["unet_server_rows_per_forward"].type == "histogram"

    def total(name: str, snapshot: dict, **labels: str) -> float:
        return sum(
            s.value for s in snapshot.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())
        )

    class_model = server.model_with("class")["id"]
    grew = total("unet_server_requests_total", samples, model=class_model, status="200") - total(
        "unet_server_requests_total", before, model=class_model, status="200"
    )
    assert grew >= 4, f"4 requests answered 200, counter grew by {grew}"
    images = total("unet_server_images_generated_total", samples, model=class_model) - total(
        "unet_server_images_generated_total", before, model=class_model
    )
    assert images >= 4
    passes = total("unet_server_rows_per_forward_count", samples)
    rows = total("unet_server_rows_per_forward_sum", samples)
    assert passes > 0 and rows >= passes
    # Every series is one that server/metrics.py declares (same names the dashboard is checked against).
    declared = exported_series()
    assert set(samples) <= set(declared), sorted(set(samples) - set(declared))
    for name in ("unet_server_queue_size", "unet_server_running_requests"):
        assert samples[name][0].value >= 0


def test_promtool_accepts_the_scrape(server: Server) -> None:
    _traffic(server, 2)
    promtool = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: apt-get install prometheus (.ci/run installs it)")
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=_scrape(server), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _prometheus_binary() -> str:
    binary = os.environ.get("PROMETHEUS") or shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(binary).is_file():
        pytest.fail("no Prometheus server binary: apt-get install prometheus (.ci/run installs it)")
    return binary


@pytest.fixture(scope="module")
def prometheus(server: Server) -> Iterator[str]:
    """A real Prometheus on a free loopback port scraping the server every second; yields its URL."""
    target = urlsplit(server.url)
    host = target.hostname or "127.0.0.1"
    # Only loopback targets: this test never sends traffic anywhere else.
    assert host in {"127.0.0.1", "localhost", "::1"}, f"refusing to scrape non-loopback {host}"
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="prometheus-it-"))
    # The compose stack's own config (deploy/prometheus.yml), pointed at this server and sped up.
    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "unet-server"]
    job.update(scheme=target.scheme, scrape_interval="1s", scrape_timeout="1s")
    for static in job["static_configs"]:
        static["targets"] = [f"{host}:{target.port or 80}"]
    config["scrape_configs"] = [job]  # only the server: nothing else is scraped from here
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config_path = work / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    log = (work / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            _prometheus_binary(),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=work,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (work / "prometheus.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "Prometheus not ready in 60s"
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def _query(prometheus: str, promql: str) -> list[dict]:
    r = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{promql}: {body}"
    return body["data"]["result"]


def _wait_for(prometheus: str, promql: str, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        result = _query(prometheus, promql)
        if result:
            return result
        assert time.monotonic() < deadline, f"Prometheus returned nothing for {promql} within {timeout}s"
        time.sleep(0.5)


def test_prometheus_scrapes_the_server_and_answers_queries(server: Server, prometheus: str) -> None:
    (up,) = _wait_for(prometheus, 'up{job="unet-server"} == 1')
    assert up["value"][1] == "1"
    _traffic(server, 4)
    class_model = server.model_with("class")["id"]
    result = _wait_for(prometheus, f'sum(unet_server_images_generated_total{{model="{class_model}"}}) >= 4')
    assert float(result[0]["value"][1]) >= 4
    # A latency percentile as the dashboard computes it, over real scraped histograms.
    _traffic(server, 2)
    (p90,) = _wait_for(
        prometheus,
        "histogram_quantile(0.9, sum by (le) (rate(unet_server_request_duration_seconds_bucket[1m]))) > 0",
    )
    assert 0 < float(p90["value"][1]) < 300


def test_every_dashboard_query_runs_on_real_prometheus(server: Server, prometheus: str) -> None:
    dashboard = json.loads((REPO / "deploy/grafana/dashboards/unet-server.json").read_text())
    _wait_for(prometheus, 'up{job="unet-server"} == 1')
    _traffic(server, 4)
    _wait_for(prometheus, "sum(rate(unet_server_rows_per_forward_count[1m])) > 0")
    empty = []
    for title, expr in dashboard_exprs(dashboard):
        if expr.startswith("label_values("):
            metric = expr[len("label_values(") :].split(",")[0]
            assert _query(prometheus, metric), f"variable query: no {metric} series"
            continue
        if not _query(prometheus, as_plain_promql(expr)):
            empty.append(f"{title}: {expr}")
    # On CPU the GPU gauge does not exist and no request has failed; everything else must have data.
    allowed = ("unet_server_gpu_memory_allocated_bytes", 'status=~"5.."', "unet_server_engine_errors_total")
    unexpected = [e for e in empty if not any(a in e for a in allowed)]
    assert not unexpected, "dashboard queries without data:\n" + "\n".join(unexpected)
