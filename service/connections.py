"""Limits on what a connection may do before it has sent a request: the part of the
server an unauthenticated client reaches before any route, token check or log line.

uvicorn's httptools protocol (its fast one: h11 is pure Python) sets no limit on the
size of a request head, whose parsing is quadratic in its length (httptools grows a
header's value by concatenation: a 32 MiB header took 2.9 s to parse, 256 MB 98 s), and
arms no timer on a connection until it has answered a request, so a connection that
sends nothing, or a head a byte at a time (slowloris), holds its socket forever, and
enough of them exhaust the process's file descriptors. :class:`GuardedHttpToolsProtocol`
adds three limits, from :class:`ConnectionLimits`:

- a request head (request line and headers) over ``max_head_bytes`` is answered 431 and
  its connection closed, before more of it is parsed (counted per read, so at most one
  read past the limit is parsed: uvloop reads up to 256,000 bytes at a time);
- a connection that has not sent a complete head within ``head_seconds`` of opening, or
  of its last response, is closed (with a 408 when it sent part of one); uvicorn's
  ``timeout_keep_alive`` still closes an idle one sooner, but any byte re-arms that, and
  this timer is not re-armed by bytes; a connection with a request in progress (a long
  stream) has no such timer;
- at most ``max_connections`` connections per process: one more closes the connection
  that has waited longest for a request head (a connection with a request in progress is
  never closed for it; a new one is refused with 503 when every other one has one), so
  half-open connections cannot lock fresh clients out, and the open-file limit is never
  reached by sockets.
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState


@dataclass(frozen=True)
class ConnectionLimits:
    """What a connection may do before its request head is complete."""

    max_head_bytes: int
    head_seconds: float
    max_connections: int


#: Per server (one per process): connections waiting for a request head, longest first.
_waiting: weakref.WeakKeyDictionary[ServerState, dict[GuardedHttpToolsProtocol, None]] = (
    weakref.WeakKeyDictionary()
)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with :class:`ConnectionLimits`; give it to uvicorn as
    ``http=functools.partial(GuardedHttpToolsProtocol, limits=...)``."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ConnectionLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self.waiting = _waiting.setdefault(server_state, {})
        #: bytes of the request head read so far; None while no head is being read
        self.head_bytes: int | None = None
        self.head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()
        if len(self.connections) > self.limits.max_connections:
            oldest = next(iter(self.waiting))
            if oldest is self:
                self._refuse(503, "server is at its connection limit; retry shortly")
            else:
                oldest._stop_waiting()
                oldest.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.head_bytes is None or self.transport.is_closing():
            return
        self.head_bytes += len(data)
        if self.head_bytes > self.limits.max_head_bytes:
            self._refuse(431, f"request head over {self.limits.max_head_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.head_bytes = 0

    def on_headers_complete(self) -> None:
        self.head_bytes = None
        self._stop_waiting()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.cycle.response_complete and not self.transport.is_closing():
            self._await_head()  # nothing pipelined: the next request's head is due

    def _await_head(self) -> None:
        """Start the clock for a request head; the connection is now evictable."""
        self._stop_waiting()
        self.waiting[self] = None
        self.head_timer = self.loop.call_later(self.limits.head_seconds, self._head_late)

    def _stop_waiting(self) -> None:
        self.waiting.pop(self, None)
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_late(self) -> None:
        self.head_timer = None
        if self.head_bytes:
            self._refuse(408, f"request head not received within {self.limits.head_seconds} s")
        else:
            self._stop_waiting()
            self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` (unless a response is under way: then only close) and close
        the connection, reading nothing more of it."""
        self._stop_waiting()
        if self.cycle is None or self.cycle.response_complete:
            body = message.encode()
            self.transport.write(
                b"".join([
                    STATUS_LINE[status], b"content-type: text/plain; charset=utf-8\r\n",
                    b"content-length: %d\r\nconnection: close\r\n" % len(body),
                    b"retry-after: 1\r\n\r\n" if status == 503 else b"\r\n", body,
                ])
            )  # fmt: skip
        self.transport.close()
