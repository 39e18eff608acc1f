"""The web dashboard: static files served by the API itself, at /dashboard/ (and / sends you there).

The page is plain HTML, CSS and one script (api/static/dashboard/) plus the vendored uPlot charting
library (api/static/vendor/uplot/, MIT): no CDN, no build step, nothing fetched at run time. It asks
for an API key, keeps it in the browser's sessionStorage and sends it as the Bearer header of every
request to the same REST API any client uses (so tenancy is exactly the API's); the key never
appears in a URL. Nothing here needs a key: the files hold no data.

Only the files that exist under api/static when the app starts are served, by their relative name;
every path is looked up in that table, so no request can reach any other file.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from api.core.errors import ApiError

STATIC = Path(__file__).resolve().parents[1] / "static"
router = APIRouter(include_in_schema=False)

# Only this origin: the page's script, styles and the API it calls; no inline code, no frames.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",  # revalidate (ETag), so an upgraded deployment serves its new files at once
}
TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".html": "text/html; charset=utf-8", ".md": "text/plain; charset=utf-8"}


def _static_files() -> dict[str, Path]:
    return {path.relative_to(STATIC).as_posix(): path for path in sorted(STATIC.rglob("*")) if path.is_file() and not path.name.startswith(".")}


FILES = _static_files()


def _file(name: str) -> FileResponse:
    path = FILES.get(name)
    if path is None:
        raise ApiError(404, "not_found", f"no dashboard file {name[:80]!r}", None)
    media_type = TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if path.name == "LICENSE":
        media_type = TYPES[".md"]
    return FileResponse(path, media_type=media_type, headers=HEADERS)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("dashboard/", status_code=307)


@router.get("/dashboard")
def dashboard_without_slash() -> RedirectResponse:
    return RedirectResponse("dashboard/", status_code=307)


@router.get("/dashboard/")
def dashboard() -> FileResponse:
    """The single page; it routes itself with the URL fragment (#/jobs, #/jobs/<id>)."""
    return _file("dashboard/index.html")


@router.get("/dashboard/static/{name:path}")
def static_file(name: str) -> FileResponse:
    return _file(name)
