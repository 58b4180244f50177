"""An open label set and the batches read out of it, as the tensors the wire carries.

One implementation for the server's payloads and for local label sets
(:func:`softserve.client.open_local`): a batch is the same tensors whether it reaches a job
over HTTP or straight from the store.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from softserve.format.labels import NORM, SOFT
from softserve.format.payload import LabelDtype
from softserve.format.sampling import Sharding
from softserve.format.schema import (
    LabelSetDetail,
    LabelSetSummary,
    MixPolicyInfo,
    RefinementParams,
    ViewPolicyInfo,
)
from softserve.storage.manifest import Manifest
from softserve.storage.reader import LabelSetReader

#: Payload tensor -> reader field with labels as stored: soft as the codec's parts, logits
#: as their norms (decoded, each is the reader field of its name).
STORED_FIELDS = {SOFT: SOFT, "logits": NORM}

_Set = TypeVar("_Set", bound="OpenLabelSet")


@dataclass
class OpenLabelSet:
    """A label set's reader, hard labels, and base images when they fit the cache."""

    name: str
    root: Path
    manifest: Manifest
    digest: str
    reader: LabelSetReader
    hard: np.ndarray
    images: np.ndarray | None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(
        cls: type[_Set], root: Path, *, image_cache_bytes: int, locking: bool | None = None
    ) -> _Set:
        """Open the set at ``root``; base images are read into memory when they fit."""
        reader = LabelSetReader(root, locking=locking)
        config = reader.manifest.config
        image_bytes = config.num_samples * int(np.prod(config.image_shape))
        try:
            images = reader.images() if image_bytes <= image_cache_bytes else None
            hard = reader.hard_labels()
        except BaseException:
            reader.close()
            raise
        return cls(
            name=root.name,
            root=root,
            manifest=reader.manifest,
            digest=reader.digest,
            reader=reader,
            hard=hard,
            images=images,
        )

    def base_images(self, ids: np.ndarray) -> np.ndarray:
        """Base images of sample ids, in the given order."""
        if self.images is not None:
            return self.images[ids]
        order = np.argsort(ids, kind="stable")
        unique, inverse = np.unique(ids[order], return_inverse=True)
        with self.lock:
            rows = self.reader.images_at(unique)
        out = np.empty((len(ids), *rows.shape[1:]), dtype=rows.dtype)
        out[order] = rows[inverse]
        return out

    def stored_epoch(self, epoch: int) -> int:
        """Epochs past the stored ones wrap around: epoch e serves stored epoch e mod E."""
        return epoch % self.manifest.config.epochs

    def read_batches(
        self, sharding: Sharding, batches: Iterable[tuple[int, int]], include: Iterable[str],
        label_dtype: LabelDtype = "float32", stored_labels: bool = False,
    ) -> Iterator[dict[str, np.ndarray]]:  # fmt: skip
        """The ``include``\\ d tensors (see softserve.format.payload) of (epoch, index) batches.

        Batches that follow each other in one stored epoch (world size 1) are read together,
        one read per dataset: a read of a few rows costs about as much as a read of many.
        """
        include = tuple(include)
        fields = ["order"]
        if "params" in include:
            fields.append("params")
        if {"mix", "partner_images"} & set(include):
            fields.append("mix")
        if "partner_params" in include:
            fields.append("partner_params")
        fields += [STORED_FIELDS[n] if stored_labels else n for n in STORED_FIELDS if n in include]
        spans = [(self.stored_epoch(epoch), *sharding.positions(i)) for epoch, i in batches]
        for run in _contiguous_runs(spans):
            stored, first, last = run[0][0], run[0][1], run[-1][2]
            with self.lock:
                rows = self.reader.read(stored, first, last, fields, label_dtype, stored_labels)
            for _, start, stop in run:
                batch = {k: v[start - first : stop - first] for k, v in rows.items()}
                yield self._tensors(batch, include, stored_labels)

    def _tensors(
        self, rows: dict[str, np.ndarray], include: tuple[str, ...], stored_labels: bool
    ) -> dict[str, np.ndarray]:
        """A batch's payload tensors, in the requested order, from its stored rows."""
        ids = rows["order"].astype(np.int64)
        out: dict[str, np.ndarray] = {}
        for name in include:
            if name == "indices":
                out[name] = ids
            elif name == "images":
                out[name] = self.base_images(ids)
            elif name == "hard":
                out[name] = self.hard[ids]
            elif name in ("params", "mix", "partner_params"):
                out[name] = rows[name]
            elif name == "partner_images":
                out[name] = self.base_images(rows["mix"][:, 0].astype(np.int64))
            elif stored_labels and name == SOFT:
                codec, classes = self.reader.codec, self.manifest.config.num_classes
                for key in codec.part_names(SOFT, classes).values():
                    out[key] = rows[key]
            elif stored_labels:
                out[NORM] = rows[NORM]
            else:
                out[name] = rows[name]
        return out

    def close(self) -> None:
        self.reader.close()


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


def summary(entry: OpenLabelSet) -> LabelSetSummary:
    """The set's entry in a listing."""
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


def detail(entry: OpenLabelSet, max_batch_size: int | None = None) -> LabelSetDetail:
    """Everything a training job needs to use the set; ``max_batch_size``: the largest batch
    a server answers (None: no limit, as for a local set)."""
    manifest = entry.manifest
    config = manifest.config
    views = config.views
    return LabelSetDetail(
        **summary(entry).model_dump(),
        max_batch_size=max_batch_size,
        class_names=config.class_names,
        mean=config.mean,
        std=config.std,
        views=ViewPolicyInfo(
            **views.model_dump(exclude={"output_size", "policy"}), policy=views.policy
        ),
        mix=None if config.mix is None else MixPolicyInfo(**config.mix.model_dump()),
        refinement=RefinementParams(**config.refinement.model_dump()),
        seed=config.seed,
        precision=config.precision,
        teacher_weights_sha256=config.teacher.weights_sha256,
        dataset_sha256=config.dataset_sha256,
        label_bytes=manifest.label_bytes(),
        shards=len(manifest.shards),
        format_version=manifest.format_version,
    )
