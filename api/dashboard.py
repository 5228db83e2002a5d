"""The operator's live page: `GET /dashboard` (and `/` redirecting to it), static files under `/dashboard/static/`.

The page is static HTML, CSS and JavaScript; its script reads the JSON API (`/v1/models`, `/v1/batches`) with
the key the operator enters, so the page itself holds no data and needs no authentication, like
`/openapi.json`. Everything it shows passes the `/v1` checks (keys, or loopback only when keyless).
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, redirect, send_from_directory

STATIC = Path(__file__).resolve().parent / "static"

bp = Blueprint("dashboard", __name__, static_folder=str(STATIC), static_url_path="/dashboard/static")

# The page loads only its own files and talks only to its own origin: no inline script or style (the script
# renders API data with textContent, and this stops any injected markup from running), no frames (clickjacking).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Following a link off the page (OpenAPI) tells the other side nothing about where it came from.
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Small files that change with each release: the browser revalidates (ETag) rather than running stale code.
    "Cache-Control": "no-cache",
}


@bp.get("/")
def root() -> Response:
    """The API's root is the dashboard."""
    return redirect("/dashboard", code=302)


@bp.get("/dashboard")
def page() -> Response:
    """The dashboard page (HTML; its script fetches the data)."""
    return send_from_directory(STATIC, "dashboard.html", mimetype="text/html")


@bp.after_request
def secure(response: Response) -> Response:
    """Every response of this blueprint (page, static files, redirect) carries the page's security headers."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response
