"""Running the server: uvicorn with N worker processes, settings handed over by environment."""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import logging.config
import os
import resource
import socket
import tempfile
from pathlib import Path

import uvicorn

from softserve.errors import InputError
from softserve.service.auth import load_tokens
from softserve.service.connections import ConnectionLimits, GuardedHttpToolsProtocol
from softserve.service.logs import log_config
from softserve.service.settings import ServiceSettings
from softserve.storage.layout import label_set_folders

log = logging.getLogger("softserve.service")


def check_port(host: str, port: int) -> None:
    """InputError unless ``host:port`` can be listened on now: a port in use is then one
    line and exit 1 from the CLI, not uvicorn's log line and exit 3."""
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise InputError(f"cannot listen on --host {host} ({exc.strerror})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise InputError(
                    f"port {port} on {host} is in use; stop what holds it or pick another "
                    "with --port (or SOFTSERVE_PORT)"
                ) from None
            raise InputError(f"cannot listen on {host}:{port} ({exc.strerror})") from None


def _check_store(store: Path) -> None:
    """Warn at start about a store with nothing to serve: probably a wrong --store."""
    try:
        empty = not any(label_set_folders(store))
    except OSError:
        log.warning("store %s does not exist or cannot be listed: not ready until it can", store)
        return
    if empty:
        log.warning(
            "store %s holds no label sets (folders NAME/ with a manifest.json, written by "
            "'softserve relabel'); new ones are served as they appear",
            store,
        )


def connection_cap(wanted: int) -> int:
    """Raise this process's open-file limit to its hard limit (workers inherit it) and
    return how many connections a process may hold: ``wanted``, at most half the limit,
    so that sockets never take the descriptors the store's files and rescans need."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft == resource.RLIM_INFINITY:
        return wanted
    cap = max(1, min(wanted, soft // 2))
    if cap < wanted:
        log.warning(
            "open-file limit %d: at most %d connections per process (SOFTSERVE_MAX_CONNECTIONS "
            "asks %d); raise the limit (ulimit -n) for more",
            soft, cap, wanted,
        )  # fmt: skip
    return cap


def run(settings: ServiceSettings) -> None:
    """Serve ``settings.store`` until interrupted."""
    if settings.token_file is not None:
        load_tokens(settings.token_file)  # fail now, in one place, not in every worker
    check_port(settings.host, settings.port)
    for name, value in settings.model_dump(exclude_none=True).items():
        os.environ[f"SOFTSERVE_{name.upper()}"] = str(value)
    with contextlib.ExitStack() as cleanup:
        if settings.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            metrics_dir = cleanup.enter_context(
                tempfile.TemporaryDirectory(prefix="softserve-metrics-")
            )
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        _serve(settings)


def _serve(settings: ServiceSettings) -> None:
    logging.config.dictConfig(log_config(settings.log_level))
    if settings.token_file is None:
        log.warning("no --token-file: the API is open to anyone who can reach %s", settings.host)
    else:
        log.info("bearer tokens required (from %s)", settings.token_file)
    log.info("serving %s on http://%s:%d", settings.store, settings.host, settings.port)
    _check_store(settings.store)
    limits = ConnectionLimits(
        max_head_bytes=settings.max_header_kb << 10,
        head_seconds=settings.header_seconds,
        max_connections=connection_cap(settings.max_connections),
    )
    uvicorn.run(
        "softserve.service.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_config=log_config(settings.log_level),
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown_seconds,
        http=functools.partial(GuardedHttpToolsProtocol, limits=limits),  # type: ignore[arg-type]
        timeout_keep_alive=settings.keep_alive_seconds,  # type: ignore[arg-type]
    )
