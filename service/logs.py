"""The server's log lines: text with an ISO 8601 timestamp on stderr, and the access log as
JSON lines (one object per request, its time included) on stdout, so that a log shipper
can parse the one and a person can read the other."""

from __future__ import annotations

import copy
import json
import logging
from datetime import datetime, timezone

import uvicorn
from uvicorn.logging import DefaultFormatter


def iso_time(created: float) -> str:
    """A log record's time in UTC, ISO 8601 to the millisecond: 2026-11-30T15:12:00.123Z."""
    moment = datetime.fromtimestamp(created, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TextFormatter(DefaultFormatter):
    """uvicorn's level-prefixed lines, with ``%(asctime)s`` in ISO 8601 (UTC)."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return iso_time(record.created)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` first, then the record's fields when it logs a
    dict (the access log does), else its ``level`` and ``message``."""

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.msg, dict):
            fields = record.msg
        else:
            fields = {"level": record.levelname.lower(), "message": record.getMessage()}
        return json.dumps({"time": iso_time(record.created), **fields})


def log_config(level: str) -> dict:
    """uvicorn's loggers and softserve's: text on stderr, ``softserve.access`` JSON on stdout."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["formatters"]["default"] = {
        "()": f"{__name__}.TextFormatter",
        "fmt": "%(asctime)s %(levelprefix)s %(message)s",
        "use_colors": None,
    }
    config["formatters"]["json"] = {"()": f"{__name__}.JsonFormatter"}
    config["handlers"]["json"] = {
        "formatter": "json", "class": "logging.StreamHandler", "stream": "ext://sys.stdout",
    }  # fmt: skip
    config["loggers"] = {
        **config["loggers"],
        "softserve": {"handlers": ["default"], "level": level.upper(), "propagate": False},
        "softserve.access": {"handlers": ["json"], "level": level.upper(), "propagate": False},
    }
    return config
