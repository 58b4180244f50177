"""What one server process holds at once: open streams and batch bytes in flight.

A stream is admitted only while fewer than ``max_streams`` are open, and a single-batch
request only while its bytes fit under ``max_bytes``; the others get 503 ``busy`` with a
``Retry-After`` header (the Python client waits and tries again). An admitted stream
reserves the bytes of each group it reads and gives them back once the group is handed
to the connection; when the process is at its cap it waits (backpressure) rather than
failing. Everything here runs on the event loop: no thread touches the counts.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from softserve.service.errors import ApiError


@dataclass
class Limits:
    """Caps of one process, and what is in use now."""

    max_streams: int
    max_bytes: int
    retry_after: int = 1
    streams: int = 0
    bytes: int = 0
    _freed: asyncio.Condition | None = field(default=None, repr=False)

    def busy(self, what: str) -> ApiError:
        return ApiError(
            503, "busy", f"server is at its limit of {what}; retry in {self.retry_after} s",
            headers={"Retry-After": str(self.retry_after)},
        )  # fmt: skip

    def open_stream(self) -> None:
        """Count a new stream in, or refuse it (503 busy)."""
        if self.streams >= self.max_streams:
            raise self.busy(f"{self.max_streams} open streams")
        self.streams += 1

    async def close_stream(self) -> None:
        self.streams -= 1

    def try_reserve(self, wanted: int) -> int:
        """Reserve ``wanted`` bytes (at most the cap) now, or refuse (503 busy)."""
        wanted = min(wanted, self.max_bytes)
        if self.bytes + wanted > self.max_bytes:
            raise self.busy(f"{self.max_bytes >> 20} MB of batches in flight")
        self.bytes += wanted
        return wanted

    async def reserve(self, wanted: int, stop: asyncio.Event) -> int | None:
        """Reserve ``wanted`` bytes (at most the cap), waiting for other requests to give
        some back; None when ``stop`` is set first."""
        wanted = min(wanted, self.max_bytes)
        freed = self._condition()
        async with freed:
            while self.bytes + wanted > self.max_bytes:
                if stop.is_set():
                    return None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(freed.wait(), 0.25)
            self.bytes += wanted
        return wanted

    async def release(self, reserved: int) -> None:
        """Give back reserved bytes and wake the requests waiting for them."""
        self.bytes -= reserved
        freed = self._condition()
        async with freed:
            freed.notify_all()

    def _condition(self) -> asyncio.Condition:
        if self._freed is None:  # made on the event loop that uses it
            self._freed = asyncio.Condition()
        return self._freed


class _Releasing:
    """A response that runs ``release`` once it is sent, or once sending it fails."""

    def __init__(self, *args: Any, release: Callable[[], Awaitable[None]], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)  # type: ignore[misc]
        finally:
            await self._release()


class ReleasingResponse(_Releasing, Response):
    """A batch's response: its bytes count as in flight until it is sent."""


class ReleasingStreamingResponse(_Releasing, StreamingResponse):
    """A stream's response: it holds its slot until it ends, however it ends."""
