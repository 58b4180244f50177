"""``softserve pull``: mirror a served label set into a local store, every byte checked.

The set's files come from the server's file route (``GET /v1/labelsets/{name}/files/{file}``),
each request pinned to the version first seen (``digest=``: a set replaced on the server
mid-pull is a 409 and a clear error, never a mix of two builds), and each file is checked
against the manifest's sha256 before it counts. While pulling, nothing under the store is a
label set (a server lists only folders with a ``manifest.json`` at their top)::

    STORE/.NAME.pull/          the staging folder, kept across reruns, locked while in use
      source.json              the server's manifest as fetched: the version being pulled
      NAME/                    the set as it is pulled
        dataset.h5             a complete file, its sha256 checked
        labels-00001.h5.tmp    a partial file, continued with an HTTP Range request
        manifest.json          written last, once every file is checked

``STORE/.NAME.pull/NAME`` is then renamed to ``STORE/NAME`` and the staging folder removed.
A rerun after a cut fetches only what is missing; a rerun after the server's set changed
starts over; ``--out`` already holding the server's version is left as it is.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from softserve.errors import (
    ClientError,
    PayloadError,
    ServerError,
    SoftserveError,
    StoreError,
    brief,
)
from softserve.storage.layout import MANIFEST_FILE, commit, tmp_path
from softserve.storage.manifest import FileInfo, Manifest, load_manifest

#: Called with (bytes of the set on disk, bytes of the whole set) as the pull goes.
Progress = Callable[[int, int], None]
#: What the staging folder keeps of the version being pulled.
SOURCE_FILE = "source.json"
#: Server errors that no retry here can fix: the server cannot read its copy of the set.
_STORE_CODES = ("store_error", "withdrawn")

_T = TypeVar("_T")


@dataclass(frozen=True)
class PullResult:
    """What a pull did."""

    out: Path
    digest: str
    #: Files of the set, its manifest included.
    files: int
    #: Bytes of file content received from the server in this run.
    fetched_bytes: int
    #: ``out`` already held this version: nothing was fetched.
    up_to_date: bool = False
    #: The staging folder held a cut pull of another version, and was emptied.
    restarted: bool = False


def staging_folder(out: Path) -> Path:
    """Where a pull into ``out`` keeps what it has fetched until the set is complete."""
    return out.parent / f".{out.name}.pull"


def pull(
    url: str, labelset: str, out: Path, *, token: str | None = None,
    progress: Progress | None = None, retries: int = 3, timeout: float = 60.0,
) -> PullResult:  # fmt: skip
    """Mirror label set ``labelset`` of the server at ``url`` into ``out`` (STORE/NAME).

    ``retries``: attempts after a cut connection or a 5xx without progress, each continuing
    where the last stopped. ClientError for a refusal (a wrong token, an unknown set, a set
    replaced mid-pull), PayloadError for a file whose sha256 is not the manifest's (it is
    deleted), StoreError for an ``out`` that holds something else or a full disk.
    """
    _check_url(url)
    out = Path(out)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout) as http:
        remote = _Remote(http, url, labelset, retries)
        raw = remote.manifest()
        digest = hashlib.sha256(raw).hexdigest()
        try:
            manifest = Manifest.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ClientError(
                f"{url} sent a manifest for {labelset!r} that this softserve cannot read "
                f"({'.'.join(map(str, first['loc']))}: {first['msg']}); upgrade softserve"
            ) from None
        files = [manifest.dataset, *manifest.shards]
        held = _held_version(out)
        if held == digest:
            return PullResult(out, digest, len(files) + 1, 0, up_to_date=True)
        if held is not None:
            raise StoreError(
                f"--out {out} holds another label set (version {held[:12]}; {labelset!r} on "
                f"{url} is {digest[:12]}); choose another --out, or remove it to replace it"
            )
        remote.digest = digest
        staging = staging_folder(out)
        try:
            with _locked(staging, out):
                restarted = _prepare(staging, out.name, raw)
                fetched = _fetch_all(remote, staging / out.name, files, progress)
                _finish(staging, out, raw)
        except OSError as exc:
            raise _write_failed(exc, staging) from None
    return PullResult(out, digest, len(files) + 1, fetched, restarted=restarted)


def _check_url(url: str) -> None:
    """ClientError now for a URL that names no HTTP server, rather than a failed connection."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise ClientError(f"{url!r} is not a server URL; give http(s)://HOST:PORT", code="bad_url")


def _held_version(out: Path) -> str | None:
    """The digest of the label set at ``out``; None when there is nothing there (no such
    path, or an empty folder). StoreError for anything else."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    try:
        return load_manifest(out)[1]
    except StoreError as exc:
        raise StoreError(
            f"--out {out} exists and is not a label set ({exc}); choose another --out"
        ) from None


@contextlib.contextmanager
def _locked(staging: Path, out: Path) -> Iterator[None]:
    """The staging folder, made if need be and locked: one pull into ``out`` at a time."""
    try:
        staging.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot write into {out.parent} ({exc.strerror})") from None
    fd = os.open(staging, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"another pull into {out} is running (it holds {staging})") from None
        yield
    finally:
        os.close(fd)


def _prepare(staging: Path, name: str, raw: bytes) -> bool:
    """Make the staging folder hold the version of manifest ``raw``: a cut pull of another
    version (or of none known) is emptied first. True when something was emptied."""
    source, staged = staging / SOURCE_FILE, staging / name
    kept = source.is_file() and source.read_bytes() == raw
    restarted = not kept and staged.exists()
    if not kept:
        shutil.rmtree(staged, ignore_errors=True)
        _write(source, raw)
    staged.mkdir(exist_ok=True)
    return restarted


def _write(path: Path, data: bytes) -> None:
    """Write a small file atomically and durably."""
    tmp = tmp_path(path)
    tmp.write_bytes(data)
    commit(tmp, path)


@dataclass
class _Part:
    """A file being fetched: its bytes so far under the temporary name, and their sha256."""

    path: Path
    size: int = 0
    sha256: hashlib._Hash = field(default_factory=hashlib.sha256)

    @classmethod
    def resume(cls, path: Path) -> _Part:
        """What an earlier run left of the file at ``path``, hashed again."""
        part = cls(path)
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
            while block := f.read(1 << 22):
                part.sha256.update(block)
                part.size += len(block)
        return part

    def restart(self) -> None:
        self.path.write_bytes(b"")
        self.size, self.sha256 = 0, hashlib.sha256()


def _fetch_all(
    remote: _Remote, staged: Path, files: list[FileInfo], progress: Progress | None
) -> int:
    """Fetch every file of the set into ``staged`` that is not there complete; the bytes
    received."""
    total = sum(f.size for f in files)
    done = 0
    parts: dict[str, _Part] = {}
    for info in files:
        final = staged / info.file
        if final.is_file() and _Part.resume(final).sha256.hexdigest() == info.sha256:
            done += info.size
            continue
        final.unlink(missing_ok=True)
        part = parts[info.file] = _Part.resume(tmp_path(final))
        if part.size > info.size:
            part.restart()
        done += part.size
    free = shutil.disk_usage(staged).free
    if total - done > free:
        raise StoreError(
            f"pulling {remote.name!r} needs {(total - done) / 2**20:.1f} MiB more, and "
            f"{free / 2**20:.1f} MiB are free under {staged.parent.parent}; free space and rerun"
        )
    if progress is not None:
        progress(done, total)
    fetched = 0
    for info in files:
        part = parts.get(info.file)
        if part is None:
            continue

        def advance(n: int) -> None:
            """``n`` bytes more on disk (fewer, when a file starts over)."""
            nonlocal done, fetched
            done, fetched = done + n, fetched + max(n, 0)
            if progress is not None:
                progress(done, total)

        remote.fetch(info, part, advance)
        if part.sha256.hexdigest() != info.sha256:
            part.path.unlink()
            raise PayloadError(
                f"{info.file} from {remote.url} has sha256 {part.sha256.hexdigest()[:12]}…, "
                f"the manifest says {info.sha256[:12]}… (damaged on the way); it was deleted: "
                "rerun to fetch it again"
            )
        commit(part.path, staged / info.file)
    return fetched


def _finish(staging: Path, out: Path, raw: bytes) -> None:
    """Write the manifest last, rename the complete set into place, drop the staging."""
    staged = staging / out.name
    _write(staged / MANIFEST_FILE, raw)
    try:
        os.rename(staged, out)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        raise StoreError(
            f"--out {out} was filled by something else during the pull; the pulled set is "
            f"kept in {staged}"
        ) from None
    dir_fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    shutil.rmtree(staging)


class _Remote:
    """One label set's files on one server, each request pinned to one version."""

    def __init__(self, http: httpx.Client, url: str, name: str, retries: int) -> None:
        self.http, self.url, self.name, self.retries = http, url, name, retries
        #: The version every file is asked for (None until the manifest is read).
        self.digest: str | None = None

    def _path(self, file: str) -> str:
        return f"/v1/labelsets/{quote(self.name, safe='')}/files/{quote(file, safe='')}"

    def manifest(self) -> bytes:
        """The set's manifest.json, as the server has it."""

        def get() -> bytes:
            response = self.http.get(self._path(MANIFEST_FILE))
            if response.status_code != 200:
                raise self._refusal(response)
            return response.content

        return self._retrying(get, lambda: 0)

    def fetch(self, info: FileInfo, part: _Part, advance: Callable[[int], None]) -> None:
        """Append the rest of file ``info`` to ``part``, continuing after a cut with a Range
        request from the bytes already there."""

        def attempt() -> None:
            self._append(info, part, advance)
            if part.size < info.size:
                raise _Cut(f"the response ended after {part.size} of {info.size} bytes")

        self._retrying(attempt, lambda: part.size)

    def _retrying(self, call: Callable[[], _T], position: Callable[[], int]) -> _T:
        """``call()``, tried again after a cut or a 5xx, after a pause, until ``retries``
        tries in a row fail without moving ``position()``; then a ClientError saying that a
        rerun resumes."""
        failures = 0
        while True:
            mark = position()
            try:
                return call()
            except (httpx.TransportError, _Cut, ServerError) as exc:
                failures = 1 if position() > mark else failures + 1
                if failures > self.retries:
                    raise ClientError(
                        f"{self.url} failed {failures} times in a row while pulling "
                        f"{self.name!r} ({brief(exc)}); what was fetched is kept: rerun the "
                        "same command to resume"
                    ) from None
                wait = exc.retry_after if isinstance(exc, ServerError) else None
                time.sleep(min(wait or 2.0 ** (failures - 1), 10.0))

    def _append(self, info: FileInfo, part: _Part, advance: Callable[[int], None]) -> None:
        """Append what one response sends of file ``info`` after ``part``'s bytes."""
        ranged = {"Range": f"bytes={part.size}-"} if part.size else {}
        params = {"digest": self.digest}
        with self.http.stream("GET", self._path(info.file), params=params, headers=ranged) as r:
            if r.status_code not in (200, 206):
                r.read()
                raise self._refusal(r)
            if r.status_code == 200 and part.size:  # the range was not honoured: all again
                advance(-part.size)
                part.restart()
            elif r.status_code == 206 and not r.headers.get("content-range", "").startswith(
                f"bytes {part.size}-"
            ):
                raise ClientError(
                    f"{self.url} answered a range of {info.file} other than the one asked for "
                    f"({r.headers.get('content-range')!r})"
                )
            with open(part.path, "ab") as f:
                for chunk in r.iter_bytes():
                    if part.size + len(chunk) > info.size:
                        raise PayloadError(f"{info.file} from {self.url} is longer than listed")
                    f.write(chunk)
                    part.sha256.update(chunk)
                    part.size += len(chunk)
                    advance(len(chunk))

    def _refusal(self, response: httpx.Response) -> SoftserveError:
        """The error for an answer other than the file: ServerError (worth a retry) for a
        5xx that may pass, ClientError for the rest."""
        status = response.status_code
        try:
            body = response.json()["error"]
            message, code = str(body["message"]), str(body["code"])
        except (ValueError, KeyError, TypeError):
            message, code = response.text[:200] or response.reason_phrase, None
        if status >= 500 and code not in _STORE_CODES:
            try:
                wait = float(response.headers["retry-after"])
            except (KeyError, ValueError):
                wait = None
            return ServerError(f"{status} {message}", wait)
        if status in (401, 403):
            hint = "; pass the server's bearer token with --token (or SOFTSERVE_TOKEN)"
        elif status == 409:
            hint = (
                f"; {self.name!r} on {self.url} was replaced during the pull, whose files would "
                "mix two versions: rerun to pull the new one"
            )
        elif status == 404 and code == "not_found":
            hint = f"; the server at {self.url} serves no label-set files (an older softserve?)"
        else:
            hint = ""
        return ClientError(f"{status} from {self.url}: {message}{hint}", status, code)


def _write_failed(exc: OSError, staging: Path) -> StoreError:
    """A failed write into the staging folder as one line: what failed, and that a rerun
    resumes."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    reason = "the disk is full" if full else brief(exc)
    return StoreError(
        f"writing into {staging} failed: {reason}; what was fetched is kept: free space (or "
        "fix the path) and rerun the same command to resume"
    )


class _Cut(Exception):
    """A response that ended before the file's last byte."""
