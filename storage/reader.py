"""Reader of a complete label set: base images, hard labels, and contiguous label rows.

Serving an epoch is a sequential read: rows are stored in each epoch's order, so any batch
of any rank is one contiguous slice per dataset. Open a reader after forking, never before
(h5py handles do not survive a fork).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import h5py
import numpy as np

from softserve.errors import StoreError, brief
from softserve.storage.codecs import get_codec, part_name
from softserve.storage.layout import DATASET_FILE
from softserve.storage.manifest import Manifest, read_manifest
from softserve.storage.writer import LABEL_FIELDS

ROW_FIELDS = ("order", "params", *LABEL_FIELDS)


class LabelSetReader:
    """Read access to the label set at ``root`` (which must have a manifest)."""

    def __init__(self, root: str | Path, *, locking: bool | None = None) -> None:
        self.root = Path(root)
        self.manifest: Manifest = read_manifest(self.root)
        self.config = self.manifest.config
        self.codec = get_codec(self.config.codec)
        self._locking = locking
        self._files: dict[str, h5py.File] = {}
        self._datasets: dict[tuple[str, str], h5py.Dataset] = {}

    def _file(self, name: str) -> h5py.File:
        handle = self._files.get(name)
        if handle is None:
            path = self.root / name
            try:
                handle = h5py.File(path, "r", locking=self._locking)
            except (OSError, ValueError) as exc:
                raise StoreError(
                    f"cannot read {path} ({brief(exc)}); run 'softserve verify {self.root}' "
                    "and relabel if it is corrupt"
                ) from None
            self._files[name] = handle
        return handle

    def _read(self, name: str, key: str, index: tuple | slice | np.ndarray) -> np.ndarray:
        try:
            dataset = self._datasets.get((name, key))
            if dataset is None:  # looking a dataset up costs more than a small read
                dataset = self._datasets[name, key] = self._file(name)[key]
            return dataset[index]
        except (OSError, KeyError, ValueError) as exc:
            raise StoreError(
                f"cannot read {key!r} from {self.root / name} ({brief(exc)}); "
                f"run 'softserve verify {self.root}'"
            ) from None

    def images(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Base images [start, stop) by sample id, uint8 (n, C, H, W)."""
        return self._read(DATASET_FILE, "images", slice(start, stop))

    def images_at(self, ids: np.ndarray) -> np.ndarray:
        """Base images of sample ids given in increasing order, without repeats."""
        return self._read(DATASET_FILE, "images", np.asarray(ids))

    def hard_labels(self) -> np.ndarray:
        """Hard labels of every sample, int64 (N,)."""
        return self._read(DATASET_FILE, "labels", slice(None))

    def shard_of(self, epoch: int) -> tuple[str, int]:
        """File holding a stored epoch, and the epoch's index inside it."""
        if not 0 <= epoch < self.config.epochs:
            raise IndexError(f"epoch {epoch} is outside the stored 0..{self.config.epochs - 1}")
        shard = self.manifest.shards[epoch // self.config.shard_epochs]
        return shard.file, epoch - shard.epoch_start

    def read(
        self, epoch: int, start: int, stop: int, fields: Iterable[str] = ROW_FIELDS,
        label_dtype: np.dtype | type = np.float32,
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """Rows [start, stop) of an epoch's order: sample ids, view params, and labels decoded
        to ``label_dtype`` (float32, or float16: the fp16 codec's labels as stored)."""
        name, local = self.shard_of(epoch)
        rows = slice(start, stop)
        out: dict[str, np.ndarray] = {}
        for field in fields:
            if field in LABEL_FIELDS:
                parts = {
                    p.suffix: self._read(name, part_name(field, p.suffix), (local, rows))
                    for p in self.codec.parts
                }
                out[field] = self.codec.decode_as(parts, label_dtype)
            elif field in ROW_FIELDS:
                out[field] = self._read(name, field, (local, rows))
            else:
                raise ValueError(f"unknown field {field!r}; choose from {ROW_FIELDS}")
        return out

    def close(self) -> None:
        self._datasets.clear()
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def __enter__(self) -> LabelSetReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
