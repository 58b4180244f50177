"""Where a report reads a label set from: a store on disk, or a server through the client.

Both give the same rows: an epoch's sample order, view parameters (and a mixed set's mix
rows and partners' view parameters), GIFT-refined labels,
the teacher's logits (recovered from the refined labels and their norms, as every consumer
does), and for a top-k set the classes it kept. Labels travel in their stored form and are
decoded here by the codec's own decoder, so the report sees exactly what training sees.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from softserve.format.codecs import Codec, TopKCodec, get_codec
from softserve.format.labels import NORM, SOFT, decode_labels, label_parts


@dataclass(frozen=True)
class SetInfo:
    """What a report states about a label set, and needs to compute on it."""

    name: str
    digest: str
    num_samples: int
    num_classes: int
    class_names: tuple[str, ...]
    epochs: int
    image_shape: tuple[int, int, int]
    output_size: tuple[int, int]
    codec: str
    alpha: float
    beta: float
    format_version: int
    label_bytes: int
    teacher: str
    mix: str | None  # "cutmix" or "mixup" for a mixed set
    interpolation: str = "bilinear"  # the view policy's (softserve.pixels)
    views: str = "rrc"  # "dsa" for DSA views (their pictures need the normalization)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


@dataclass(frozen=True)
class EpochRows:
    """One stored epoch, row j being sample ``order[j]`` seen through view ``params[j]``."""

    order: np.ndarray  # int64 (N,)
    params: np.ndarray  # (N, 5), or (N, 14) DSA rows
    soft: np.ndarray  # float32 (N, K): GIFT's refined soft labels, as served
    logits: np.ndarray  # float32 (N, K): the teacher's logits
    kept: np.ndarray | None  # (N, k) classes a top-k codec stored; None for other codecs
    mix: np.ndarray | None = None  # float32 (N, 6) mix rows of a mixed set
    partner_params: np.ndarray | None = None  # the partners' views, like params


class LabelSource(Protocol):
    """A label set as a report reads it."""

    info: SetInfo

    def hard_labels(self) -> np.ndarray:
        """Hard labels by sample id, int64 (N,)."""
        ...

    def images(self, ids: np.ndarray) -> np.ndarray:
        """Base images of the given sample ids, uint8 (n, C, H, W)."""
        ...

    def epoch(self, epoch: int) -> EpochRows:
        """Every row of one stored epoch."""
        ...


def decode_rows(
    info: SetInfo, order: np.ndarray, params: np.ndarray, arrays: Mapping[str, np.ndarray],
    norm: np.ndarray, hard: np.ndarray, mix: np.ndarray | None = None,
    partner_params: np.ndarray | None = None,
) -> EpochRows:  # fmt: skip
    """An epoch's rows from the codec's stored parts (by suffix) and the logits' norms."""
    codec: Codec = get_codec(info.codec)
    parts = label_parts(codec, info.num_classes, arrays)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in parts.items()}
    order = np.asarray(order, dtype=np.int64)
    soft, logits = decode_labels(
        codec, info.num_classes, tensors, hard=torch.from_numpy(hard[order]),
        norm=torch.from_numpy(np.asarray(norm)), alpha=info.alpha, beta=info.beta,
    )  # fmt: skip
    kept = np.asarray(parts["index"], dtype=np.int64) if isinstance(codec, TopKCodec) else None
    return EpochRows(
        order, np.asarray(params), soft.numpy(), logits.numpy(), kept, mix, partner_params
    )


class StoreSource:
    """A complete label set on disk (``STORE/NAME``), read with the storage reader."""

    def __init__(self, root: Path) -> None:
        from softserve.storage.reader import LabelSetReader

        self.reader = LabelSetReader(root)
        manifest = self.reader.manifest
        config = manifest.config
        self.info = SetInfo(
            name=manifest.name, digest=self.reader.digest, num_samples=config.num_samples,
            num_classes=config.num_classes, class_names=tuple(config.class_names),
            epochs=config.epochs, image_shape=config.image_shape,
            output_size=config.views.output_size, codec=config.codec,
            alpha=config.refinement.alpha, beta=config.refinement.beta,
            format_version=manifest.format_version, label_bytes=manifest.label_bytes(),
            teacher=config.teacher.spec, mix=None if config.mix is None else config.mix.kind,
            interpolation=config.views.interpolation, views=config.views.policy,
            mean=config.mean, std=config.std,
        )  # fmt: skip

    def hard_labels(self) -> np.ndarray:
        return self.reader.hard_labels()

    def images(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        unique, inverse = np.unique(ids, return_inverse=True)
        return self.reader.images_at(unique)[inverse]

    def epoch(self, epoch: int) -> EpochRows:
        n = self.info.num_samples
        mixed = [] if self.info.mix is None else ["mix", "partner_params"]
        rows = self.reader.read(
            epoch, 0, n, ["order", "params", SOFT, NORM, *mixed], stored_labels=True
        )
        return decode_rows(
            self.info, rows["order"], rows["params"], rows, rows["norm"], self.hard_labels(),
            rows.get("mix"), rows.get("partner_params"),
        )  # fmt: skip

    def close(self) -> None:
        self.reader.close()


class RemoteSource:
    """A label set on a server, read through the Python client (stored-form labels)."""

    #: Rows per batch (an epoch arrives as a few large batches of one stream) and base images
    #: per request, both capped by the server's ``max_batch_size`` for the set.
    BATCH_ROWS = 4096
    IMAGE_ROWS = 8192

    def __init__(self, url: str, name: str, token: str | None = None) -> None:
        from softserve.client.remote import Client

        self.client = Client(url, token=token)
        self.remote = self.client.labelset(name)
        d = self.remote.detail
        self.info = SetInfo(
            name=d.name, digest=d.digest, num_samples=d.num_samples,
            num_classes=d.num_classes, class_names=tuple(d.class_names), epochs=d.epochs,
            image_shape=tuple(d.image_shape), output_size=tuple(d.output_size), codec=d.codec,
            alpha=d.refinement.alpha, beta=d.refinement.beta,
            format_version=d.format_version, label_bytes=d.label_bytes, teacher=d.teacher,
            mix=None if d.mix is None else d.mix.kind, interpolation=d.views.interpolation,
            views=d.views.policy, mean=d.mean, std=d.std,
        )  # fmt: skip
        cap = d.max_batch_size or max(self.BATCH_ROWS, self.IMAGE_ROWS)
        self.batch_rows, self.image_rows = min(self.BATCH_ROWS, cap), min(self.IMAGE_ROWS, cap)
        self._images, self._hard = self._fetch_images()

    def _fetch_images(self) -> tuple[np.ndarray, np.ndarray]:
        """Every base image and hard label, from the images route, pinned to the digest."""
        from softserve.format.payload import decode

        images, hard = [], []
        n = self.info.num_samples
        for start in range(0, n, self.image_rows):
            query = {"start": start, "stop": min(n, start + self.image_rows),
                     "digest": self.info.digest}  # fmt: skip
            response = self.client.get(f"/v1/labelsets/{self.info.name}/images", query)
            tensors, _ = decode(response.content)
            images.append(tensors["images"])
            hard.append(tensors["hard"])
        return np.concatenate(images), np.concatenate(hard).astype(np.int64)

    def hard_labels(self) -> np.ndarray:
        return self._hard

    def images(self, ids: np.ndarray) -> np.ndarray:
        return self._images[np.asarray(ids)]

    def epoch(self, epoch: int) -> EpochRows:
        n = self.info.num_samples
        sharding = self.remote.sharding(min(n, self.batch_rows), 0, 1, drop_last=False)
        batches = [raw.tensors for raw in self.remote.raw_batches(epoch, sharding, logits=True)]
        joined = {k: np.concatenate([b[k].numpy() for b in batches]) for k in batches[0]}
        return decode_rows(
            self.info, joined["indices"], joined["params"], joined, joined["norm"], self._hard,
            joined.get("mix"), joined.get("partner_params"),
        )  # fmt: skip

    def close(self) -> None:
        self.client.close()
