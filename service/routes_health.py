"""Probes: ``/healthz`` (the process answers) and ``/readyz`` (the store is scanned), both
without a token and outside the API's schema."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from softserve.service.auth import authorized
from softserve.service.state import State

router = APIRouter(include_in_schema=False)


class Readiness(BaseModel):
    """The answer of ``/readyz``; ``unhealthy`` and ``store`` only where details are due."""

    status: Literal["ready", "not ready"]
    label_sets: int = Field(description="Label sets served")
    unhealthy_sets: int = Field(description="Label sets skipped at scan time or withdrawn")
    unhealthy: dict[str, str] | None = Field(None, description="Their names and reasons")
    store: str | None = Field(None, description="The store folder, as configured")


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers requests."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request, state: State) -> JSONResponse:
    """Status and counts for anyone (probes carry no token); which sets are unhealthy
    and why for a token holder, or on an open server with the store's own absolute
    path written ``STORE``. The server's log has every reason in full."""
    catalog, tokens = state.catalog, state.tokens
    unhealthy = catalog.unhealthy()  # as of the last scan: no file system call here
    answer = Readiness(
        status="ready" if catalog.ready else "not ready",
        label_sets=len(catalog.names()),
        unhealthy_sets=len(unhealthy),
    )
    if tokens is None:
        answer.unhealthy = {
            name: _redact(why, state.store_paths) for name, why in unhealthy.items()
        }
    elif authorized(request.headers.get("authorization"), tokens):
        answer.unhealthy, answer.store = unhealthy, str(state.settings.store)
    return JSONResponse(answer.model_dump(exclude_none=True), 200 if catalog.ready else 503)


def _redact(reason: str, paths: list[str]) -> str:
    """``reason`` with each of ``paths`` (the store's absolute forms) written ``STORE``."""
    for path in paths:
        reason = reason.replace(path, "STORE")
    return reason
