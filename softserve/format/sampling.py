"""Which positions of an epoch's order a batch holds, for any batch size, rank and world size.

``batch_size`` is per rank, as a DataLoader's under DDP. Batch ``b`` on rank ``r`` of ``w``
holds positions [(b·w + r)·B, (b·w + r + 1)·B) of the epoch's order: consecutive ranges, so
every read is sequential. The last, partial global batch is dropped by default; with
``drop_last=False`` its positions are split as evenly as possible over the ranks (sizes
differ by at most one), and when it holds fewer samples than there are ranks, each rank
gets one and the last ranks repeat its first samples, as DistributedSampler pads: an empty
batch would make a loss's mean NaN. Either way every rank gets the same number of batches,
so no DDP rank waits on a batch that never comes.

Every epoch has a fixed sample order π_e drawn from the label set's seed
(:func:`epoch_order`); the view and mix parameters of :mod:`softserve.format.augment` come
from their own streams of the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

#: Independent random streams of one (seed, epoch): the order, the views and the mixes.
ORDER_STREAM, VIEW_STREAM, MIX_STREAM = 0, 1, 2


def seeded_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    """The generator of one stream of one epoch of a label set's seed."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, stream])))


def epoch_order(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """The fixed sample order π_e of one epoch (int64, a permutation of range(num_samples))."""
    return seeded_rng(seed, epoch, ORDER_STREAM).permutation(num_samples)


@dataclass(frozen=True)
class Sharding:
    """One rank's view of an epoch: how it is cut into batches."""

    num_samples: int
    batch_size: int
    rank: int = 0
    world_size: int = 1
    drop_last: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        """Batches per epoch on every rank."""
        full, rest = divmod(self.num_samples, self.global_batch)
        return full + (1 if rest and not self.drop_last else 0)

    def positions(self, index: int) -> tuple[int, int]:
        """[start, stop) positions in the epoch's order of batch ``index`` on this rank."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} is outside 0..{len(self) - 1}")
        base = index * self.global_batch
        if base + self.global_batch <= self.num_samples:
            start = base + self.rank * self.batch_size
            return start, start + self.batch_size
        rest = self.num_samples - base
        w, r = self.world_size, self.rank
        if rest < w:
            return base + r % rest, base + r % rest + 1
        return base + (r * rest) // w, base + ((r + 1) * rest) // w

    def schedule(
        self, epoch: int, start: int = 0, epochs: int = 1, step: int = 1
    ) -> Iterator[tuple[int, int]]:
        """(epoch, index) of batches ``start``, ``start + step``, ... counted on from batch
        ``start`` of ``epoch`` through the end of epoch ``epoch + epochs - 1``: one rank's
        batches in order (``step`` 1), or every ``step``-th of them, as one DataLoader worker of
        ``step`` takes them."""
        if step < 1:
            raise ValueError(f"step must be at least 1, got {step}")
        per_epoch = len(self)
        end = (epoch + epochs) * per_epoch
        for position in range(epoch * per_epoch + start, end, step):
            yield divmod(position, per_epoch)


def starved_ranks(sharding: Sharding, name: str | None = None) -> str | None:
    """Why ``sharding`` leaves some rank without a batch (more ranks than samples, or no
    batch an epoch), or None when every rank gets one; the server and the client both refuse
    such a request with this message."""
    if sharding.world_size > sharding.num_samples or len(sharding) == 0:
        return (
            f"batch_size {sharding.batch_size} on {sharding.world_size} rank(s) leaves no batch "
            f"of the {sharding.num_samples} samples{'' if name is None else f' of {name!r}'} "
            "for every rank; lower batch_size "
            "(or world_size)"
        )
    return None
