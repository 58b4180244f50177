"""Every error as JSON: ``{"error": {"code": ..., "message": ...}}`` with a fitting status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from softserve.errors import SoftserveError
from softserve.format.schema import ErrorResponse

log = logging.getLogger("softserve.service")


class ApiError(SoftserveError):
    """An error the API reports to the client as is."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def openapi_errors(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI entries of the JSON errors a route can answer: 401, 404 and 500, and
    ``statuses``."""
    return {status: {"model": ErrorResponse} for status in (401, 404, 500, *statuses)}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer", **(headers or {})}
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def _describe_validation(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("query", "path"))
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Map API errors, validation errors, HTTP errors, store errors and bugs to the JSON
    shape."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_request", _describe_validation(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """Starlette's own errors (404, 405, ...), with their headers: a 405's ``Allow``."""
        code = "not_found" if exc.status_code == 404 else f"http_{exc.status_code}"
        return error_response(exc.status_code, code, str(exc.detail), exc.headers)

    @app.exception_handler(SoftserveError)
    async def store_error(request: Request, exc: SoftserveError) -> JSONResponse:
        log.error("store error on %s: %s", request.url.path, exc)
        return error_response(500, "store_error", str(exc))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        """A bug: the client gets the JSON shape, the log the traceback (Starlette's
        server-error middleware logs it once this returns)."""
        return error_response(
            500, "internal_error",
            f"internal error ({type(exc).__name__}); the server's log has the traceback",
        )  # fmt: skip
