"""Reader of a complete label set: base images, hard labels, and contiguous label rows.

Serving an epoch is a sequential read: rows are stored in each epoch's order, so any batch
of any rank is one contiguous slice per dataset. Open a reader after forking, never before
(h5py handles do not survive a fork). Sets of every format version read the same way: in
format 2 the teacher's logits are recovered from the refined labels and their norms.

Every byte read is trusted only as :mod:`softserve.storage.integrity` says: each file's
sha256 verified at open, its structure that of the format and inside the file, and the file
unchanged since (an ``fstat`` after each read). Hard labels must index the classes and
labels must be finite: a label that passes all this is the one the manifest's digest names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import numpy as np

from softserve.errors import StoreChanged, StoreError, brief
from softserve.format.codecs import get_codec, part_name
from softserve.format.labels import NORM, SOFT, decode_labels
from softserve.storage.integrity import (
    H5_ERRORS,
    PinnedFile,
    int_attribute,
    structure_problems,
)
from softserve.storage.layout import DATASET_FILE
from softserve.storage.manifest import FileInfo, load_manifest
from softserve.storage.shards import (
    CODEC_FIELDS,
    MIX_DATASETS,
    Layout,
    dataset_layout,
    shard_layout,
)

#: What :meth:`LabelSetReader.read` returns: sample ids, views, soft (refined) labels,
#: teacher logits, the logits' norms, and (mixed sets only) the mix rows and partners' views.
#: The names are the same for every format version, whatever the datasets are called.
ROW_FIELDS = ("order", "params", SOFT, "logits", NORM, *MIX_DATASETS)
#: Opens of a set that is replaced each time before its files are all open, before giving up.
_OPEN_ATTEMPTS = 3

_T = TypeVar("_T")


def _finite(values: np.ndarray) -> bool:
    """Whether every value is finite: float16 by its exponent bits (all ones: inf or NaN),
    9x faster than np.isfinite on it (20 µs for 256×1000 values)."""
    if values.dtype == np.float16:
        return not values.size or int((values.view(np.uint16) & 0x7C00).max()) < 0x7C00
    return bool(np.isfinite(values).all())


class LabelSetReader:
    """Read access to the label set at ``root`` (which must have a manifest).

    Every file of the set is opened when the reader is made, and checked against the
    manifest's sizes, sha256s, datasets and epochs: a reader reads one version of a set for
    its whole life, whatever happens to the paths later (a set replaced under the same name
    is a new reader; one written in place is an error). The ``digest`` (sha256 of the
    manifest) names that version; the manifest is read again once the files are open, so a
    set replaced meanwhile is opened again rather than served as a mix of two builds under
    one digest.
    """

    def __init__(self, root: str | Path, *, locking: bool | None = None) -> None:
        self.root = Path(root)
        self._hard: np.ndarray | None = None
        self._files: dict[str, PinnedFile] = {}
        for _ in range(_OPEN_ATTEMPTS):
            self.manifest, self.digest = load_manifest(self.root)
            try:
                self._open_all(locking)
            except StoreChanged:
                self.close()
                continue
            except StoreError:
                self.close()
                if load_manifest(self.root)[1] == self.digest:
                    raise
                continue  # replaced while its files were opened: try the new build
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
        #: the soft labels' dataset in this version's files
        self._soft = CODEC_FIELDS[self.version][0]

    def _layouts(self) -> Iterable[tuple[FileInfo, Layout]]:
        """Every file the manifest lists, with the datasets its format gives it."""
        config = self.manifest.config
        codec, mixed = get_codec(config.codec), config.mix is not None
        yield self.manifest.dataset, dataset_layout(config.num_samples, config.image_shape)
        for shard in self.manifest.shards:
            epochs = shard.epoch_stop - shard.epoch_start
            yield shard, shard_layout(
                self.manifest.format_version, epochs, config.num_samples, config.num_classes,
                codec, mixed, config.views.policy,
            )  # fmt: skip

    def _open_all(self, locking: bool | None) -> None:
        """Open and verify every file the manifest lists (see
        :mod:`softserve.storage.integrity`); each shard must hold the epochs it lists."""
        self._files = {}
        for entry, layout in self._layouts():
            pinned = self._files[entry.file] = self._open(entry, locking)
            try:
                problem = next(structure_problems(pinned.handle, layout), None)
                held = tuple(int_attribute(pinned.handle, k) for k in ("epoch_start", "epoch_stop"))
            except H5_ERRORS as exc:
                raise StoreError(f"cannot read {pinned.path} ({brief(exc)}); run "
                                 f"'softserve verify {self.root}'") from None  # fmt: skip
            if problem is not None:
                raise StoreError(
                    f"{pinned.path}: {problem}; the set is refused (run "
                    f"'softserve verify {self.root}')"
                )
            epochs = getattr(entry, "epochs", None)
            if epochs is not None and held != epochs:
                shown = "missing or not integers" if None in held else held
                raise StoreError(
                    f"{entry.file} holds epochs {shown}, the manifest says {epochs}; "
                    f"run 'softserve verify {self.root}'"
                )

    def _open(self, entry: FileInfo, locking: bool | None) -> PinnedFile:
        return PinnedFile.open(self.root, entry, locking)

    def pinned_file(self, name: str) -> PinnedFile:
        """The open, verified file ``name`` of this version (what the server sends when a
        set's files are pulled)."""
        return self._file(name)

    def _file(self, name: str) -> PinnedFile:
        pinned = self._files.get(name)
        if pinned is None:
            raise StoreError(
                f"{self.root} was closed (replaced or removed from the store); reopen it"
            )
        return pinned

    def _read(self, name: str, key: str, index: tuple | slice | np.ndarray) -> np.ndarray:
        """A dataset's rows as stored; callers check the file unchanged (:meth:`_checked`)."""
        try:
            return self._file(name).dataset(key)[index]
        except H5_ERRORS as exc:
            raise StoreError(
                f"cannot read {key!r} from {self.root / name} ({brief(exc)}); "
                f"run 'softserve verify {self.root}'"
            ) from None

    def _checked(self, name: str, read: Callable[[], _T]) -> _T:
        """What ``read()`` read from file ``name``, once the file is shown unchanged since
        its content was verified (one fstat). A file whose ctime alone moved and whose
        content still verifies is reopened, and read again."""
        out = read()
        if self._file(name).unchanged():
            return out
        out = read()
        if not self._file(name).unchanged():
            raise StoreError(f"cannot read {self.root / name}: it keeps changing on disk")
        return out

    def check_files(self) -> None:
        """StoreError when a file of the set changed on disk since it was verified."""
        for pinned in self._files.values():
            pinned.unchanged()

    def images(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Base images [start, stop) by sample id, uint8 (n, C, H, W)."""
        return self._checked(
            DATASET_FILE, lambda: self._read(DATASET_FILE, "images", slice(start, stop))
        )

    def images_at(self, ids: np.ndarray) -> np.ndarray:
        """Base images of sample ids given in increasing order, without repeats."""
        index = np.asarray(ids)
        return self._checked(DATASET_FILE, lambda: self._read(DATASET_FILE, "images", index))

    def hard_labels(self) -> np.ndarray:
        """Hard labels of every sample, int64 (N,), each a class index."""
        if self._hard is None:
            hard = self._checked(
                DATASET_FILE, lambda: self._read(DATASET_FILE, "labels", slice(None))
            )
            outside = (hard < 0) | (hard >= self.config.num_classes)
            if outside.any():
                sample = int(np.flatnonzero(outside)[0])
                raise StoreError(
                    f"{self.root / DATASET_FILE}: hard label {int(hard[sample])} at sample "
                    f"{sample}, outside [0, {self.config.num_classes}); run "
                    f"'softserve verify {self.root}'"
                )
            self._hard = hard
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

        With ``stored_labels``, ``soft`` comes in its codec's parts as stored (keys
        ``soft`` and ``soft_<part>``, see :func:`part_name`), for the job to decode.
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
        if stored_labels and "logits" in fields:
            raise ValueError("logits are not stored; read the norm and recover them")
        name, _ = self.shard_of(epoch)
        rows = self._checked(
            name, lambda: self._rows(epoch, start, stop, fields, label_dtype, stored_labels)
        )
        for field, values in rows.items():
            if values.dtype.kind == "f" and not _finite(values):
                raise StoreError(
                    f"{self.root / name} holds non-finite labels in stored epoch {epoch} "
                    f"({field!r}, rows {start}..{stop}); run 'softserve verify {self.root}'"
                )
        return rows

    def _rows(
        self, epoch: int, start: int, stop: int, fields: list[str],
        label_dtype: np.dtype | type, stored_labels: bool,
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """:meth:`read` without its checks of the file and of the labels' values."""
        name, local = self.shard_of(epoch)
        index = (local, slice(start, stop))
        if stored_labels:
            rest = self._rows(
                epoch, start, stop, [f for f in fields if f != SOFT], label_dtype, False
            )
            if SOFT in fields:
                parts = self._parts(name, self._soft, index)
                rest.update({part_name(SOFT, k): v for k, v in parts.items()})
            return rest
        stored = {"order", "params", *MIX_DATASETS}
        if self.version >= 2:
            stored.add(NORM)
        out: dict[str, np.ndarray] = {f: self._read(name, f, index) for f in fields if f in stored}
        if "order" in out:
            self._check_order(out["order"], name)
        if "mix" in out:
            self._check_order(out["mix"][:, 0], name)
        if self.version == 1:  # the logits stored in the codec beside the soft labels
            if SOFT in fields:
                out[SOFT] = self._decode(name, self._soft, index, label_dtype)
            if "logits" in fields:
                out["logits"] = self._decode(name, "logits", index, label_dtype)
            if NORM in fields:
                logits = self._decode(name, "logits", index, np.float32)
                out[NORM] = np.linalg.norm(logits, axis=-1).astype(np.float32)
        elif {SOFT, "logits"} & set(fields):
            out.update(self._labels(name, index, label_dtype, "logits" in fields, out))
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

    def _labels(
        self, name: str, index: tuple, dtype: np.dtype | type, logits: bool,
        have: dict[str, np.ndarray],
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """Soft labels, and with ``logits`` the teacher's logits t = ‖t‖·(r − β·s/‖s‖)
        recovered from them, their norms and the rows' hard labels."""
        norm = hard = None
        if logits:
            order = have["order"] if "order" in have else self._read(name, "order", index)
            self._check_order(order, name)
            norm = have[NORM] if NORM in have else self._read(name, NORM, index)
            hard = self.hard_labels()[order]
        refinement = self.config.refinement
        soft, teacher = decode_labels(
            self.codec, self.config.num_classes, self._parts(name, self._soft, index),
            hard=hard, norm=norm, alpha=refinement.alpha, beta=refinement.beta, dtype=dtype,
        )  # fmt: skip
        return {SOFT: soft} if teacher is None else {SOFT: soft, "logits": teacher}

    def close(self) -> None:
        for pinned in self._files.values():
            pinned.close()
        self._files.clear()

    def __enter__(self) -> LabelSetReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
