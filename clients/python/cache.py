"""The node's base-image cache: a label-set version's base images in one file per machine,
written once and memory-mapped read-only by every process that uses them.

Without it every DataLoader worker and every rank holds (and, from a server, downloads) its
own copy: at ImageNet-1K IPC 50 (7.5 GB) 8 ranks × 4 workers are 32 downloads and up to
240 GB of memory. With it a node downloads once and holds one copy, in the page cache.

Under ``SOFTSERVE_CACHE_DIR`` (default ``~/.cache/softserve``; ``off`` turns the cache off)
a version is ``STEM = DIGEST16-IMAGES16``, the first 16 hex digits of the set's digest and
of its manifest's ``dataset_sha256``:

* ``STEM.images``: a 4096-byte header (``softserve-images 1``, then JSON: name, digest,
  dataset_sha256, shape), the images as raw uint8 N×C×H×W, the hard labels as little-endian
  int64 (N,);
* ``STEM.lock``: the ``flock`` a process holds while it fills the file, so that the first
  users of a node download once (the others wait, then map what it wrote);
* ``STEM.verified``: the file's identity (device, inode, size, mtime, ctime) when its content
  was last hashed; its own mtime is the version's last use.

The hash is the manifest's ``dataset_sha256`` as the worker computes it (``ImageSet.sha256``):
sha256 of ``json.dumps([[N, C, H, W], class_names])``, then the images' bytes, then the
labels' int64 bytes, which is that JSON followed by the file from byte 4096 on. A file is
filled under a temporary name, hashed as it is written, and renamed into place only when
the hash is the manifest's. A process maps it only after checking its size, its header and
that its identity is the one recorded when it was hashed: no user can set a ctime, so a
file written since (a flipped byte, a truncation, a copy from elsewhere) never matches; it
is hashed again under the lock, and removed and fetched again when the hash is wrong. That
is one ``stat`` per process where a hash would take 5 s per rank at 7.5 GB (sha256 at
1.5 GB/s); what it cannot see is a disk changing bytes without a write.

An unwritable folder, a full disk, or a source whose images are not the manifest's give
None, logged: the caller then holds the images itself, as it did before the cache.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("softserve.client")

ENV = "SOFTSERVE_CACHE_DIR"
HEADER_BYTES = 4096
_MAGIC = b"softserve-images 1\n"
_HASH_BLOCK = 1 << 22
#: Every file the cache writes: STEM.KIND, or a temporary STEM.KIND.tmp-PID.
_FILE = re.compile(r"([0-9a-f]{16}-[0-9a-f]{16})\.(images|verified|lock)(\.tmp-\d+)?")

#: (images, hard labels) of consecutive sample ids, from id 0 on.
Chunks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]
#: st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns
Identity = tuple[int, int, int, int, int]


class Unverified(Exception):
    """A source's images are not what the manifest's ``dataset_sha256`` names."""


def cache_dir() -> Path | None:
    """The cache folder (``SOFTSERVE_CACHE_DIR``, default ``~/.cache/softserve``); None when
    it is ``off``, or off POSIX (the cache needs flock and pread)."""
    value = os.environ.get(ENV, "")
    if value == "off" or os.name != "posix":
        return None
    return Path(value or "~/.cache/softserve").expanduser()


@dataclass(frozen=True)
class Version:
    """One version of a label set's base images: what names, sizes and checks its file."""

    name: str
    digest: str
    dataset_sha256: str
    shape: tuple[int, int, int, int]
    class_names: tuple[str, ...]

    @property
    def stem(self) -> str:
        return f"{self.digest[:16]}-{self.dataset_sha256[:16]}"

    @property
    def image_bytes(self) -> int:
        return int(np.prod(self.shape))

    @property
    def file_bytes(self) -> int:
        return HEADER_BYTES + self.image_bytes + 8 * self.shape[0]

    def key(self) -> dict[str, object]:
        """What a file's header must say to be this version's."""
        return {"digest": self.digest, "dataset_sha256": self.dataset_sha256,
                "shape": list(self.shape)}  # fmt: skip

    def header(self) -> bytes:
        body = json.dumps({"name": self.name, **self.key()}).encode()
        return (_MAGIC + body + b"\n").ljust(HEADER_BYTES, b" ")

    def hasher(self) -> hashlib._Hash:
        """sha256 fed with what comes before the images in ``dataset_sha256``."""
        return hashlib.sha256(json.dumps([list(self.shape), list(self.class_names)]).encode())


def mapped_images(version: Version, chunks: Chunks) -> np.ndarray | None:
    """The version's base images (read-only uint8 N×C×H×W) mapped from the node's cache,
    filled from ``chunks()`` by the first process of the node that needs them; None, logged,
    when the cache cannot hold them."""
    directory = cache_dir()
    if directory is None:
        return None
    path = directory / f"{version.stem}.images"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        images = _open(path, version, rehash=False)
        if images is None:
            with _locked(path.with_suffix(".lock")):
                images = _open(path, version, rehash=True)
                if images is None:
                    _fill(path, version, chunks)
                    images = _open(path, version, rehash=False)
            if images is None:
                raise Unverified(f"{path} changed as soon as it was written")
    except (OSError, Unverified) as exc:
        log.warning(
            "node image cache unusable for %r (%s): this process holds its own copy of the "
            "base images", version.name, exc,
        )  # fmt: skip
        return None
    with contextlib.suppress(OSError):  # the last use; a read-only cache has none
        os.utime(path.with_suffix(".verified"))
    return images


def _identity(st: os.stat_result) -> Identity:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _stamp(path: Path) -> Identity | None:
    """The identity ``path`` was last hashed at, if recorded."""
    try:
        found = json.loads(path.with_suffix(".verified").read_text())
        return tuple(int(x) for x in found)  # type: ignore[return-value]
    except (OSError, ValueError, TypeError):
        return None


def _write_stamp(path: Path, st: os.stat_result) -> None:
    stamp = path.with_suffix(".verified")
    tmp = stamp.with_name(f"{stamp.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_identity(st)))
    os.replace(tmp, stamp)


def _open(path: Path, version: Version, rehash: bool) -> np.ndarray | None:
    """The images of ``path`` mapped, when it is the version's file and verified. None when
    it is missing, or not verified at its identity and ``rehash`` is False; with ``rehash``
    (under the lock) it is hashed, and a damaged or foreign file removed, logged."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        problem = _problem(fd, st, version)
        if problem is None and _identity(st) != _stamp(path):
            if not rehash:
                return None
            problem = _hash_problem(fd, version)
            if problem is None:
                _write_stamp(path, st)
        if problem is not None:
            if rehash:
                log.warning("cache file %s %s: fetching its images again", path, problem)
                path.unlink()
            return None
        mapped = mmap.mmap(fd, version.file_bytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    images = np.frombuffer(mapped, np.uint8, version.image_bytes, HEADER_BYTES)
    return images.reshape(version.shape)


def _problem(fd: int, st: os.stat_result, version: Version) -> str | None:
    """Why the open file is not the version's (its kind, size and header), if it is not."""
    if not stat.S_ISREG(st.st_mode):
        return "is not a plain file"
    if st.st_size != version.file_bytes:
        return f"has {st.st_size} bytes, not {version.file_bytes}"
    head = os.pread(fd, HEADER_BYTES, 0)
    try:
        found = json.loads(head[len(_MAGIC) :]) if head.startswith(_MAGIC) else None
    except ValueError:
        found = None
    if not isinstance(found, dict):
        return "has no softserve-images header"
    if {k: found.get(k) for k in version.key()} != version.key():
        return "is of another version"
    return None


def _hash_problem(fd: int, version: Version) -> str | None:
    """Why the file's content is not what ``dataset_sha256`` names, if it is not."""
    digest = version.hasher()
    offset = HEADER_BYTES
    while block := os.pread(fd, _HASH_BLOCK, offset):
        digest.update(block)
        offset += len(block)
    if digest.hexdigest() != version.dataset_sha256:
        return f"hashes to {digest.hexdigest()[:12]}…, not {version.dataset_sha256[:12]}…"
    return None


def _fill(path: Path, version: Version, chunks: Chunks) -> None:
    """Write the version's file from ``chunks()`` under a temporary name, hashing what it
    writes, and rename it into place when the hash is the manifest's ``dataset_sha256``."""
    for stale in path.parent.glob(f"{path.name}.tmp-*"):  # a killed fill's: none runs now
        stale.unlink(missing_ok=True)
    free = shutil.disk_usage(path.parent).free
    if free < version.file_bytes:
        raise OSError(errno.ENOSPC, f"{free >> 20} MiB free, the images need "
                      f"{version.file_bytes >> 20} MiB")  # fmt: skip
    count = version.shape[0]
    labels = np.empty(count, "<i8")
    digest = version.hasher()
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            out.write(version.header())
            filled = 0
            for images, hard in chunks():
                rows = np.ascontiguousarray(images, np.uint8)
                if rows.shape[1:] != version.shape[1:] or filled + len(rows) > count:
                    raise Unverified(f"images of shape {rows.shape} after {filled}")
                digest.update(rows.data)
                out.write(rows.data)
                labels[filled : filled + len(rows)] = hard
                filled += len(rows)
            if filled != count:
                raise Unverified(f"{filled} images arrived, {count} expected")
            digest.update(labels.data)
            out.write(labels.data)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != version.dataset_sha256:
            raise Unverified(
                f"the images and labels hash to {digest.hexdigest()[:12]}…, the manifest's "
                f"dataset_sha256 is {version.dataset_sha256[:12]}…"
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _write_stamp(path, os.stat(path))


def _lock(lock: Path, blocking: bool) -> int | None:
    """A descriptor holding the exclusive flock of ``lock`` (None when not ``blocking`` and
    another process holds it). A lock file removed meanwhile (by :func:`clear`) is taken
    again by its new file, so two processes never hold two files of one name."""
    import fcntl  # POSIX only, as is the cache (cache_dir)

    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            with contextlib.suppress(FileNotFoundError):
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    return fd
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    fd = _lock(lock, blocking=True)
    assert fd is not None
    try:
        yield
    finally:
        os.close(fd)  # releases the flock


@dataclass(frozen=True)
class Entry:
    """A cached version as ``softserve cache list`` shows it."""

    stem: str
    name: str | None
    digest: str | None
    dataset_sha256: str | None
    bytes: int
    last_used: float | None
    #: whether the file is as it was when hashed (else it is hashed on next use)
    verified: bool


def entries(directory: Path) -> list[Entry]:
    """The versions cached in ``directory``, by last use (the most recent first)."""
    found = []
    for path in directory.glob("*.images"):
        if not _FILE.fullmatch(path.name):
            continue
        try:
            st = path.stat()
            with open(path, "rb") as f:
                head = f.read(HEADER_BYTES)
            header = json.loads(head[len(_MAGIC) :]) if head.startswith(_MAGIC) else {}
        except (OSError, ValueError):
            continue
        header = header if isinstance(header, dict) else {}
        stamp = path.with_suffix(".verified")
        try:
            last_used: float | None = stamp.stat().st_mtime
        except OSError:
            last_used = None
        found.append(Entry(
            stem=path.stem, name=header.get("name"), digest=header.get("digest"),
            dataset_sha256=header.get("dataset_sha256"), bytes=st.st_size, last_used=last_used,
            verified=_stamp(path) == _identity(st),
        ))  # fmt: skip
    return sorted(found, key=lambda e: -(e.last_used or 0))


def clear(directory: Path, name: str | None = None) -> tuple[list[str], list[str]]:
    """Remove the cache's files (only those of label set ``name``, when given): (stems
    removed, stems skipped because a process is filling them). A job that has a file
    mapped keeps reading it; the disk space comes back when it unmaps it."""
    stems: set[str] = set()
    for path in directory.iterdir() if directory.is_dir() else ():
        match = _FILE.fullmatch(path.name)
        if match:
            stems.add(match[1])
    if name is not None:
        stems &= {e.stem for e in entries(directory) if e.name == name}
    removed, busy = [], []
    for stem in sorted(stems):
        lock = directory / f"{stem}.lock"
        fd = _lock(lock, blocking=False)
        if fd is None:
            busy.append(stem)
            continue
        try:
            for path in directory.glob(f"{stem}.*"):
                if _FILE.fullmatch(path.name) and path != lock:
                    path.unlink(missing_ok=True)
            lock.unlink()  # while held: a waiter on it takes the next one (_lock)
        finally:
            os.close(fd)
        removed.append(stem)
    return removed, busy
