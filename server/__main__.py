"""``python -m server`` / ``unet-server``: serve with uvicorn. Flags mirror the UNET_SERVER_* settings.

    python -m server --host 127.0.0.1 --port 8000           # shipped models from ./weights
    python -m server --models fashion-class --device cpu --max-batch-rows 32
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from server.logconfig import configure_logging
from server.settings import Settings

log = logging.getLogger("server")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unet-server",
        description="Diffusion U-Net sampling server. Every flag has an environment variable "
        "UNET_SERVER_<NAME>; a flag wins over its variable.",
    )
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = info.default_factory() if info.default_factory else info.default  # type: ignore[call-arg]
        shown = default.get_secret_value() if hasattr(default, "get_secret_value") else default
        if isinstance(shown, list):
            shown = ",".join(str(v) for v in shown) or "(all)"
        help_text = f"env UNET_SERVER_{name.upper()} (default: {shown if name != 'api_key' else 'none'})"
        parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)
    return parser


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (a name other than localhost counts as not)."""
    if host.strip("[]").lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(settings: Settings) -> None:
    """A loud warning when the server listens beyond loopback without an API key."""
    if settings.api_key is not None or is_loopback(settings.host):
        return
    bar = "!" * 100
    log.warning(
        "%s\nlistening on %s:%d WITHOUT an API key: anyone who can reach this address can generate images, "
        "read and cancel jobs. Set UNET_SERVER_API_KEY (clients then send 'Authorization: Bearer <key>') or "
        "bind 127.0.0.1 (UNET_SERVER_HOST / --host).\n%s",
        bar, settings.host, settings.port, bar,
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        sys.exit(f"invalid settings:\n{exc}")
    configure_logging(settings.log_level, settings.log_format)
    warn_if_exposed(settings)
    import uvicorn

    from server.app import create_app

    uvicorn.run(
        create_app(settings, freeze_heap=True),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's loggers propagate to configure_logging's one handler (one format)
        timeout_graceful_shutdown=60,
    )


if __name__ == "__main__":
    main()
