"""Readers shared by the static deploy tests: the Dockerfile, compose files, tools from the venv or PATH."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_CPU = REPO / "docker-compose.cpu.yml"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus.yml"
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "unet-server.json"


def find_tool(name: str, hint: str) -> str:
    """A tool from the venv (beside sys.executable) or PATH; a failing test says how to get it."""
    venv_tool = Path(sys.executable).parent / name
    if venv_tool.exists():
        return str(venv_tool)
    found = shutil.which(name)
    if found is None:
        raise AssertionError(f"`{name}` not found in the venv or on PATH: {hint}")
    return found


def promtool() -> str:
    return os.environ.get("PROMTOOL") or find_tool(
        "promtool", "install Debian's `prometheus` package (apt-get install prometheus); .ci/run does"
    )


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case, e.g. "RUN"
    args: str  # the rest of the logical line, continuations joined
    line: int  # 1-based line of the instruction's first physical line

    def exec_form(self) -> list[str] | None:
        """The JSON (exec) form of CMD/ENTRYPOINT/HEALTHCHECK CMD, or None for the shell form."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            words = text.split()
            while words and words[0].startswith("--"):
                words.pop(0)
            if not words or words[0] != "CMD":
                return None
            text = text[text.index("CMD") + 3 :]
        text = text.strip()
        return json.loads(text) if text.startswith("[") else None

    def flags(self) -> dict[str, str]:
        """Leading --name=value options (HEALTHCHECK, COPY --chown=...)."""
        out = {}
        for word in shlex.split(self.args):
            if not word.startswith("--"):
                break
            name, _, value = word[2:].partition("=")
            out[name] = value
        return out


def dockerfile_instructions(path: Path = DOCKERFILE) -> list[Instruction]:
    """Logical instructions of a Dockerfile: comments dropped, backslash continuations joined."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.rstrip()
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # comment lines inside a continued instruction are ignored by Docker
        if not buf:
            start = number
        if line.endswith("\\"):
            buf.append(line[:-1])
            continue
        buf.append(line)
        text = " ".join(part.strip() for part in buf)
        buf = []
        keyword, _, args = text.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    assert not buf, "Dockerfile ends inside a continued line"
    return out


class _ComposeLoader(yaml.SafeLoader):
    """YAML loader that keeps Compose's merge tags (`!reset`, `!override`) as plain values."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> object:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_ComposeLoader.add_constructor("!reset", _tagged)
_ComposeLoader.add_constructor("!override", _tagged)


def load_compose(path: Path) -> dict:
    with path.open() as f:
        return yaml.load(f, Loader=_ComposeLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: Path) -> dict:
    with path.open() as f:
        return yaml.safe_load(f)
