"""A training loop's loader over epochs: prefetching, resumable, one request for all.

A background thread receives batches (one stream for all epochs, resumed after failures)
and keeps up to ``prefetch`` of them ready (pinned, for CUDA), so a training step does not
wait on the network. Views are built on the training device by the consuming thread: on
a CPU, building them in the background only takes cores from the training step.

``state_dict()`` names the next batch to yield; a loader restored from it continues with
exactly that batch, so no sample is lost or repeated across a restart of the job or of
the server.

In a ``torch.utils.data.DataLoader`` with ``num_workers`` n (``batch_size=None``: the
loader's items are batches already), worker w takes batches w, w + n, w + 2n, ... of the
rank's sequence, so the DataLoader, which takes one item from each worker in turn, yields
the rank's batches exactly once and in the order a loader iterated directly would. The
loader pickles (``spawn``) and reopens its connection or files in each worker, where it maps
the base images from the node's image cache (:mod:`softserve.client.cache`). Each worker's
``state_dict()`` is its own next batch; torchdata's ``StatefulDataLoader`` keeps one per
worker and resumes exactly (with the same ``num_workers``).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

if TYPE_CHECKING:
    from softserve.client.labelset import Batch, LabelSet

_DONE = object()


class Loader(IterableDataset):
    """Batches of epochs ``[epoch, epochs)`` of a label set (remote or local), for one rank.

    Iterate it directly (it yields ready :class:`Batch` objects, views applied on
    ``device``), or through a DataLoader with workers to build views in other processes
    (then ``device="cpu"``, and ``batch.to("cuda")`` in the loop). ``epochs`` defaults to
    the stored epochs; later epochs wrap around.
    """

    def __init__(
        self,
        labelset: LabelSet,
        batch_size: int,
        *,
        epochs: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        device: torch.device | str = "cpu",
        logits: bool = False,
        drop_last: bool = True,
        prefetch: int = 8,
    ) -> None:
        super().__init__()
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        self.labelset = labelset
        self.sharding = labelset.sharding(batch_size, rank, world_size, drop_last)
        self.epochs = labelset.epochs if epochs is None else epochs
        self.device = torch.device(device)
        self.logits = logits
        self.prefetch = prefetch
        self.epoch = 0
        self.batch = 0
        #: (worker id, workers) when epoch/batch is one DataLoader worker's own next batch
        self.worker: tuple[int, int] | None = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.sharding)

    def __len__(self) -> int:
        """Batches left to yield (by all DataLoader workers together)."""
        remaining_epochs = max(0, self.epochs - self.epoch)
        return remaining_epochs * self.batches_per_epoch - (self.batch if remaining_epochs else 0)

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands: the next batch it will yield."""
        return {
            "labelset": self.labelset.name,
            "digest": self.labelset.digest,
            "epoch": self.epoch,
            "batch": self.batch,
            "batch_size": self.sharding.batch_size,
            "rank": self.sharding.rank,
            "world_size": self.sharding.world_size,
            "drop_last": self.sharding.drop_last,
            "worker": self.worker,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state dict taken with the same label set (the same version of it)
        and batch layout."""
        mine = self.state_dict()
        for key in ("labelset", "digest", "batch_size", "rank", "world_size", "drop_last"):
            theirs = state.get(key, mine[key] if key == "drop_last" else None)  # older: none
            if theirs != mine[key]:
                raise ValueError(
                    f"state dict is for {key}={theirs!r}, this loader has {mine[key]!r}"
                )
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(
                f"state dict is at epoch {epoch} batch {batch}; an epoch of this loader has "
                f"batches 0..{self.batches_per_epoch - 1}"
            )
        self.epoch, self.batch = epoch, batch
        worker = state.get("worker")
        self.worker = None if worker is None else (int(worker[0]), int(worker[1]))

    def _split(self) -> int:
        """Step between this iterator's batches: the DataLoader's workers (1 outside one).

        A fresh loader in worker w moves to its first batch, w batches on; a loader restored
        from that worker's state dict is there already.
        """
        info = get_worker_info()
        mine = None if info is None or info.num_workers == 1 else (info.id, info.num_workers)
        if self.worker is None and mine is not None:
            self._move(mine[0])
        elif self.worker != mine:
            raise ValueError(
                f"this loader's state is DataLoader worker {self.worker}'s (id, workers), "
                f"it runs as {mine or 'no worker'}: resume with the same num_workers, "
                "through torchdata's StatefulDataLoader"
            )
        self.worker = mine
        return 1 if mine is None else mine[1]

    def _move(self, batches: int) -> None:
        """Advance the position by ``batches`` batches."""
        per_epoch = self.batches_per_epoch
        self.epoch, self.batch = divmod(self.epoch * per_epoch + self.batch + batches, per_epoch)

    def _produce(
        self, out: queue.Queue, credits: threading.Semaphore, stop: threading.Event, step: int
    ) -> None:
        """Background: receive batches from the current position on, every ``step``-th,
        until told to stop.

        Each batch is received against a credit, which the consumer hands back once it has
        built the views of a batch it took: the Python work of receiving the next batch
        then overlaps the training step, not the view building (both would want the GIL).
        """
        try:
            with_images = self.labelset.base_images() is None
            if self.epoch >= self.epochs:
                out.put(_DONE)
                return
            raw_batches = self.labelset.raw_batches(
                self.epoch, self.sharding, self.batch, self.logits, with_images,
                epochs=self.epochs - self.epoch, step=step,
            )  # fmt: skip
            with contextlib.closing(raw_batches):
                while True:
                    while not credits.acquire(timeout=0.1):
                        if stop.is_set():
                            return
                    if stop.is_set() or (raw := next(raw_batches, None)) is None:
                        break
                    if self.device.type == "cuda":
                        raw.tensors = {k: v.pin_memory() for k, v in raw.tensors.items()}
                    out.put(raw)
            out.put(_DONE)
        except BaseException as exc:  # handed to the consumer, which raises it
            out.put(exc)

    def __iter__(self) -> Iterator[Batch]:
        step = self._split()
        out: queue.Queue = queue.Queue()
        credits = threading.Semaphore(self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(
            target=self._produce, args=(out, credits, stop, step), name="softserve-prefetch",
            daemon=True,
        )  # fmt: skip
        worker.start()
        try:
            while (item := out.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                batch = self.labelset.to_batch(item, self.device)
                credits.release()
                self.epoch, self.batch = batch.epoch, batch.index
                self._move(step)
                yield batch
        finally:
            stop.set()  # the worker sees it within 0.1 s of waiting for a credit
            worker.join()
