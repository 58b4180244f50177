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

from softserve.client.codecs import part_name
from softserve.client.payload import (
    END_FRAME,
    TENSORS,
    LabelDtype,
    LabelEncoding,
    encode,
    encode_parts,
    error_frame,
    frame_parts,
    going_away_frame,
)
from softserve.client.sampling import Sharding
from softserve.client.schema import (
    LabelSetDetail,
    LabelSetSummary,
    RefinementParams,
    ViewPolicyInfo,
)
from softserve.errors import SoftserveError, StoreError
from softserve.service import metrics
from softserve.service.catalog import LabelSet
from softserve.service.limits import Limits

log = logging.getLogger("softserve.service")

_LABEL_FIELDS = {"soft": "refined", "logits": "logits"}
#: With label_encoding=stored: soft as the codec's parts, logits as their norms.
_STORED_FIELDS = {"soft": "refined", "logits": "norm"}
#: Most batches a stream reads per trip to the thread pool (serve_bench: enough to amortize it).
_MAX_BATCHES_PER_READ = 8
#: Bytes per sample of the small tensors: indices and hard (int64), params (5 × int16).
_INDEX_BYTES = {"indices": 8, "hard": 8, "params": 10}


def sample_bytes(
    entry: LabelSet, include: Iterable[str], label_dtype: LabelDtype = "float32"
) -> int:
    """An upper bound on the bytes one sample adds to a batch with these tensors (labels
    counted as decoded floats: stored codecs take at most that)."""
    config = entry.manifest.config
    label = (2 if label_dtype == "float16" else 4) * config.num_classes
    sizes = {**_INDEX_BYTES, "images": math.prod(config.image_shape), "soft": label,
             "logits": label}  # fmt: skip
    return sum(sizes[name] for name in include)


def max_batch_size(entry: LabelSet, batch_bytes: int, cap: int) -> int:
    """The largest batch_size served with every tensor included: ``batch_bytes`` over the
    bytes of a sample, at most ``cap`` (and at least 1)."""
    return max(1, min(cap, batch_bytes // sample_bytes(entry, TENSORS)))


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
        return epoch % self.entry.manifest.config.epochs


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
        digest=entry.digest,
    )


def detail(entry: LabelSet, largest_batch: int) -> LabelSetDetail:
    manifest = entry.manifest
    config = manifest.config
    views = config.views
    return LabelSetDetail(
        **summary(entry).model_dump(),
        max_batch_size=largest_batch,
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


def read_batches(
    request: BatchRequest, batches: Iterable[tuple[int, int]]
) -> Iterator[dict[str, np.ndarray]]:
    """The requested tensors (see softserve.client.payload) of (epoch, index) batches.

    Batches that follow each other in one stored epoch (world size 1) are read together, one
    read per dataset: a read of a few rows costs about as much as a read of many.
    """
    entry = request.entry
    fields = ["order"]
    if "params" in request.include:
        fields.append("params")
    labels = _STORED_FIELDS if request.stored_labels else _LABEL_FIELDS
    fields += [stored for name, stored in labels.items() if name in request.include]
    spans = [(request.stored(epoch), *request.sharding.positions(i)) for epoch, i in batches]
    for run in _contiguous_runs(spans):
        stored, first, last = run[0][0], run[0][1], run[-1][2]
        try:
            with entry.lock:
                rows = entry.reader.read(
                    stored, first, last, fields, request.label_dtype, request.stored_labels
                )
        except StoreError as exc:
            entry.withdraw(str(exc))
            raise
        for _, start, stop in run:
            batch = {k: v[start - first : stop - first] for k, v in rows.items()}
            yield _tensors(request, batch)


def _contiguous_runs(spans: list[tuple[int, int, int]]) -> Iterator[list[tuple[int, int, int]]]:
    """(stored epoch, start, stop) spans grouped into runs that read as one slice."""
    run: list[tuple[int, int, int]] = []
    for span in spans:
        if run and (span[0] != run[-1][0] or span[1] != run[-1][2]):
            yield run
            run = []
        run.append(span)
    if run:
        yield run


def _tensors(request: BatchRequest, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A batch's payload tensors, in the requested order, from its stored rows."""
    entry = request.entry
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
        elif request.stored_labels and name == "soft":
            codec, classes = entry.reader.codec, entry.manifest.config.num_classes
            for suffix, key in codec.part_names("refined", classes).items():
                out[part_name("soft", suffix)] = rows[key]
        elif request.stored_labels:
            out["norm"] = rows["norm"]
        else:
            out[name] = rows[_LABEL_FIELDS[name]]
    return out


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
    request: BatchRequest, start: int, epochs: int, group_bytes: int
) -> Iterator[list[tuple[int, int]]]:
    """The (epoch, index) batches of a stream from batch ``start`` through ``epochs`` epochs,
    in the groups it reads at a time: as many batches as fit ``group_bytes``, at least one
    and at most ``_MAX_BATCHES_PER_READ``, across epoch boundaries (a trip to the thread
    pool and a write cost more than reading a small batch; a group of large batches would
    take memory for nothing, and a group of thousands of tiny ones delays the first)."""
    per_epoch = len(request.sharding)
    batches = (
        (epoch, index)
        for epoch in range(request.epoch, request.epoch + epochs)
        for index in range(start if epoch == request.epoch else 0, per_epoch)
    )
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
