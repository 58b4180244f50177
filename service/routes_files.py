"""The file route: a label set's files as stored, for ``softserve pull`` to mirror the set.

Only the files its manifest lists and ``manifest.json`` itself are served, by bare name;
any other name (``..``, a temporary, a plan) is 404. A data file's bytes come from the
descriptor the server's reader verified against the manifest (the same inode, whatever the
path names by now) and are read in chunks in the thread pool, the file checked unchanged
after each chunk: a response carries the version its ``ETag`` (the file's sha256) and
``X-Softserve-Digest`` name, or is cut short, never a mix of two. The manifest is read from
disk and sent only while its sha256 is still the set's digest. One byte range a request
(``Range: bytes=a-b``, ``a-``, ``-n``): 206 with ``Content-Range``, 416 past the end.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from softserve.format.schema import ErrorResponse
from softserve.service.catalog import CatalogEntry
from softserve.service.errors import ApiError, openapi_errors
from softserve.service.limits import ReleasingStreamingResponse
from softserve.service.requests import Entry, require_token
from softserve.service.state import State
from softserve.storage.integrity import PinnedFile, identity
from softserve.storage.layout import MANIFEST_FILE
from softserve.storage.manifest import read_json_file

log = logging.getLogger("softserve.service")

#: Bytes read and sent at a time: what one download holds in memory.
CHUNK_BYTES = 1 << 20
FILE_MEDIA_TYPE = "application/octet-stream"
_RANGE = re.compile(r"bytes=(\d*)-(\d*)", re.ASCII | re.IGNORECASE)

_HEADERS = {
    "ETag": {"description": "the file's sha256, quoted", "schema": {"type": "string"}},
    "X-Softserve-Digest": {"description": "the label set's digest", "schema": {"type": "string"}},
    "Accept-Ranges": {"description": "bytes", "schema": {"type": "string"}},
}
_CONTENT_RANGE = {"description": "bytes a-b/size (416: bytes */size)", "schema": {"type": "string"}}
_RESPONSES: dict[int | str, dict] = {
    200: {"content": {FILE_MEDIA_TYPE: {}}, "description": "the file", "headers": _HEADERS},
    206: {
        "content": {FILE_MEDIA_TYPE: {}},
        "description": "the range asked for",
        "headers": {**_HEADERS, "Content-Range": _CONTENT_RANGE},
    },
    416: {
        "model": ErrorResponse,
        "description": "a range that starts past the end of the file",
        "headers": {"Content-Range": _CONTENT_RANGE},
    },
    **openapi_errors(409, 503),
}

router = APIRouter(dependencies=[Depends(require_token)])


@router.get("/v1/labelsets/{name}/files/{file}", response_class=Response, responses=_RESPONSES)
async def get_file(
    state: State,
    entry: Entry,
    file: Annotated[str, Path(description="manifest.json, or a file its manifest lists")],
    range_: Annotated[
        str | None,
        Header(alias="Range", description="One byte range: bytes=a-b, bytes=a- or bytes=-n"),
    ] = None,
) -> Response:
    """One file of the label set as stored, whole or one byte range of it, with its sha256
    as ``ETag``; pass ``digest=`` to get 409 once the set here is another version."""
    if file == MANIFEST_FILE:
        body = await run_in_threadpool(_manifest_bytes, entry)
        span = byte_range(range_, len(body))
        start, stop = span or (0, len(body))
        headers = _headers(entry, entry.digest, span, len(body))
        return Response(body[start:stop], 206 if span else 200, headers, media_type=FILE_MEDIA_TYPE)
    listed = {f.file: f for f in (entry.manifest.dataset, *entry.manifest.shards)}
    info = listed.get(file)
    if info is None:
        raise ApiError(
            404, "unknown_file",
            f"label set {entry.name!r} has no file {file!r}; its files are {MANIFEST_FILE} "
            f"and those its manifest lists",
        )  # fmt: skip
    span = byte_range(range_, info.size)
    start, stop = span or (0, info.size)
    limits = state.limits
    limits.open_stream()  # a download holds a stream's slot (503 busy beyond them)
    try:
        pinned, fd = await run_in_threadpool(_open_pinned, entry, file)
    except BaseException:
        await limits.close_stream()
        raise
    return ReleasingStreamingResponse(
        _chunks(entry, pinned, fd, start, stop), status_code=206 if span else 200,
        headers=_headers(entry, info.sha256, span, info.size), media_type=FILE_MEDIA_TYPE,
        release=limits.close_stream,
    )  # fmt: skip


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """[start, stop) of a file of ``size`` bytes that a ``Range`` header asks for; None (the
    whole file, 200) without one or for one this route ignores (another unit, several
    ranges, a syntax error, as RFC 9110 allows); 416 for a range that starts past the end."""
    found = _RANGE.fullmatch(header.strip()) if header is not None else None
    if found is None or found.groups() == ("", ""):
        return None
    first, last = found.groups()
    try:
        if not first:  # the last n bytes
            suffix = int(last)
            if suffix == 0 or size == 0:
                raise _unsatisfiable(size)
            return max(0, size - suffix), size
        start = int(first)
        end = int(last) if last else None
    except ValueError:  # more digits than Python converts: past the end of any file
        raise _unsatisfiable(size) from None
    if end is not None and end < start:
        return None
    if start >= size:
        raise _unsatisfiable(size)
    return start, size if end is None else min(end + 1, size)


def _unsatisfiable(size: int) -> ApiError:
    return ApiError(
        416, "range_not_satisfiable", f"the file has {size} bytes: a range must start below that",
        headers={"Content-Range": f"bytes */{size}"},
    )  # fmt: skip


def _headers(
    entry: CatalogEntry, sha256: str, span: tuple[int, int] | None, size: int
) -> dict[str, str]:
    """The headers of a file (``span``: the range sent, None: all of it): its version, its
    length and its range."""
    start, stop = span or (0, size)
    headers = {
        "ETag": f'"{sha256}"',
        "X-Softserve-Digest": entry.digest,
        "Accept-Ranges": "bytes",
        "Content-Length": str(stop - start),
    }
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    return headers


def _manifest_bytes(entry: CatalogEntry) -> bytes:
    """The set's manifest as served: 503 while the file on disk is another version's (the
    next rescan opens that one)."""
    try:
        raw = read_json_file(entry.root / MANIFEST_FILE, "manifest")
    except (FileNotFoundError, NotADirectoryError):
        raw = None
    if raw is None or hashlib.sha256(raw).hexdigest() != entry.digest:
        raise ApiError(
            503, "changed",
            f"label set {entry.name!r} changed on disk since it was opened; retry shortly",
            headers={"Retry-After": "1"},
        )  # fmt: skip
    return raw


def _open_pinned(entry: CatalogEntry, file: str) -> tuple[PinnedFile, int]:
    """The reader's verified file ``file`` of ``entry``, and a descriptor of its inode of
    this response's own: 503 when the set is withdrawn (a file of it changed in place)."""
    entry.check_files()
    if entry.failure is not None:
        raise ApiError(503, "withdrawn", f"label set {entry.name!r} is withdrawn: {entry.failure}")
    with entry.lock:
        # The reader keeps its files private; this route reads the very inodes it verified.
        pinned = entry.reader.pinned_file(file)
        return pinned, os.dup(pinned.handle.id.get_vfd_handle())


def _chunks(
    entry: CatalogEntry, pinned: PinnedFile, fd: int, start: int, stop: int
) -> Iterator[bytes]:
    """Bytes [start, stop) of the pinned file, a chunk at a time, each read while the file
    is as it was verified: a file written in place withdraws the version and cuts the
    response (the client's sha256 would refuse it anyway)."""
    try:
        offset = start
        while offset < stop:
            block = os.pread(fd, min(CHUNK_BYTES, stop - offset), offset)
            if identity(os.fstat(fd)) != pinned.identity:
                entry.check_files()  # a change of ctime alone is hashed again, and passes
                if entry.failure is not None:
                    log.error("cutting a download of %s: %s", pinned.path, entry.failure)
                    raise ApiError(503, "withdrawn", entry.failure)
                continue  # the content verified again: read the block again
            if not block:
                raise ApiError(503, "withdrawn", f"{pinned.path} is shorter than verified")
            yield block
            offset += len(block)
    finally:
        os.close(fd)
