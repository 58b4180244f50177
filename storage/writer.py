"""Writers of the two HDF5 file kinds of a label set: the dataset and the label shards.

Every dataset carries HDF5's fletcher32 checksum per chunk, and files are written in the
HDF5 1.10 file format (superblock version 3), whose superblock, object headers and chunk
indexes carry checksums too; the reader verifies each file's sha256 anyway (see
:mod:`softserve.storage.integrity`). HDF5 1.10 and later read the format: every h5py that
softserve supports (3.9 and later bundle HDF5 1.14 or 2.0), and softserve's reader of any
version. Every file is written under a temporary name, fsynced, and renamed, so a file
under its final name is always whole, which is what makes an interrupted relabel
resumable shard by shard. HDF5 itself must never see a write fail: h5py reports a flush
that fails while closing as a RuntimeError and may crash the process later, when it frees
that file. A shard (256 MiB at most by default) is therefore assembled in memory (HDF5's
core driver) and written in one plain pass, where a full disk is a plain OSError. The
dataset is as large as the images, so it is written by HDF5 straight to its temporary
file instead, after the disk space it needs has been reserved for that file: a disk
without room is then a plain OSError before any content is written.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from pathlib import Path

import h5py
import numpy as np

from softserve.errors import InputError, StoreError
from softserve.format.codecs import Codec, part_name
from softserve.format.labels import SOFT
from softserve.format.payload import ViewKind
from softserve.storage.layout import commit, sha256_file, tmp_path
from softserve.storage.manifest import FORMAT_VERSION, FileInfo, ShardInfo
from softserve.storage.shards import NORM, bytes_per_row, shard_layout

_CHUNK_BYTES = 1 << 16
#: What a dataset file holds besides its chunks, labels and class names, with room to spare
#: (measured: 6 to 8 KiB, and about 16 bytes a chunk of index).
_DATASET_METADATA_BYTES = 16 << 10
_INDEX_BYTES_PER_CHUNK = 32
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: The oldest and newest HDF5 format versions written: 1.10's, whose metadata is
#: checksummed (the default, "earliest", writes superblock 0 and version-1 B-trees, which
#: carry none), and no newer, so that HDF5 1.10 through 2.0 all read what is written.
LIBVER = ("v110", "v110")


def _in_memory(path: Path) -> h5py.File:
    """A new HDF5 file that lives in memory until :func:`_persist` (a shard's)."""
    name = f"{path}.{uuid.uuid4().hex}"  # unique: HDF5 refuses two open files of one name
    return h5py.File(name, "w", driver="core", backing_store=False, track_order=True, libver=LIBVER)


def _persist(f: h5py.File, path: Path) -> None:
    """Write an in-memory file to ``path`` atomically (temporary name, fsync, rename)."""
    f.flush()
    image = f.id.get_file_image()
    f.close()
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as out:
            out.write(image)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    commit(tmp, path)


def bytes_per_epoch(
    num_samples: int, num_classes: int, codec: Codec, mixed: bool = False, views: ViewKind = "rrc"
) -> int:
    """Stored bytes of one epoch of a shard written today (order, views, mixes, labels, norms)."""
    return num_samples * bytes_per_row(FORMAT_VERSION, num_classes, codec, mixed, views)


def chunk_rows_for(num_samples: int, row_bytes: int) -> int:
    """Rows per chunk along the sample axis: about 64 KiB, with N split into chunks of
    equal size (HDF5 allocates a whole chunk for the last, partial one: with chunks of a
    fixed size, up to half of a small label field could be padding)."""
    target = max(16, _CHUNK_BYTES // max(1, row_bytes))
    chunks = -(-num_samples // target)
    return -(-num_samples // chunks)


def file_info(path: Path) -> FileInfo:
    """Name, size and sha256 of a complete file, as the manifest lists it."""
    return FileInfo(file=path.name, size=path.stat().st_size, sha256=sha256_file(path))


def shard_info(path: Path, epoch_start: int, epoch_stop: int) -> ShardInfo:
    """Manifest entry of a complete shard."""
    return ShardInfo(**file_info(path).model_dump(), epoch_start=epoch_start, epoch_stop=epoch_stop)


def write_dataset(
    path: Path,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> FileInfo:
    """Write base images (uint8 N×C×H×W), hard labels and metadata to ``dataset.h5``.

    HDF5 writes the file chunk by chunk from ``images`` straight to its temporary name (no
    copy of the set in memory), into space reserved beforehand; the bytes are those an
    in-memory build of the same file writes."""
    rows = chunk_rows_for(images.shape[0], int(np.prod(images.shape[1:])))
    names = json.dumps(class_names)
    tmp = tmp_path(path)
    try:
        with h5py.File(tmp, "w", track_order=True, libver=LIBVER) as f:
            _reserve(tmp, _dataset_bound(images.shape, rows, len(names.encode())))
            f.create_dataset(
                "images", data=images, dtype=np.uint8, chunks=(rows, *images.shape[1:]),
                fletcher32=True, track_times=False,
            )  # fmt: skip
            f.create_dataset(
                "labels", data=labels.astype(np.int64), chunks=labels.shape, fletcher32=True,
                track_times=False,
            )  # fmt: skip
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["class_names"] = names
            f.attrs["mean"] = np.asarray(mean, dtype=np.float64)
            f.attrs["std"] = np.asarray(std, dtype=np.float64)
        _trim(tmp)
        commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return file_info(path)


def _dataset_bound(shape: tuple[int, ...], rows: int, names_bytes: int) -> int:
    """An upper bound on the size of a dataset file: whole chunks of images (HDF5 stores
    the last one whole too) with their checksums, the labels, the class names and the
    metadata."""
    n, row_bytes = shape[0], int(np.prod(shape[1:]))
    chunks = -(-n // rows)
    images = chunks * (rows * row_bytes + 4 + _INDEX_BYTES_PER_CHUNK)
    return images + 8 * n + 4 + 2 * names_bytes + _DATASET_METADATA_BYTES


def _reserve(path: Path, size: int) -> None:
    """Allocate ``size`` bytes of disk to ``path`` (a plain OSError when the disk lacks
    them), so that HDF5's writes into it cannot fail for space. HDF5 has written only its
    superblock by then, so closing the file after a failure here needs no new space. Where
    the file system cannot allocate ahead, the free space is checked instead."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, size)
    except (AttributeError, OSError) as exc:  # AttributeError: no posix_fallocate (macOS)
        if isinstance(exc, OSError) and exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        if shutil.disk_usage(path.parent).free < size:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
    finally:
        os.close(fd)


def _trim(path: Path) -> None:
    """Cut a closed HDF5 file to the end its superblock records, dropping the reserved
    space HDF5 did not use (superblock version 2 or 3, 8-byte addresses, as ``LIBVER``
    writes: the end-of-file address is bytes 28 to 36)."""
    with open(path, "r+b") as f:
        head = f.read(36)
        if len(head) < 36 or head[:8] != _HDF5_SIGNATURE or head[8] not in (2, 3) or head[9] != 8:
            raise StoreError(f"{path} does not start with an HDF5 1.10 superblock")
        end = int.from_bytes(head[28:36], "little")
        if end > os.fstat(f.fileno()).st_size:
            raise StoreError(f"{path} is shorter than its superblock says ({end} bytes)")
        f.truncate(end)


class ShardWriter:
    """Builds one label shard: a contiguous range of epochs, rows in each epoch's order, in
    the current format (:mod:`softserve.storage.shards`).

    Rows accumulate in NumPy arrays (a shard is 256 MiB at most by default) and become an
    HDF5 file only at :meth:`commit`, so the hot loop never waits on h5py.
    """

    def __init__(
        self,
        path: Path,
        epoch_start: int,
        epoch_stop: int,
        num_samples: int,
        num_classes: int,
        codec: Codec,
        chunk_rows: int,
        mixed: bool = False,
        views: ViewKind = "rrc",
    ) -> None:
        self.path = path
        self.epoch_start = epoch_start
        self.epoch_stop = epoch_stop
        self.codec = codec
        self.num_samples = num_samples
        self.chunk_rows = chunk_rows
        codec.check(num_classes)
        layout = shard_layout(
            FORMAT_VERSION, epoch_stop - epoch_start, num_samples, num_classes, codec, mixed,
            views,
        )
        self._arrays = {name: np.zeros(shape, dtype) for name, (shape, dtype) in layout.items()}

    def write_epoch_plan(
        self, epoch: int, order: np.ndarray, params: np.ndarray,
        mix: dict[str, np.ndarray] | None = None,
    ) -> None:  # fmt: skip
        """Store an epoch's order, its views and (mixed sets) its ``mix`` and
        ``partner_params``, all in order: row j is sample order[j]."""
        local = epoch - self.epoch_start
        self._arrays["order"][local] = order
        self._arrays["params"][local] = params
        for name, rows in (mix or {}).items():
            self._arrays[name][local] = rows

    def write_labels(self, position: int, soft: np.ndarray, norm: np.ndarray) -> None:
        """Store label rows from flat ``position`` (local epoch · N + row) on: GIFT's refined
        labels, float32 (rows, K), encoded in the codec, and the norms ‖t‖ of the teacher's
        logits, (rows,). Rows may span epochs. A row that is not finite is refused: it would
        be served as a target, checksummed and verified like any other."""
        bad = ~(np.isfinite(norm) & np.isfinite(soft).all(axis=1))
        if bad.any():
            epoch, row = divmod(position + int(np.argmax(bad)), self.num_samples)
            count = "1 label row is" if bad.sum() == 1 else f"{int(bad.sum())} label rows are"
            raise InputError(
                f"{count} not finite (NaN or inf), the first at row {row} of epoch "
                f"{self.epoch_start + epoch}: the teacher's logits are NaN or overflow (a "
                "half-precision teacher can overflow: relabel in bf16 or fp32)"
            )
        parts = {part_name(SOFT, k): v for k, v in self.codec.encode(soft).items()}
        for name, values in {**parts, NORM: np.asarray(norm, dtype=np.float32)}.items():
            flat = self._arrays[name].reshape(-1, *values.shape[1:])
            flat[position : position + len(values)] = values

    def commit(self) -> None:
        """Write the shard to disk under its final name, atomically and durably."""
        with _in_memory(self.path) as f:
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["epoch_start"] = self.epoch_start
            f.attrs["epoch_stop"] = self.epoch_stop
            f.attrs["codec"] = self.codec.name
            for name, array in self._arrays.items():
                chunks = (1, self.chunk_rows, *array.shape[2:])
                f.create_dataset(
                    name, data=array, chunks=chunks, fletcher32=True, track_times=False
                )
            _persist(f, self.path)
        self._arrays.clear()

    def abort(self) -> None:
        """Drop the shard; nothing of it reaches the disk."""
        self._arrays.clear()
