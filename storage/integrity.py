"""What a reader trusts in a label set's files, checked before any label leaves them.

Label sets are untrusted input (a store filled by copies, pulls and imports): a file is read
only once three things hold.

* **Content.** Its sha256 is the manifest's, hashed through a descriptor that HDF5 then
  opens the file by (``/dev/fd/N``: the same inode, whatever the path names by then), and
  HDF5's own descriptor is checked to be at the identity hashed: a damaged, zeroed or
  truncated byte anywhere, metadata included, is refused before HDF5 parses it. Hashes
  are remembered per process by file identity (device, inode, size, mtime and ctime), so a
  reopen or a rescan of an unchanged file costs one ``fstat``. No user can set a ctime
  (``touch`` and ``utime`` move it to now), so a file written since it was hashed never
  matches its old identity.
* **Structure.** A file holds exactly the datasets of its format, with their shapes and
  dtypes, each a hard link to data inside the file: no soft, external or user-defined
  links, no external storage, no virtual datasets (which read other files), no filter but
  those HDF5 builds in (an unknown one would load a plugin). Nothing in a set reaches
  outside its own files.
* **Stability.** After each read, the file's identity is compared with the one its content
  was verified at (one ``fstat``): a file written in place since the set was opened (a
  ``cp`` over it, a truncation, a zeroed block) is a StoreError, and the server withdraws
  that version rather than serve its new bytes under the old digest. When only the ctime
  moved (the file was unlinked, renamed or chmodded, or written with its mtime set back),
  the content decides: it is hashed again, the file's datasets refreshed (HDF5 drops every
  block of them it cached, in case one was read while the bytes differed) and the read
  repeated.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from softserve.errors import StoreChanged, StoreError, brief
from softserve.storage.manifest import FileInfo
from softserve.storage.shards import Layout

#: What h5py raises on a file whose structure it cannot make sense of.
H5_ERRORS = (OSError, RuntimeError, ValueError, KeyError, TypeError)
#: HDF5's built-in filters (deflate, shuffle, fletcher32, szip, n-bit, scale-offset): any
#: other id is a plugin HDF5 would search its plugin path for.
_BUILTIN_FILTERS = frozenset(range(1, 7))
_HASH_BLOCK = 1 << 22

#: st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns
Identity = tuple[int, int, int, int, int]

_hashed: dict[Identity, str] = {}
_hashed_lock = threading.Lock()


def identity(st: os.stat_result) -> Identity:
    """What tells one state of a file from another without reading it."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _sha256_fd(fd: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while block := os.pread(fd, _HASH_BLOCK, offset):
        digest.update(block)
        offset += len(block)
    return digest.hexdigest()


def _hash(fd: int, found: Identity, path: Path) -> str:
    """The sha256 of ``path``, open at ``fd`` and known to be at ``found``: remembered, or
    hashed now (StoreChanged if the file moves meanwhile)."""
    with _hashed_lock:
        known = _hashed.get(found)
    if known is None:
        known = _sha256_fd(fd)
        if identity(os.fstat(fd)) != found:
            raise StoreChanged(f"{path} changed while it was hashed")
        with _hashed_lock:
            _hashed[found] = known
    return known


class PinnedFile:
    """One HDF5 file of an open label set, pinned to the identity its sha256 was verified
    at; open it with :meth:`open`."""

    def __init__(self, path: Path, entry: FileInfo, handle: h5py.File, found: Identity) -> None:
        self.path = path
        self.entry = entry
        self.handle = handle
        self.identity = found
        self._fd = handle.id.get_vfd_handle()
        self._datasets: dict[str, h5py.Dataset] = {}

    @classmethod
    def open(cls, root: Path, entry: FileInfo, locking: bool | None) -> PinnedFile:
        """Verify ``root/entry.file`` against its manifest entry, then open it in HDF5 by
        way of the descriptor it was hashed through (the same inode, even if the path was
        swapped meanwhile). A symbolic link, a folder or a device in its place is refused:
        a set's files live in its folder."""
        path = root / entry.file
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise StoreError(f"{entry.file} is missing") from None
        except OSError as exc:
            kind = "a symbolic link" if path.is_symlink() else brief(exc)
            raise StoreError(f"cannot open {path} ({kind}): a label set's files are plain "
                             "files in its folder") from None  # fmt: skip
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"{path} is not a plain file")
            found = identity(st)
            if st.st_size != entry.size:
                raise StoreError(f"{entry.file} has {st.st_size} bytes, manifest says {entry.size}")
            digest = _hash(fd, found, path)
            if digest != entry.sha256:
                raise StoreError(
                    f"{path}: sha256 {digest[:12]}…, manifest says {entry.sha256[:12]}… "
                    f"(damaged or changed); run 'softserve verify {root}'"
                )
            handle = _open_hdf5(f"/dev/fd/{fd}", path, locking, root)
        finally:
            os.close(fd)
        pinned = cls(path, entry, handle, found)
        if pinned.current() != found:
            pinned.close()
            raise StoreChanged(f"{path} changed while it was opened")
        return pinned

    def current(self) -> Identity:
        """The identity of the file HDF5 reads, now."""
        return identity(os.fstat(self._fd))

    def dataset(self, key: str) -> h5py.Dataset:
        """A dataset of the file, opened once (looking one up costs more than a small read)."""
        found = self._datasets.get(key)
        if found is None:
            found = self._datasets[key] = self.handle[key]
        return found

    def unchanged(self) -> bool:
        """True when the file is as verified. False when only its ctime moved and its
        content still verifies: its datasets were refreshed, and what was read from it must
        be read again. StoreError when it was written, truncated or replaced in place."""
        now = self.current()
        if now == self.identity:
            return True
        if now[:4] == self.identity[:4] and _hash(self._fd, now, self.path) == self.entry.sha256:
            for dataset in self._datasets.values():
                dataset.refresh()  # HDF5 drops what it cached: it may be of other bytes
            self.identity = now
            return False
        raise StoreError(
            f"cannot read {self.path}: it changed on disk since the set was opened (written, "
            "truncated or overwritten in place); this version is withdrawn. Write a rebuild "
            "into a new folder and rename it into place"
        )

    def close(self) -> None:
        self._datasets.clear()
        self.handle.close()


def _open_hdf5(name: str, path: Path, locking: bool | None, root: Path) -> h5py.File:
    try:
        return h5py.File(name, "r", driver="sec2", locking=locking)
    except H5_ERRORS as exc:
        raise StoreError(
            f"cannot read {path} ({brief(exc)}); run 'softserve verify {root}' and relabel "
            "if it is corrupt"
        ) from None


def structure_problems(handle: h5py.File, layout: Layout) -> Iterator[str]:
    """What in a file breaks its format or reaches outside it, a line each naming the
    dataset; nothing for a file of exactly ``layout``'s datasets, stored in the file."""
    names = list(handle)
    for name in sorted(names, key=lambda n: n not in layout):  # the format's datasets first
        problem = _member_problem(handle, name, layout)
        if problem is not None:
            yield f"{name!r} {problem}"
    for name in layout:
        if name not in names:
            yield f"dataset {name!r} missing"


def _member_problem(handle: h5py.File, name: str, layout: Layout) -> str | None:
    kind = handle.id.links.get_info(name.encode()).type
    if kind == h5py.h5l.TYPE_EXTERNAL:
        link = handle.get(name, getlink=True)
        return f"is an external link to {link.filename}:{link.path} (outside the set)"
    if kind == h5py.h5l.TYPE_SOFT:
        return f"is a soft link to {handle.get(name, getlink=True).path}, not a dataset"
    if kind != h5py.h5l.TYPE_HARD:
        return "is a user-defined link, not a dataset"
    if name not in layout:
        return f"is not part of this file's format (expected {', '.join(layout)})"
    found = handle[name]
    if not isinstance(found, h5py.Dataset):
        return f"is a {type(found).__name__.lower()}, not a dataset"
    plist = found.id.get_create_plist()
    if plist.get_layout() == h5py.h5d.VIRTUAL:
        return "is a virtual dataset: it reads other files"
    if plist.get_external_count():
        outside = plist.get_external(0)[0].decode(errors="replace")
        return f"is stored in another file ({outside}), outside the set"
    filters = {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
    if filters - _BUILTIN_FILTERS:
        return f"needs HDF5 filter plugins {sorted(filters - _BUILTIN_FILTERS)}"
    shape, dtype = layout[name]
    if found.shape != shape or found.dtype != dtype:
        return f"is {found.dtype}{found.shape}, expected {dtype}{shape}"
    return None


def int_attribute(handle: h5py.File, key: str) -> int | None:
    """An integer attribute of the file; None when absent or not one integer (a string,
    an array, an empty value)."""
    if key not in handle.attrs:
        return None
    value = handle.attrs[key]
    if isinstance(value, np.integer | int) and not isinstance(value, bool | np.bool_):
        return int(value)
    return None
