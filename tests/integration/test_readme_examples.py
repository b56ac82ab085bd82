"""The README's curl and Python examples, run as written against the live server (URL swapped in)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from .conftest import REPO, Server, decode_png

pytestmark = pytest.mark.integration

README_URL = "http://localhost:8000"


def _block(language: str, containing: str) -> str:
    blocks = re.findall(r"```(\w*)\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    return next(body for lang, body in blocks if lang == language and containing in body)


@pytest.fixture()
def workdir(tmp_path: Path, server: Server) -> Path:
    if server.headers:
        pytest.skip("the README examples assume a server without an API key")
    edges = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(edges).rectangle((8, 4, 24, 28), outline=255)
    edges.save(tmp_path / "edges.png")
    return tmp_path


def test_curl_examples(server: Server, workdir: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    script = _block("sh", "curl").replace(README_URL, server.url)
    # The job example streams every progress event; a short job keeps this quick.
    script = script.replace('"num_inference_steps": 50', '"num_inference_steps": 4')
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=workdir, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "event: completed" in proc.stdout, proc.stdout[-2000:]
    for name, mode in [("sneaker.png", "L"), ("dress.png", "RGB")]:
        assert decode_png((workdir / name).read_bytes()).mode == mode


def test_python_example(server: Server, workdir: Path) -> None:
    code = _block("python", "OpenAI(").replace(README_URL, server.url)
    code = code.replace('"num_inference_steps": 50', '"num_inference_steps": 4')
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "event: completed", proc.stdout[-2000:]
    for name in ["bag-7.png", "bag-10.png", "trainers.png"]:
        assert decode_png((workdir / name).read_bytes()).size == (32, 32)
