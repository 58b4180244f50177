"""Graceful shutdown: open streams learn of a SIGTERM and end with a going-away frame.

uvicorn stops accepting connections on SIGTERM and waits for the open ones to finish, up
to ``timeout_graceful_shutdown``, but does not tell the application. A stream of many
epochs would run into that deadline and be cut. :func:`watch_signals` chains a handler
onto uvicorn's (installed before the app's startup runs) that sets an event; each stream
checks it between read groups and ends with a frame that tells the client to resume
elsewhere (or here, after the restart), so nothing is lost and nothing is cut.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from types import FrameType

log = logging.getLogger("softserve.service")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def watch_signals(stopping: asyncio.Event) -> None:
    """Set ``stopping`` on SIGTERM or SIGINT, then run the server's own handler (uvicorn's).

    Nothing is chained where no such handler is installed, or off the main thread (an
    in-process test client): there is no server to stop gracefully there.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    for sig in _SIGNALS:
        previous = signal.getsignal(sig)
        if not callable(previous) or previous is signal.default_int_handler:
            continue

        def handler(number: int, frame: FrameType | None, previous=previous) -> None:
            if not stopping.is_set():
                log.info("shutting down: ending open streams with a going-away frame")
            loop.call_soon_threadsafe(stopping.set)
            previous(number, frame)

        signal.signal(sig, handler)
