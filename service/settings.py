"""Server settings, read from ``SOFTSERVE_*`` environment variables; ``softserve serve``
has flags for the common ones (store, host, port, workers, token file, image cache, batch
size, log level), which win over the environment. The rest are environment-only."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Everything the server reads at start; each field is also ``SOFTSERVE_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix="SOFTSERVE_", extra="ignore", env_ignore_empty=True
    )

    store: Path = Field(Path("store"), description="Folder holding label sets (STORE/NAME).")
    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port.")
    workers: int = Field(1, ge=1, description="Server processes (uvicorn workers).")
    token_file: Path | None = Field(
        None, description="File of bearer tokens, one per line; unset means open access."
    )
    image_cache_mb: int = Field(
        1024, ge=0, description="Per-process budget for base images kept in memory."
    )
    max_batch_size: int = Field(8192, ge=1, description="Largest batch_size a request may ask.")
    batch_mb: int = Field(
        256, ge=1, description="Largest batch in MB: a label set's max_batch_size follows from it."
    )
    stream_read_mb: int = Field(
        8, ge=1, description="Bytes of batches a stream reads per trip to the disk, in MB."
    )
    inflight_mb: int = Field(
        512, ge=1,
        description="Per process: MB of batches read but not yet sent; streams beyond it wait, "
        "single batches get 503 busy.",
    )  # fmt: skip
    max_streams: int = Field(
        64, ge=1, description="Per process: open streams; more get 503 busy with Retry-After."
    )
    retry_after_seconds: int = Field(
        1, ge=1, description="Retry-After of a 503 busy answer, in seconds."
    )
    rescan_seconds: float = Field(
        2.0, gt=0, description="How often the store is rescanned for new label sets."
    )
    hdf5_locking: bool | None = Field(
        None, description="HDF5 file locking; set false on network filesystems."
    )
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = Field(
        "info", description="Log level of the server, in any case."
    )
    shutdown_seconds: float = Field(
        10.0, gt=0, description="On SIGTERM, how long open streams may run before they are cut."
    )
    docs: bool = Field(
        False, description="Serve Swagger UI at /docs (it loads its scripts from a CDN)."
    )
    max_header_kb: int = Field(
        16, ge=1, le=1024,
        description="Largest request head (request line and headers) in KiB; a longer one "
        "gets 431 and its connection is closed.",
    )  # fmt: skip
    header_seconds: float = Field(
        10.0, gt=0,
        description="How long a connection may take to send a request head, from when it "
        "opens or its last response ends; then it is closed (408 if it sent part of one).",
    )  # fmt: skip
    keep_alive_seconds: float = Field(
        5.0, gt=0, description="An idle connection between requests is closed after this."
    )
    max_connections: int = Field(
        4096, ge=1,
        description="Per process: open connections; one more closes the one waiting longest "
        "for a request head. At most half the open-file limit, which is raised to its hard "
        "limit at start.",
    )  # fmt: skip

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_case_level(cls, value: object) -> object:
        """INFO and Info are info: the level names are case-insensitive, as in logging."""
        return value.lower() if isinstance(value, str) else value
