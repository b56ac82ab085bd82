"""The playground in a real headless browser: Debian's chromium driven by Playwright for Python.

A session starts the real server (`python -m server`, the Dockerfile's CMD, as tests/integration does) on
CPU with the shipped models and an API key, so every test also goes through the page's key handling. Each
test gets a fresh browser context (its own localStorage) whose key is already stored, and a log of every
request the page made: the fixture fails a test whose page asked anything of another origin.

Without chromium (`apt-get install chromium`) or playwright (the dev extra) the tests skip, except under
CI, where they fail. PLAYGROUND_SCREENSHOT_DIR=docs writes the per-model screenshots into docs/ (the
README's); by default they go to pytest's temporary directory.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import (
    REPO,
    STARTUP_TIMEOUT_S,
    WEIGHTS,
    Server,
    _wait_ready,
    container_command,
    free_port,
    missing_shipped_models,
)

# CPU fp32 (a seed gives the same bytes from the page and from the API) with small buckets: quick warm-up,
# and a 16-row forward pass that one 8-image guided job fills (the queue test relies on it).
SERVER_ENV = {
    "UNET_SERVER_DEVICE": "cpu",
    "UNET_SERVER_DTYPE": "float32",
    "UNET_SERVER_MAX_BATCH_ROWS": "16",
    "UNET_SERVER_BATCH_BUCKETS": "4,8,16",
    "UNET_SERVER_MAX_IMAGES": "8",
    "UNET_SERVER_LOG_LEVEL": "warning",
}
KEY_STORE = "unet-playground.apiKey"
GALLERY_STORE = "unet-playground.gallery"

# Records what a person would have seen change: each value the progress bar showed (MutationObserver with
# old values, so no step is lost between callbacks) and each live preview image. Test-side only.
OBSERVER = """
window.__seen = {progress: [], previews: []};
document.addEventListener("DOMContentLoaded", () => {
  new MutationObserver((records) => {
    for (const r of records) {
      if (r.target.id === "progress" && r.attributeName === "value") {
        window.__seen.progress.push([Number(r.oldValue), Number(r.target.max)]);
      }
      if (r.target.id === "preview" && r.attributeName === "src") {
        window.__seen.previews.push(r.target.getAttribute("src"));
      }
    }
  }).observe(document.body, {subtree: true, attributes: true, attributeOldValue: true,
                             attributeFilter: ["value", "src"]});
});
"""


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI installs it: see .ci/run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """The real server process on CPU with the shipped models, requiring a fresh API key."""
    missing = missing_shipped_models()
    if missing:
        pytest.fail(f"the shipped models {missing} are absent from {WEIGHTS}")
    api_key = secrets.token_urlsafe(16)
    port = free_port()
    log_path = Path(tempfile.mkdtemp(prefix="unet-server-browser-")) / "server.log"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("UNET_SERVER_") or k == "UNET_SERVER_TEXT_ENCODER_DIR"}
    env.update(SERVER_ENV, UNET_SERVER_WEIGHTS_DIR=str(WEIGHTS), UNET_SERVER_API_KEY=api_key,
               PYTHONUNBUFFERED="1")
    cmd = [*container_command(), "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    srv = Server(url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {api_key}"},
                 log_path=log_path, process=process)
    try:
        _wait_ready(srv, time.monotonic() + STARTUP_TIMEOUT_S)
        with srv.client() as c:
            srv.models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        yield srv
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# Module scope, not session: sync_playwright runs an event loop in this thread while it lives, and later
# tests call asyncio.run (which refuses to run inside a running loop).
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = _chromium()
    if executable is None:
        _unavailable("chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@dataclass
class Page:
    """A page on the playground, with what it sent and what went wrong in it."""

    page: Any
    server: Server
    requests: list[Any] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def open(self) -> None:
        self.page.goto(self.server.url + "/")
        self.page.wait_for_selector("body[data-ready=true]", timeout=30_000)

    def seen(self) -> dict[str, Any]:
        return self.page.evaluate("window.__seen")

    def job_bodies(self) -> list[dict]:
        """JSON bodies the page POSTed to /v1/jobs, in order."""
        return [r.post_data_json for r in self.requests if r.method == "POST" and r.url.endswith("/v1/jobs")]

    def outside_requests(self) -> list[str]:
        ours = self.server.url + "/"
        return [r.url for r in self.requests
                if not (r.url.startswith(ours) or r.url.startswith(("data:", "blob:")))]


def new_page(browser: Any, server: Server, with_key: bool = True) -> tuple[Any, Page]:
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    if with_key:
        key = server.headers["Authorization"].split(" ", 1)[1]
        context.add_init_script(f"localStorage.setItem({KEY_STORE!r}, {key!r});")
    context.add_init_script(OBSERVER)
    page = context.new_page()
    page.set_default_timeout(30_000)
    wrapped = Page(page=page, server=server)
    page.on("request", lambda request: wrapped.requests.append(request))
    page.on("pageerror", lambda exc: wrapped.errors.append(f"page error: {exc}"))
    return context, wrapped


@pytest.fixture()
def pg(browser: Any, server: Server) -> Iterator[Page]:
    """A fresh context (own localStorage, key stored) on the playground; checks the network log after."""
    context, wrapped = new_page(browser, server)
    wrapped.open()
    yield wrapped
    context.close()
    assert wrapped.outside_requests() == [], "the page made requests outside the server"
    assert wrapped.errors == []


@pytest.fixture(scope="session")
def screenshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("PLAYGROUND_SCREENSHOT_DIR")
    path = (REPO / where) if where else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path
