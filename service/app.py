"""The FastAPI application: label-set metadata as JSON, batches as safetensors.

Routes are thin: validation and HTTP shape here, reading in :mod:`softserve.service.batches`.
Blocking HDF5 reads and store rescans run in the thread pool, never on the event loop;
everything else (auth, lookups, validation, JSON) is async, so a request does not pay a
trip to the thread pool for each of them.
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

import softserve
from softserve.format.payload import (
    CHECKSUM_HEADER,
    DEFAULT_INCLUDE,
    MEDIA_TYPE,
    MIX_TENSORS,
    STREAM_MEDIA_TYPE,
    TENSORS,
    LabelDtype,
    LabelEncoding,
    crc32,
)
from softserve.format.sampling import Sharding, starved_ranks
from softserve.format.schema import ErrorResponse, LabelSetDetail, LabelSetSummary
from softserve.service import metrics
from softserve.service.auth import authorized, load_tokens
from softserve.service.batches import (
    BatchRequest,
    batch_payload,
    image_payload,
    max_batch_size,
    sample_bytes,
    stream_frames,
)
from softserve.service.catalog import Catalog, LabelSet
from softserve.service.errors import ApiError, install_error_handlers
from softserve.service.limits import Limits, ReleasingResponse, ReleasingStreamingResponse
from softserve.service.settings import ServiceSettings
from softserve.service.shutdown import watch_signals
from softserve.service.ui import UI_PAGE, UI_POLICY
from softserve.service.views import view_png
from softserve.storage.open_set import detail, summary

log = logging.getLogger("softserve.service")


def _errors(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI entries of the JSON errors a route can answer."""
    return {status: {"model": ErrorResponse} for status in (401, 404, 500, *statuses)}


#: Errors of the routes on a label set; batch routes add 400 (parameters) and 409/503 all.
_SET_ERRORS = _errors(409, 503)
_BATCH_ERRORS = _errors(400, 409, 503)
_SAFETENSORS = {
    200: {
        "content": {MEDIA_TYPE: {}},
        "description": "safetensors payload",
        "headers": {
            CHECKSUM_HEADER: {
                "description": "CRC-32 of the body, 8 hex digits",
                "schema": {"type": "string"},
            }
        },
    },
    **_BATCH_ERRORS,
}


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """The server for ``settings`` (default: from ``SOFTSERVE_*`` environment variables)."""
    settings = settings or ServiceSettings()
    tokens = load_tokens(settings.token_file) if settings.token_file else None
    catalog = Catalog(
        settings.store,
        image_cache_bytes=settings.image_cache_mb << 20,
        locking=settings.hdf5_locking,
    )
    limits = Limits(settings.max_streams, settings.inflight_mb << 20, settings.retry_after_seconds)
    stopping = asyncio.Event()
    batch_bytes = settings.batch_mb << 20

    async def rescan() -> None:
        while True:
            await asyncio.sleep(settings.rescan_seconds)
            try:
                await run_in_threadpool(catalog.refresh)
            except Exception:  # keep serving what is open; the next rescan may succeed
                log.exception("rescanning the store %s failed", settings.store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(catalog.refresh)
        watch_signals(stopping)
        rescans = asyncio.create_task(rescan())
        yield
        rescans.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await rescans
        catalog.close()

    app = FastAPI(
        title="softserve",
        version=softserve.__version__,
        summary="Precomputed soft labels for dataset distillation, served as batches.",
        lifespan=lifespan,
        docs_url="/docs" if settings.docs else None,
        redoc_url=None,
    )
    install_error_handlers(app)
    metrics.install(app)

    async def require_token(request: Request) -> None:
        if tokens is not None and not authorized(request.headers.get("authorization"), tokens):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token")

    async def label_set(
        name: Annotated[str, Path(description="Label set name")],
        digest: Annotated[
            str | None,
            Query(description="The label set's digest as first seen: 409 if it has changed"),
        ] = None,
    ) -> LabelSet:
        found = catalog.get(name)
        if found is None:
            raise ApiError(
                404, "unknown_label_set", f"no label set named {name!r}; {catalog.available()}"
            )
        if found.failure is not None:
            raise ApiError(
                503, "withdrawn",
                f"label set {name!r} is withdrawn: {found.failure}",
            )  # fmt: skip
        if digest is not None and digest != found.digest:
            raise ApiError(
                409, "digest_mismatch",
                f"label set {name!r} here is version {found.digest[:12]}, not the "
                f"{digest[:12]} asked for: it was rebuilt, or this server holds another build",
            )  # fmt: skip
        return found

    async def batch_request(
        entry: Annotated[LabelSet, Depends(label_set)],
        epoch: Annotated[int, Path(ge=0, description="Epoch; wraps modulo the stored epochs")],
        batch_size: Annotated[
            int,
            Query(
                description="Samples per batch, per rank",
                json_schema_extra={"minimum": 1, "maximum": settings.max_batch_size},
            ),
        ],
        rank: Annotated[int, Query(ge=0)] = 0,
        world_size: Annotated[int, Query(ge=1)] = 1,
        drop_last: bool = True,
        include: Annotated[
            str,
            Query(
                description=f"Comma-separated tensors among {', '.join(TENSORS)}; of a set "
                f"relabelled with --mix also {', '.join(MIX_TENSORS)}"
            ),
        ] = ",".join(DEFAULT_INCLUDE),
        label_dtype: Annotated[
            LabelDtype,
            Query(description="dtype of soft and logits; float16 is exact for the fp16 codec"),
        ] = "float32",
        label_encoding: Annotated[
            LabelEncoding,
            Query(
                description="decoded: soft and logits as floats; stored: soft in the codec's "
                "stored parts (soft, soft_<part>) and logits as their norms (norm), for the "
                "client to decode and recover on its device"
            ),
        ] = "decoded",
    ) -> BatchRequest:
        if not 1 <= batch_size <= settings.max_batch_size:
            raise ApiError(
                400, "bad_batch_size", f"batch_size must be in 1..{settings.max_batch_size}"
            )
        if rank >= world_size:
            raise ApiError(400, "bad_rank", f"rank {rank} must be below world_size {world_size}")
        wanted = tuple(t for t in include.split(",") if t)
        unknown = sorted(set(wanted) - set(TENSORS) - set(MIX_TENSORS))
        if unknown or not wanted:
            raise ApiError(
                400,
                "bad_include",
                f"include takes tensors among {', '.join((*TENSORS, *MIX_TENSORS))}; "
                f"got {include!r}",
            )
        mixing = sorted(set(wanted) & set(MIX_TENSORS))
        if mixing and entry.manifest.config.mix is None:
            raise ApiError(
                400, "bad_include",
                f"{', '.join(mixing)}: label set {entry.name!r} was relabelled without --mix",
            )  # fmt: skip
        per_sample = sample_bytes(entry, wanted, label_dtype)
        if batch_size * per_sample > batch_bytes:
            raise ApiError(
                400, "batch_too_large",
                f"batch_size {batch_size} of {', '.join(wanted)} is {batch_size * per_sample:,} "
                f"bytes, over this server's {settings.batch_mb} MB per batch: at most "
                f"{max(1, batch_bytes // per_sample)} with these tensors",
            )  # fmt: skip
        n = entry.manifest.config.num_samples
        sharding = Sharding(n, batch_size, rank, world_size, drop_last)
        starved = starved_ranks(sharding)
        if starved is not None:
            raise ApiError(400, "no_batches", starved)
        return BatchRequest(entry, epoch, sharding, wanted, label_dtype, label_encoding)

    async def bounded_payload(
        size: int, read: Callable[[], bytes], headers: dict[str, str]
    ) -> Response:
        """A safetensors response read (and its CRC-32 taken) in the thread pool, its
        ``size`` bytes counted in flight until it is sent (503 busy when the process has no
        room for them)."""
        reserved = limits.try_reserve(size)
        try:
            body, crc = await run_in_threadpool(_with_crc32, read)
        except BaseException:
            await limits.release(reserved)
            raise
        return ReleasingResponse(
            body, media_type=MEDIA_TYPE, headers={**headers, CHECKSUM_HEADER: f"{crc:08x}"},
            release=lambda: limits.release(reserved),
        )  # fmt: skip

    v1 = [Depends(require_token)]

    @app.get(
        "/v1/labelsets", dependencies=v1, response_model=list[LabelSetSummary],
        responses=_errors(),
    )  # fmt: skip
    async def list_label_sets() -> list[LabelSetSummary]:
        """Complete label sets in the store."""
        return [summary(entry) for name in catalog.names() if (entry := catalog.get(name))]

    @app.get(
        "/v1/labelsets/{name}", dependencies=v1, response_model=LabelSetDetail,
        responses=_SET_ERRORS,
    )  # fmt: skip
    async def get_label_set(entry: Annotated[LabelSet, Depends(label_set)]) -> LabelSetDetail:
        """Everything a training job needs: shapes, normalization, views, refinement."""
        return detail(entry, max_batch_size(entry, batch_bytes, settings.max_batch_size))

    @app.get(
        "/v1/labelsets/{name}/images",
        dependencies=v1,
        response_class=Response,
        responses=_SAFETENSORS,
    )
    async def get_images(
        entry: Annotated[LabelSet, Depends(label_set)],
        start: Annotated[int, Query(ge=0)] = 0,
        stop: Annotated[int | None, Query(ge=0)] = None,
    ) -> Response:
        """Base images [start, stop) by sample id (``images`` uint8, ``hard`` int64): a client
        caches them once and then streams batches without images."""
        n = entry.manifest.config.num_samples
        stop = n if stop is None else stop
        if not start < stop <= n:
            raise ApiError(400, "bad_range", f"need 0 <= start < stop <= {n}")
        per_image = sample_bytes(entry, ("images", "hard"))
        if (stop - start) * per_image > batch_bytes:
            raise ApiError(
                400, "range_too_large",
                f"{stop - start} images are over this server's {settings.batch_mb} MB per "
                f"response: at most {max(1, batch_bytes // per_image)} a request",
            )  # fmt: skip
        return await bounded_payload(
            (stop - start) * per_image, partial(image_payload, entry, start, stop),
            {"X-Softserve-Digest": entry.digest},
        )  # fmt: skip

    @app.get(
        "/v1/labelsets/{name}/epochs/{epoch}/batches/{index}",
        dependencies=v1,
        response_class=Response,
        responses=_SAFETENSORS,
    )
    async def get_batch(
        request: Annotated[BatchRequest, Depends(batch_request)],
        index: Annotated[int, Path(ge=0)],
    ) -> Response:
        """One batch as a safetensors payload (tensor names and shapes: see the README)."""
        if index >= len(request.sharding):
            raise ApiError(
                404, "bad_batch_index", f"batch {index} is past the last batch "
                f"{len(request.sharding) - 1} of this epoch at this batch size and world size"
            )  # fmt: skip
        with metrics.BATCH_SECONDS.labels("batch").time():
            return await bounded_payload(
                request.batch_bytes, partial(batch_payload, request, index),
                _batch_headers(request),
            )  # fmt: skip

    @app.get(
        "/v1/labelsets/{name}/epochs/{epoch}/stream",
        dependencies=v1,
        response_class=StreamingResponse,
        responses={
            200: {"content": {STREAM_MEDIA_TYPE: {}}, "description": "framed batches"},
            **_BATCH_ERRORS,
        },
    )
    async def stream_batches(
        request: Annotated[BatchRequest, Depends(batch_request)],
        start: Annotated[int, Query(ge=0, description="First batch index (to resume)")] = 0,
        epochs: Annotated[
            int, Query(ge=1, le=1_000_000, description="Epochs to stream, from this one on")
        ] = 1,
    ) -> StreamingResponse:
        """Batches ``start``.. of an epoch (and of the following ``epochs - 1`` epochs) as
        length-prefixed safetensors frames, then an end frame (or a going-away frame when
        the server shuts down: resume at the next batch). Beyond the server's open-stream
        limit: 503 busy, with Retry-After."""
        if start > len(request.sharding):
            raise ApiError(404, "bad_batch_index", f"start {start} is past the epoch's batches")
        if stopping.is_set():
            raise ApiError(503, "shutting_down", "server is shutting down; retry elsewhere",
                           headers={"Retry-After": str(settings.retry_after_seconds)})  # fmt: skip
        limits.open_stream()
        frames = stream_frames(
            request, start, epochs, group_bytes=settings.stream_read_mb << 20, limits=limits,
            stopping=stopping,
        )  # fmt: skip
        return ReleasingStreamingResponse(
            frames, media_type=STREAM_MEDIA_TYPE, headers=_batch_headers(request),
            release=limits.close_stream,
        )  # fmt: skip

    @app.get(
        "/v1/labelsets/{name}/views/{epoch}/{sample}.png",
        dependencies=v1,
        response_class=Response,
        responses={
            200: {"content": {"image/png": {}}, "description": "the view"},
            **_errors(409, 501, 503),
        },
    )
    async def get_view(
        entry: Annotated[LabelSet, Depends(label_set)],
        epoch: Annotated[int, Path(ge=0, description="Epoch; wraps modulo the stored epochs")],
        sample: Annotated[int, Path(ge=0, description="Sample id")],
    ) -> Response:
        """The view a sample was seen through in an epoch, as the teacher saw it (crop, resize
        and flip by the stored parameters, and a mixed set's stored CutMix/Mixup with its
        partner's view; before normalization), as a PNG."""
        body = await run_in_threadpool(view_png, entry, epoch, sample)
        return Response(body, media_type="image/png", headers={"X-Softserve-Digest": entry.digest})

    @app.get("/ui", include_in_schema=False, response_class=HTMLResponse)
    async def ui() -> HTMLResponse:
        return HTMLResponse(UI_PAGE, headers={"Content-Security-Policy": UI_POLICY})

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    store_paths = sorted({str(settings.store.absolute()), str(settings.store.resolve())},
                         key=len, reverse=True)  # fmt: skip

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        """Status and counts for anyone (probes carry no token); which sets are unhealthy
        and why for a token holder, or on an open server with the store's own absolute
        path written ``STORE``. The server's log has every reason in full."""
        unhealthy = catalog.unhealthy()  # as of the last scan: no file system call here
        answer = Readiness(
            status="ready" if catalog.ready else "not ready",
            label_sets=len(catalog.names()),
            unhealthy_sets=len(unhealthy),
        )
        if tokens is None:
            answer.unhealthy = {name: _redact(why, store_paths) for name, why in unhealthy.items()}
        elif authorized(request.headers.get("authorization"), tokens):
            answer.unhealthy, answer.store = unhealthy, str(settings.store)
        return JSONResponse(answer.model_dump(exclude_none=True), 200 if catalog.ready else 503)

    return app


class Readiness(BaseModel):
    """The answer of ``/readyz``; ``unhealthy`` and ``store`` only where details are due."""

    status: Literal["ready", "not ready"]
    label_sets: int = Field(description="Label sets served")
    unhealthy_sets: int = Field(description="Label sets skipped at scan time or withdrawn")
    unhealthy: dict[str, str] | None = Field(None, description="Their names and reasons")
    store: str | None = Field(None, description="The store folder, as configured")


def _with_crc32(read: Callable[[], bytes]) -> tuple[bytes, int]:
    """What ``read`` returns, and its CRC-32."""
    body = read()
    return body, crc32([body])


def _redact(reason: str, paths: list[str]) -> str:
    """``reason`` with each of ``paths`` (the store's absolute forms) written ``STORE``."""
    for path in paths:
        reason = reason.replace(path, "STORE")
    return reason


def _batch_headers(request: BatchRequest) -> dict[str, str]:
    return {
        "X-Softserve-Digest": request.entry.digest,
        "X-Softserve-Batches": str(len(request.sharding)),
        "X-Softserve-Stored-Epoch": str(request.stored_epoch),
    }
