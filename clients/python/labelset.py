"""A label set as a training job sees it, wherever its batches come from.

:class:`LabelSet` is everything a job uses (metadata, :meth:`~LabelSet.base_images`,
:meth:`~LabelSet.batches`, :meth:`~LabelSet.loader`) over one small source protocol:
``image_chunks()`` and ``raw_batches()``. A server (:class:`softserve.client.RemoteLabelSet`)
and a local store (:class:`softserve.client.LocalLabelSet`) implement only those two, so the
node's image cache, views, label decoding, batch planning and the loader are one
implementation, and a batch is the same tensors either way.
"""

from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from softserve.client.cache import Version, mapped_images
from softserve.client.loader import Loader
from softserve.format.codecs import get_codec
from softserve.format.labels import NORM, decode_labels, label_parts
from softserve.format.sampling import Sharding, starved_ranks
from softserve.format.schema import LabelSetDetail
from softserve.pixels import mixed_views

#: Base images per read when a source gives them all (requests, reads of the store).
_IMAGE_CHUNK_BYTES = 32 << 20


@dataclass
class Batch:
    """One batch: the student's inputs (views as the teacher saw them) and its targets."""

    epoch: int
    index: int
    indices: torch.Tensor
    images: torch.Tensor
    params: torch.Tensor
    hard: torch.Tensor
    soft: torch.Tensor
    logits: torch.Tensor | None = None
    #: mixed sets: each sample's mix row (partner id, λ, CutMix box; see
    #: softserve.format.augment) and its partner's view params; ``images`` are mixed already.
    #: ``params`` (and ``partner_params``) are DSA rows (float32 (B, 14)) in a DSA set
    mix: torch.Tensor | None = None
    partner_params: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        tensors = {
            f.name: fn(value)
            for f in fields(self)
            if isinstance(value := getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **tensors)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The batch with every tensor on ``device`` (from DataLoader workers to the GPU)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """The batch in pinned memory: what ``DataLoader(pin_memory=True)`` calls."""
        return self._map(torch.Tensor.pin_memory)


@dataclass
class RawBatch:
    """A batch as its source gives it: CPU tensors, views not yet applied, labels in their
    stored form (the codec's parts, and the logits' norm when asked)."""

    epoch: int
    index: int
    tensors: dict[str, torch.Tensor]


def _resolve_ranks(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """``rank`` and ``world_size``, each taken from the process group when not given; with
    no process group, refused when the environment (torchrun's WORLD_SIZE > 1, or a RANK
    above 0) says this process is one of several ranks, or every rank would read the same
    batches (as DistributedSampler refuses)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return (
            dist.get_rank() if rank is None else rank,
            dist.get_world_size() if world_size is None else world_size,
        )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    env_rank = int(os.environ.get("RANK", "0"))
    if launched > 1 or env_rank > 0:
        missing = " and ".join(
            name for name, value in (("rank=", rank), ("world_size=", world_size)) if value is None
        )
        raise ValueError(
            f"this process is rank {env_rank} of {launched} (RANK, WORLD_SIZE) but "
            "torch.distributed is not initialized: call init_process_group before making the "
            f"loader, or pass rank= and world_size= (no {missing} was given)"
        )
    return rank or 0, world_size or 1


class LabelSet(ABC):
    """A label set: metadata, and batches as views plus labels.

    It is pinned to one version of the set (``digest``): a source that meets another build
    raises rather than mix two versions into one run. Its base images are held per process
    and never pickled: a DataLoader worker, forked or spawned, maps them itself.
    """

    def __init__(self, detail: LabelSetDetail, image_cache_mb: int) -> None:
        self.detail = detail
        self.image_cache_bytes = image_cache_mb << 20
        self._images: tuple[int, torch.Tensor | None] | None = None

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_images": None}

    @property
    def name(self) -> str:
        return self.detail.name

    @property
    def num_samples(self) -> int:
        return self.detail.num_samples

    @property
    def num_classes(self) -> int:
        return self.detail.num_classes

    @property
    def epochs(self) -> int:
        """Stored epochs; later epochs wrap around."""
        return self.detail.epochs

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Base images' (C, H, W)."""
        return self.detail.image_shape

    @property
    def output_size(self) -> tuple[int, int]:
        """Views' (H, W)."""
        return self.detail.output_size

    @property
    def mean(self) -> tuple[float, ...]:
        return self.detail.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.detail.std

    @property
    def class_names(self) -> list[str]:
        return self.detail.class_names

    @property
    def digest(self) -> str:
        """sha256 of the set's manifest: the version every batch comes from."""
        return self.detail.digest

    def base_images(self) -> torch.Tensor | None:
        """All base images (uint8 N×C×H×W) when they fit ``image_cache_mb``, once per
        process: mapped read-only from the node's cache (:mod:`softserve.client.cache`), or
        read into memory where the cache cannot hold them. None over the budget: then every
        batch carries its images."""
        if self._images is None or self._images[0] != os.getpid():
            self._images = (os.getpid(), self._load_images())
        return self._images[1]

    def _load_images(self) -> torch.Tensor | None:
        """The base images as :meth:`base_images` gives them, loaded in this process."""
        if int(np.prod(self.image_shape)) * self.num_samples > self.image_cache_bytes:
            return None
        version = Version(
            self.name, self.digest, self.detail.dataset_sha256,
            (self.num_samples, *self.image_shape), tuple(self.class_names),
        )  # fmt: skip
        mapped = mapped_images(version, self.image_chunks)
        if mapped is None:
            return torch.from_numpy(np.concatenate([x for x, _ in self.image_chunks()]))
        with warnings.catch_warnings():  # read-only by design: batches index it, never write
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            return torch.from_numpy(mapped)

    @abstractmethod
    def image_chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Base images (uint8 n×C×H×W) and hard labels (int64 n) of consecutive sample ids,
        from id 0 to the last, a chunk (:meth:`_image_spans`) at a time."""

    def _image_spans(self, most: int | None = None) -> Iterator[tuple[int, int]]:
        """Sample ids [start, stop) of 32 MiB of base images each, and at most ``most``."""
        step = max(1, _IMAGE_CHUNK_BYTES // int(np.prod(self.image_shape)))
        if most is not None:
            step = min(step, most)
        for start in range(0, self.num_samples, step):
            yield start, min(start + step, self.num_samples)

    @abstractmethod
    def raw_batches(
        self, epoch: int, sharding: Sharding, start: int = 0, logits: bool = False,
        with_images: bool = False, epochs: int = 1, step: int = 1,
    ) -> Iterator[RawBatch]:  # fmt: skip
        """Batches from batch ``start`` of ``epoch`` on, through ``epochs`` epochs, every
        ``step``-th (see :meth:`Sharding.schedule`), as the source gives them."""

    def sharding(
        self, batch_size: int, rank: int | None = None, world_size: int | None = None,
        drop_last: bool = True,
    ) -> Sharding:  # fmt: skip
        """How an epoch is cut into batches for this rank; ValueError when some rank would
        get no batch at all (the server refuses those requests too)."""
        rank, world_size = _resolve_ranks(rank, world_size)
        sharding = Sharding(self.num_samples, batch_size, rank, world_size, drop_last)
        starved = starved_ranks(sharding, self.name)
        if starved is not None:
            raise ValueError(starved)
        return sharding

    def include(self, logits: bool, with_images: bool) -> list[str]:
        """The tensors a raw batch needs (see softserve.format.payload): images unless the
        base images are cached, and the mix rows of a mixed set."""
        include = ["indices", "params", "hard", "soft"]
        if logits:
            include.append("logits")
        if with_images:
            include.append("images")
        if self.detail.mix is not None:
            include += ["mix", "partner_params"]
            if with_images:
                include.append("partner_images")
        return include

    def _carried(self, t: dict[str, torch.Tensor], key: str, ids: torch.Tensor) -> torch.Tensor:
        """Base images the batch carries under ``key``, else those of ``ids`` in the cache."""
        if key in t:
            return t[key]
        cache = self.base_images()
        assert cache is not None, "batches without images need the base-image cache"
        return cache.index_select(0, ids)

    def to_batch(self, raw: RawBatch, device: torch.device | str) -> Batch:
        """Apply the views (and mixes) on ``device``: the student sees what the teacher saw."""
        t = raw.tensors
        device = torch.device(device)
        non_blocking = device.type == "cuda"

        def put(x: torch.Tensor) -> torch.Tensor:
            return x.to(device, non_blocking=non_blocking)

        mix = t.get("mix")
        mixing = self.detail.mix
        partner = None
        if mixing is not None and mix is not None:
            partner = put(self._carried(t, "partner_images", mix[:, 0].to(torch.long)))
        # every tensor of the batch on the device, the small ones too (user code indexes
        # its own device tensors with them)
        params = put(t["params"])
        partner_params = None if mix is None else put(t["partner_params"])
        mix = None if mix is None else put(mix)
        views = mixed_views(
            None if mixing is None else mixing.kind,  # type: ignore[arg-type]
            put(self._carried(t, "images", t["indices"])),
            params,
            self.output_size,
            partner_images=partner,
            partner_params=partner_params,
            mix=mix,
            mean=self.mean,
            std=self.std,
            interpolation=self.detail.views.interpolation,
            views=self.detail.views.policy,
        )

        # labels arrive as stored (a top-k row is a few dozen bytes) and are decoded after
        # the copy, on the job's device
        codec = get_codec(self.detail.codec)
        parts = label_parts(codec, self.num_classes, t)
        hard = t["hard"].to(device, non_blocking=non_blocking)
        norm = t.get(NORM)
        refinement = self.detail.refinement
        soft, logits = decode_labels(
            codec, self.num_classes,
            {s: v.to(device, non_blocking=non_blocking) for s, v in parts.items()},
            hard=hard, norm=None if norm is None else norm.to(device, non_blocking=non_blocking),
            alpha=refinement.alpha, beta=refinement.beta,
        )  # fmt: skip
        return Batch(
            epoch=raw.epoch,
            index=raw.index,
            indices=put(t["indices"]),
            images=views,
            params=params,
            hard=hard,
            soft=soft,
            logits=logits,
            mix=mix,
            partner_params=partner_params,
        )

    def batches(
        self, epoch: int, batch_size: int, rank: int | None = None,
        world_size: int | None = None, device: torch.device | str = "cpu", start: int = 0,
        logits: bool = False, drop_last: bool = True,
    ) -> Iterator[Batch]:  # fmt: skip
        """Batches of one epoch for this rank, with views applied on ``device``."""
        sharding = self.sharding(batch_size, rank, world_size, drop_last)
        with_images = self.base_images() is None
        for raw in self.raw_batches(epoch, sharding, start, logits, with_images):
            yield self.to_batch(raw, device)

    def loader(
        self, batch_size: int, epochs: int | None = None, *, rank: int | None = None,
        world_size: int | None = None, device: torch.device | str = "cpu",
        logits: bool = False, drop_last: bool = True, prefetch: int = 8,
    ) -> Loader:  # fmt: skip
        """A prefetching, resumable loader over epochs; see :class:`softserve.client.Loader`."""
        return Loader(
            self, batch_size, epochs=epochs, rank=rank, world_size=world_size, device=device,
            logits=logits, drop_last=drop_last, prefetch=prefetch,
        )  # fmt: skip
