"""The web playground: GET / and /playground serve one static page; its assets live in server/static/.

The page talks only to this server's API (same origin), so it needs no API key to load; the API routes it
calls check the key as usual. Assets are served from a fixed table built from the package directory at
import time: a request names a file of that table or gets 404, so no path can leave server/static/.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

STATIC_DIR = Path(__file__).resolve().parent / "static"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# The page loads nothing from elsewhere; the policy makes the browser refuse if a change ever tried.
# data:/blob: images are results, previews and dropped files the page shows.
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; style-src 'self'; "
    "script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'"
)
_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def _assets() -> dict[str, Path]:
    """File name -> path of every servable file directly in server/static/."""
    if not STATIC_DIR.is_dir():
        return {}
    return {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and p.suffix in CONTENT_TYPES}


ASSETS = _assets()
router = APIRouter(include_in_schema=False)


def _serve(name: str) -> Response:
    path = ASSETS.get(name)
    if path is None:
        raise HTTPException(404, f"no playground asset {name!r}")
    return Response(path.read_bytes(), media_type=CONTENT_TYPES[path.suffix], headers=_HEADERS)


@router.api_route("/", methods=["GET", "HEAD"])
@router.api_route("/playground", methods=["GET", "HEAD"])
async def page() -> Response:
    """The playground page."""
    return _serve("index.html")


@router.api_route("/playground/static/{name}", methods=["GET", "HEAD"])
async def asset(name: str) -> Response:
    """A script, style sheet or image of the page."""
    return _serve(name)
