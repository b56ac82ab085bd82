"""Autoscaling simulation: an arrival-rate trace replayed against the Kubernetes HPA algorithm with the Helm
chart's shipped settings and the per-pod throughput/latency curve measured in bench/RESULTS.md.

    python -m bench.scaling_sim --out docs/scaling_sim.png     # prints the summary, writes the plot

What is modelled, and from where:
- a pod: the closed-loop server_load points of run 9 (fashion-class on an H100, 20 steps, guidance 5,
  2 rows per request): throughput, mean and p99 latency against rows in flight (Little's law). Below
  saturation a pod holds `rows(rate)` rows; above it (591 img/s) the excess waits in the queue, up to
  `max_queue_size` requests, and the rest is shed (429). Served at the measured p99 plus the queue's wait.
- a new pod: `schedule_s` to be scheduled and started (an assumption: image already on the node), then
  run 9's start-to-ready (bench.startup, engine process), then up to one startup-probe period.
- the metric: each running pod's `unet_server_outstanding_rows`, scraped every ServiceMonitor interval
  (a sample of a queue: Poisson around its mean), averaged over the adapter's `metricWindow`.
- the HPA (pkg/controller/podautoscaler): every 15 s, desired = ceil(sum / target) with the 0.1
  tolerance and its missing/unready-pod rules, then the stabilisation windows and rate policies of
  `behavior`, clamped to min/max replicas. Scale-down removes unready pods first, then the newest.
Not modelled: the cluster autoscaler adding GPU nodes (minutes, not seconds), uneven load balancing.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
LOAD_RESULTS = REPO / "bench" / "results" / "h100-run9-server_load.json"
STARTUP_RESULTS = REPO / "bench" / "results" / "h100-run9-startup.json"
CHART_VALUES = REPO / "deploy" / "helm" / "unet-server" / "values.yaml"
HPA_SYNC_S = 15  # kube-controller-manager --horizontal-pod-autoscaler-sync-period default
HPA_TOLERANCE = 0.1  # --horizontal-pod-autoscaler-tolerance default
OTHER_LABEL = "300 s scale-down window"


def _seconds(duration: str) -> float:
    """A Prometheus/Kubernetes duration ("30s", "1m") in seconds."""
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)", duration).groups()
    return int(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


@dataclass(frozen=True)
class PodCurve:
    """One pod's measured load curve: at throughput `rate` (requests/s) it holds `rows` rows in flight
    (waiting and running) and serves at `p99_ms`. Points are sorted by rate, starting at (0, 0, p99 at 1)."""

    rate: tuple[float, ...]
    rows: tuple[float, ...]
    mean_ms: tuple[float, ...]
    p99_ms: tuple[float, ...]
    rows_per_request: int

    @classmethod
    def from_results(cls, path: Path = LOAD_RESULTS) -> PodCurve:
        data = json.loads(path.read_text())
        rows_per_request = int(re.search(r"\((\d+) rows/request\)", " ".join(data["notes"])).group(1))
        points = sorted(
            (r["img_s"], r["mean_ms"], r["p99_ms"])
            for r in data["tables"][0]["rows"]
            if r["server"] == "batched" and r["point"].startswith("closed ")
        )
        rate = [0.0] + [p[0] for p in points]
        mean = [points[0][1]] + [p[1] for p in points]
        p99 = [points[0][2]] + [p[2] for p in points]
        # Little's law: rows in flight = rows/request x requests/s x seconds per request.
        rows = [rows_per_request * r * m / 1000 for r, m in zip(rate, mean, strict=True)]
        return cls(tuple(rate), tuple(rows), tuple(mean), tuple(p99), rows_per_request)

    @property
    def capacity(self) -> float:
        """Requests/s at saturation (the highest measured point)."""
        return self.rate[-1]

    def rows_at(self, rate: float) -> float:
        return float(np.interp(rate, self.rate, self.rows))

    def rate_at_rows(self, rows: float) -> float:
        return float(np.interp(rows, self.rows, self.rate))

    def p99_at(self, rate: float) -> float:
        return float(np.interp(rate, self.rate, self.p99_ms))

    def knee(self) -> int:
        """Index of the measured point where latency starts to climb: after it, the mean latency added per
        request/s of throughput grows the most (new requests wait in the queue instead of joining a batch)."""
        slopes = [
            (self.mean_ms[i + 1] - self.mean_ms[i]) / (self.rate[i + 1] - self.rate[i])
            for i in range(1, len(self.rate) - 1)
        ]
        jumps = [slopes[i + 1] / slopes[i] for i in range(len(slopes) - 1)]
        return 2 + int(np.argmax(jumps))


def start_to_ready_s(path: Path = STARTUP_RESULTS) -> float:
    """Median start-to-ready of the engine-process server (what runs on a GPU pod), bench.startup."""
    rows = json.loads(path.read_text())["tables"][0]["rows"]
    (median,) = [r["start_to_ready_s"] for r in rows if r["mode"] == "process" and r["start"] == "median"]
    return float(median)


@dataclass(frozen=True)
class Policy:
    type: str  # "Pods" or "Percent"
    value: int
    period_s: int


@dataclass(frozen=True)
class Rules:
    """One direction of an HPA's `behavior`."""

    window_s: int
    policies: tuple[Policy, ...]
    select: str = "Max"

    @classmethod
    def from_values(cls, rules: dict[str, Any]) -> Rules:
        policies = tuple(Policy(p["type"], p["value"], p["periodSeconds"]) for p in rules["policies"])
        return cls(rules["stabilizationWindowSeconds"], policies, rules.get("selectPolicy", "Max"))


@dataclass(frozen=True)
class HpaConfig:
    target: float  # average rows per pod
    min_replicas: int
    max_replicas: int
    scale_up: Rules
    scale_down: Rules
    metric_window_s: float  # avg_over_time window of the adapter rule
    scrape_s: float  # ServiceMonitor interval
    queue_size: int  # max_queue_size: waiting requests per pod before 429

    @classmethod
    def from_chart(cls, path: Path = CHART_VALUES) -> HpaConfig:
        values = yaml.safe_load(path.read_text())
        auto = values["autoscaling"]
        return cls(
            target=float(auto["targetOutstandingRows"]),
            min_replicas=auto["minReplicas"],
            max_replicas=auto["maxReplicas"],
            scale_up=Rules.from_values(auto["behavior"]["scaleUp"]),
            scale_down=Rules.from_values(auto["behavior"]["scaleDown"]),
            metric_window_s=_seconds(auto["metricWindow"]),
            scrape_s=_seconds(values["metrics"]["serviceMonitor"]["interval"]),
            queue_size=int(values["settings"]["max_queue_size"]),
        )


def plain_metric_replicas(
    metrics: dict[int, float], pods: list[int], pending: set[int], target: float, current: int,
    tolerance: float = HPA_TOLERANCE,
) -> int:
    """replica_calculator.go calcPlainMetricReplicas for a Pods metric (AverageValue target): `metrics`
    maps pod -> value; pods still Pending are unready, running pods without a value are missing; both
    are filled in pessimistically (0 when scaling up, the target when scaling down)."""
    unready = [p for p in pods if p in pending]
    missing = [p for p in pods if p not in pending and p not in metrics]
    metrics = {k: v for k, v in metrics.items() if k not in unready}
    if not metrics:
        return current  # no metrics: the HPA reports an error and leaves the scale alone
    ratio = sum(metrics.values()) / len(metrics) / target
    up_with_unready = bool(unready) and ratio > 1
    if not up_with_unready and not missing:
        return current if abs(1 - ratio) <= tolerance else math.ceil(ratio * len(metrics))
    filled = dict(metrics)
    for pod in missing:
        filled[pod] = target if ratio < 1 else 0.0
    if up_with_unready:
        filled.update({pod: 0.0 for pod in unready})
    new_ratio = sum(filled.values()) / len(filled) / target
    if abs(1 - new_ratio) <= tolerance or (ratio < 1 < new_ratio) or (new_ratio < 1 < ratio):
        return current
    new = math.ceil(new_ratio * len(filled))
    if (new_ratio < 1 and new > current) or (new_ratio > 1 and new < current):
        return current
    return new


@dataclass
class Hpa:
    """The HPA controller's memory: past recommendations (stabilisation) and scale events (rate policies)."""

    config: HpaConfig
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    events: list[tuple[float, int]] = field(default_factory=list)  # (time, replica change)

    def _changed_within(self, now: float, period_s: int, up: bool) -> int:
        return sum(abs(c) for t, c in self.events if t > now - period_s and (c > 0) == up)

    def _limit(self, now: float, current: int, rules: Rules, up: bool) -> int:
        if rules.select == "Disabled":
            return current
        proposals = []
        for policy in rules.policies:
            start = (current - self._changed_within(now, policy.period_s, True)
                     + self._changed_within(now, policy.period_s, False))
            if policy.type == "Pods":
                proposals.append(start + policy.value if up else start - policy.value)
            elif up:
                proposals.append(math.ceil(start * (1 + policy.value / 100)))
            else:
                proposals.append(int(start * (1 - policy.value / 100)))
        most = max if up else min  # selectPolicy Max = the policy allowing the biggest change
        return (most if rules.select == "Max" else (min if up else max))(proposals)

    def decide(self, now: float, current: int, desired: int) -> int:
        """normalizeDesiredReplicasWithBehaviors: stabilise, then apply rate limits and min/max."""
        cfg = self.config
        if not self.recommendations:  # maybeInitScaleDownStabilizationWindow
            self.recommendations.append((now, current))
        up_cut, down_cut = now - cfg.scale_up.window_s, now - cfg.scale_down.window_s
        up_rec = min([desired] + [r for t, r in self.recommendations if t > up_cut])
        down_rec = max([desired] + [r for t, r in self.recommendations if t > down_cut])
        self.recommendations = [(t, r) for t, r in self.recommendations if t > min(up_cut, down_cut)]
        self.recommendations.append((now, desired))
        stabilised = min(max(current, up_rec), down_rec)
        if stabilised > current:
            limit = max(self._limit(now, current, cfg.scale_up, up=True), current)
            result = min(stabilised, cfg.max_replicas, limit)
        elif stabilised < current:
            limit = min(self._limit(now, current, cfg.scale_down, up=False), current)
            result = max(stabilised, cfg.min_replicas, limit)
        else:
            result = stabilised
        if result != current:
            self.events.append((now, result - current))
        return result


@dataclass
class Pod:
    id: int
    created: float
    running_at: float  # scheduled, container started: /metrics answers (0 rows while warming)
    ready_at: float  # /health/ready passed: in the Service's endpoints
    backlog: float = 0.0  # requests waiting beyond what a saturated pod runs
    samples: list[tuple[float, float]] = field(default_factory=list)  # (time, scraped rows)
    phase: float = 0.0  # scrape offset within the interval

    def pending(self, now: float) -> bool:
        return now < self.running_at


@dataclass(frozen=True)
class SimConfig:
    schedule_s: float = 5.0  # assumption: scheduling + container start with the image cached on the node
    startup_s: float = field(default_factory=start_to_ready_s)
    probe_period_s: float = 5.0  # the startup probe notices readiness within one period
    initial_replicas: int = 1
    seed: int = 0


@dataclass
class Result:
    """Per-second series of one run, and the HPA's scale events."""

    offered: np.ndarray  # requests arriving
    served: np.ndarray
    shed: np.ndarray  # 429 (queue full) or no ready pod
    p99_ms: np.ndarray  # of the requests served that second (nan when none)
    ready: np.ndarray  # pods in the endpoints
    pods: np.ndarray  # pods existing (warming included)
    metric: np.ndarray  # average rows per pod as the HPA last saw it
    events: list[tuple[float, int, int]]  # (time, from, to)

    def summary(self, flap_window_s: float = 300.0) -> dict[str, float]:
        served = self.served.sum()
        weights = self.served / max(served, 1)
        order = np.argsort(np.nan_to_num(self.p99_ms))
        cumulative = np.cumsum(weights[order])
        p99 = float(np.nan_to_num(self.p99_ms)[order][np.searchsorted(cumulative, 0.99)])
        return {
            "offered": float(self.offered.sum()),
            "shed_fraction": float(self.shed.sum() / max(self.offered.sum(), 1)),
            "p99_ms_overall": p99,  # 99th percentile over requests, each second's p99 standing for it
            "worst_p99_ms": float(np.nanmax(self.p99_ms)),
            "pod_hours": float(self.pods.sum() / 3600),
            "max_pods": int(self.pods.max()),
            "scale_events": len(self.events),
            "reversals": flaps(self.events, flap_window_s),
        }


def flaps(events: list[tuple[float, int, int]], window_s: float) -> int:
    """Scale events that reverse the previous one's direction within `window_s` (down then up, or up then
    down): capacity thrown away and bought back, or bought and thrown away."""
    count = 0
    for (t0, a0, b0), (t1, a1, b1) in zip(events, events[1:], strict=False):
        if (b0 - a0) * (b1 - a1) < 0 and t1 - t0 <= window_s:
            count += 1
    return count


def shipped_trace(seed: int = 0) -> np.ndarray:
    """Offered requests/s, one value per second, 100 minutes: a quiet start, a morning ramp to 2500/s, a
    5-minute lull to 800/s, a 3-minute spike to 3300/s, an evening ramp down (1 image, guided, 20 steps)."""
    minutes = [0, 10, 25, 45, 46, 51, 52, 60, 60.5, 63, 63.5, 70, 90, 100]
    rates = [300, 300, 2500, 2500, 800, 800, 2500, 2500, 3300, 3300, 2500, 2500, 300, 300]
    t = np.arange(100 * 60)
    base = np.interp(t / 60, minutes, rates)
    # Slow wander of +-5% (users are not a metronome), seeded.
    rng = np.random.default_rng(seed)
    wander = np.cumsum(rng.normal(0, 0.004, t.size))
    wander = 0.05 * np.tanh(wander - np.convolve(wander, np.ones(120) / 120, mode="same"))
    return base * (1 + wander)


def simulate(trace: np.ndarray, curve: PodCurve, hpa_cfg: HpaConfig, sim: SimConfig | None = None) -> Result:
    """Replay `trace` (requests/s per second) second by second."""
    sim = sim or SimConfig()
    # Separate streams: the same seed gives the same arrivals whatever the HPA settings do to the scrapes.
    arrivals_rng, rng = (np.random.default_rng(s) for s in np.random.SeedSequence(sim.seed).spawn(2))
    hpa = Hpa(hpa_cfg)
    pods: list[Pod] = []
    next_id = 0

    def add_pod(now: float, warm: bool = False) -> None:
        nonlocal next_id
        running = now if warm else now + sim.schedule_s
        ready = now if warm else running + sim.startup_s + sim.probe_period_s
        pods.append(Pod(next_id, now, running, ready, phase=rng.uniform(0, hpa_cfg.scrape_s)))
        next_id += 1

    for _ in range(sim.initial_replicas):
        add_pod(0.0, warm=True)
    n = trace.size
    out = {k: np.zeros(n) for k in ("offered", "served", "shed", "p99_ms", "ready", "pods", "metric")}
    events: list[tuple[float, int, int]] = []
    last_metric = float("nan")
    cap = curve.capacity
    for second in range(n):
        now = float(second)
        arrivals = arrivals_rng.poisson(trace[second])
        ready = [p for p in pods if p.ready_at <= now]
        served = shed = 0.0
        p99 = float("nan")
        if not ready:
            shed = arrivals
        else:
            per_pod = arrivals / len(ready)  # the Service spreads requests evenly
            worst = 0.0
            for pod in ready:
                # Fluid queue: beyond capacity, requests wait; beyond max_queue_size waiting, they are shed.
                pod.backlog = max(0.0, pod.backlog + per_pod - cap)
                over = max(0.0, pod.backlog - hpa_cfg.queue_size)
                pod.backlog -= over
                shed += over
                served += per_pod - over
                rate = min(per_pod, cap)
                worst = max(worst, curve.p99_at(rate) + 1000 * pod.backlog / cap)
            p99 = worst if served > 0 else float("nan")
        # Scrapes: every running pod's gauge, a Poisson sample around its mean (0 while warming).
        for pod in pods:
            if pod.pending(now) or (now - pod.phase) % hpa_cfg.scrape_s >= 1:
                continue
            if pod.ready_at <= now:
                in_batch = curve.rows_at(min(arrivals / len(ready), cap))
                mean_rows = in_batch + curve.rows_per_request * pod.backlog
            else:
                mean_rows = 0.0
            sample = curve.rows_per_request * rng.poisson(mean_rows / curve.rows_per_request)
            pod.samples.append((now, float(sample)))
            pod.samples = [(t, v) for t, v in pod.samples if t > now - hpa_cfg.metric_window_s]
        if second % HPA_SYNC_S == 0 and second > 0:
            metrics = {p.id: float(np.mean([v for _, v in p.samples])) for p in pods if p.samples}
            current = len(pods)
            pending = {p.id for p in pods if p.pending(now)}
            desired = plain_metric_replicas(metrics, [p.id for p in pods], pending, hpa_cfg.target, current)
            new = hpa.decide(now, current, desired)
            if metrics:
                last_metric = sum(metrics.values()) / len(metrics)
            if new > current:
                for _ in range(new - current):
                    add_pod(now)
            elif new < current:
                # ReplicaSet deletion order: not running, then not ready, then the most recently ready.
                pods.sort(key=lambda p: (not p.pending(now), p.ready_at <= now, -p.ready_at))
                del pods[: current - new]  # drained: their backlog finishes (grace period), nothing lost
            if new != current:
                events.append((now, current, new))
        out["offered"][second] = arrivals
        out["served"][second] = served
        out["shed"][second] = shed
        out["p99_ms"][second] = p99
        out["ready"][second] = len(ready)
        out["pods"][second] = len(pods)
        out["metric"][second] = last_metric
    return Result(events=events, **out)


def kubernetes_default(cfg: HpaConfig) -> HpaConfig:
    """The chart's settings with the HPA's default scale-down behaviour (300 s window, -100% per 15 s)."""
    return replace(cfg, scale_down=Rules(300, (Policy("Percent", 100, 15),)))


def unstabilised(cfg: HpaConfig) -> HpaConfig:
    """No scale-down stabilisation at all, and one scrape per decision instead of a smoothed gauge."""
    return replace(kubernetes_default(cfg), scale_down=Rules(0, (Policy("Percent", 100, 15),)),
                   metric_window_s=cfg.scrape_s)


def plot(
    trace: np.ndarray, shipped: Result, other: Result, curve: PodCurve, cfg: HpaConfig, path: Path
) -> None:
    """Pods, p99 latency and shed requests over the trace, shipped settings against the counterfactual."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = np.arange(trace.size) / 60
    fig, axes = plt.subplots(3, 1, figsize=(10, 8.5), sharex=True, height_ratios=[3, 2, 1.4])
    ax = axes[0]
    ax.plot(minutes, trace, color="0.6", lw=1, label="offered requests/s")
    ax.plot(minutes, shipped.ready * curve.rate_at_rows(cfg.target), color="tab:blue", lw=1.2,
            label=f"ready pods x rate at target ({curve.rate_at_rows(cfg.target):.0f}/s)")
    ax.set_ylabel("requests/s")
    twin = ax.twinx()
    twin.step(minutes, shipped.pods, where="post", color="tab:green", lw=1.6, label="pods (shipped settings)")
    twin.step(minutes, other.pods, where="post", color="tab:red", lw=1, ls="--",
              label=f"pods (Kubernetes' default {OTHER_LABEL})")
    twin.set_ylabel("pods")
    twin.set_ylim(0, cfg.max_replicas + 1)
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=8)
    ax.set_title(
        f"HPA on unet_server_outstanding_rows, target {cfg.target:g} rows/pod, scale-down window "
        f"{cfg.scale_down.window_s}s (per-pod curve: bench/RESULTS.md run 9)", fontsize=10)
    bins = 10
    def binned(a: np.ndarray, fn) -> tuple[np.ndarray, np.ndarray]:
        k = a.size // bins
        return minutes[: k * bins : bins], fn(a[: k * bins].reshape(k, bins), axis=1)

    ax = axes[1]
    for res, colour, label in ((shipped, "tab:green", "shipped"), (other, "tab:red", OTHER_LABEL)):
        x, y = binned(np.nan_to_num(res.p99_ms), np.max)
        ax.plot(x, y, color=colour, lw=1.2 if res is shipped else 0.8, label=f"p99 latency ({label})")
    ax.axhline(curve.p99_at(curve.rate_at_rows(cfg.target)), color="0.4", lw=0.8, ls=":",
               label="p99 at target load")
    ax.set_ylabel("p99 ms (10 s max)")
    ax.set_yscale("log")
    ax.legend(loc="upper left", fontsize=8)
    ax = axes[2]
    for res, colour, label in ((shipped, "tab:green", "shipped"), (other, "tab:red", OTHER_LABEL)):
        x, y = binned(res.shed, np.sum)
        ax.plot(x, y / bins, color=colour, lw=1.2 if res is shipped else 0.8,
                label=f"shed requests/s ({label}): {100 * res.summary()['shed_fraction']:.3f}% of all")
    ax.set_ylabel("shed /s")
    ax.set_xlabel("minutes")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the plot (PNG) here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    curve = PodCurve.from_results()
    cfg = HpaConfig.from_chart()
    knee = curve.knee()
    print("per-pod curve (bench/results/h100-run9-server_load.json, closed loop):")
    print("| img/s | mean ms | p99 ms | rows in flight |")
    columns = (curve.rate, curve.mean_ms, curve.p99_ms, curve.rows)
    for r, m, p, rows in zip(*(c[1:] for c in columns), strict=True):
        print(f"| {r:.1f} | {m:.1f} | {p:.1f} | {rows:.1f} |")
    at_target = curve.rate_at_rows(cfg.target)
    print(f"knee: {curve.rows[knee]:.0f} rows in flight ({curve.rate[knee]:.0f} img/s); target "
          f"{cfg.target:g} rows = {cfg.target / curve.rows[knee]:.0%} of it, "
          f"{at_target:.0f} img/s per pod at p99 {curve.p99_at(at_target):.0f} ms")
    trace = shipped_trace(args.seed)
    sim = SimConfig(seed=args.seed)
    shipped = simulate(trace, curve, cfg, sim)
    other = simulate(trace, curve, kubernetes_default(cfg), sim)
    print(f"start-up: {sim.schedule_s:g} s scheduling (assumed) + {sim.startup_s:g} s start-to-ready "
          f"(bench.startup) + {sim.probe_period_s:g} s probe period")
    print("| settings | shed % | p99 ms (overall) | worst p99 ms | pod-hours | max pods | scale events "
          "| reversals |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    runs = [("shipped", shipped), (f"Kubernetes' default {OTHER_LABEL}", other),
            ("no scale-down stabilisation, one scrape", simulate(trace, curve, unstabilised(cfg), sim))]
    for target in (64.0, 128.0, 160.0):
        runs.append((f"target {target:g} rows", simulate(trace, curve, replace(cfg, target=target), sim)))
    for name, res in runs:
        s = res.summary()
        print(f"| {name} | {100 * s['shed_fraction']:.3f} | {s['p99_ms_overall']:.0f} | "
              f"{s['worst_p99_ms']:.0f} | {s['pod_hours']:.2f} | {s['max_pods']} | {s['scale_events']} | "
              f"{s['reversals']} |")
    if args.out:
        plot(trace, shipped, other, curve, cfg, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
