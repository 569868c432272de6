"""The browser playground: `GET /` and `/playground` serve one page (plain HTML, CSS and JavaScript modules in
`server/static/`, no build step) and `/v1/tasks/{name}/training-curve.png` draws a task's stored training log.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from hub.plots import training_curve_png
from hub.store.protocol import Store
from server.responses import error_responses

STATIC = Path(__file__).with_name("static")


def training_curve_url(name: str) -> str:
    return f"/v1/tasks/{name}/training-curve.png"


def add_playground(app: FastAPI, store: Store) -> None:
    """Mount the page, its static files and the training-curve route on `app`."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    page = STATIC / "index.html"

    @app.get("/", include_in_schema=False)
    @app.get("/playground", include_in_schema=False)
    async def playground():
        return FileResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get(training_curve_url("{name}"), response_class=Response,
             responses={200: {"content": {"image/png": {}}, "description": "the training curve"},
                        **error_responses(404, 422, 503)})
    async def training_curve(name: str):
        stored, log = await app.state.hub.store_call(store.training_log, name)  # off the event loop, bounded
        png = await run_in_threadpool(training_curve_png, log, f"{stored.ref}: training curve")
        return Response(png, media_type="image/png")
