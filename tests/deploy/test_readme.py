"""README.md matches the code: every setting (name and default), every metric (type and labels), every
endpoint, sampler name, response header, make target and relative link it mentions."""

from __future__ import annotations

import re

import pytest
from prometheus_client.metrics import MetricWrapperBase

from model.samplers import SAMPLERS
from server.app import create_app
from server.metrics import Metrics
from server.settings import Settings

from ._files import DOCKERFILE, REPO

README = REPO / "README.md"


@pytest.fixture(scope="module")
def readme() -> str:
    return README.read_text()


def _table_rows(text: str, first_header: str) -> dict[str, list[str]]:
    """Rows of the markdown table whose first header cell is `first_header`, keyed by first cell."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1:]
    return rows


def _shown_default(value: object) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) if value else "(all)"
    if value is None:
        return "(none)"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_configuration_table_lists_every_setting_with_its_default(readme: str) -> None:
    rows = _table_rows(readme, "Variable")
    expected = {}
    for name, info in Settings.model_fields.items():
        default = info.default_factory() if info.default_factory else info.default  # type: ignore[call-arg]
        expected[f"UNET_SERVER_{name.upper()}"] = _shown_default(default)
    assert set(rows) == set(expected), {
        "missing": sorted(set(expected) - set(rows)),
        "not settings": sorted(set(rows) - set(expected)),
    }
    for var, default in expected.items():
        assert rows[var][0].strip("`") == default, f"{var}: README says {rows[var][0]}, code {default}"


def test_every_env_var_mentioned_exists(readme: str) -> None:
    from server.loras import LoraSettings

    known = {f"UNET_SERVER_{name.upper()}" for name in Settings.model_fields}
    known |= {f"UNET_SERVER_LORA_{name.upper()}" for name in LoraSettings.model_fields}
    text_encoder = (REPO / "model" / "text_encoder.py").read_text()
    for var in set(re.findall(r"UNET_SERVER_[A-Z_]+[A-Z]", readme)):
        assert var in known or var in text_encoder, f"README mentions {var}, which nothing reads"


def test_metrics_table_lists_every_metric_with_type_and_labels(readme: str) -> None:
    metrics = Metrics()
    metrics.set_gpu_memory_source("0", "cuda:0", lambda: 0.0)
    expected = {}
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            name = obj._name + ("_total" if obj._type == "counter" else "")  # noqa: SLF001
            expected[name] = (obj._type, set(obj._labelnames))  # noqa: SLF001
    rows = _table_rows(readme, "Metric")
    assert set(rows) == set(expected), {
        "missing": sorted(set(expected) - set(rows)),
        "not exported": sorted(set(rows) - set(expected)),
    }
    for name, (kind, labels) in expected.items():
        assert rows[name][0] == kind, f"{name}: README type {rows[name][0]}, code {kind}"
        shown = set(re.findall(r"`(\w+)`", rows[name][1]))
        assert shown == labels, f"{name}: README labels {shown}, code {labels}"
    series = {n + s for n in expected for s in ("", "_sum", "_count", "_bucket")}
    for mentioned in set(re.findall(r"unet_server_[a-z_]+[a-z]", readme)):
        assert mentioned in series, f"README mentions {mentioned}, which the server does not export"


def test_api_table_matches_the_routes(readme: str) -> None:
    def norm(path: str) -> str:
        return re.sub(r"\{\w+\}", "{}", path)

    paths = create_app(Settings()).openapi()["paths"]  # builds the app; nothing loads until startup
    served = {(method.upper(), norm(path)) for path, ops in paths.items() for method in ops}
    rows = _table_rows(readme, "Method and path")
    mentioned = set()
    for cell in rows:
        for method, path in re.findall(r"(GET|POST|PUT|DELETE) (/[\w/{}.-]*)", cell):
            mentioned.add((method, norm(path)))
    assert mentioned, "no endpoints found in the API table"
    assert mentioned <= served, sorted(mentioned - served)
    assert served <= mentioned, f"endpoints the README does not list: {sorted(served - mentioned)}"


def test_samplers_headers_and_make_targets_exist(readme: str) -> None:
    for name in re.findall(r'"sampler": "([^"]+)"', readme):
        assert name in SAMPLERS, f"README uses sampler {name!r}; registered: {list(SAMPLERS)}"
    routes_source = (REPO / "server" / "routes.py").read_text()
    for header in set(re.findall(r"\bX-[A-Z][A-Za-z-]+", readme)):
        assert f'"{header}"' in routes_source, f"README mentions header {header}, routes.py never sets it"
    makefile = (REPO / "Makefile").read_text()
    for target in set(re.findall(r"`make ([a-z-]+)", readme)):
        assert re.search(rf"^{target}:", makefile, re.M), f"README mentions `make {target}`; no such target"


def test_base_image_and_relative_links(readme: str) -> None:
    base = re.search(r"ARG BASE_IMAGE=(\S+)", DOCKERFILE.read_text()).group(1)
    assert base in readme, f"README should name the Dockerfile's base image {base}"
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if "://" in target:
            continue
        assert (REPO / target).exists(), f"README links to {target}, which does not exist"
