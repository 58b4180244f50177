"""Restarts survived: graceful shutdown ends streams with a going-away frame the client
resumes from, and a store error on one server is failed over to a replica of the same
version. (A server SIGKILLed and restarted mid-epoch: test_service.)"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import Server, build_label_set
from test_service import damage

from softserve.client import Client, ClientError
from softserve.client import remote as client_remote
from softserve.errors import GoingAway, PayloadError
from softserve.format.payload import decode, read_frames

BIG = "/v1/labelsets/big"


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 images of 128×128: a batch of 4 is ~200 KB, an epoch of 60 batches ~50 MB."""
    store = tmp_path_factory.mktemp("restarts") / "store"
    build_label_set(store / "big", n=240, h=128, w=128, epochs=1, shard_epochs=1)
    return store


#: One batch per read group, so that a shutdown is seen between any two batches.
SMALL_GROUPS = {"SOFTSERVE_STREAM_READ_MB": "1"}


def test_sigterm_ends_an_open_stream_with_a_going_away_frame(big_store: Path) -> None:
    srv = Server(big_store, env={**SMALL_GROUPS, "SOFTSERVE_SHUTDOWN_SECONDS": "10"}).start()
    try:
        params = {"batch_size": 4, "epochs": 1000, "include": "indices,images"}
        with httpx.stream("GET", srv.url + BIG + "/epochs/0/stream", params=params) as response:
            frames = read_frames(response.iter_bytes())
            decode(next(frames))
            started = time.monotonic()
            srv.proc.terminate()
            received = 0
            with pytest.raises(GoingAway, match="resume at epoch"):
                for payload in frames:
                    decode(payload)
                    received += 1
            assert time.monotonic() - started < 10
        assert srv.proc.wait(timeout=10) == 0
        assert received < 1000 * 60  # it ended early, and cleanly
    finally:
        srv.stop()


def test_server_sigtermed_mid_epoch(big_store: Path) -> None:
    """SIGTERM while the client reads: the stream ends with a going-away frame, the client
    retries until the server is back, resumes where it stopped; the epoch is complete,
    nothing lost or repeated."""
    srv = Server(big_store, env=SMALL_GROUPS).start()
    try:
        with Client(srv.url) as client:
            remote = client.labelset("big", image_cache_mb=0)
            reference = [b.indices.tolist() for b in remote.batches(0, 4)]
            restarted = threading.Thread(target=lambda: (srv.proc.wait(), srv.start()))
            got = []
            for batch in remote.batches(0, 4):
                got.append(batch.indices.tolist())
                if len(got) == 10:
                    srv.proc.terminate()
                    restarted.start()
                time.sleep(0.02)  # a training step: the shutdown comes mid-epoch
            restarted.join()
        assert got == reference
        assert len(got) == 60
        assert "server shutting down" in srv.log.read_text()
    finally:
        srv.stop()


def test_store_error_fails_over_to_a_replica_of_the_same_version(
    big_store: Path, tmp_path: Path
) -> None:
    """Server A's copy is damaged, B holds the same version: the client, given both, reads
    the whole epoch from B. Given A alone, it raises the store error at once."""
    a_store, b_store = tmp_path / "a", tmp_path / "b"
    shutil.copytree(big_store / "big", a_store / "big")
    shutil.copytree(big_store / "big", b_store / "big")
    a, b = Server(a_store).start(), Server(b_store).start()
    try:
        with Client(b.url) as client:
            remote = client.labelset("big", image_cache_mb=0)
            reference = [b.indices.tolist() for b in remote.batches(0, 4)]
        damage(a_store / "big" / "labels-00000.h5")
        with Client([a.url, b.url]) as client:
            remote = client.labelset("big", image_cache_mb=0)
            assert [b.indices.tolist() for b in remote.batches(0, 4)] == reference
            assert client.url == b.url
        with Client(a.url) as client, pytest.raises(ClientError, match="withdrawn"):
            started = time.monotonic()
            list(client.labelset("big", image_cache_mb=0).batches(0, 4))
        assert time.monotonic() - started < 5
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("epochs", [1, 2])
def test_a_stream_cut_before_its_end_frame_keeps_every_batch(
    server: Server, monkeypatch: pytest.MonkeyPatch, epochs: int
) -> None:
    """The connection lost after the last batch but before the end frame: every batch has
    arrived, so the client ends there instead of reopening a stream of no epochs."""
    with Client(server.url) as client:
        labels = client.labelset("tiny")
        sharding = labels.sharding(4)
        reference = [(r.epoch, r.index) for r in labels.raw_batches(1, sharding, epochs=epochs)]

        def cut_before_the_end(chunks, **kwargs):
            yield from read_frames(chunks, **kwargs)
            raise PayloadError("stream ended before its end frame (connection lost?)")

        monkeypatch.setattr(client_remote, "read_frames", cut_before_the_end)
        got = [(r.epoch, r.index) for r in labels.raw_batches(1, sharding, epochs=epochs)]
    assert got == reference and len(got) == epochs * len(sharding)
