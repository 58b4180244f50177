"""Reading batches out of a label set and encoding them for the wire."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool

from softserve.errors import SoftserveError, StoreError
from softserve.format.payload import (
    END_FRAME,
    MIX_TENSORS,
    TENSORS,
    LabelDtype,
    LabelEncoding,
    encode,
    encode_parts,
    error_frame,
    frame_parts,
    going_away_frame,
    view_columns,
)
from softserve.format.sampling import Sharding
from softserve.service import metrics
from softserve.service.catalog import CatalogEntry
from softserve.service.limits import Limits

log = logging.getLogger("softserve.service")

#: Most batches a stream reads per trip to the thread pool (serve_bench: enough to amortize it).
_MAX_BATCHES_PER_READ = 8
#: Bytes per sample of the small tensors: indices and hard (int64), the mix row (6 × float32).
_INDEX_BYTES = {"indices": 8, "hard": 8, "mix": 24}


def sample_bytes(
    entry: CatalogEntry, include: Iterable[str], label_dtype: LabelDtype = "float32"
) -> int:
    """An upper bound on the bytes one sample adds to a batch with these tensors (labels
    counted as decoded floats: stored codecs take at most that)."""
    config = entry.manifest.config
    label = (2 if label_dtype == "float16" else 4) * config.num_classes
    image = math.prod(config.image_shape)
    columns, dtype = view_columns(config.views.policy)
    view = len(columns) * dtype.itemsize  # 5 × int16, or 14 × float32 for DSA rows
    sizes = {**_INDEX_BYTES, "params": view, "partner_params": view, "images": image,
             "partner_images": image, "soft": label, "logits": label}  # fmt: skip
    return sum(sizes[name] for name in include)


def max_batch_size(entry: CatalogEntry, batch_bytes: int, cap: int) -> int:
    """The largest batch_size served with every tensor included: ``batch_bytes`` over the
    bytes of a sample, at most ``cap`` (and at least 1)."""
    served = (*TENSORS, *MIX_TENSORS) if entry.manifest.config.mix else TENSORS
    return max(1, min(cap, batch_bytes // sample_bytes(entry, served)))


@dataclass(frozen=True)
class BatchRequest:
    """A validated request for batches of one epoch, on one rank."""

    entry: CatalogEntry
    epoch: int
    sharding: Sharding
    include: tuple[str, ...]
    label_dtype: LabelDtype = "float32"
    label_encoding: LabelEncoding = "decoded"

    @property
    def batch_bytes(self) -> int:
        """An upper bound on the bytes of one batch of this request."""
        return self.sharding.batch_size * sample_bytes(self.entry, self.include, self.label_dtype)

    @property
    def stored_labels(self) -> bool:
        return self.label_encoding == "stored"

    @property
    def stored_epoch(self) -> int:
        return self.stored(self.epoch)

    def stored(self, epoch: int) -> int:
        """Epochs past the stored ones wrap around: epoch e serves stored epoch e mod E."""
        return self.entry.stored_epoch(epoch)


def read_batches(
    request: BatchRequest, batches: Iterable[tuple[int, int]]
) -> Iterator[dict[str, np.ndarray]]:
    """The requested tensors (see softserve.format.payload) of (epoch, index) batches; a
    failed read withdraws the label set."""
    entry = request.entry
    try:
        yield from entry.read_batches(
            request.sharding, batches, request.include, request.label_dtype,
            request.stored_labels,
        )  # fmt: skip
    except StoreError as exc:
        entry.withdraw(str(exc))
        raise


def _parts(
    request: BatchRequest, epoch: int, index: int, tensors: dict[str, np.ndarray]
) -> list[bytes | memoryview]:
    """Batch ``index`` of ``epoch`` as safetensors buffers, to be joined once."""
    metadata = {
        "digest": request.entry.digest,
        "epoch": str(epoch),
        "stored_epoch": str(request.stored(epoch)),
        "batch": str(index),
    }
    if request.stored_labels:
        metadata["codec"] = request.entry.manifest.config.codec
    return encode_parts(tensors, metadata)


def batch_payload(request: BatchRequest, index: int) -> bytes:
    """Batch ``index`` of the request's epoch as safetensors bytes."""
    (tensors,) = read_batches(request, [(request.epoch, index)])
    return b"".join(_parts(request, request.epoch, index, tensors))


def image_payload(entry: CatalogEntry, start: int, stop: int) -> bytes:
    """Base images and hard labels of sample ids [start, stop) as safetensors bytes."""
    ids = np.arange(start, stop)
    tensors = {"images": entry.base_images(ids), "hard": entry.hard[start:stop]}
    return encode(tensors, {"digest": entry.digest})


def _frames(request: BatchRequest, batches: list[tuple[int, int]]) -> tuple[bytes, str | None]:
    """Frames of several (epoch, index) batches read in one go (joined: one copy), and the
    error that stopped them, if any."""
    parts: list[bytes | memoryview] = []
    done, error = 0, None
    started = time.perf_counter()
    try:
        for (epoch, index), tensors in zip(batches, read_batches(request, batches), strict=True):
            parts += frame_parts(_parts(request, epoch, index, tensors))
            done += 1
    except Exception as exc:  # reported in-stream: a cut stream would be retried for a minute
        epoch, index = batches[done]
        where = f"stream of {request.entry.name} failed at epoch {epoch}, batch {index}"
        if isinstance(exc, SoftserveError):
            log.error("%s: %s", where, exc)
            error = str(exc)
        else:  # a bug, not a damaged set: the traceback goes to the log
            log.exception(where)
            error = (f"internal error ({type(exc).__name__}) at epoch {epoch} batch {index}; "
                     "the server's log has the traceback")  # fmt: skip
    metrics.observe_batches("stream", time.perf_counter() - started, done)
    return b"".join(parts), error


def stream_groups(
    request: BatchRequest, start: int, epochs: int, group_bytes: int
) -> Iterator[list[tuple[int, int]]]:
    """The (epoch, index) batches of a stream from batch ``start`` through ``epochs`` epochs,
    in the groups it reads at a time: as many batches as fit ``group_bytes``, at least one
    and at most ``_MAX_BATCHES_PER_READ``, across epoch boundaries (a trip to the thread
    pool and a write cost more than reading a small batch; a group of large batches would
    take memory for nothing, and a group of thousands of tiny ones delays the first)."""
    batches = request.sharding.schedule(request.epoch, start, epochs)
    per_group = max(1, min(_MAX_BATCHES_PER_READ, group_bytes // request.batch_bytes))
    while group := list(itertools.islice(batches, per_group)):
        yield group


async def stream_frames(
    request: BatchRequest, start: int, epochs: int, *, group_bytes: int, limits: Limits,
    stopping: asyncio.Event,
) -> AsyncIterator[bytes]:  # fmt: skip
    """Frames of batches ``start``.. of ``epochs`` epochs, then the end frame.

    Each group of :func:`stream_groups` is one trip to the thread pool, its bytes reserved
    in ``limits`` until they are handed to the connection. A read failure ends the stream
    with an error frame; a shutdown (``stopping``) with a going-away frame.
    """
    for group in stream_groups(request, start, epochs, group_bytes):
        reserved = None if stopping.is_set() else await limits.reserve(
            len(group) * request.batch_bytes, stopping)  # fmt: skip
        if reserved is None:
            epoch, index = group[0]
            log.info("stream of %s ends at epoch %d, batch %d: server shutting down",
                     request.entry.name, epoch, index)  # fmt: skip
            yield going_away_frame(f"server shutting down; resume at epoch {epoch} batch {index}")
            return
        try:
            frames, error = await run_in_threadpool(_frames, request, group)
            if frames:
                yield frames
        finally:
            await limits.release(reserved)
        if error is not None:
            yield error_frame(error)
            return
    yield END_FRAME
