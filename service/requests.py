"""Request validation: the bearer token, the label set a path names, and the parameters of
a batch, image or stream request, each checked before a route reads anything.

All of it is async (no trip to the thread pool). A bad parameter is a 400 with its own
error code and a message that says what would be accepted; a parameter of the wrong type
is FastAPI's 422. Whether a sharding leaves some rank no batch is decided by
:func:`softserve.format.sampling.starved_ranks`, the rule the client applies too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request

from softserve.format.payload import (
    DEFAULT_INCLUDE,
    MIX_TENSORS,
    TENSORS,
    LabelDtype,
    LabelEncoding,
)
from softserve.format.sampling import Sharding, starved_ranks
from softserve.service.auth import authorized
from softserve.service.batches import BatchRequest, sample_bytes
from softserve.service.catalog import CatalogEntry
from softserve.service.errors import ApiError
from softserve.service.settings import ServiceSettings
from softserve.service.state import State

#: The bound of ``batch_size`` as declared; :func:`document_batch_size` writes each
#: server's own ``max_batch_size`` over it in that server's schema.
_DEFAULT_MAX_BATCH_SIZE: int = ServiceSettings.model_fields["max_batch_size"].default


async def require_token(request: Request, state: State) -> None:
    """401 unless the server is open or the request carries one of its bearer tokens."""
    tokens = state.tokens
    if tokens is not None and not authorized(request.headers.get("authorization"), tokens):
        raise ApiError(401, "unauthorized", "missing or wrong bearer token")


async def label_set(
    state: State,
    name: Annotated[str, Path(description="Label set name")],
    digest: Annotated[
        str | None,
        Query(description="The label set's digest as first seen: 409 if it has changed"),
    ] = None,
) -> CatalogEntry:
    """The served label set ``name``: 404 if there is none, 503 if it is withdrawn, 409 if
    it is not the version ``digest`` asks for."""
    catalog = state.catalog
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


Entry = Annotated[CatalogEntry, Depends(label_set)]


async def batch_request(
    state: State,
    entry: Entry,
    epoch: Annotated[int, Path(ge=0, description="Epoch; wraps modulo the stored epochs")],
    batch_size: Annotated[
        int,
        Query(
            description="Samples per batch, per rank",
            json_schema_extra={"minimum": 1, "maximum": _DEFAULT_MAX_BATCH_SIZE},
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
    """The batches of one epoch on one rank that the query asks for, once each parameter,
    the batch's size in bytes and the sharding are known to be servable."""
    settings = state.settings
    if not 1 <= batch_size <= settings.max_batch_size:
        raise ApiError(400, "bad_batch_size", f"batch_size must be in 1..{settings.max_batch_size}")
    if rank >= world_size:
        raise ApiError(400, "bad_rank", f"rank {rank} must be below world_size {world_size}")
    wanted = _tensors(entry, include)
    per_sample = sample_bytes(entry, wanted, label_dtype)
    if batch_size * per_sample > state.batch_bytes:
        raise ApiError(
            400, "batch_too_large",
            f"batch_size {batch_size} of {', '.join(wanted)} is {batch_size * per_sample:,} "
            f"bytes, over this server's {settings.batch_mb} MB per batch: at most "
            f"{max(1, state.batch_bytes // per_sample)} with these tensors",
        )  # fmt: skip
    n = entry.manifest.config.num_samples
    sharding = Sharding(n, batch_size, rank, world_size, drop_last)
    starved = starved_ranks(sharding)
    if starved is not None:
        raise ApiError(400, "no_batches", starved)
    return BatchRequest(entry, epoch, sharding, wanted, label_dtype, label_encoding)


def _tensors(entry: CatalogEntry, include: str) -> tuple[str, ...]:
    """The tensors of the comma-separated ``include``: 400 unless each is known, and the
    mix tensors only of a set relabelled with --mix."""
    wanted = tuple(t for t in include.split(",") if t)
    unknown = sorted(set(wanted) - set(TENSORS) - set(MIX_TENSORS))
    if unknown or not wanted:
        raise ApiError(
            400,
            "bad_include",
            f"include takes tensors among {', '.join((*TENSORS, *MIX_TENSORS))}; got {include!r}",
        )
    mixing = sorted(set(wanted) & set(MIX_TENSORS))
    if mixing and entry.manifest.config.mix is None:
        raise ApiError(
            400, "bad_include",
            f"{', '.join(mixing)}: label set {entry.name!r} was relabelled without --mix",
        )  # fmt: skip
    return wanted


def check_batch_index(request: BatchRequest, index: int) -> None:
    """404 unless ``index`` is a batch of the request's epoch."""
    if index >= len(request.sharding):
        raise ApiError(
            404, "bad_batch_index", f"batch {index} is past the last batch "
            f"{len(request.sharding) - 1} of this epoch at this batch size and world size"
        )  # fmt: skip


def check_stream_start(request: BatchRequest, start: int) -> None:
    """404 if a stream would start past the epoch's batches (at its end: only the end
    frame)."""
    if start > len(request.sharding):
        raise ApiError(404, "bad_batch_index", f"start {start} is past the epoch's batches")


@dataclass(frozen=True)
class ImageRequest:
    """A validated request for the base images of sample ids [start, stop)."""

    entry: CatalogEntry
    start: int
    stop: int
    #: An upper bound on the response's bytes (images and hard labels).
    nbytes: int


async def image_request(
    state: State,
    entry: Entry,
    start: Annotated[int, Query(ge=0)] = 0,
    stop: Annotated[int | None, Query(ge=0)] = None,
) -> ImageRequest:
    """Sample ids [start, stop) of ``entry`` (``stop`` defaults to the last): 400 unless
    the range is within the set and its images fit in one response."""
    n = entry.manifest.config.num_samples
    stop = n if stop is None else stop
    if not start < stop <= n:
        raise ApiError(400, "bad_range", f"need 0 <= start < stop <= {n}")
    per_image = sample_bytes(entry, ("images", "hard"))
    if (stop - start) * per_image > state.batch_bytes:
        raise ApiError(
            400, "range_too_large",
            f"{stop - start} images are over this server's {state.settings.batch_mb} MB per "
            f"response: at most {max(1, state.batch_bytes // per_image)} a request",
        )  # fmt: skip
    return ImageRequest(entry, start, stop, (stop - start) * per_image)


def document_batch_size(schema: dict[str, Any], max_batch_size: int) -> None:
    """Write ``max_batch_size`` as the maximum of each ``batch_size`` query parameter in an
    OpenAPI ``schema``: the routes are declared once for every server, the bound is each
    server's own setting."""
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for parameter in operation.get("parameters", ()):
                if parameter["in"] == "query" and parameter["name"] == "batch_size":
                    parameter["schema"]["maximum"] = max_batch_size
