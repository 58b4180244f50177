"""The HTTP client: label-set metadata, base images, and batches streamed from a server.

Requests are retried with exponential backoff and jitter on connection errors and 5xx
(tenacity), rotating through the server URLs on each failure; a 503 busy is retried after
its Retry-After. Every payload is checked against the CRC-32 the server sent with it
(a stream frame's header, a single payload's ``X-Softserve-CRC32``): a mismatch is a
PayloadError, retried like a cut connection, never a batch. A store error (a damaged or
withdrawn set) is retried only on another URL, which must serve the same version (the
digest travels with every request). A stream cut
mid-epoch, or ended by a server shutting down, is resumed at the first batch not yet
received, so a server restart loses and repeats nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import httpx
import numpy as np
import torch
from pydantic import BaseModel, ValidationError
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    wait_random_exponential,
)

from softserve import __version__
from softserve.client.labelset import LabelSet, RawBatch
from softserve.errors import ClientError, PayloadError, ServerError, first_invalid
from softserve.format.payload import (
    CHECKSUM_HEADER,
    STREAM_MEDIA_TYPE,
    check_crc32,
    decode,
    read_frames,
)
from softserve.format.sampling import Sharding
from softserve.format.schema import LabelSetDetail, LabelSetSummary

log = logging.getLogger("softserve.client")


_Model = TypeVar("_Model", bound=BaseModel)


def _described(model: type[_Model], body: object, what: str) -> _Model:
    """The server's description of ``what`` as ``model``; a ClientError naming the first
    field this client cannot read (a newer server's view policy, say), not a schema dump."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        got = repr(exc.errors()[0].get("input"))
        got = got if len(got) <= 60 else got[:59] + "…"
        raise ClientError(
            f"cannot read the server's {what}: {first_invalid(exc)} (got {got}); "
            f"this client is softserve {__version__}, and a newer server may need a newer one"
        ) from None


@dataclass
class Patience:
    """Failures since the last progress, and when the first of them came."""

    failures: int = 0
    since: float = 0.0
    store_failures: int = 0

    def failed(self, exc: BaseException | None) -> None:
        if self.failures == 0:
            self.since = time.monotonic()
        self.failures += 1
        self.store_failures += _store_failure(exc)

    def progress(self) -> None:
        self.failures = self.store_failures = 0


_STORE_CODES = ("store_error", "withdrawn")


def _store_failure(exc: BaseException | None) -> bool:
    """A server's report that its copy of the set cannot be read: another URL may serve it."""
    if isinstance(exc, PayloadError):
        return exc.from_server
    return isinstance(exc, ClientError) and exc.code in _STORE_CODES


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, PayloadError):  # a cut stream is worth a retry, a server's report not
        return not exc.from_server
    return isinstance(exc, (httpx.TransportError, ServerError))


def _check_url(url: str) -> None:
    """A server URL must say http(s)://host: anything else is a mistake to report now, not a
    connection to retry for a minute."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        parsed, problem = None, str(exc)
    if parsed is not None and parsed.scheme in ("http", "https") and parsed.host:
        return
    if parsed is not None:
        problem = "it needs http:// or https:// and a host"
    raise ClientError(
        f"{url!r} is not a server URL ({problem}), e.g. http://127.0.0.1:8000; for a label "
        "set on this machine use softserve.client.open_local(STORE/NAME) "
        "(softserve train --store STORE)",
        code="bad_url",
    )


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


def _raise_for_status(response: httpx.Response) -> None:
    """ClientError for a 4xx or a store error (retrying cannot help), ServerError for
    other 5xx (it might)."""
    if response.status_code < 400:
        return
    try:
        body = response.json()["error"]
        message, code = body["message"], body["code"]
    except (ValueError, KeyError, TypeError):
        message, code = response.text[:200], None
    if response.status_code >= 500 and code not in _STORE_CODES:
        raise ServerError(
            f"{response.status_code} from {response.request.url}: {message}",
            _retry_after(response),
        )
    raise ClientError(f"{response.status_code} {message}", response.status_code, code)


class Client:
    """A connection to one or more softserve servers holding the same store."""

    def __init__(
        self,
        url: str | Sequence[str],
        token: str | None = None,
        timeout: float = 30.0,
        retry_seconds: float = 60.0,
        retries: int | None = None,
        max_wait: float = 10.0,
    ) -> None:
        self.urls = [url] if isinstance(url, str) else list(url)
        if not self.urls:
            raise ValueError("give at least one server URL")
        for each in self.urls:
            _check_url(each)
        self.token = token
        self.timeout = timeout
        self.retry_seconds = retry_seconds
        self.retries = retries
        self.max_wait = max_wait
        self._current = 0
        self._connection: tuple[int, httpx.Client] | None = None

    @property
    def _http(self) -> httpx.Client:
        """This process's HTTP connection pool: a process forked from this one (a DataLoader
        worker) opens its own rather than share sockets with its parent."""
        if self._connection is None or self._connection[0] != os.getpid():
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            http = httpx.Client(timeout=self.timeout, headers=headers)
            self._connection = (os.getpid(), http)
        return self._connection[1]

    def __getstate__(self) -> dict[str, object]:
        """Settings only: the unpickled client (in a spawned worker) connects afresh."""
        return {**self.__dict__, "_connection": None}

    @property
    def url(self) -> str:
        """The server URL requests go to now."""
        return self.urls[self._current].rstrip("/")

    def _failover(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("request to %s failed (%s); retrying", self.url, exc)
        self._current = (self._current + 1) % len(self.urls)

    def retrying(self, patience: Patience | None = None) -> Retrying:
        """Retry policy: connection errors and 5xx are retried, rotating through the URLs,
        for ``retry_seconds`` after the first failure since the last progress (and at most
        ``retries`` times, when set), waiting what a Retry-After asks; store errors are
        retried on each other URL once. ``patience`` carries that across a stream's
        batches."""
        patience = patience or Patience()
        backoff = wait_random_exponential(multiplier=0.05, max=self.max_wait)

        def retryable(exc: BaseException) -> bool:
            if _store_failure(exc):
                return patience.store_failures < len(self.urls) - 1
            return _retryable(exc)

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            asked = getattr(exc, "retry_after", None)
            if asked is None:
                return backoff(state)
            left = patience.since + self.retry_seconds - time.monotonic()
            return max(0.0, min(asked, left))

        def stop(state: RetryCallState) -> bool:
            if self.retries is not None and patience.failures > self.retries:
                return True
            return time.monotonic() - patience.since > self.retry_seconds

        def give_up(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            raise ClientError(
                f"no server answered for {time.monotonic() - patience.since:.0f} s "
                f"({patience.failures} tries; last: {exc}); tried {', '.join(self.urls)}"
            ) from exc

        return Retrying(
            retry=retry_if_exception(retryable),
            wait=wait,
            stop=stop,
            after=lambda state: patience.failed(state.outcome.exception()),
            before_sleep=self._failover,
            retry_error_callback=give_up,
        )

    def get(self, path: str, params: dict | None = None, payload: bool = False) -> httpx.Response:
        """GET with retries and failover; raises ClientError on 4xx. A ``payload`` (a
        safetensors body) is checked against the CRC-32 the server sent with it: a
        mismatch is a PayloadError, retried like a lost connection."""
        for attempt in self.retrying():
            with attempt:
                response = self._http.get(self.url + path, params=params)
                _raise_for_status(response)
                if payload:
                    check_crc32(response.content, response.headers.get(CHECKSUM_HEADER))
        return response

    @contextlib.contextmanager
    def stream(self, path: str, params: dict) -> Iterator[httpx.Response]:
        """An open streaming GET (no retries: the caller resumes where it stopped)."""
        with self._http.stream("GET", self.url + path, params=params) as response:
            if response.status_code >= 400:
                response.read()
            _raise_for_status(response)
            yield response

    def labelsets(self) -> list[LabelSetSummary]:
        """Complete label sets the server offers."""
        listed = self.get("/v1/labelsets").json()
        return [
            _described(LabelSetSummary, x, f"list of label sets, entry {i}")
            for i, x in enumerate(listed)
        ]

    def labelset(self, name: str, image_cache_mb: int = 2048) -> RemoteLabelSet:
        """One label set by name, with its metadata.

        Base images are fetched once per node into its image cache (or, where that cannot
        be written, once per process into memory) when they fit ``image_cache_mb``;
        otherwise every batch carries its images.
        """
        body = self.get(f"/v1/labelsets/{name}").json()
        detail = _described(LabelSetDetail, body, f"description of label set {name!r}")
        return RemoteLabelSet(self, detail, image_cache_mb)

    def close(self) -> None:
        if self._connection is not None and self._connection[0] == os.getpid():
            self._connection[1].close()
        self._connection = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteLabelSet(LabelSet):
    """A label set on a server: metadata, and batches as views plus labels.

    It is pinned to the version first seen (``digest``): every request names it, and a
    server that holds another build of the set (rebuilt, or a failover target with other
    labels) answers 409, raised as a :class:`ClientError`, never served silently.
    Pickling keeps the connection settings; base images are asked for once per node (the
    node's image cache), and a DataLoader worker maps them from there.
    """

    def __init__(self, client: Client, detail: LabelSetDetail, image_cache_mb: int = 2048) -> None:
        super().__init__(detail, image_cache_mb)
        self.client = client

    def __repr__(self) -> str:
        d = self.detail
        return (
            f"RemoteLabelSet({d.name!r}, samples={d.num_samples}, classes={d.num_classes}, "
            f"epochs={d.epochs}, image_shape={d.image_shape}, url={self.client.url!r})"
        )

    @property
    def _path(self) -> str:
        return f"/v1/labelsets/{self.detail.name}"

    def image_chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Base images and hard labels, one ``GET …/images`` a chunk (at most the server's
        largest batch)."""
        for start, stop in self._image_spans(self.detail.max_batch_size):
            query = {"start": start, "stop": stop, "digest": self.digest}
            response = self.client.get(f"{self._path}/images", query, payload=True)
            tensors = self._checked(response.content)
            yield tensors["images"], tensors["hard"]

    def raw_batches(
        self, epoch: int, sharding: Sharding, start: int = 0, logits: bool = False,
        with_images: bool = False, epochs: int = 1, step: int = 1,
    ) -> Iterator[RawBatch]:  # fmt: skip
        """Batches as received. With ``step`` 1 one stream carries them all, reopened after a
        failure at the first batch not yet yielded; every ``step``-th batch comes by its own
        request (a DataLoader worker's share)."""
        include = self.include(logits, with_images)
        params = {
            "batch_size": sharding.batch_size,
            "rank": sharding.rank,
            "world_size": sharding.world_size,
            "drop_last": str(sharding.drop_last).lower(),
            "include": ",".join(include),
            "label_encoding": "stored",
            "digest": self.digest,
        }
        if step > 1:
            for e, index in sharding.schedule(epoch, start, epochs, step):
                path = f"{self._path}/epochs/{e}/batches/{index}"
                response = self.client.get(path, params, payload=True)
                yield RawBatch(e, index, self._received(response.content))
            return
        per_epoch, end = len(sharding), epoch + epochs
        index = start
        left = max(0, per_epoch * epochs - start)
        patience = Patience()
        for attempt in self.client.retrying(patience):
            if epoch == end:  # cut after the last batch, before the end frame: nothing is lost
                return
            path = f"{self._path}/epochs/{epoch}/stream"
            query = {**params, "start": index, "epochs": end - epoch}
            with attempt, self.client.stream(path, query) as response:
                if (framing := response.headers.get("content-type")) != STREAM_MEDIA_TYPE:
                    raise PayloadError(
                        f"stream of type {framing!r}, not {STREAM_MEDIA_TYPE!r}: a server "
                        "older than this client, whose frames carry no checksum?"
                    )
                chunks = response.iter_bytes()
                for payload in read_frames(chunks):
                    received = self._received(payload)
                    patience.progress()
                    yield RawBatch(epoch, index, received)
                    epoch, index = (epoch + 1, 0) if index + 1 == per_epoch else (epoch, index + 1)
                    left -= 1
                if left:  # an end frame too early: never a short epoch without an error
                    raise PayloadError(f"stream ended {left} batches early")
                for _ in chunks:  # read to the end, so that the connection is reused
                    pass

    def _received(self, payload: bytes | bytearray) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in self._checked(payload).items()}

    def _checked(self, payload: bytes | bytearray) -> dict[str, np.ndarray]:
        """A payload's tensors, after checking it comes from the pinned version."""
        tensors, metadata = decode(payload)
        if metadata.get("digest") != self.digest:
            raise ClientError(
                f"label set {self.name!r} changed: a payload of version "
                f"{str(metadata.get('digest'))[:12]} arrived for pinned version "
                f"{self.digest[:12]}; open the label set again to use the new version",
                code="digest_mismatch",
            )
        return tensors
