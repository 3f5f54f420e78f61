"""The session web page at `/`: static HTML, CSS and JavaScript shipped in `deployments/static/` (package
data), served by the ingress's FastAPI app. No build step and no external requests: the page calls the
API it is served with (`v1/preview`, `v1/refine` as server-sent events, see `static/app.js`)."""

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).with_name("static")


def add_web_page(app: FastAPI) -> None:
    """`GET /` answers the page, `/static/...` its files."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")
