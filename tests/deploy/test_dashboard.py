"""The Grafana dashboard queries only what the server exports, with valid PromQL, and covers what an
operator needs: throughput, latency percentiles, queue, rows per forward pass, GPU memory.

The exported names come from server/metrics.py (every object, the CUDA-only GPU gauge included); the
integration tests check the same dashboard against a live scrape and a real Prometheus."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

from server.app import COUNTED_ENDPOINTS
from server.metrics import Metrics

from ._files import DASHBOARD, promtool

METRIC_NAME = re.compile(r"\bunet_server_[a-zA-Z0-9_]+")
SELECTOR = re.compile(r"(unet_server_[a-zA-Z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
EXACT_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:!=|=)\s*\"([^\"]*)\"")
_SUFFIXES = {
    "counter": ["_total", "_created"],
    "gauge": [""],
    "histogram": ["_bucket", "_sum", "_count", "_created"],
}


def exported_series() -> dict[str, set[str]]:
    """Every series name the server can export -> its label names (histogram buckets add `le`)."""
    metrics = Metrics()
    metrics.set_gpu_memory_source("0", "cuda:0", lambda: 0.0)  # the CUDA-only gauge is a real export too
    out: dict[str, set[str]] = {}
    for obj in vars(metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        kind = obj._type  # noqa: SLF001 - prometheus_client keeps type and names on the wrapper
        labels = set(obj._labelnames)  # noqa: SLF001
        for suffix in _SUFFIXES[kind]:
            out[obj._name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())  # noqa: SLF001
    return out


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every panel target and query variable."""
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((f"variable {var['name']}", query))
    return out


def as_plain_promql(expr: str) -> str:
    """Grafana's variables replaced by values Prometheus accepts."""
    return expr.replace("$__rate_interval", "1m").replace("$__interval", "1m").replace("$model", ".*")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_is_well_formed(dashboard: dict) -> None:
    assert dashboard["uid"] == "unet-server" and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], f"panel {panel['title']!r} has no query"
            ref_ids = [t["refId"] for t in panel["targets"]]
            assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_dashboard_references_only_exported_metrics_and_labels(dashboard: dict) -> None:
    exported = exported_series()
    assert exported, "server.metrics exports nothing?"
    for title, expr in dashboard_exprs(dashboard):
        names = set(METRIC_NAME.findall(expr))
        assert names, f"{title}: query uses no unet_server_ metric: {expr}"
        unknown = names - set(exported)
        assert not unknown, f"{title}: {sorted(unknown)} not exported by server/metrics.py"
        for name, matchers in SELECTOR.findall(expr):
            labels = set(MATCHER.findall(matchers))
            missing = sorted(labels - exported[name])
            assert not missing, f"{title}: {name} has no label(s) {missing}"
            for label, value in EXACT_MATCHER.findall(matchers):
                if label == "endpoint":  # values the server's request counter really uses
                    assert value in set(COUNTED_ENDPOINTS.values()), f"{title}: no endpoint {value!r}"


def test_histogram_quantiles_aggregate_buckets_by_le(dashboard: dict) -> None:
    quantile_exprs = [(t, e) for t, e in dashboard_exprs(dashboard) if "histogram_quantile" in e]
    assert quantile_exprs
    for title, expr in quantile_exprs:
        for call in re.findall(r"histogram_quantile\(([^,]+),(.*)", expr):
            assert 0 < float(call[0]) < 1, title
            assert "_bucket" in call[1] and re.search(r"by \(([^)]*\b)?le\b", call[1]), (
                f"{title}: histogram_quantile needs rate(..._bucket) summed by le: {expr}"
            )


@pytest.mark.parametrize(
    "needed, pattern",
    [
        ("throughput", r"rate\(unet_server_images_generated_total"),
        ("latency percentiles", r"histogram_quantile\([^,]+, sum by \(le\) \(rate\(unet_server_request_dur"),
        ("queue size", r"unet_server_queue_size"),
        ("rows per forward pass", r"unet_server_rows_per_forward_(sum|bucket)"),
        ("GPU memory", r"unet_server_gpu_memory_allocated_bytes"),
    ],
)
def test_dashboard_covers(dashboard: dict, needed: str, pattern: str) -> None:
    assert any(re.search(pattern, expr) for _, expr in dashboard_exprs(dashboard)), f"no panel shows {needed}"


def test_every_query_is_valid_promql(dashboard: dict, tmp_path: Path) -> None:
    """promtool parses each expression (as a recording rule) the way Prometheus will."""
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": as_plain_promql(expr)}
                    for i, (_, expr) in enumerate(dashboard_exprs(dashboard))
                    if not expr.startswith("label_values(")
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    cmd = [promtool(), "check", "rules", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
