"""``python -m server`` / ``unet-server``: serve with uvicorn. Flags mirror the UNET_SERVER_* settings.

    python -m server --host 127.0.0.1 --port 8000           # shipped models from ./weights
    python -m server --models fashion-class --device cpu --max-batch-rows 32
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from server.settings import Settings


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


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        sys.exit(f"invalid settings:\n{exc}")
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn

    from server.app import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=60,
    )


if __name__ == "__main__":
    main()
