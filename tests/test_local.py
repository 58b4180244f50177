"""Local label sets: the remote API and the remote tensors, read from the store, no server."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import Server, build_label_set, run_cli
from test_errors import assert_one_line_error

from softserve.client import Batch, Client, ClientError, LabelSet, open_local
from softserve.errors import StoreError

FIELDS = ("epoch", "index", "indices", "images", "params", "hard", "soft", "logits")


def assert_same_batches(local: list[Batch], remote: list[Batch]) -> None:
    """Every field of every batch equal, bit for bit."""
    assert len(local) == len(remote) > 0
    for a, b in zip(local, remote, strict=True):
        for name in FIELDS:
            x, y = getattr(a, name), getattr(b, name)
            if isinstance(x, torch.Tensor):
                assert x.dtype == y.dtype and torch.equal(x, y), name
            else:
                assert x == y, name


@pytest.mark.parametrize("name", ["tiny", "tiny-int8"])
@pytest.mark.parametrize(
    ("epoch", "batch_size", "rank", "world_size", "drop_last"),
    [(0, 8, 0, 1, True), (1, 5, 1, 3, False), (5, 7, 0, 2, True)],  # epoch 5 wraps to 1
)
def test_local_batches_equal_remote(
    store: Path, server: Server, name: str, epoch: int, batch_size: int, rank: int,
    world_size: int, drop_last: bool,
) -> None:  # fmt: skip
    args = dict(rank=rank, world_size=world_size, logits=True, drop_last=drop_last)
    with Client(server.url) as client:
        remote = client.labelset(name)
        served = list(remote.batches(epoch, batch_size, **args))
        with open_local(store / name) as local:
            # the server adds the largest batch it answers; a local set has no such limit
            assert local.detail.max_batch_size is None and remote.detail.max_batch_size
            assert local.detail == remote.detail.model_copy(update={"max_batch_size": None})
            assert_same_batches(list(local.batches(epoch, batch_size, **args)), served)


def test_local_batches_carrying_images_equal_remote(store: Path, server: Server) -> None:
    """With no room for the base-image cache, each batch carries its images: same tensors."""
    with Client(server.url) as client:
        remote = client.labelset("tiny", image_cache_mb=0)
        with open_local(store / "tiny", image_cache_mb=0) as local:
            assert local.base_images() is None and remote.base_images() is None
            raws = local.raw_batches(2, local.sharding(9), with_images=True)
            assert "images" in next(raws).tensors
            assert_same_batches(list(local.batches(2, 9)), list(remote.batches(2, 9)))


def test_local_loader_equals_remote_and_resumes(store: Path, server: Server) -> None:
    with Client(server.url) as client:
        remote = list(client.labelset("tiny").loader(6, epochs=3, logits=True))
    local = open_local(store / "tiny")
    loader = local.loader(6, epochs=3, logits=True)
    assert isinstance(local, LabelSet) and len(loader) == len(remote) == 3 * 8
    first = []
    for batch in loader:
        first.append(batch)
        if len(first) == 11:
            break
    state = loader.state_dict()
    assert (state["epoch"], state["batch"], state["digest"]) == (1, 3, local.digest)
    again = open_local(store / "tiny").loader(6, epochs=3, logits=True)
    again.load_state_dict(state)
    assert_same_batches(first + list(again), remote)
    # a state of another batch layout, or out of range, is refused rather than reread
    with pytest.raises(ValueError, match="drop_last=True, this loader has False"):
        local.loader(6, epochs=3, drop_last=False).load_state_dict(state)
    with pytest.raises(ValueError, match=r"batch 8; an epoch of this loader has batches 0..7"):
        local.loader(6, epochs=3).load_state_dict({**state, "batch": 8})
    older = {k: v for k, v in state.items() if k != "drop_last"}  # saved before it was kept
    local.loader(6, epochs=3).load_state_dict(older)


def test_open_local_errors(tmp_path: Path, store: Path) -> None:
    with pytest.raises(StoreError, match="manifest"):
        open_local(tmp_path)
    with pytest.raises(StoreError):
        open_local(tmp_path / "missing")
    with pytest.raises(ValueError, match="leaves no batch"):
        open_local(store / "tiny").loader(51)


def test_a_rebuilt_set_is_refused_not_mixed(tmp_path: Path) -> None:
    """A worker that reopens the set after it was rebuilt raises; it never mixes versions."""
    root = build_label_set(tmp_path / "store" / "set", n=20)
    local = open_local(root)
    copy = pickle.loads(pickle.dumps(local))  # what a spawned DataLoader worker gets
    assert next(iter(copy.batches(0, 5))).indices.shape == (5,)
    shutil.rmtree(root)
    build_label_set(root, n=20, seed=1)
    fresh = pickle.loads(pickle.dumps(local))
    with pytest.raises(ClientError, match="changed") as info:
        fresh.base_images()
    assert info.value.code == "digest_mismatch"


def test_train_from_a_local_store(store: Path, tmp_path: Path) -> None:
    """``softserve train --store`` needs no server, and trains as a served run does."""
    images = torch.randint(0, 256, (12, 3, 12, 10), dtype=torch.uint8)
    eval_set = tmp_path / "test.pt"
    torch.save({"data": images, "label": torch.arange(12) % 3}, eval_set)
    done = run_cli(
        "train", "--store", store, "--labelset", "tiny", "--epochs", 2, "--batch-size", 8,
        "--eval", eval_set, "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["feed"], result["labelset"]) == ("local", "tiny")
    assert result["steps"] == 2 * 7  # 50 samples: 6 batches of 8 and the last of 2
    base = ["train", "--labelset", "tiny", "--epochs", 1, "--eval", eval_set, "--no-progress"]
    done = run_cli(*base, "--store", store, "--url", "http://127.0.0.1:1")
    assert_one_line_error(done, "--url", "--store", "not both")
    assert_one_line_error(run_cli(*base, "--store", tmp_path), "tiny", "no such file or folder")


def test_a_rank_of_an_uninitialized_job_is_refused(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun (WORLD_SIZE > 1) a loader made before init_process_group would give
    every rank the whole epoch: refused, as DistributedSampler refuses, unless the ranks are
    passed."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with open_local(store / "tiny") as labels:
        with pytest.raises(ValueError, match="not initialized: call init_process_group"):
            labels.loader(8)
        with pytest.raises(ValueError, match="WORLD_SIZE"):
            next(labels.batches(0, 8))
        assert labels.loader(8, rank=1, world_size=2).batches_per_epoch == len(
            labels.sharding(8, 1, 2)
        )


def test_a_world_size_without_rank_never_defaults_to_rank_0(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``world_size=`` alone under torchrun (RANK=1 WORLD_SIZE=2): the rank comes from the
    process group, or the loader is refused as with no arguments; never rank 0, which would
    give both ranks the same batches."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with open_local(store / "tiny") as labels:
        with pytest.raises(ValueError, match="rank 1 of 2 .*not initialized: call init_process"):
            labels.loader(8, world_size=2)
        with pytest.raises(ValueError, match="no rank= was given"):
            next(labels.batches(0, 8, world_size=2))
        monkeypatch.delenv("WORLD_SIZE")  # a RANK above 0 alone says so too
        with pytest.raises(ValueError, match="rank 1 of 1"):
            labels.loader(8, world_size=2)
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
        assert labels.loader(8, world_size=2).sharding.rank == 1
        monkeypatch.undo()
        assert labels.loader(8, world_size=2).sharding.rank == 0  # one process, no torchrun
