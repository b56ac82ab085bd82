"""One log format for every line a server process writes: ours, uvicorn's (error and access) and warnings.

``configure_logging(level, fmt, process)`` puts one handler on the root logger (stderr) and makes uvicorn's
loggers hand their records to it (run uvicorn with ``log_config=None`` so that it installs none of its own).
``fmt="text"``: ``2026-01-02 03:04:05,678 INFO [server] server.app: ready: …``; ``fmt="json"``: one JSON
object per line (``time``, ``level``, ``logger``, ``process``, ``pid``, ``message``, ``exc_info``), for log
collectors. ``process`` names the process in each line ("server", or "engine" for the engine process).

uvicorn announces "Uvicorn running on …" and "Application startup complete." as soon as it listens, while
the models are still loading in the background: those two lines are reworded so that no line claims the
server is up before the app's own "ready" line (logged when /health/ready turns 200).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Literal

TEXT_FORMAT = "%(asctime)s %(levelname)s [{process}] %(name)s: %(message)s"
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback goes into ``exc_info``)."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": self.process,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


class _NoEarlyClaims(logging.Filter):
    """Reword uvicorn's start-up lines, which read as "the server is up" while the models still load."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith("Uvicorn running on"):
            record.msg = msg.replace("Uvicorn running on", "listening on", 1).replace(
                " (Press CTRL+C to quit)", "; loading the models: not ready until the \"ready\" line"
            )
        elif msg == "Application startup complete.":
            record.msg = "started; the models load in the background (/health/ready is 503 until then)"
        record.__dict__.pop("color_message", None)  # uvicorn's coloured copy of the old text
        return True


def formatter(fmt: Literal["text", "json"], process: str) -> logging.Formatter:
    """The formatter every handler of a ``process`` uses."""
    if fmt == "json":
        return JsonFormatter(process)
    return logging.Formatter(TEXT_FORMAT.format(process=process))


def configure_logging(level: str, fmt: Literal["text", "json"] = "text", process: str = "server") -> None:
    """Route every logger of this process through one stderr handler in ``fmt`` (replaces earlier setup)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt, process))
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in UVICORN_LOGGERS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True
    early = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _NoEarlyClaims) for f in early.filters):
        early.addFilter(_NoEarlyClaims())
    logging.captureWarnings(True)  # warnings.warn(...) from libraries: a log line too, not raw stderr
