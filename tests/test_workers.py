"""The loader inside a DataLoader with workers: every batch once, in order, resumable."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from conftest import Server
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from softserve.client import Batch, Client, Loader, open_local

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
BATCH_SIZE, EPOCHS = 6, 2  # tiny: 50 samples, 8 batches an epoch


def keys(batches: list[Batch]) -> list[tuple[int, int]]:
    return [(b.epoch, b.index) for b in batches]


def assert_same(got: list[Batch], expected: list[Batch]) -> None:
    assert keys(got) == keys(expected)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
        assert torch.equal(a.soft, b.soft) and torch.equal(a.hard, b.hard)


@pytest.fixture(scope="module")
def direct(store: Path) -> list[Batch]:
    """The batches of the loader iterated in this process: what every DataLoader must give."""
    return list(open_local(store / "tiny").loader(BATCH_SIZE, epochs=EPOCHS))


def data_loader(loader: Loader, workers: int, context: str | None, stateful: bool = False):
    kind = StatefulDataLoader if stateful else DataLoader
    return kind(
        loader, batch_size=None, num_workers=workers,
        multiprocessing_context=context if workers else None,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("workers", "context"), [(0, None), (2, "fork"), (3, "fork"), (2, "spawn"), (3, "spawn")]
)
def test_local_loader_in_workers(store: Path, direct: list[Batch], workers, context) -> None:
    """Worker w takes batches w, w + n, ...: each batch once, in the direct order."""
    loader = open_local(store / "tiny").loader(BATCH_SIZE, epochs=EPOCHS)
    got = list(data_loader(loader, workers, context))
    assert len(got) == len(direct) == EPOCHS * 8
    assert_same(got, direct)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_remote_loader_in_workers(server: Server, direct: list[Batch], context: str) -> None:
    """A used client (open connection) pickles and forks: each worker connects afresh."""
    with Client(server.url) as client:
        labels = client.labelset("tiny")
        next(labels.batches(0, BATCH_SIZE))  # the pool now holds a connection
        loader = labels.loader(BATCH_SIZE, epochs=EPOCHS)
        assert pickle.loads(pickle.dumps(loader)).labelset.base_images() is not None
        assert_same(list(data_loader(loader, 3, context)), direct)


@pytest.mark.parametrize(("workers", "stop"), [(0, 5), (2, 5), (2, 8), (3, 13)])
def test_stateful_data_loader_resumes_exactly(
    store: Path, direct: list[Batch], workers: int, stop: int
) -> None:
    """torchdata's StatefulDataLoader keeps each worker's loader state: a new job restored
    from it yields exactly the batches not yet yielded."""
    first_job = data_loader(
        open_local(store / "tiny").loader(BATCH_SIZE, epochs=EPOCHS), workers, "fork", True
    )
    first = []
    for batch in first_job:
        first.append(batch)
        if len(first) == stop:
            break
    state = first_job.state_dict()
    second_job = data_loader(
        open_local(store / "tiny").loader(BATCH_SIZE, epochs=EPOCHS), workers, "fork", True
    )
    second_job.load_state_dict(state)
    assert_same(first + list(second_job), direct)


def test_a_worker_state_needs_the_same_workers(store: Path) -> None:
    """A worker's state resumed outside a DataLoader (or with other workers) is refused."""
    loader = open_local(store / "tiny").loader(BATCH_SIZE, epochs=EPOCHS)
    state = {**loader.state_dict(), "batch": 3, "worker": (1, 2)}
    loader.load_state_dict(state)
    with pytest.raises(ValueError, match="same num_workers"):
        next(iter(loader))


def test_ranks_times_workers_partition_the_epoch(store: Path) -> None:
    """Two ranks with three workers each: every sample of an epoch exactly once."""
    seen = []
    for rank in range(2):
        loader = open_local(store / "tiny").loader(5, epochs=1, rank=rank, world_size=2)
        batches = list(data_loader(loader, 3, "fork"))
        assert keys(batches) == [(0, i) for i in range(5)]
        seen += [i for b in batches for i in b.indices.tolist()]
    assert sorted(seen) == list(range(50))


def test_batch_moves_every_tensor(direct: list[Batch]) -> None:
    """``batch.to(device)`` after the DataLoader moves every tensor and keeps the rest."""
    batch = direct[3]
    moved = batch.to("meta")
    assert (moved.epoch, moved.index, moved.logits) == (batch.epoch, batch.index, None)
    for name in ("indices", "images", "params", "hard", "soft"):
        assert getattr(moved, name).device.type == "meta"
        assert getattr(moved, name).shape == getattr(batch, name).shape
    assert batch.images.device.type == "cpu"
