"""The ``/ui`` page: a browser over a server's label sets, with no build step.

One static HTML file with inline CSS and JavaScript (no third-party scripts, no CDN). It
reads everything through the public API (label-set JSON, batches as safetensors, a view as
PNG) with the bearer token the user enters, so it can see exactly what a client can.
"""

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

#: The page as served; it is the same for every request and every server.
UI_PAGE = (Path(__file__).parent / "ui.html").read_text(encoding="utf-8")
#: What the page may load: its own inline script and style, this server's API, and the view
#: images it fetched itself (blob URLs); nothing from anywhere else.
UI_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' blob:; base-uri 'none'; form-action 'none'"
)

router = APIRouter(include_in_schema=False)


@router.get("/ui", response_class=HTMLResponse)
async def ui() -> HTMLResponse:
    """The page, under its policy; it needs no token (the API calls it makes do)."""
    return HTMLResponse(UI_PAGE, headers={"Content-Security-Policy": UI_POLICY})
