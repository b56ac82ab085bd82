"""The README's curl and Python examples, run as written from a fresh clone against the live server (URL
swapped in, a job's steps shortened): every file they read must be in the repository."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import REPO, SHIPPED_MODELS, Server, decode_png

pytestmark = pytest.mark.integration

README_URL = "http://localhost:8000"


def _blocks(language: str, containing: str) -> list[str]:
    blocks = re.findall(r"```(\w*)\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    return [body for lang, body in blocks if lang == language and containing in body]


def _shipped_examples(language: str) -> list[str]:
    """The blocks that call the server with the shipped models only (the Stable Diffusion example needs a
    model folder the repository does not ship)."""
    out = []
    for body in _blocks(language, README_URL):
        models = set(re.findall(r'"model": "([^"]+)"|\bmodel=([\w-]+)', body))
        if {a or b for a, b in models} <= set(SHIPPED_MODELS):
            out.append(body)
    return out


def _block(language: str, containing: str) -> str:
    [body] = _blocks(language, containing)
    return body


def _fresh_clone(dest: Path) -> Path:
    """The files git tracks, copied to ``dest``: what a fresh clone has (nothing generated, nothing local)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    files = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True
    ).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture()
def workdir(tmp_path: Path, server: Server) -> Path:
    if server.headers:
        pytest.skip("the README examples assume a server without an API key")
    return _fresh_clone(tmp_path)


def test_shipped_edge_map_is_a_white_on_black_32px_map() -> None:
    edges = Image.open(REPO / "docs" / "examples" / "edges.png")
    assert edges.size == (32, 32) and edges.mode == "L"
    a = np.asarray(edges)
    assert set(np.unique(a)) == {0, 255} and 30 < (a == 255).sum() < 300  # thin white edges on black
    assert "docs/examples/edges.png" in _block("sh", "control_image=@")


def test_curl_examples(server: Server, workdir: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    script = "\n".join(_shipped_examples("sh")).replace(README_URL, server.url)
    # The job example streams every progress event; a short job keeps this quick.
    script = script.replace('"num_inference_steps": 50', '"num_inference_steps": 4')
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=workdir, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "event: completed" in proc.stdout, proc.stdout[-2000:]
    for name, mode in [("sneaker.png", "L"), ("dress.png", "RGB")]:
        assert decode_png((workdir / name).read_bytes()).mode == mode


def _run_python(code: str, server: Server, workdir: Path) -> subprocess.CompletedProcess:
    code = code.replace(README_URL, server.url)
    code = code.replace('"num_inference_steps": 50', '"num_inference_steps": 4')
    # The example's own imports only (httpx, openai): the repository is not on the path.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_python_example(server: Server, workdir: Path) -> None:
    first, *others = _shipped_examples("python")
    proc = _run_python(first, server, workdir)
    assert proc.stdout.strip().splitlines()[-1] == "event: completed", proc.stdout[-2000:]
    for name in ["bag-7.png", "bag-10.png", "trainers.png"]:
        assert decode_png((workdir / name).read_bytes()).size == (32, 32)
    # The later blocks (the openai client's image edits) start from the coat the curl examples draw.
    import httpx

    r = httpx.post(
        server.url + "/generate",
        json={"model": "fashion-text", "prompt": "a dark blue coat", "seed": 7},
        headers={"Accept": "image/png", **server.headers},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    (workdir / "coat.png").write_bytes(r.content)
    assert others, "the README's image-edits example is missing"
    for code in others:
        _run_python(code, server, workdir)
    assert decode_png((workdir / "hem-openai.png").read_bytes()).size == (32, 32)
