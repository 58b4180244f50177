"""Reading batches out of a label set and encoding them for the wire."""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import numpy as np
from starlette.concurrency import run_in_threadpool

from softserve.client.payload import (
    END_FRAME,
    LabelDtype,
    encode,
    encode_parts,
    error_frame,
    frame_parts,
)
from softserve.client.sampling import Sharding
from softserve.client.schema import (
    LabelSetDetail,
    LabelSetSummary,
    RefinementParams,
    ViewPolicyInfo,
)
from softserve.errors import SoftserveError
from softserve.service import metrics
from softserve.service.catalog import LabelSet

log = logging.getLogger("softserve.service")

_LABEL_FIELDS = {"soft": "refined", "logits": "logits"}
_BATCHES_PER_READ = 8


@dataclass(frozen=True)
class BatchRequest:
    """A validated request for batches of one epoch, on one rank."""

    entry: LabelSet
    epoch: int
    sharding: Sharding
    include: tuple[str, ...]
    label_dtype: LabelDtype = "float32"

    @property
    def stored_epoch(self) -> int:
        """Epochs past the stored ones wrap around: epoch e serves stored epoch e mod E."""
        return self.epoch % self.entry.manifest.config.epochs


def summary(entry: LabelSet) -> LabelSetSummary:
    config = entry.manifest.config
    return LabelSetSummary(
        name=entry.name,
        num_samples=config.num_samples,
        num_classes=config.num_classes,
        epochs=config.epochs,
        image_shape=config.image_shape,
        output_size=config.views.output_size,
        codec=config.codec,
        teacher=config.teacher.spec,
        created=entry.manifest.created,
    )


def detail(entry: LabelSet) -> LabelSetDetail:
    manifest = entry.manifest
    config = manifest.config
    views = config.views
    return LabelSetDetail(
        **summary(entry).model_dump(),
        class_names=config.class_names,
        mean=config.mean,
        std=config.std,
        views=ViewPolicyInfo(
            scale=views.scale, ratio=views.ratio, flip=views.flip, interpolation=views.interpolation
        ),
        refinement=RefinementParams(**config.refinement.model_dump()),
        seed=config.seed,
        precision=config.precision,
        teacher_weights_sha256=config.teacher.weights_sha256,
        dataset_sha256=config.dataset_sha256,
        label_bytes=manifest.label_bytes(),
        shards=len(manifest.shards),
        format_version=manifest.format_version,
    )


def read_batch(request: BatchRequest, index: int) -> dict[str, np.ndarray]:
    """The requested tensors of batch ``index`` (see softserve.client.payload)."""
    entry = request.entry
    start, stop = request.sharding.positions(index)
    fields = ["order"]
    if "params" in request.include:
        fields.append("params")
    fields += [stored for name, stored in _LABEL_FIELDS.items() if name in request.include]
    with entry.lock:
        rows = entry.reader.read(request.stored_epoch, start, stop, fields, request.label_dtype)
    ids = rows["order"].astype(np.int64)
    out: dict[str, np.ndarray] = {}
    for name in request.include:
        if name == "indices":
            out[name] = ids
        elif name == "images":
            out[name] = entry.base_images(ids)
        elif name == "hard":
            out[name] = entry.hard[ids]
        elif name == "params":
            out[name] = rows["params"]
        else:
            out[name] = rows[_LABEL_FIELDS[name]]
    return out


def batch_parts(request: BatchRequest, index: int) -> list[bytes | memoryview]:
    """Batch ``index`` as safetensors buffers, to be joined once."""
    metadata = {
        "epoch": str(request.epoch),
        "stored_epoch": str(request.stored_epoch),
        "batch": str(index),
    }
    return encode_parts(read_batch(request, index), metadata)


def batch_payload(request: BatchRequest, index: int) -> bytes:
    """Batch ``index`` as safetensors bytes."""
    return b"".join(batch_parts(request, index))


def image_payload(entry: LabelSet, start: int, stop: int) -> bytes:
    """Base images and hard labels of sample ids [start, stop) as safetensors bytes."""
    ids = np.arange(start, stop)
    return encode({"images": entry.base_images(ids), "hard": entry.hard[start:stop]})


def _frames(request: BatchRequest, batches: list[tuple[int, int]]) -> tuple[bytes, str | None]:
    """Frames of several (epoch, index) batches read in one go (joined: one copy), and the
    error that stopped them, if any."""
    parts: list[bytes | memoryview] = []
    error = None
    try:
        for epoch, index in batches:
            with metrics.BATCH_SECONDS.labels("stream").time():
                parts += frame_parts(batch_parts(replace(request, epoch=epoch), index))
    except SoftserveError as exc:
        log.error("stream of %s failed at batch %d: %s", request.entry.name, index, exc)
        error = str(exc)
    return b"".join(parts), error


async def stream_frames(request: BatchRequest, start: int, epochs: int) -> AsyncIterator[bytes]:
    """Frames of batches ``start``.. of ``epochs`` epochs, then the end frame.

    Batches are read several at a time per trip to the thread pool, across epoch
    boundaries: a trip and a write cost more than reading a small batch. A read failure
    ends the stream with an error frame.
    """
    per_epoch = len(request.sharding)
    batches = (
        (epoch, index)
        for epoch in range(request.epoch, request.epoch + epochs)
        for index in range(start if epoch == request.epoch else 0, per_epoch)
    )
    while group := list(itertools.islice(batches, _BATCHES_PER_READ)):
        frames, error = await run_in_threadpool(_frames, request, group)
        if frames:
            yield frames
        if error is not None:
            yield error_frame(error)
            return
    yield END_FRAME
