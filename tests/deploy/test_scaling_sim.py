"""bench/scaling_sim.py: the HPA model follows the controller's rules, the per-pod curve is the measured one,
and on the shipped trace the chart's autoscaling settings neither flap nor shed, where the same trace with
Kubernetes' default scale-down (300 s window) or none at all does both."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from bench.scaling_sim import (
    Hpa,
    HpaConfig,
    PodCurve,
    Result,
    SimConfig,
    flaps,
    kubernetes_default,
    plain_metric_replicas,
    plot,
    shipped_trace,
    simulate,
    unstabilised,
)
from server.settings import Settings


@pytest.fixture(scope="module")
def curve() -> PodCurve:
    return PodCurve.from_results()


@pytest.fixture(scope="module")
def cfg() -> HpaConfig:
    return HpaConfig.from_chart()


@pytest.fixture(scope="module")
def trace() -> np.ndarray:
    return shipped_trace(seed=0)


@pytest.fixture(scope="module")
def shipped(trace: np.ndarray, curve: PodCurve, cfg: HpaConfig) -> Result:
    return simulate(trace, curve, cfg, SimConfig(seed=0))


@pytest.fixture(scope="module")
def k8s_default(trace: np.ndarray, curve: PodCurve, cfg: HpaConfig) -> Result:
    return simulate(trace, curve, kubernetes_default(cfg), SimConfig(seed=0))


@pytest.fixture(scope="module")
def unstable(trace: np.ndarray, curve: PodCurve, cfg: HpaConfig) -> Result:
    return simulate(trace, curve, unstabilised(cfg), SimConfig(seed=0))


def test_pod_curve_is_measured_and_its_knee_is_the_largest_batch(curve: PodCurve, cfg: HpaConfig) -> None:
    # Closed-loop clients keep one request (2 rows) each in flight: Little's law must give that back.
    for clients, rows in zip((1, 8, 64, 128), curve.rows[1:], strict=True):
        assert rows == pytest.approx(2 * clients, rel=0.05)
    knee = curve.rows[curve.knee()]
    max_batch_rows = Settings(device="cuda").max_batch_rows
    # Latency climbs once rows in flight pass one forward pass: new rows then wait instead of joining.
    assert knee == pytest.approx(max_batch_rows, rel=0.05)
    assert 0.5 * knee <= cfg.target <= 0.8 * knee, (cfg.target, knee)
    assert curve.p99_at(curve.rate_at_rows(cfg.target)) < curve.p99_ms[curve.knee()]


def test_replica_calculator_rules() -> None:
    # desired = ceil(sum / target) when every pod reports
    assert plain_metric_replicas({0: 192.0, 1: 192.0}, [0, 1], set(), 96, current=2) == 4
    assert plain_metric_replicas({0: 20.0, 1: 30.0, 2: 10.0}, [0, 1, 2], set(), 96, current=3) == 1
    # within the 0.1 tolerance nothing moves
    assert plain_metric_replicas({0: 104.0, 1: 100.0}, [0, 1], set(), 96, current=2) == 2
    # a pod without samples counts as at target when scaling down: no scale-down on half the data
    assert plain_metric_replicas({0: 60.0}, [0, 1], set(), 96, current=2) == 2
    # a pending pod counts as 0 when scaling up: the new pod is credited before it serves
    assert plain_metric_replicas({0: 192.0}, [0, 1], {1}, 96, current=2) == 2
    assert plain_metric_replicas({0: 400.0}, [0, 1], {1}, 96, current=2) == math.ceil(400 / 96)


def test_stabilisation_and_rate_policies(cfg: HpaConfig) -> None:
    hpa = Hpa(cfg)
    # scale-up: the larger of +100% and +4 pods per 15 s, capped at maxReplicas
    assert hpa.decide(0, current=2, desired=20) == min(6, cfg.max_replicas)
    hpa = Hpa(cfg)
    assert hpa.decide(0, current=6, desired=6) == 6
    window = cfg.scale_down.window_s
    # a lull inside the window: the highest recommendation of the window holds
    for t in range(15, window, 15):
        assert hpa.decide(t, current=6, desired=2) == 6
    # past the window the pods go, at the policy's pace (1 per 60 s)
    assert hpa.decide(window + 15, current=6, desired=2) == 5
    assert hpa.decide(window + 30, current=5, desired=2) == 5
    assert hpa.decide(window + 90, current=5, desired=2) == 4


def test_flap_detector() -> None:
    assert flaps([(0, 1, 2), (100, 2, 3), (200, 3, 2)], 300) == 1
    assert flaps([(0, 1, 2), (400, 2, 1)], 300) == 0
    assert flaps([(0, 2, 1), (60, 1, 2), (120, 2, 1)], 300) == 2


def test_shipped_settings_neither_flap_nor_shed(shipped: Result, curve: PodCurve, cfg: HpaConfig) -> None:
    summary = shipped.summary()
    assert summary["reversals"] == 0, shipped.events
    assert summary["shed_fraction"] < 1e-3, summary
    assert summary["max_pods"] <= cfg.max_replicas
    assert summary["p99_ms_overall"] < 2 * curve.p99_at(curve.rate_at_rows(cfg.target)), summary
    minute = lambda m: int(m * 60)  # noqa: E731
    # On the 2500/s plateau the pods match the formula: ceil(rows in flight / target).
    plateau = slice(minute(32), minute(45))
    per_pod_rows = curve.rows_at(2500 / shipped.ready[plateau].mean())
    expected = math.ceil(shipped.ready[plateau].mean() * per_pod_rows / cfg.target)
    assert abs(shipped.pods[plateau].mean() - expected) <= 1
    # The 5-minute lull keeps the warm pods (scale-down window longer than the lull).
    assert shipped.pods[minute(46) : minute(52)].min() == shipped.pods[minute(45)]
    # And once the evening is quiet the pods go back down.
    assert shipped.pods[-1] == cfg.min_replicas


def test_shorter_scale_down_windows_flap_and_shed_on_the_same_trace(
    k8s_default: Result, unstable: Result, shipped: Result
) -> None:
    lull = slice(46 * 60, 52 * 60)
    for other, min_reversals in ((k8s_default, 1), (unstable, 5)):
        summary = other.summary()
        assert np.array_equal(other.offered, shipped.offered)  # same arrivals, only the settings differ
        assert summary["reversals"] >= min_reversals, other.events
        assert summary["shed_fraction"] > shipped.summary()["shed_fraction"]
        # the lull costs warm pods, bought back (and shed for) when the load returns
        assert other.pods[lull].min() < shipped.pods[lull].min()


def test_plot(tmp_path: Path, trace: np.ndarray, shipped: Result, k8s_default: Result, curve: PodCurve,
              cfg: HpaConfig) -> None:
    path = tmp_path / "sim.png"
    plot(trace, shipped, k8s_default, curve, cfg, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
