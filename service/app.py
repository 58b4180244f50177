"""The FastAPI application: label-set metadata as JSON, batches as safetensors.

:func:`create_app` only wires: the state shared by requests (:mod:`softserve.service.state`),
the lifespan (store scans), the middleware, the error handlers and the routers. Routes are
thin and live in ``routes_*`` modules, their validation in :mod:`softserve.service.requests`,
reading in :mod:`softserve.service.batches`. Blocking HDF5 reads and store rescans run in
the thread pool, never on the event loop; everything else (auth, lookups, validation, JSON)
is async, so a request does not pay a trip to the thread pool for each of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

import softserve
from softserve.service import (
    metrics,
    routes_files,
    routes_health,
    routes_labelsets,
    routes_previews,
    ui,
)
from softserve.service.errors import install_error_handlers
from softserve.service.requests import document_batch_size
from softserve.service.settings import ServiceSettings
from softserve.service.shutdown import watch_signals
from softserve.service.state import ServiceState

log = logging.getLogger("softserve.service")


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """The server for ``settings`` (default: from ``SOFTSERVE_*`` environment variables)."""
    settings = settings or ServiceSettings()
    app = FastAPI(
        title="softserve",
        version=softserve.__version__,
        summary="Precomputed soft labels for dataset distillation, served as batches.",
        lifespan=_lifespan,
        docs_url="/docs" if settings.docs else None,
        redoc_url=None,
    )
    app.state.service = ServiceState.from_settings(settings)
    app.openapi = partial(_openapi, app)  # type: ignore[method-assign]
    install_error_handlers(app)
    metrics.install(app)
    for module in (routes_labelsets, routes_files, routes_previews, ui, routes_health):
        app.include_router(module.router)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Scan the store before the first request, rescan it in the background while serving,
    and watch for the signals that end open streams; close the label sets at the end."""
    state: ServiceState = app.state.service
    await run_in_threadpool(state.catalog.refresh)
    watch_signals(state.stopping)
    rescans = asyncio.create_task(_rescan(state))
    yield
    rescans.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await rescans
    state.catalog.close()


async def _rescan(state: ServiceState) -> None:
    """Rescan the store every ``rescan_seconds``, in the thread pool, until cancelled."""
    while True:
        await asyncio.sleep(state.settings.rescan_seconds)
        try:
            await run_in_threadpool(state.catalog.refresh)
        except Exception:  # keep serving what is open; the next rescan may succeed
            log.exception("rescanning the store %s failed", state.settings.store)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The application's OpenAPI schema, built once, with this server's ``batch_size``
    bound in it."""
    schema = app.openapi_schema
    if schema is None:
        schema = FastAPI.openapi(app)
        document_batch_size(schema, app.state.service.settings.max_batch_size)
    return schema
