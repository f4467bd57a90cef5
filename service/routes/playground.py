"""GET /playground: one self-contained review page (no build step, no CDN) over the public API."""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["playground"])

# The page loads nothing from elsewhere: its script and style are inline, and it talks only to
# this server.
CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; form-action 'none'; base-uri 'none'"
)


@cache
def _page() -> str:
    return resources.files("service").joinpath("playground.html").read_text(encoding="utf-8")


@router.get("/playground", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    """The review page: paste text or drop an .eml, pick a model, see where it was flagged."""
    return HTMLResponse(_page(), headers={"Content-Security-Policy": CSP})
