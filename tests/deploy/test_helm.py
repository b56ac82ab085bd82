"""The Helm chart (deploy/helm/unet-server), offline: real `helm lint --strict` and `helm template` for the
default, GPU, CPU and KEDA values; every rendered object against the Kubernetes JSON schemas
(kubernetes-validate) or, for CRDs, the schemas vendored in deploy/helm/schemas (check-jsonschema); and the
rendered objects against the server itself: env vars parse as server Settings, probes hit real routes,
the autoscaling metric is a gauge the server exports, selectors and ports line up, the pod runs as the
image's user and gets its termination grace from the server's own shutdown bounds."""

from __future__ import annotations

import ast
import functools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from server.app import create_app
from server.metrics import Metrics
from server.settings import Settings

from ._files import DASHBOARD, REPO, dockerfile_instructions, load_yaml, promtool
from ._helm import CHART, CRD_SCHEMAS, helm, render, settings_values_schema

VARIANTS = {
    "default": (),
    "gpu": ("ci/gpu-values.yaml",),
    "cpu": ("ci/cpu-values.yaml",),
    "keda": ("ci/keda-values.yaml",),
}
CRD_SCHEMA_FILES = {
    ("keda.sh/v1alpha1", "ScaledObject"): CRD_SCHEMAS / "scaledobject_keda.sh_v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): (
        CRD_SCHEMAS / "servicemonitor_monitoring.coreos.com_v1.json"
    ),
}
NAMESPACE = "serving"
Objects = list[dict[str, Any]]
Rendered = dict[str, Objects]


def _min_kube_version() -> str:
    """The lowest Kubernetes version Chart.yaml's kubeVersion admits (">=1.25.0-0" -> "1.25.0")."""
    spec = load_yaml(CHART / "Chart.yaml")["kubeVersion"]
    return re.fullmatch(r">=\s*v?(\d+\.\d+\.\d+)(-0)?", spec).group(1)


KUBE_VERSIONS = (_min_kube_version(), kubernetes_validate.latest_version())


@pytest.fixture(scope="module")
def rendered() -> Rendered:
    return {name: render(files, namespace=NAMESPACE) for name, files in VARIANTS.items()}


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


@functools.cache
def _server_paths() -> frozenset[str]:
    """Every path the server serves (building the app loads nothing until startup)."""
    return frozenset(create_app(Settings(device="cpu")).openapi()["paths"])


def _values(variant: str) -> dict[str, Any]:
    """The chart's values with the variant's file merged over them (as helm does for maps)."""

    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        return out

    values = load_yaml(CHART / "values.yaml")
    for f in VARIANTS[variant]:
        values = merge(values, load_yaml(CHART / f))
    return values


def _container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = _one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _server_settings(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings exactly as the server would read them from the container's env."""
    for var in [v for v in os.environ if v.startswith("UNET_SERVER_")]:
        monkeypatch.delenv(var)
    for env in container["env"]:
        if env["name"].startswith("UNET_SERVER_") and "value" in env:
            monkeypatch.setenv(env["name"], env["value"])
    return Settings()


# -- helm itself ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint_strict(variant: str) -> None:
    args = ["lint", "--strict", str(CHART)]
    for f in VARIANTS[variant]:
        args += ["-f", str(CHART / f)]
    out = helm(*args).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out, out
    assert "[WARNING]" not in out and "[ERROR]" not in out, out


def test_values_schema_rejects_what_the_server_would_reject() -> None:
    # The `settings` block of values.schema.json is the server's own settings schema (less what the chart
    # sets itself), so a typo or out-of-range setting fails at `helm install`, not at pod start.
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["settings"] == settings_values_schema(), (
        "server/settings.py changed: paste `python -m tests.deploy._helm --settings-schema` into "
        "values.schema.json's properties.settings (and add the setting to values.yaml if it matters)"
    )
    for bad, why in [
        ("settings.max_batch_rowz=64", "max_batch_rowz"),
        ("settings.max_batch_rows=5000", "max_batch_rows"),
        ("settings.device=cpu", "device"),  # the chart owns it (gpu.enabled)
        ("autoscaling.engine=cpu-utilisation", "engine"),
    ]:
        proc = helm("template", "x", str(CHART), "--set", bad, check=False)
        assert proc.returncode != 0 and why in proc.stderr, (bad, proc.stderr)
    proc = helm("template", "x", str(CHART), "--set", "weights.source=pvc", check=False)
    assert proc.returncode != 0 and "existingClaim" in proc.stderr, proc.stderr


# -- schemas ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_validates_offline(variant: str, kube_version: str, tmp_path: Path) -> None:
    objects = render(VARIANTS[variant], kube_version=kube_version, namespace=NAMESPACE)
    crds: dict[Path, list[Path]] = {}
    for i, obj in enumerate(objects):
        key = (obj["apiVersion"], obj["kind"])
        if key in CRD_SCHEMA_FILES:
            path = tmp_path / f"{i}-{obj['kind']}.json"
            path.write_text(json.dumps(obj))
            crds.setdefault(CRD_SCHEMA_FILES[key], []).append(path)
            continue
        try:  # strict: unknown fields are errors (the API server would drop them silently)
            kubernetes_validate.validate(obj, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = f"{obj['kind']}/{obj['metadata']['name']} on {kube_version}"
            pytest.fail(f"{where}: {exc.message} at {list(exc.path)}")
    for schema, instances in crds.items():
        proc = subprocess.run(
            [sys.executable, "-m", "check_jsonschema", "--schemafile", str(schema), *map(str, instances)],
            capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_vendored_crd_schemas_catch_mistakes(rendered: Rendered) -> None:
    """The CRD schemas are strict enough to matter: each accepts the chart's object, rejects broken ones."""
    scaled = _one(rendered["keda"], "ScaledObject")
    monitor = _one(rendered["default"], "ServiceMonitor")
    broken = {
        "ScaledObject": [
            lambda o: o["spec"]["triggers"][0]["metadata"].pop("query"),
            lambda o: o["spec"].update(minReplicas=1),  # KEDA spells it minReplicaCount
            lambda o: o["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"].update(
                stabilisationWindowSeconds=600),
            lambda o: o["spec"]["triggers"][0]["metadata"].update(threshold=96),  # must be a string
        ],
        "ServiceMonitor": [
            lambda o: o["spec"]["endpoints"][0].update(interval="5 seconds"),
            lambda o: o["spec"]["endpoints"][0].update(portName="http"),
            lambda o: o["spec"].pop("selector"),
        ],
    }
    for obj in (scaled, monitor):
        schema = json.loads(CRD_SCHEMA_FILES[(obj["apiVersion"], obj["kind"])].read_text())
        validator = jsonschema.Draft202012Validator(schema)
        validator.validate(obj)
        for breaks in broken[obj["kind"]]:
            bad = json.loads(json.dumps(obj))
            breaks(bad)
            assert not validator.is_valid(bad), f"{obj['kind']} schema accepted a broken object"


def test_every_kind_has_a_schema(rendered: Rendered) -> None:
    kinds = {(o["apiVersion"], o["kind"]) for objects in rendered.values() for o in objects}
    assert {k for k in kinds if "." in k[0].split("/")[0]} == set(CRD_SCHEMA_FILES), kinds
    assert {k[1] for k in kinds} >= {
        "Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ScaledObject",
        "ServiceMonitor", "ConfigMap",
    }


# -- agreement with the server ---------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_env_parses_as_the_servers_settings(
    variant: str, rendered: Rendered, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = rendered[variant]
    container = _container(objects)
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names)), names
    known = {f"UNET_SERVER_{n.upper()}" for n in Settings.model_fields}
    assert {n for n in names if n.startswith("UNET_SERVER_")} <= known
    settings = _server_settings(container, monkeypatch)
    (port,) = container["ports"]
    assert (port["name"], settings.port, settings.host) == ("http", port["containerPort"], "0.0.0.0")
    gpus = {k for k in container["resources"].get("limits", {}) if "gpu" in k}
    assert (settings.device == "cuda") == bool(gpus), (settings.device, gpus)
    assert all(container["resources"]["limits"][g] == 1 for g in gpus)  # the server drives one device
    values = _values(variant)
    # The env round-trips: the same Settings as the values given straight to the server.
    direct = Settings(device=settings.device, **values["settings"])
    for name in values["settings"]:
        assert getattr(settings, name) == getattr(direct, name), name
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    if values["weights"]["source"] == "pvc":
        assert mounts[str(settings.weights_dir)]["readOnly"] is True
    else:  # the image's baked-in models live at the server's weights dir
        env = _dockerfile_env()
        assert str(settings.weights_dir) == env["UNET_SERVER_WEIGHTS_DIR"]


def _dockerfile_env() -> dict[str, str]:
    out = {}
    for ins in dockerfile_instructions():
        if ins.keyword == "ENV":
            out.update(word.split("=", 1) for word in shlex.split(ins.args))
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_probes_hit_the_servers_health_routes(variant: str, rendered: Rendered) -> None:
    container = _container(rendered[variant])
    routes = _server_paths()
    probes = {kind: container[f"{kind}Probe"]["httpGet"] for kind in ("startup", "readiness", "liveness")}
    for kind, get in probes.items():
        assert get["path"] in routes, f"{kind} probe path {get['path']} is not a server route"
        assert get["port"] == "http"
    # Ready (503 until warm) gates traffic and start-up; live must not depend on the model or the queue.
    assert probes["startup"]["path"] == probes["readiness"]["path"] == "/health/ready"
    assert probes["liveness"]["path"] == "/health/live"
    startup = container["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    measured = json.loads((REPO / "bench/results/h100-run9-startup.json").read_text())
    longest = max(r["start_to_ready_s"] for r in measured["tables"][0]["rows"] if r["start"] != "median")
    assert budget >= 10 * longest, f"startup probe allows {budget}s; measured start-to-ready up to {longest}s"
    if _values(variant)["settings"].get("compile"):
        assert budget >= _values(variant)["probes"]["startup"]["compileBudgetSeconds"]


def _server_shutdown_bound(request_timeout: float) -> float:
    """Seconds from SIGTERM to exit at most, read from the server's source: uvicorn's graceful wait for open
    requests (server/__main__.py), then the engine drain (server/app.py, drain_timeout=min(C, timeout))."""
    main = ast.parse((REPO / "server" / "__main__.py").read_text())
    (graceful,) = [ast.literal_eval(k.value) for k in ast.walk(main)
                   if isinstance(k, ast.keyword) and k.arg == "timeout_graceful_shutdown"]
    app = ast.parse((REPO / "server" / "app.py").read_text())
    (drain,) = [k.value for k in ast.walk(app) if isinstance(k, ast.keyword) and k.arg == "drain_timeout"]
    assert isinstance(drain, ast.Call) and drain.func.id == "min", ast.dump(drain)
    cap = next(ast.literal_eval(a) for a in drain.args if isinstance(a, ast.Constant))
    return graceful + min(cap, request_timeout)


@pytest.mark.parametrize("variant", VARIANTS)
def test_termination_grace_covers_the_servers_drain(
    variant: str, rendered: Rendered, monkeypatch: pytest.MonkeyPatch
) -> None:
    pod = _one(rendered[variant], "Deployment")["spec"]["template"]["spec"]
    container = _container(rendered[variant])
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and int(sleep[1]) > 0
    settings = _server_settings(container, monkeypatch)
    needed = int(sleep[1]) + _server_shutdown_bound(settings.request_timeout_seconds)
    assert pod["terminationGracePeriodSeconds"] >= needed, (pod["terminationGracePeriodSeconds"], needed)


@pytest.mark.parametrize("variant", VARIANTS)
def test_pod_runs_as_the_images_user(variant: str, rendered: Rendered) -> None:
    pod = _one(rendered[variant], "Deployment")["spec"]["template"]["spec"]
    container = _container(rendered[variant])
    (user,) = [i.args for i in dockerfile_instructions() if i.keyword == "USER"]
    uid, gid = (int(x) for x in user.split(":"))
    sc = pod["securityContext"]
    assert (sc["runAsNonRoot"], sc["runAsUser"], sc["runAsGroup"], sc["fsGroup"]) == (True, uid, gid, gid)
    csc = container["securityContext"]
    assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"]
    if csc.get("readOnlyRootFilesystem"):
        # Everything the server writes must land on a writable volume: HF_HOME (Dockerfile) and /tmp.
        writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "/tmp" in writable and "emptyDir" in volumes["tmp"]
        assert any(_dockerfile_env()["HF_HOME"].startswith(w + "/") for w in writable)
    assert pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize("variant", VARIANTS)
def test_selectors_ports_and_targets_line_up(variant: str, rendered: Rendered) -> None:
    objects = rendered[variant]
    deployment = _one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    service = _one(objects, "Service")
    assert service["spec"]["selector"] == selector
    (svc_port,) = service["spec"]["ports"]
    (container_port,) = _container(objects)["ports"]
    assert svc_port["targetPort"] == container_port["name"]
    pdb = _one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    monitor = _one(objects, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == svc_port["name"]
    assert endpoint["path"] in _server_paths()
    # A scrape must finish within its interval.
    seconds = [int(endpoint[k].rstrip("s")) for k in ("scrapeTimeout", "interval")]
    assert seconds[0] < seconds[1]
    scalers = [o for o in objects if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]
    assert len(scalers) == 1, [o["kind"] for o in scalers]
    ref = scalers[0]["spec"]["scaleTargetRef"]
    target = (ref["apiVersion"], ref["kind"], ref["name"])
    assert target == ("apps/v1", "Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"]  # the autoscaler owns the count


def _exported_gauges() -> dict[str, tuple[str, ...]]:
    metrics = Metrics()
    return {
        obj._name: tuple(obj._labelnames)  # noqa: SLF001 - prometheus_client keeps them on the wrapper
        for obj in vars(metrics).values()
        if isinstance(obj, MetricWrapperBase) and obj._type == "gauge"  # noqa: SLF001
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_autoscaling_targets_the_servers_load_gauge(
    variant: str, rendered: Rendered, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = rendered[variant]
    values = _values(variant)["autoscaling"]
    gauges = _exported_gauges()
    settings = _server_settings(_container(objects), monkeypatch)
    service = _one(objects, "Service")
    if values["engine"] == "hpa":
        hpa = _one(objects, "HorizontalPodAutoscaler")
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
        name = metric["pods"]["metric"]["name"]
        target = float(metric["pods"]["target"]["averageValue"])
        assert hpa["spec"]["behavior"] == values["behavior"]
        (rule,) = _adapter_rules(objects)["rules"]
        assert rule["name"]["as"] == name and re.fullmatch(rule["name"]["matches"], name)
        assert rule["seriesQuery"].startswith(name + "{")
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}  # a Pods metric is per pod
        queries = [rule["metricsQuery"].replace("<<.Series>>", name).replace("<<.LabelMatchers>>",
                   f'namespace="{NAMESPACE}",pod=~"x.*"').replace("<<.GroupBy>>", "pod")]
    else:
        scaled = _one(objects, "ScaledObject")
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        query = trigger["metadata"]["query"]
        name = re.search(r"\b(unet_server_\w+)\{", query).group(1)
        # The series of this release only: the Service's name is the scrape's `service` label.
        assert f'service="{service["metadata"]["name"]}"' in query and f'namespace="{NAMESPACE}"' in query
        assert query.startswith("sum(")  # KEDA divides the total by the threshold per pod
        target = float(trigger["metadata"]["threshold"])
        behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior == values["behavior"]
        queries = [query]
    assert name in gauges and gauges[name] == (), f"{name} is not a label-free gauge of server/metrics.py"
    assert name == "unet_server_outstanding_rows"
    assert target == values["targetOutstandingRows"]
    # Below the knee: past max_batch_rows a pod's new rows wait in the queue instead of joining the batch.
    assert 0 < target < settings.max_batch_rows, (target, settings.max_batch_rows)
    _check_promql(queries)


def _adapter_rules(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (config,) = [o for o in objects if o["kind"] == "ConfigMap" and "config.yaml" in o.get("data", {})]
    return yaml.safe_load(config["data"]["config.yaml"])


def _check_promql(queries: list[str]) -> None:
    """Each query parses as PromQL (promtool check rules on a throwaway recording-rule file)."""
    rules = {"groups": [{"name": "chart", "rules": [{"record": f"chart:q{i}", "expr": q}
                                                    for i, q in enumerate(queries)]}]}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rules.yaml"
        path.write_text(yaml.safe_dump(rules))
        proc = subprocess.run(
            [promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
        )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_configmap_is_the_compose_dashboard(rendered: Rendered) -> None:
    (dashboard,) = [
        o for o in rendered["default"] if o["kind"] == "ConfigMap" and "unet-server.json" in o["data"]
    ]
    assert json.loads(dashboard["data"]["unet-server.json"]) == json.loads(DASHBOARD.read_text())
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"  # the Grafana sidecar's default label


def test_no_secret_in_values_and_the_key_comes_from_a_secret(rendered: Rendered) -> None:
    assert all(o["kind"] != "Secret" for objects in rendered.values() for o in objects)
    assert load_yaml(CHART / "values.yaml")["apiKey"]["existingSecret"] == ""
    assert "UNET_SERVER_API_KEY" not in {e["name"] for e in _container(rendered["default"])["env"]}
    (key,) = [e for e in _container(rendered["gpu"])["env"] if e["name"] == "UNET_SERVER_API_KEY"]
    ref = key["valueFrom"]["secretKeyRef"]
    api_key = _values("gpu")["apiKey"]
    assert ref == {"name": api_key["existingSecret"], "key": api_key["secretKey"]}


def test_without_autoscaling_the_replica_count_is_fixed() -> None:
    objects = render(sets=("autoscaling.enabled=false", "replicaCount=3"))
    assert _one(objects, "Deployment")["spec"]["replicas"] == 3
    assert not [o for o in objects if o["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")]


def test_startup_budget_rounds_up() -> None:
    objects = render(sets=("probes.startup.budgetSeconds=61", "probes.startup.periodSeconds=5"))
    probe = _container(objects)["startupProbe"]
    assert probe["failureThreshold"] == math.ceil(61 / 5)
