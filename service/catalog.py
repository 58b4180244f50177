"""The label sets a server process offers: discovered in the store, opened, cached.

Only complete, intact label sets are served: a folder needs a valid manifest whose files
match it, each file's sha256 included (hashed once per process and file, see
:mod:`softserve.storage.integrity`). Anything wrong with one set, whatever it raises, makes
that set unhealthy with a one-line reason and leaves the others served. The server rescans
the store every few seconds in the background (never on a request's path), so new sets
appear without a restart and removed ones disappear; a rescan also finds open sets whose
files changed in place, and withdraws them. Each process has its own catalog: h5py handles
are opened after the server forks its workers, never before.

A set is known by its digest (sha256 of its manifest). A set rebuilt under the same name
is a new entry with a new reader; the old entry is not closed but dropped, so a stream
that holds it goes on reading the old files, open since the entry was made, to its end:
one response never mixes two versions. Its handles close when the last such stream ends.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from softserve.errors import SoftserveError, brief
from softserve.storage.layout import label_set_folders
from softserve.storage.manifest import load_manifest
from softserve.storage.open_set import OpenLabelSet

log = logging.getLogger("softserve.catalog")


@dataclass
class CatalogEntry(OpenLabelSet):
    """An open label set as served: withdrawn when a read finds it damaged."""

    failure: str | None = None

    def check_files(self) -> None:
        """Withdraw this version if a file of it changed on disk since it was opened."""
        if self.failure is None:
            try:
                with self.lock:
                    self.reader.check_files()
            except SoftserveError as exc:
                self.withdraw(str(exc))

    def withdraw(self, reason: str) -> None:
        """Stop serving this version of the set: a read found it damaged. A rebuild (a new
        digest) is served again; this version stays withdrawn across rescans."""
        if self.failure is None:
            log.error("withdrawing label set %s: %s", self.name, reason)
            self.failure = reason


class Catalog:
    """Label sets of one store, as of the last :meth:`refresh`."""

    def __init__(self, store: Path, *, image_cache_bytes: int, locking: bool | None) -> None:
        self.store = store
        self.image_cache_bytes = image_cache_bytes
        self.locking = locking
        self.ready = False
        self._sets: dict[str, CatalogEntry] = {}
        self._skipped: dict[str, str] = {}
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Rescan the store: open new or changed label sets, drop gone or broken ones."""
        with self._lock:
            self.ready = self._scan()

    def _scan(self) -> bool:
        """Update the open label sets; False when the store folder is missing. The new
        catalog is built aside and published in one assignment: requests reading it on the
        event loop, meanwhile, see the old one or the new, never one changing under them."""
        if not self.store.is_dir():
            log.warning("store %s does not exist (yet)", self.store)
            return False
        try:
            roots = list(label_set_folders(self.store))
        except OSError as exc:
            log.warning("cannot list store %s: %s", self.store, exc)
            return False
        sets, skipped = dict(self._sets), dict(self._skipped)
        for root in roots:
            try:
                current = sets.get(root.name)
                _, digest = load_manifest(root)
                if current is not None and current.digest == digest:
                    current.check_files()
                    continue
                sets.pop(root.name, None)  # its cached images no longer count
                sets[root.name] = self._open(root, self._cache_left(sets))
            except Exception as exc:  # noqa: BLE001 - one bad set never blocks the others
                reason = str(exc) if isinstance(exc, SoftserveError | OSError) else (
                    f"cannot open {root} ({brief(exc)})"
                )  # fmt: skip
                if skipped.get(root.name) != reason:
                    log.warning("skipping label set %s: %s", root.name, reason,
                                exc_info=not isinstance(exc, SoftserveError | OSError))  # fmt: skip
                skipped[root.name] = reason
                sets.pop(root.name, None)
                continue
            skipped.pop(root.name, None)
            log.info("serving label set %s (digest %s)", root.name, digest[:12])
        names = {root.name for root in roots}
        for name in set(sets) - names:
            log.info("label set %s is gone from the store", name)
            sets.pop(name)
        self._sets, self._skipped = sets, {n: e for n, e in skipped.items() if n in names}
        return True

    def _cache_left(self, sets: dict[str, CatalogEntry]) -> int:
        """What the process's image cache budget leaves after the images ``sets`` hold."""
        held = sum(entry.images.nbytes for entry in sets.values() if entry.images is not None)
        return self.image_cache_bytes - held

    def _open(self, root: Path, image_cache_bytes: int) -> CatalogEntry:
        return CatalogEntry.open(root, image_cache_bytes=image_cache_bytes, locking=self.locking)

    def names(self) -> list[str]:
        """Label sets being served: open, and not withdrawn."""
        return sorted(name for name, entry in self._sets.items() if entry.failure is None)

    def available(self, limit: int = 20) -> str:
        """The served label sets' names, for a message: the first ``limit`` of them."""
        names = self.names()
        if not names:
            return f"the store {self.store} has no label sets"
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        return f"available: {', '.join(names[:limit])}{more}"

    def unhealthy(self) -> dict[str, str]:
        """Label sets not served, and why: withdrawn after a failed read, or skipped."""
        withdrawn = {n: e.failure for n, e in self._sets.items() if e.failure is not None}
        return {**self._skipped, **withdrawn}

    def get(self, name: str) -> CatalogEntry | None:
        return self._sets.get(name)

    def close(self) -> None:
        with self._lock:
            for entry in self._sets.values():
                entry.reader.close()
            self._sets.clear()
