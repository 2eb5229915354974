"""The browser demo: `GET /demo` and its static files (plain JS/CSS, no build).

`ingress.py` includes `router` in its FastAPI app, so the page is served by
the same Serve ingress as the WebSocket it talks to.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parent / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}

router = APIRouter(include_in_schema=False)


@router.get("/demo")
async def demo_page() -> FileResponse:
    """The demo page; pass the API token as `/demo?token=...`."""
    return FileResponse(STATIC / "demo.html", media_type=MEDIA_TYPES[".html"])


@router.get("/demo/static/{name}")
async def demo_static(name: str) -> FileResponse:
    """One of the page's own files (a flat folder; nothing else is served)."""
    path = STATIC / name
    media = MEDIA_TYPES.get(path.suffix)
    if "/" in name or name.startswith(".") or media is None or not path.is_file():
        raise HTTPException(status_code=404)
    return FileResponse(path, media_type=media, headers={"Cache-Control": "no-cache"})
