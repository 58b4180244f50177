"""Reading batches out of a label set and encoding them for the wire."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool

from softserve.client.payload import (
    END_FRAME,
    LabelDtype,
    LabelEncoding,
    encode,
    encode_parts,
    error_frame,
    frame_parts,
)
from softserve.client.sampling import Sharding
from softserve.errors import SoftserveError, StoreError
from softserve.service import metrics
from softserve.service.catalog import LabelSet

log = logging.getLogger("softserve.service")

_BATCHES_PER_READ = 8


@dataclass(frozen=True)
class BatchRequest:
    """A validated request for batches of one epoch, on one rank."""

    entry: LabelSet
    epoch: int
    sharding: Sharding
    include: tuple[str, ...]
    label_dtype: LabelDtype = "float32"
    label_encoding: LabelEncoding = "decoded"

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
    """The requested tensors (see softserve.client.payload) of (epoch, index) batches; a
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


def image_payload(entry: LabelSet, start: int, stop: int) -> bytes:
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
    except SoftserveError as exc:
        epoch, index = batches[done]
        log.error("stream of %s failed at epoch %d, batch %d: %s", request.entry.name, epoch,
                  index, exc)  # fmt: skip
        error = str(exc)
    metrics.observe_batches("stream", time.perf_counter() - started, done)
    return b"".join(parts), error


def stream_groups(
    request: BatchRequest, start: int, epochs: int
) -> Iterator[list[tuple[int, int]]]:
    """The (epoch, index) batches of a stream from batch ``start`` through ``epochs`` epochs,
    in the groups it reads at a time (across epoch boundaries: a trip to the thread pool and
    a write cost more than reading a small batch)."""
    batches = request.sharding.schedule(request.epoch, start, epochs)
    while group := list(itertools.islice(batches, _BATCHES_PER_READ)):
        yield group


async def stream_frames(request: BatchRequest, start: int, epochs: int) -> AsyncIterator[bytes]:
    """Frames of batches ``start``.. of ``epochs`` epochs, then the end frame; each group of
    :func:`stream_groups` is one trip to the thread pool. A read failure ends the stream
    with an error frame."""
    for group in stream_groups(request, start, epochs):
        frames, error = await run_in_threadpool(_frames, request, group)
        if frames:
            yield frames
        if error is not None:
            yield error_frame(error)
            return
    yield END_FRAME
