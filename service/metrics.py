"""Prometheus metrics (requests, bytes, batch latency, errors) and the structured access log.

With several server processes, set ``PROMETHEUS_MULTIPROC_DIR`` (``softserve serve`` does)
so that ``/metrics`` aggregates every process.
"""

from __future__ import annotations

import json
import logging
import os
import time

from fastapi import FastAPI, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUESTS = Counter(
    "softserve_requests_total", "HTTP requests by route and status", ["route", "status"]
)
ERRORS = Counter("softserve_errors_total", "Responses with status >= 400, by route", ["route"])
BYTES = Counter("softserve_batch_bytes_total", "Batch payload bytes sent", ["kind"])
BATCH_SECONDS = Histogram(
    "softserve_batch_seconds",
    "Time to read and encode one batch",
    ["kind"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

access_log = logging.getLogger("softserve.access")


def _route(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", "unmatched")


def install(app: FastAPI) -> None:
    """Add ``/metrics`` and a middleware that counts requests and logs one JSON line each."""

    @app.middleware("http")
    async def observe(request: Request, call_next):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        response: Response = await call_next(request)
        route = _route(request)
        REQUESTS.labels(route, str(response.status_code)).inc()
        if response.status_code >= 400:
            ERRORS.labels(route).inc()
        access_log.info(
            json.dumps(
                {
                    "method": request.method,
                    "path": request.url.path,
                    "query": request.url.query,
                    "status": response.status_code,
                    "ms": round((time.perf_counter() - started) * 1000, 2),
                    "bytes": response.headers.get("content-length"),
                    "client": request.client.host if request.client else None,
                    "pid": os.getpid(),
                }
            )
        )
        return response

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
