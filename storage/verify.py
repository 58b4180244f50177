"""Full integrity check of a label set: each file's size and sha256, its structure (the
datasets of its format, with their shapes and dtypes, stored inside the file), and its
content (hard labels that index the classes, finite labels, orders that are permutations)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np

from softserve.errors import StoreError, brief
from softserve.format.codecs import get_codec
from softserve.storage.integrity import int_attribute, structure_problems
from softserve.storage.layout import sha256_file
from softserve.storage.manifest import FileInfo, Manifest, ShardInfo, read_manifest
from softserve.storage.shards import Layout, dataset_layout, shard_layout

#: Problems a file of one kind can have in its content, given it has its format's datasets.
ContentCheck = Callable[[h5py.File], Iterator[str]]


def _check_file(
    root: Path, entry: FileInfo, layout: Layout, content: ContentCheck
) -> Iterator[str]:
    """Size, sha256, structure, then content: each step only if the one before passed."""
    path = root / entry.file
    if path.is_symlink() or not path.is_file():
        kind = "a symbolic link" if path.is_symlink() else "not a plain file"
        yield f"{entry.file}: {kind if path.is_symlink() or path.exists() else 'missing'}"
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
        with h5py.File(path, "r", driver="sec2") as f:
            found = [f"{entry.file}: {problem}" for problem in structure_problems(f, layout)]
            yield from found
            if not found:
                yield from (f"{entry.file}: {problem}" for problem in content(f))
    except Exception as exc:  # noqa: BLE001 - h5py raises many kinds on a file it cannot parse
        yield f"{entry.file}: not a readable HDF5 file ({brief(exc)})"


def _dataset_content(num_classes: int) -> ContentCheck:
    """Hard labels must be class indices."""

    def check(f: h5py.File) -> Iterator[str]:
        hard = f["labels"][...]
        outside = np.flatnonzero((hard < 0) | (hard >= num_classes))
        if len(outside):
            yield (
                f"{len(outside)} hard labels outside [0, {num_classes}), the first "
                f"{int(hard[outside[0]])} at sample {int(outside[0])}"
            )

    return check


def _shard_content(shard: ShardInfo, num_samples: int, layout: Layout) -> ContentCheck:
    """The shard holds the epochs the manifest lists; each stored epoch's order is a
    permutation of the sample ids; every float (labels, norms, mix rows) is finite."""

    def check(f: h5py.File) -> Iterator[str]:
        held = tuple(int_attribute(f, key) for key in ("epoch_start", "epoch_stop"))
        if held != shard.epochs:
            shown = "missing or not integers" if None in held else held
            yield f"holds epochs {shown}, the manifest says {shard.epochs}"
        expected = np.arange(num_samples)
        for local, order in enumerate(f["order"][...]):
            if not np.array_equal(np.sort(order), expected):
                yield f"order of epoch {local} (in the shard) is not a permutation"
        for key, (_, dtype) in layout.items():
            if dtype.kind == "f":
                bad = ~np.isfinite(f[key][...])
                if bad.any():
                    local = int(np.argwhere(bad)[0][0])
                    yield (
                        f"{key!r} holds {int(bad.sum())} non-finite values (NaN or inf), the "
                        f"first in stored epoch {shard.epoch_start + local}"
                    )

    return check


def _shard_layout(manifest: Manifest, shard: ShardInfo) -> Layout:
    config = manifest.config
    return shard_layout(
        manifest.format_version, shard.epoch_stop - shard.epoch_start, config.num_samples,
        config.num_classes, get_codec(config.codec), config.mix is not None, config.views.policy,
    )  # fmt: skip


def verify_label_set(root: Path, progress: Callable[[str], None] | None = None) -> list[str]:
    """Every problem found in the label set at ``root``, a line each; an empty list means
    it is intact."""
    try:
        manifest = read_manifest(root)
    except StoreError as exc:
        return [str(exc)]
    config = manifest.config
    layout = dataset_layout(config.num_samples, config.image_shape)
    problems = list(
        _check_file(root, manifest.dataset, layout, _dataset_content(config.num_classes))
    )
    for shard in manifest.shards:
        if progress is not None:
            progress(shard.file)
        layout = _shard_layout(manifest, shard)
        content = _shard_content(shard, config.num_samples, layout)
        problems.extend(_check_file(root, shard, layout, content))
    return problems
