"""Label sets read straight from a store on this machine: no server, no HTTP.

``open_local("store/my-set")`` gives the same :class:`~softserve.client.LabelSet` API as
``Client(url).labelset("my-set")``, and the same tensors for the same epoch, batch size,
rank and world size: batches are read by the code the server reads them with
(:mod:`softserve.storage.open_set`). Reading HDF5 needs h5py (the worker's install), which
is imported only when a set is opened, so ``import softserve.client`` stays light.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from softserve.client.labelset import LabelSet, RawBatch
from softserve.errors import ClientError
from softserve.format.sampling import Sharding

if TYPE_CHECKING:
    from softserve.storage.open_set import OpenLabelSet

#: Batches read in one go (as the server's stream does).
_BATCHES_PER_READ = 8


def _open(root: Path, locking: bool | None) -> OpenLabelSet:
    """The set's files, open; base images stay on disk (:meth:`LabelSet.base_images` holds
    them, mapped from the node's cache)."""
    from softserve.storage.open_set import OpenLabelSet

    return OpenLabelSet.open(root, image_cache_bytes=0, locking=locking)


class LocalLabelSet(LabelSet):
    """A label set in a local store, pinned to the version opened (``digest``).

    Files are opened per process: a DataLoader worker (forked or spawned) opens its own,
    and raises :class:`ClientError` (``code="digest_mismatch"``) if the set was rebuilt
    since it was first opened.
    """

    def __init__(
        self, path: str | Path, image_cache_mb: int = 2048, locking: bool | None = None
    ) -> None:
        from softserve.storage.open_set import detail

        self.path = Path(path)
        self.locking = locking
        entry = _open(self.path, locking)
        super().__init__(detail(entry), image_cache_mb)
        self._opened: tuple[int, OpenLabelSet] | None = (os.getpid(), entry)

    @property
    def _entry(self) -> OpenLabelSet:
        """This process's open files (h5py handles never cross a fork)."""
        if self._opened is None or self._opened[0] != os.getpid():
            entry = _open(self.path, self.locking)
            if entry.digest != self.digest:
                entry.close()
                raise ClientError(
                    f"label set {str(self.path)!r} changed: version {entry.digest[:12]} is on "
                    f"disk, this job pinned {self.digest[:12]}; open it again to use the new "
                    "version",
                    code="digest_mismatch",
                )
            self._opened = (os.getpid(), entry)
        return self._opened[1]

    def __getstate__(self) -> dict[str, object]:
        """Path and pinned version: the unpickled set (in a spawned worker) reopens."""
        return {**super().__getstate__(), "_opened": None}

    def __repr__(self) -> str:
        d = self.detail
        return (
            f"LocalLabelSet({d.name!r}, samples={d.num_samples}, classes={d.num_classes}, "
            f"epochs={d.epochs}, image_shape={d.image_shape}, path={str(self.path)!r})"
        )

    def _load_images(self) -> torch.Tensor | None:
        """This process's files are opened first, so that a set rebuilt since it was pinned
        is refused here too, not served from the cache of the old version."""
        self._entry.reader.check_files()
        return super()._load_images()

    def image_chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Base images and hard labels read from the store's dataset file."""
        entry = self._entry
        for start, stop in self._image_spans():
            with entry.lock:
                images = entry.reader.images(start, stop)
            yield images, entry.hard[start:stop]

    def raw_batches(
        self, epoch: int, sharding: Sharding, start: int = 0, logits: bool = False,
        with_images: bool = False, epochs: int = 1, step: int = 1,
    ) -> Iterator[RawBatch]:  # fmt: skip
        """Batches read from the store, in the server's stored-label form."""
        include = self.include(logits, with_images)
        entry = self._entry
        batches = sharding.schedule(epoch, start, epochs, step)
        while group := list(itertools.islice(batches, _BATCHES_PER_READ)):
            read = entry.read_batches(sharding, group, include, stored_labels=True)
            for (e, index), tensors in zip(group, read, strict=True):
                yield RawBatch(e, index, {k: torch.from_numpy(v) for k, v in tensors.items()})

    def close(self) -> None:
        """Close this process's files (a later read reopens them)."""
        if self._opened is not None and self._opened[0] == os.getpid():
            self._opened[1].close()
        self._opened = None

    def __enter__(self) -> LocalLabelSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_local(
    path: str | Path, *, image_cache_mb: int = 2048, locking: bool | None = None
) -> LocalLabelSet:
    """The label set at ``path`` (``STORE/NAME``, as ``relabel --out`` wrote it), read
    directly from its files: the remote label set's API, with no server.

    Base images that fit ``image_cache_mb`` are copied once per node into its image cache
    and mapped from there (or, where that cannot be written, read into memory once per
    process); ``locking=False`` for stores on network file systems without locks.
    """
    return LocalLabelSet(path, image_cache_mb, locking)
