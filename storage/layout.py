"""Where each file of a label set lives, and how files become complete atomically."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

DATASET_FILE = "dataset.h5"
MANIFEST_FILE = "manifest.json"
PLAN_FILE = "relabel-plan.json"
TMP_SUFFIX = ".tmp"


def shard_file(index: int) -> str:
    """File name of label shard ``index``."""
    return f"labels-{index:05d}.h5"


def label_set_folders(store: Path) -> Iterator[Path]:
    """The label sets of a store, by name: its folders that hold a manifest (complete or
    not: whether one can be served is the reader's call). OSError if the store cannot be
    listed; an unreadable folder is skipped."""
    for path in sorted(store.iterdir()):
        with contextlib.suppress(OSError):
            if (path / MANIFEST_FILE).is_file():
                yield path


def tmp_path(path: Path) -> Path:
    """Where ``path`` is written before it is complete."""
    return path.with_name(path.name + TMP_SUFFIX)


def commit(tmp: Path, final: Path) -> None:
    """Make a fully written temporary file visible under its final name, durably."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small text file so that readers see the old content or the new, never half."""
    tmp = tmp_path(path)
    tmp.write_text(text)
    commit(tmp, path)


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()
