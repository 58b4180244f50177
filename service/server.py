"""Running the server: uvicorn with N worker processes, settings handed over by environment."""

from __future__ import annotations

import contextlib
import logging
import logging.config
import os
import tempfile

import uvicorn

from softserve.service.auth import load_tokens
from softserve.service.settings import ServiceSettings

log = logging.getLogger("softserve.service")


def _log_config(level: str) -> dict:
    """uvicorn's own loggers plus softserve's, one line each on stderr."""
    config = dict(uvicorn.config.LOGGING_CONFIG)
    config["loggers"] = {
        **config["loggers"],
        "softserve": {"handlers": ["default"], "level": level.upper(), "propagate": False},
    }
    return config


def run(settings: ServiceSettings) -> None:
    """Serve ``settings.store`` until interrupted."""
    if settings.token_file is not None:
        load_tokens(settings.token_file)  # fail now, in one place, not in every worker
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
    logging.config.dictConfig(_log_config(settings.log_level))
    if settings.token_file is None:
        log.warning("no --token-file: the API is open to anyone who can reach %s", settings.host)
    else:
        log.info("bearer tokens required (from %s)", settings.token_file)
    log.info("serving %s on http://%s:%d", settings.store, settings.host, settings.port)
    uvicorn.run(
        "softserve.service.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_config=_log_config(settings.log_level),
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=settings.shutdown_seconds,
    )
