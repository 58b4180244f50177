"""What one application shares between its requests, and the dependency that hands it out.

:func:`softserve.service.app.create_app` builds one :class:`ServiceState` from its settings
and keeps it as ``app.state.service``; routes and request dependencies take it as
:data:`State`, so nothing they need is captured in a closure.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from softserve.service.auth import load_tokens
from softserve.service.catalog import Catalog
from softserve.service.limits import Limits
from softserve.service.settings import ServiceSettings


@dataclass
class ServiceState:
    """The settings of one application and the objects built from them."""

    settings: ServiceSettings
    #: Bearer tokens from the token file; None on an open server.
    tokens: tuple[bytes, ...] | None
    catalog: Catalog
    limits: Limits
    #: The store's absolute paths (as configured, and resolved), longest first: ``/readyz``
    #: writes them ``STORE`` in the reasons it shows.
    store_paths: list[str]
    #: Set on SIGTERM or SIGINT: open streams end with a going-away frame, new ones get 503.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> ServiceState:
        """The state of a server for ``settings``: its tokens read, its catalog not yet
        scanned (the application's startup does that)."""
        return cls(
            settings=settings,
            tokens=load_tokens(settings.token_file) if settings.token_file else None,
            catalog=Catalog(
                settings.store,
                image_cache_bytes=settings.image_cache_mb << 20,
                locking=settings.hdf5_locking,
            ),
            limits=Limits(
                settings.max_streams, settings.inflight_mb << 20, settings.retry_after_seconds
            ),
            store_paths=sorted(
                {str(settings.store.absolute()), str(settings.store.resolve())},
                key=len,
                reverse=True,
            ),
        )

    @property
    def batch_bytes(self) -> int:
        """The largest response of batch tensors or images, in bytes."""
        return self.settings.batch_mb << 20


async def service_state(request: Request) -> ServiceState:
    """The state of the application serving ``request``."""
    return request.app.state.service


#: A route's or dependency's parameter annotation for the application's state.
State = Annotated[ServiceState, Depends(service_state)]
