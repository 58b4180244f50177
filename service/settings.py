"""Server settings: flags of ``softserve serve`` or ``SOFTSERVE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
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
    rescan_seconds: float = Field(
        2.0, gt=0, description="How often the store is rescanned for new label sets."
    )
    hdf5_locking: bool | None = Field(
        None, description="HDF5 file locking; set false on network filesystems."
    )
    log_level: str = Field("info", description="Log level of the server.")
    shutdown_seconds: float = Field(
        10.0, gt=0, description="On SIGTERM, how long open streams may run before they are cut."
    )
    docs: bool = Field(
        False, description="Serve Swagger UI at /docs (it loads its scripts from a CDN)."
    )
