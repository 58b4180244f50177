"""Prometheus metrics (requests, bytes, batch latency, errors) and the structured access log
(JSON lines: :mod:`softserve.service.logs`).

Both come from one pure ASGI middleware that watches ``send``: it costs nothing per chunk
of a streamed response (Starlette's ``BaseHTTPMiddleware`` copies every chunk through an
extra task) and counts the bytes of streams too. With several server processes, set
``PROMETHEUS_MULTIPROC_DIR`` (``softserve serve`` does) so ``/metrics`` sums them all.
"""

from __future__ import annotations

import logging
import os
import time

from fastapi import FastAPI, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter(
    "softserve_requests_total", "HTTP requests by route and status", ["route", "status"]
)
ERRORS = Counter("softserve_errors_total", "Responses with status >= 400, by route", ["route"])
BYTES = Counter("softserve_response_bytes_total", "Response body bytes sent, by route", ["route"])
BATCH_SECONDS = Histogram(
    "softserve_batch_seconds",
    "Time to read and encode a batch (batches of a stream read together share it evenly)",
    ["kind"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

access_log = logging.getLogger("softserve.access")


def observe_batches(kind: str, seconds: float, count: int) -> None:
    """Record ``count`` batches read and encoded together in ``seconds``."""
    histogram = BATCH_SECONDS.labels(kind)
    for _ in range(count):
        histogram.observe(seconds / count)


class ObserveMiddleware:
    """Count every request and log it as one JSON line once its response is complete."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status, sent = 500, 0

        async def observed(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            REQUESTS.labels(route, str(status)).inc()
            BYTES.labels(route).inc(sent)
            if status >= 400:
                ERRORS.labels(route).inc()
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client")
                access_log.info(  # a dict: the access log's formatter writes it as JSON
                    {
                        "method": scope["method"],
                        "path": scope["path"],
                        "query": scope.get("query_string", b"").decode("latin-1"),
                        "status": status,
                        "ms": round((time.perf_counter() - started) * 1000, 2),
                        "bytes": sent,
                        "client": client[0] if client else None,
                        "pid": os.getpid(),
                    }
                )


def install(app: FastAPI) -> None:
    """Add the observing middleware and ``/metrics``."""
    app.add_middleware(ObserveMiddleware)

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
