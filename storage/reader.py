"""Reader of a complete label set: base images, hard labels, and contiguous label rows.

Serving an epoch is a sequential read: rows are stored in each epoch's order, so any batch
of any rank is one contiguous slice per dataset. Open a reader after forking, never before
(h5py handles do not survive a fork). Sets of every format version read the same way: in
format 2 the teacher's logits are recovered from the refined labels and their norms.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import h5py
import numpy as np

from softserve.client.codecs import get_codec, part_name, to_float16
from softserve.client.refinement import recover_logits
from softserve.errors import StoreError, brief
from softserve.storage.layout import DATASET_FILE
from softserve.storage.manifest import load_manifest
from softserve.storage.shards import CODEC_FIELDS, MIX_DATASETS, NORM

#: What :meth:`LabelSetReader.read` returns: sample ids, views, refined labels, teacher
#: logits, the logits' norms, and (mixed sets only) the mix rows and partners' views.
ROW_FIELDS = ("order", "params", "refined", "logits", NORM, *MIX_DATASETS)
#: Opens of a set that is replaced each time before its files are all open, before giving up.
_OPEN_ATTEMPTS = 3


class LabelSetReader:
    """Read access to the label set at ``root`` (which must have a manifest).

    Every file of the set is opened when the reader is made, and checked against the
    manifest's sizes and epochs: a reader reads one version of a set for its whole life,
    whatever happens to the paths later (a set replaced under the same name is a new
    reader). The ``digest`` (sha256 of the manifest) names that version; the manifest is
    read again once the files are open, so a set replaced meanwhile is opened again rather
    than served as a mix of two builds under one digest.
    """

    def __init__(self, root: str | Path, *, locking: bool | None = None) -> None:
        self.root = Path(root)
        self._hard: np.ndarray | None = None
        self._datasets: dict[tuple[str, str], h5py.Dataset] = {}
        self._files: dict[str, h5py.File] = {}
        for _ in range(_OPEN_ATTEMPTS):
            self.manifest, self.digest = load_manifest(self.root)
            try:
                self._open_all(locking)
            except StoreError:
                self.close()
                raise
            if load_manifest(self.root)[1] == self.digest:
                break
            self.close()  # replaced while its files were opened: they may be of two builds
        else:
            raise StoreError(
                f"{self.root} was replaced {_OPEN_ATTEMPTS} times while it was being opened"
            )
        self.config = self.manifest.config
        self.codec = get_codec(self.config.codec)
        self.version = self.manifest.format_version

    def _open_all(self, locking: bool | None) -> None:
        """Open every file the manifest lists; each shard must hold the epochs it lists."""
        self._files = {}
        for entry in (self.manifest.dataset, *self.manifest.shards):
            self._files[entry.file] = self._open(entry.file, entry.size, locking)
        for shard in self.manifest.shards:
            attrs = self._files[shard.file].attrs
            held = (int(attrs.get("epoch_start", -1)), int(attrs.get("epoch_stop", -1)))
            if held != shard.epochs:
                raise StoreError(
                    f"{shard.file} holds epochs {held}, the manifest says {shard.epochs}; "
                    f"run 'softserve verify {self.root}'"
                )

    def _open(self, name: str, size: int, locking: bool | None) -> h5py.File:
        path = self.root / name
        try:
            handle = h5py.File(path, "r", locking=locking)
        except FileNotFoundError:
            raise StoreError(f"{name} is missing") from None
        except (OSError, ValueError) as exc:
            raise StoreError(
                f"cannot read {path} ({brief(exc)}); run 'softserve verify {self.root}' "
                "and relabel if it is corrupt"
            ) from None
        actual = handle.id.get_filesize()
        if actual != size:
            handle.close()
            raise StoreError(f"{name} has {actual} bytes, manifest says {size}")
        return handle

    def _file(self, name: str) -> h5py.File:
        handle = self._files.get(name)
        if handle is None:
            raise StoreError(
                f"{self.root} was closed (replaced or removed from the store); reopen it"
            )
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
        if self._hard is None:
            self._hard = self._read(DATASET_FILE, "labels", slice(None))
        return self._hard

    def shard_of(self, epoch: int) -> tuple[str, int]:
        """File holding a stored epoch, and the epoch's index inside it."""
        if not 0 <= epoch < self.config.epochs:
            raise IndexError(f"epoch {epoch} is outside the stored 0..{self.config.epochs - 1}")
        shard = self.manifest.shards[epoch // self.config.shard_epochs]
        return shard.file, epoch - shard.epoch_start

    def read(
        self, epoch: int, start: int, stop: int, fields: Iterable[str] | None = None,
        label_dtype: np.dtype | type = np.float32, stored_labels: bool = False,
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """Rows [start, stop) of an epoch's order: any of :data:`ROW_FIELDS`, with labels
        decoded to ``label_dtype`` (float32, or float16: the fp16 codec's labels as stored).

        With ``stored_labels``, ``refined`` comes in its codec's parts as stored (keys
        ``refined`` and ``refined_<part>``, see :func:`part_name`), for the job to decode.
        By default every field the set has (the mix rows only when it is mixed).
        """
        if fields is None:
            mixed = self.config.mix is not None
            fields = [f for f in ROW_FIELDS if mixed or f not in MIX_DATASETS]
        fields = list(fields)
        unknown = set(fields) - set(ROW_FIELDS)
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}; choose from {ROW_FIELDS}")
        if self.config.mix is None and set(fields) & set(MIX_DATASETS):
            raise ValueError(f"{self.root.name} was relabelled without --mix: it has no mix rows")
        if stored_labels:
            if "logits" in fields:
                raise ValueError("logits are not stored; read the norm and recover them")
            name, local = self.shard_of(epoch)
            rest = self.read(epoch, start, stop, [f for f in fields if f != "refined"])
            if "refined" in fields:
                parts = self._parts(name, "refined", (local, slice(start, stop)))
                rest.update({part_name("refined", k): v for k, v in parts.items()})
            return rest
        name, local = self.shard_of(epoch)
        index = (local, slice(start, stop))
        stored = {"order", "params", *CODEC_FIELDS[self.version], *MIX_DATASETS}
        if self.version >= 2:
            stored.add(NORM)
        out: dict[str, np.ndarray] = {}
        for field in fields:
            if field in CODEC_FIELDS[self.version]:
                out[field] = self._decode(name, field, index, label_dtype)
            elif field in stored:
                out[field] = self._read(name, field, index)
        if "order" in out:
            self._check_order(out["order"], name)
        if "mix" in out:
            self._check_order(out["mix"][:, 0], name)
        if "logits" in fields and "logits" not in out:
            out["logits"] = self._recover_logits(name, index, label_dtype, out)
        if NORM in fields and NORM not in out:  # format 1: the norm of the stored logits
            logits = self._decode(name, "logits", index, np.float32)
            out[NORM] = np.linalg.norm(logits, axis=-1).astype(np.float32)
        return {field: out[field] for field in fields}

    def _check_order(self, order: np.ndarray, name: str) -> None:
        """Sample ids must index the set: a wrong one would serve another sample's image."""
        if len(order) and (order.min() < 0 or order.max() >= self.config.num_samples):
            raise StoreError(
                f"{self.root / name} holds sample ids outside 0..{self.config.num_samples - 1};"
                f" run 'softserve verify {self.root}'"
            )

    def _parts(self, name: str, field: str, index: tuple) -> dict[str, np.ndarray]:
        """A label field's codec parts as stored, by part suffix."""
        names = self.codec.part_names(field, self.config.num_classes)
        return {suffix: self._read(name, key, index) for suffix, key in names.items()}

    def _decode(self, name: str, field: str, index: tuple, dtype: np.dtype | type) -> np.ndarray:
        parts = self._parts(name, field, index)
        return self.codec.decode_as(parts, self.config.num_classes, dtype)

    def _recover_logits(
        self, name: str, index: tuple, dtype: np.dtype | type, have: dict[str, np.ndarray]
    ) -> np.ndarray:
        """t = ‖t‖·(r − β·s/‖s‖) from the refined labels, norms and hard labels."""
        refined = self._decode(name, "refined", index, np.float32)
        order = have["order"] if "order" in have else self._read(name, "order", index)
        self._check_order(order, name)
        norm = have[NORM] if NORM in have else self._read(name, NORM, index)
        refinement = self.config.refinement
        hard = self.hard_labels()[order]
        logits = recover_logits(refined, hard, norm, refinement.alpha, refinement.beta)
        return to_float16(logits) if np.dtype(dtype) == np.float16 else logits

    def close(self) -> None:
        self._datasets.clear()
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def __enter__(self) -> LabelSetReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
