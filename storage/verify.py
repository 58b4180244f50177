"""Full integrity check of a label set: checksums, sizes, shapes and dtypes of every file."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np

from softserve.client.codecs import get_codec
from softserve.errors import StoreError, brief
from softserve.storage.layout import sha256_file
from softserve.storage.manifest import FileInfo, LabelSetConfig, read_manifest
from softserve.storage.shards import Layout as Expected
from softserve.storage.shards import shard_layout


def _dataset_layout(config: LabelSetConfig) -> Expected:
    n = config.num_samples
    return {
        "images": ((n, *config.image_shape), np.dtype(np.uint8)),
        "labels": ((n,), np.dtype(np.int64)),
    }


def _check_file(root: Path, entry: FileInfo, layout: Expected) -> Iterator[str]:
    path = root / entry.file
    if not path.is_file():
        yield f"{entry.file}: missing"
        return
    size = path.stat().st_size
    if size != entry.size:
        yield f"{entry.file}: size {size} bytes, manifest says {entry.size}"
        return
    digest = sha256_file(path)
    if digest != entry.sha256:
        yield f"{entry.file}: sha256 {digest[:12]}…, manifest says {entry.sha256[:12]}…"
        return
    try:
        with h5py.File(path, "r") as f:
            for key, (shape, dtype) in layout.items():
                if key not in f:
                    yield f"{entry.file}: dataset {key!r} missing"
                elif f[key].shape != shape or f[key].dtype != dtype:
                    yield (
                        f"{entry.file}: {key!r} is {f[key].dtype}{f[key].shape}, "
                        f"expected {dtype}{shape}"
                    )
    except OSError as exc:
        yield f"{entry.file}: not a readable HDF5 file ({brief(exc)})"


def _check_orders(root: Path, entry: FileInfo, num_samples: int) -> Iterator[str]:
    """Each stored epoch's order must be a permutation of the sample ids."""
    try:
        with h5py.File(root / entry.file, "r") as f:
            orders = f["order"][...]
    except (OSError, KeyError) as exc:
        yield f"{entry.file}: cannot read 'order' ({brief(exc)})"
        return
    expected = np.arange(num_samples)
    for local, order in enumerate(orders):
        if not np.array_equal(np.sort(order), expected):
            yield f"{entry.file}: order of epoch {local} (in the shard) is not a permutation"


def verify_label_set(root: Path, progress: Callable[[str], None] | None = None) -> list[str]:
    """Every problem found in the label set at ``root``; an empty list means it is intact."""
    try:
        manifest = read_manifest(root)
    except StoreError as exc:
        return [str(exc)]
    config = manifest.config
    problems = list(_check_file(root, manifest.dataset, _dataset_layout(config)))
    for shard in manifest.shards:
        if progress is not None:
            progress(shard.file)
        layout = shard_layout(
            manifest.format_version, shard.epoch_stop - shard.epoch_start, config.num_samples,
            config.num_classes, get_codec(config.codec), config.mix is not None,
        )  # fmt: skip
        found = list(_check_file(root, shard, layout))
        problems.extend(found or _check_orders(root, shard, config.num_samples))
    return problems
