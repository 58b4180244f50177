"""The label-set routes: the list, one set's detail, its base images, a batch, a stream.

Each takes what :mod:`softserve.service.requests` validated, reads in the thread pool
through :mod:`softserve.service.batches`, and counts the bytes it holds in the process's
:class:`~softserve.service.limits.Limits` until they are sent.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from softserve.format.payload import CHECKSUM_HEADER, MEDIA_TYPE, STREAM_MEDIA_TYPE, crc32
from softserve.format.schema import LabelSetDetail, LabelSetSummary
from softserve.service import metrics
from softserve.service.batches import (
    BatchRequest,
    batch_payload,
    image_payload,
    max_batch_size,
    stream_frames,
)
from softserve.service.errors import ApiError, openapi_errors
from softserve.service.limits import Limits, ReleasingResponse, ReleasingStreamingResponse
from softserve.service.requests import (
    Entry,
    ImageRequest,
    batch_request,
    check_batch_index,
    check_stream_start,
    image_request,
    require_token,
)
from softserve.service.state import State
from softserve.storage.open_set import detail, summary

#: Errors of the routes on a label set; batch routes add 400 (parameters) and 409/503 all.
_SET_ERRORS = openapi_errors(409, 503)
_BATCH_ERRORS = openapi_errors(400, 409, 503)
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

Batches = Annotated[BatchRequest, Depends(batch_request)]

router = APIRouter(dependencies=[Depends(require_token)])


@router.get("/v1/labelsets", response_model=list[LabelSetSummary], responses=openapi_errors())
async def list_label_sets(state: State) -> list[LabelSetSummary]:
    """Complete label sets in the store."""
    catalog = state.catalog
    return [summary(entry) for name in catalog.names() if (entry := catalog.get(name))]


@router.get("/v1/labelsets/{name}", response_model=LabelSetDetail, responses=_SET_ERRORS)
async def get_label_set(state: State, entry: Entry) -> LabelSetDetail:
    """Everything a training job needs: shapes, normalization, views, refinement."""
    return detail(entry, max_batch_size(entry, state.batch_bytes, state.settings.max_batch_size))


@router.get("/v1/labelsets/{name}/images", response_class=Response, responses=_SAFETENSORS)
async def get_images(
    state: State, request: Annotated[ImageRequest, Depends(image_request)]
) -> Response:
    """Base images [start, stop) by sample id (``images`` uint8, ``hard`` int64): a client
    caches them once and then streams batches without images."""
    return await bounded_payload(
        state.limits, request.nbytes,
        partial(image_payload, request.entry, request.start, request.stop),
        {"X-Softserve-Digest": request.entry.digest},
    )  # fmt: skip


@router.get(
    "/v1/labelsets/{name}/epochs/{epoch}/batches/{index}",
    response_class=Response,
    responses=_SAFETENSORS,
)
async def get_batch(state: State, request: Batches, index: Annotated[int, Path(ge=0)]) -> Response:
    """One batch as a safetensors payload (tensor names and shapes: see the README)."""
    check_batch_index(request, index)
    with metrics.BATCH_SECONDS.labels("batch").time():
        return await bounded_payload(
            state.limits, request.batch_bytes, partial(batch_payload, request, index),
            _batch_headers(request),
        )  # fmt: skip


@router.get(
    "/v1/labelsets/{name}/epochs/{epoch}/stream",
    response_class=StreamingResponse,
    responses={
        200: {"content": {STREAM_MEDIA_TYPE: {}}, "description": "framed batches"},
        **_BATCH_ERRORS,
    },
)
async def stream_batches(
    state: State,
    request: Batches,
    start: Annotated[int, Query(ge=0, description="First batch index (to resume)")] = 0,
    epochs: Annotated[
        int, Query(ge=1, le=1_000_000, description="Epochs to stream, from this one on")
    ] = 1,
) -> StreamingResponse:
    """Batches ``start``.. of an epoch (and of the following ``epochs - 1`` epochs) as
    length-prefixed safetensors frames, then an end frame (or a going-away frame when
    the server shuts down: resume at the next batch). Beyond the server's open-stream
    limit: 503 busy, with Retry-After."""
    check_stream_start(request, start)
    settings, limits = state.settings, state.limits
    if state.stopping.is_set():
        raise ApiError(503, "shutting_down", "server is shutting down; retry elsewhere",
                       headers={"Retry-After": str(settings.retry_after_seconds)})  # fmt: skip
    limits.open_stream()
    frames = stream_frames(
        request, start, epochs, group_bytes=settings.stream_read_mb << 20, limits=limits,
        stopping=state.stopping,
    )  # fmt: skip
    return ReleasingStreamingResponse(
        frames, media_type=STREAM_MEDIA_TYPE, headers=_batch_headers(request),
        release=limits.close_stream,
    )  # fmt: skip


async def bounded_payload(
    limits: Limits, size: int, read: Callable[[], bytes], headers: dict[str, str]
) -> Response:
    """A safetensors response read (and its CRC-32 taken) in the thread pool, its ``size``
    bytes counted in flight in ``limits`` until it is sent (503 busy when the process has
    no room for them)."""
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


def _with_crc32(read: Callable[[], bytes]) -> tuple[bytes, int]:
    """What ``read`` returns, and its CRC-32."""
    body = read()
    return body, crc32([body])


def _batch_headers(request: BatchRequest) -> dict[str, str]:
    """The headers of a batch or a stream: the set's version and the epoch's batches."""
    return {
        "X-Softserve-Digest": request.entry.digest,
        "X-Softserve-Batches": str(len(request.sharding)),
        "X-Softserve-Stored-Epoch": str(request.stored_epoch),
    }
