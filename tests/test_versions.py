"""One label-set version per job: digests on every response, pinned by the client."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import Server, build_label_set

from softserve.client import Client, ClientError
from softserve.client.codecs import part_name
from softserve.storage import LabelSetReader

BATCH = 5


def wait_for_digest(server: Server, name: str, digest: str) -> None:
    """Until the server's rescan lists ``name`` at ``digest``."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listed = {s["name"]: s["digest"] for s in httpx.get(server.url + "/v1/labelsets").json()}
        if listed.get(name) == digest:
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} never reached digest {digest[:12]}")


def test_digest_is_on_every_response(tmp_path: Path) -> None:
    root = build_label_set(tmp_path / "store" / "s")
    with LabelSetReader(root) as reader:
        digest = reader.digest
    server = Server(tmp_path / "store").start()
    try:
        url = server.url + "/v1/labelsets/s"
        assert httpx.get(url).json()["digest"] == digest
        assert httpx.get(server.url + "/v1/labelsets").json()[0]["digest"] == digest
        for path in ("/epochs/0/batches/0?batch_size=5", "/images?start=0&stop=3"):
            response = httpx.get(url + path)
            assert response.headers["x-softserve-digest"] == digest
            header = response.content[8 : 8 + int.from_bytes(response.content[:8], "little")]
            assert f'"digest":"{digest}"' in header.decode()
        mismatch = httpx.get(url + "/epochs/0/batches/0", params={"batch_size": 5, "digest": "ab"})
        assert mismatch.status_code == 409 and mismatch.json()["error"]["code"] == "digest_mismatch"
    finally:
        server.stop()


def test_replacing_a_set_mid_stream_never_mixes_versions(tmp_path: Path) -> None:
    """A stream open when its set is rebuilt (another seed, fewer samples) finishes on the
    version it started with, every frame; new requests of the old version get 409, and a
    new client sees the new version."""
    store = tmp_path / "store"
    build_label_set(store / "s", seed=0)
    build_label_set(tmp_path / "next" / "s", seed=1, n=20)
    old = LabelSetReader(store / "s")
    server = Server(store).start()
    try:
        with Client(server.url, retries=1) as client:
            remote = client.labelset("s")
            assert remote.digest == old.digest
            sharding = remote.sharding(BATCH)
            frames = remote.raw_batches(0, sharding, epochs=12)  # 120 frames
            received = [next(frames) for _ in range(15)]
            (store / "s").rename(tmp_path / "s-old")
            (tmp_path / "next" / "s").rename(store / "s")
            with LabelSetReader(store / "s") as new:
                wait_for_digest(server, "s", new.digest)
                new_digest = new.digest
            received += list(frames)
            assert len(received) == 12 * len(sharding)
            for raw in received:
                start, stop = sharding.positions(raw.index)
                rows = old.read(
                    raw.epoch % 4, start, stop, ["order", "refined"], stored_labels=True
                )
                assert np.array_equal(raw.tensors["indices"].numpy(), rows["order"])
                assert np.array_equal(raw.tensors["soft"].numpy(), rows[part_name("refined", "")])
            with pytest.raises(ClientError, match="rebuilt, or this server holds another build"):
                list(remote.batches(0, BATCH))
            assert client.labelset("s").digest == new_digest != old.digest
    finally:
        server.stop()
        old.close()


def test_failover_to_another_build_is_refused(tmp_path: Path) -> None:
    """Server B holds another build of the set: the client fails over to it when A dies,
    and refuses its labels instead of training on them."""
    build_label_set(tmp_path / "a" / "s", seed=0)
    build_label_set(tmp_path / "b" / "s", seed=1)
    a, b = Server(tmp_path / "a").start(), Server(tmp_path / "b").start()
    try:
        with Client([a.url, b.url], retries=3, max_wait=0.1) as client:
            remote = client.labelset("s")
            assert len(list(remote.batches(0, BATCH))) == 10
            a.kill()
            with pytest.raises(ClientError, match="409"):
                list(remote.batches(1, BATCH))
    finally:
        a.stop()
        b.stop()


def test_state_dict_of_another_version_is_refused(tmp_path: Path) -> None:
    build_label_set(tmp_path / "one" / "s", seed=0)
    build_label_set(tmp_path / "two" / "s", seed=1)
    one, two = Server(tmp_path / "one").start(), Server(tmp_path / "two").start()
    try:
        with Client(one.url) as c1, Client(two.url) as c2:
            first = c1.labelset("s").loader(BATCH, epochs=2)
            batches = iter(first)
            next(batches)
            state = first.state_dict()
            batches.close()
            assert state["digest"] == c1.labelset("s").digest
            other = c2.labelset("s").loader(BATCH, epochs=2)
            with pytest.raises(ValueError, match="digest"):
                other.load_state_dict(state)
            same = c1.labelset("s").loader(BATCH, epochs=2)
            same.load_state_dict(state)
            assert (same.epoch, same.batch) == (state["epoch"], state["batch"])
    finally:
        one.stop()
        two.stop()
