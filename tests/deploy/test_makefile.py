"""`make serve` installs what serving needs (runtime + text), binds loopback, and can take the CPU torch
wheel; the README names the prerequisites and the interpreter its examples run with."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ._files import DOCKERFILE, REPO

MAKEFILE = Path(os.environ.get("TEST_MAKEFILE", REPO / "Makefile"))
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def dry_run(target: str, tmp_path: Path, *assignments: str) -> str:
    """The commands `make target` would run for a venv that does not exist yet (nothing is run)."""
    out = subprocess.run(
        ["make", "-n", "-C", str(REPO), "-f", str(MAKEFILE), target, f"VENV={tmp_path / 'venv'}",
         *assignments],
        capture_output=True, text=True, check=True, timeout=60,
    )
    return out.stdout


def _extras(commands: str) -> set[str]:
    return set(re.findall(r'pip install -q -e "\.\[([\w,]+)\]"', commands))


def _stamp(commands: str) -> str:
    return re.findall(r"^touch (\S+)$", commands, re.M)[-1]


def test_serve_installs_runtime_and_text_only(tmp_path: Path) -> None:
    serve, test = dry_run("serve", tmp_path), dry_run("test", tmp_path)
    assert _extras(serve) == {"text"}, serve
    assert _extras(test) == {"text,dev"}, test
    assert _stamp(serve) != _stamp(test)  # serving after testing (or before) installs only its own set


def test_serve_binds_loopback_unless_told(tmp_path: Path) -> None:
    assert re.search(r"-m server --host 127\.0\.0\.1 --port 8000$", dry_run("serve", tmp_path), re.M)
    assert "--host 0.0.0.0" in dry_run("serve", tmp_path, "HOST=0.0.0.0")
    assert re.search(r"^ENV .*\n?.*UNET_SERVER_HOST=0\.0\.0\.0", DOCKERFILE.read_text(), re.M)  # container


def test_cpu_torch_wheel_from_its_index(tmp_path: Path) -> None:
    default = dry_run("serve", tmp_path)
    assert "--index-url" not in default
    cpu = dry_run("serve", tmp_path, f"TORCH_INDEX={CPU_INDEX}")
    assert re.search(rf'pip install -q "torch[^"]*" --index-url {re.escape(CPU_INDEX)}', cpu), cpu


def test_readme_names_prerequisites_interpreter_and_cpu_wheel() -> None:
    readme = (REPO / "README.md").read_text()
    assert "python3-venv" in readme
    assert re.search(r"prerequisites?:? .*`make`", readme, re.I)
    assert f"TORCH_INDEX={CPU_INDEX}" in readme
    python_section = readme.split("### Python", 1)[1].split("```python", 1)[0]
    assert ".venv/bin/python" in python_section, python_section
    assert "make serve HOST=0.0.0.0" in readme
