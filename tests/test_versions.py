"""One label-set version per job: digests on every response, pinned by the client."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import Server, build_label_set, run_cli

from softserve.client import Client, ClientError
from softserve.errors import StoreError
from softserve.format.codecs import part_name
from softserve.storage import LabelSetReader, read_manifest
from softserve.storage.manifest import write_model
from softserve.storage.writer import shard_info

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
                    raw.epoch % 4, start, stop, ["order", "soft"], stored_labels=True
                )
                assert np.array_equal(raw.tensors["indices"].numpy(), rows["order"])
                assert np.array_equal(raw.tensors["soft"].numpy(), rows[part_name("soft", "")])
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


def _swap_in(current: Path, replacement: Path) -> None:
    """Replace the set at ``current`` by another build, as a rename-swap does."""
    current.rename(current.with_name("old"))
    replacement.rename(current)


def test_a_set_replaced_while_it_opens_is_one_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rename-swap between the manifest's read and the files' opens (two builds of one
    config: same file sizes) gives a reader of the new build, digest and rows alike, never
    the old digest over the new files; a set replaced on every try is a StoreError."""
    store = tmp_path / "store"
    build_label_set(store / "s", seed=0)
    build_label_set(tmp_path / "next" / "s", seed=1)
    with LabelSetReader(store / "s") as first, LabelSetReader(tmp_path / "next" / "s") as second:
        builds = {r.digest: r.read(1, 0, 50)["soft"] for r in (first, second)}
    assert len(builds) == 2
    opened = LabelSetReader._open
    swaps = [tmp_path / "next" / "s"]

    def swap_then_open(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if swaps:
            _swap_in(store / "s", swaps.pop())
        return opened(self, *args, **kwargs)

    monkeypatch.setattr(LabelSetReader, "_open", swap_then_open)
    with LabelSetReader(store / "s") as reader:
        np.testing.assert_array_equal(reader.read(1, 0, 50)["soft"], builds[reader.digest])
        assert reader.digest == second.digest

    def always_swapping(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        old = store / "old"
        (store / "s").rename(store / "tmp")
        old.rename(store / "s")
        (store / "tmp").rename(old)
        return opened(self, *args, **kwargs)

    monkeypatch.setattr(LabelSetReader, "_open", always_swapping)
    with pytest.raises(StoreError, match="replaced 3 times while it was being opened"):
        LabelSetReader(store / "s")


def test_shards_must_hold_the_epochs_the_manifest_says(tmp_path: Path) -> None:
    """Two same-sized shards swapped (or a manifest edited to say so) would serve one epoch's
    labels as another's: the set is refused when opened, and the server skips it."""
    store = tmp_path / "store"
    swapped = build_label_set(store / "swapped")  # 4 epochs, 2 shards of 2
    a, b = swapped / "labels-00000.h5", swapped / "labels-00001.h5"
    assert a.stat().st_size == b.stat().st_size
    a.rename(swapped / "x")
    b.rename(a)
    (swapped / "x").rename(b)
    with pytest.raises(StoreError, match=r"labels-00000.h5: sha256 .* manifest says"):
        LabelSetReader(swapped)
    manifest = read_manifest(swapped)  # a manifest made to match the swapped files' bytes
    shards = [shard_info(swapped / s.file, *s.epochs) for s in manifest.shards]
    write_model(swapped / "manifest.json", manifest.model_copy(update={"shards": shards}))
    with pytest.raises(StoreError, match=r"labels-00000.h5 holds epochs \(2, 4\), the manifest"):
        LabelSetReader(swapped)
    edited = build_label_set(store / "edited")
    manifest = edited / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"epoch_start": 2', '"epoch_start": 3', 1))
    with pytest.raises(StoreError, match=r"shards cover epochs \[\(0, 2\), \(3, 4\)\], the config"):
        LabelSetReader(edited)
    verified = run_cli("verify", edited)
    assert verified.returncode != 0 and "(shards cover epochs [(0, 2), (3, 4)]" in verified.stderr
    build_label_set(store / "good")
    server = Server(store).start()
    try:
        assert [s["name"] for s in httpx.get(server.url + "/v1/labelsets").json()] == ["good"]
        unhealthy = httpx.get(server.url + "/readyz").json()["unhealthy"]
        assert set(unhealthy) == {"edited", "swapped"}
    finally:
        server.stop()
