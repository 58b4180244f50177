"""The HTTP server, started for real in a subprocess, and the client talking to it."""

from __future__ import annotations

import itertools
import json
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import safetensors.numpy
import teachers
import torch
from conftest import TESTS_DIR, Server, build_label_set, run_cli

from softserve.client import Client, ClientError, PayloadError, Sharding, refine_labels
from softserve.client.remote import RawBatch
from softserve.format.codecs import get_codec, part_name
from softserve.format.payload import TENSORS, read_frames
from softserve.service.batches import BatchRequest, read_batches
from softserve.service.catalog import Catalog
from softserve.storage import LabelSetReader

TINY = "/v1/labelsets/tiny"


def test_metadata(server: Server) -> None:
    listed = httpx.get(server.url + "/v1/labelsets").json()
    assert [x["name"] for x in listed] == ["tiny", "tiny-int8"]
    tiny = listed[0]
    assert (tiny["num_samples"], tiny["num_classes"], tiny["epochs"]) == (50, 3, 4)
    assert tiny["image_shape"] == [3, 12, 10] and tiny["codec"] == "fp16"
    assert tiny["teacher"] == "teachers:tiny_rgb"
    detail = httpx.get(server.url + TINY).json()
    assert detail["mean"] == [0.485, 0.456, 0.406] and detail["class_names"] == [
        "ant",
        "bee",
        "cat",
    ]
    assert detail["refinement"] == {"method": "gift", "alpha": 0.1, "beta": 0.1}
    assert detail["views"]["interpolation"] == "bilinear"

    with Client(server.url) as client:
        remote = client.labelset("tiny")
        assert (remote.name, remote.num_samples, remote.num_classes) == ("tiny", 50, 3)
        assert (remote.epochs, remote.image_shape) == (4, (3, 12, 10))
        assert remote.mean == (0.485, 0.456, 0.406) and remote.std == (0.229, 0.224, 0.225)
        assert [s.name for s in client.labelsets()] == ["tiny", "tiny-int8"]


def test_batch_is_plain_safetensors(server: Server, store: Path) -> None:
    """A batch decodes with safetensors alone and holds exactly the stored rows."""
    response = httpx.get(
        server.url + TINY + "/epochs/1/batches/2",
        params={"batch_size": 8, "include": "indices,images,params,hard,soft,logits"},
    )
    assert response.status_code == 200
    tensors = safetensors.numpy.load(response.content)
    assert {k: (v.dtype.name, v.shape) for k, v in tensors.items()} == {
        "indices": ("int64", (8,)),
        "images": ("uint8", (8, 3, 12, 10)),
        "params": ("int16", (8, 5)),
        "hard": ("int64", (8,)),
        "soft": ("float32", (8, 3)),
        "logits": ("float32", (8, 3)),
    }
    with LabelSetReader(store / "tiny") as reader:
        rows = reader.read(1, 16, 24)
        np.testing.assert_array_equal(tensors["indices"], rows["order"])
        np.testing.assert_array_equal(tensors["params"], rows["params"])
        np.testing.assert_array_equal(tensors["soft"], rows["soft"])
        np.testing.assert_array_equal(tensors["images"], reader.images()[rows["order"]])
        np.testing.assert_array_equal(tensors["hard"], reader.hard_labels()[rows["order"]])
    assert response.headers["x-softserve-batches"] == "6"
    few = httpx.get(server.url + TINY + "/epochs/1/batches/2?batch_size=8&include=soft")
    assert set(safetensors.numpy.load(few.content)) == {"soft"}


@pytest.mark.parametrize("name", ["tiny", "tiny-int8"])
def test_labels_as_float16(server: Server, name: str) -> None:
    """label_dtype=float16 halves the label bytes; for the fp16 codec's stored (refined)
    labels it loses nothing; recovered logits are rounded to float16."""
    path = f"/v1/labelsets/{name}/epochs/1/batches/1"
    params = {"batch_size": 8, "include": "soft,logits"}
    wide = safetensors.numpy.load(httpx.get(server.url + path, params=params).content)
    response = httpx.get(server.url + path, params={**params, "label_dtype": "float16"})
    half = safetensors.numpy.load(response.content)
    for key in ("soft", "logits"):
        assert half[key].dtype == np.float16 and half[key].shape == wide[key].shape
        np.testing.assert_array_equal(half[key], wide[key].astype(np.float16))
        if name == "tiny" and key == "soft":  # stored as fp16: widening is exact
            np.testing.assert_array_equal(half[key].astype(np.float32), wide[key])
    bad = httpx.get(server.url + path, params={**params, "label_dtype": "float64"})
    assert bad.status_code == 422 and "label_dtype" in bad.text


@pytest.mark.parametrize("name", ["tiny", "tiny-int8"])
def test_client_receives_labels_as_stored_and_decodes_them(
    server: Server, store: Path, name: str
) -> None:
    """The client asks for labels in their stored form (the codec's parts, and norms in
    place of logits) and decodes them to exactly what the server's own decoding gives."""
    with Client(server.url) as client:
        remote = client.labelset(name)
        (raw, *_) = remote.raw_batches(0, remote.sharding(8), logits=True)
        codec = get_codec(remote.detail.codec)
        names = codec.part_names("soft", remote.num_classes)
        assert set(raw.tensors) == {"indices", "params", "hard", "norm", *names.values()}
        with LabelSetReader(store / name) as reader:
            stored = reader.read(0, 0, 8, ["soft"], stored_labels=True)
            rows = reader.read(0, 0, 8, ["soft", "logits", "norm"])
        for suffix, key in names.items():
            np.testing.assert_array_equal(raw.tensors[key], stored[part_name("soft", suffix)])
        np.testing.assert_array_equal(raw.tensors["norm"], rows["norm"])
        batch = remote.to_batch(raw, "cpu")
        assert batch.soft.dtype == batch.logits.dtype == torch.float32
        torch.testing.assert_close(batch.soft, torch.from_numpy(rows["soft"]), rtol=0, atol=0)
        torch.testing.assert_close(batch.logits, torch.from_numpy(rows["logits"]))


def test_loader_puts_every_tensor_on_the_training_device(server: Server) -> None:
    """Views and targets land on the loader's device. This machine has no GPU: the "meta"
    device stands in for one, so a tensor made on the CPU by mistake fails to mix with it."""
    with Client(server.url) as client:
        remote = client.labelset("tiny")
        loader = remote.loader(8, epochs=1, device="meta", logits=True)
        assert len(loader) == 6
        batches = list(loader)
        assert len(batches) == 6 and len(loader) == 0  # batches left to yield
        for batch in batches:
            assert batch.images.shape == (8, 3, *remote.output_size)
            for t in (batch.images, batch.soft, batch.hard, batch.logits):
                assert t is not None and t.device.type == "meta"
            assert batch.soft.dtype == batch.images.dtype == torch.float32


def test_stream_equals_batches_and_resumes(server: Server) -> None:
    params = {"batch_size": 7, "rank": 1, "world_size": 2, "include": "indices,soft"}
    with httpx.stream("GET", server.url + TINY + "/epochs/2/stream", params=params) as response:
        frames = list(read_frames(response.iter_bytes()))
    assert len(frames) == len(Sharding(50, 7, 1, 2)) == 3
    for index, payload in enumerate(frames):
        single = httpx.get(server.url + TINY + f"/epochs/2/batches/{index}", params=params)
        got, want = safetensors.numpy.load(bytes(payload)), safetensors.numpy.load(single.content)
        assert got.keys() == want.keys()
        for key in got:
            np.testing.assert_array_equal(got[key], want[key])
    later = httpx.get(server.url + TINY + "/epochs/2/stream", params={**params, "start": 2})
    (resumed,) = read_frames(iter([later.content]))
    np.testing.assert_array_equal(
        safetensors.numpy.load(bytes(resumed))["indices"],
        safetensors.numpy.load(bytes(frames[2]))["indices"],
    )


def test_epochs_wrap_around(server: Server) -> None:
    first = httpx.get(server.url + TINY + "/epochs/1/batches/0?batch_size=10&include=indices,soft")
    wrapped = httpx.get(
        server.url + TINY + "/epochs/5/batches/0?batch_size=10&include=indices,soft"
    )
    assert wrapped.headers["x-softserve-stored-epoch"] == "1"
    a, b = safetensors.numpy.load(first.content), safetensors.numpy.load(wrapped.content)
    np.testing.assert_array_equal(a["indices"], b["indices"])
    np.testing.assert_array_equal(a["soft"], b["soft"])


def codec_tolerance(name: str, refined: torch.Tensor, norm: torch.Tensor | None = None):
    """The stated error bound of the label set's codec on the stored refined labels, for
    assert_close; with ``norm``, on the logits recovered from them (the bound times ‖t‖)."""
    scale = norm[:, None] if norm is not None else torch.ones(len(refined), 1)
    if name == "tiny":  # fp16: relative 2^-11 per stored value, plus the teacher's rounding
        bound = 2**-11 * refined.abs().max(1, keepdim=True).values
    else:  # int8: (max - min) / 510 per row
        bound = (refined.max(1, keepdim=True).values - refined.min(1, keepdim=True).values) / 510
    return {"rtol": 0, "atol": (bound * scale * 1.01).max().item() + 1e-5}


@pytest.mark.parametrize("name", ["tiny", "tiny-int8"])
def test_client_labels_match_the_teacher_on_the_client_views(server: Server, name: str) -> None:
    """Every label the client yields is the teacher on the view the client built."""
    teacher = teachers.tiny_rgb().eval()
    with Client(server.url) as client:
        remote = client.labelset(name)
        seen = []
        for epoch in (0, 3):
            for batch in remote.batches(epoch, batch_size=6, logits=True, drop_last=False):
                with torch.no_grad():
                    logits = teacher(batch.images)
                refined = refine_labels(logits, batch.hard)
                tolerance = codec_tolerance(name, refined, logits.norm(dim=1))
                torch.testing.assert_close(batch.logits, logits, **tolerance)
                torch.testing.assert_close(batch.soft, refined, **codec_tolerance(name, refined))
                seen.append(batch.indices)
        assert sorted(torch.cat(seen).tolist()) == sorted(list(range(remote.num_samples)) * 2)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_split_each_epoch_exactly_once(server: Server, world_size: int, drop_last: bool):
    """Every sample once, no batch empty; a tail of fewer samples than ranks (50 = 2·24 + 2
    with 3 ranks of 8) is padded by repeating its first."""
    with Client(server.url) as client:
        remote = client.labelset("tiny")
        per_rank = []
        for rank in range(world_size):
            batches = list(
                remote.batches(1, 8, rank=rank, world_size=world_size, drop_last=drop_last)
            )
            assert all(len(b.indices) for b in batches)
            per_rank.append(torch.cat([b.indices for b in batches]).tolist())
            assert len(batches) == len(Sharding(50, 8, rank, world_size, drop_last))
        assert len({len(Sharding(50, 8, r, world_size, drop_last)) for r in range(world_size)}) == 1
    everything = [i for rank in per_rank for i in rank]
    if drop_last:
        assert len(everything) == len(set(everything))  # nobody sees a sample twice
        assert len(everything) == (50 // (8 * world_size)) * 8 * world_size
    else:
        assert sorted(set(everything)) == list(range(50))
        padded = {1: 0, 2: 0, 3: 1}[world_size]
        assert len(everything) == 50 + padded


@pytest.mark.parametrize("world_size", [2, 3, 5, 8])
@pytest.mark.parametrize("num_samples", [13, 17, 40, 41])
def test_a_partial_last_batch_leaves_no_rank_empty(num_samples: int, world_size: int) -> None:
    """drop_last=False: sizes within one of each other, none empty, every position served,
    and a position twice only where the tail has fewer samples than ranks."""
    for batch_size in (1, 4, 5):
        shards = [Sharding(num_samples, batch_size, r, world_size, False)
                  for r in range(world_size)]  # fmt: skip
        last = len(shards[0]) - 1
        sizes = [stop - start for start, stop in (s.positions(last) for s in shards)]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        served = [p for s in shards for b in range(len(s)) for p in range(*s.positions(b))]
        assert set(served) == set(range(num_samples))
        tail = num_samples % (batch_size * world_size)
        assert len(served) == num_samples + (world_size - tail if 0 < tail < world_size else 0)


def test_loader_resumes_from_a_state_dict(server: Server) -> None:
    with Client(server.url) as client:
        remote = client.labelset("tiny")
        full = [(b.epoch, b.index, b.indices.tolist()) for b in remote.loader(8, epochs=3)]
        assert len(full) == 3 * 6
        loader = remote.loader(8, epochs=3, prefetch=2)
        head = []
        for batch in loader:
            head.append((batch.epoch, batch.index, batch.indices.tolist()))
            if len(head) == 8:
                break
        state = loader.state_dict()
        assert (state["epoch"], state["batch"]) == (1, 2)
        resumed = remote.loader(8, epochs=3)
        resumed.load_state_dict(state)
        assert len(resumed) == len(full) - 8
        tail = [(b.epoch, b.index, b.indices.tolist()) for b in resumed]
    assert head + tail == full
    with pytest.raises(ValueError, match="batch_size"):
        remote.loader(4).load_state_dict(state)


def test_loader_runs_at_most_prefetch_batches_ahead_and_stops(server: Server) -> None:
    with Client(server.url) as client:
        remote = client.labelset("tiny")
        received: list[int] = []
        raw_batches = remote.raw_batches

        def counting(*args: object, **kwargs: object) -> Iterator[RawBatch]:
            for raw in raw_batches(*args, **kwargs):
                received.append(raw.index)
                yield raw

        remote.raw_batches = counting  # type: ignore[method-assign]
        batches = iter(remote.loader(8, epochs=3, prefetch=2))
        for taken in range(1, 5):
            next(batches)
            deadline = time.monotonic() + 30
            while len(received) < taken + 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.05)  # room to overrun, were the bound broken
            assert len(received) == taken + 2
        batches.close()
        assert not [t for t in threading.enumerate() if t.name == "softserve-prefetch"]


def test_errors_are_json_with_a_clear_message(server: Server) -> None:
    def error(path: str, status: int, code: str) -> str:
        response = httpx.get(server.url + path)
        assert response.status_code == status, response.text
        body = response.json()["error"]
        assert body["code"] == code
        return body["message"]

    assert "nope" in error("/v1/labelsets/nope", 404, "unknown_label_set")
    assert "nope" in error(
        "/v1/labelsets/nope/epochs/0/batches/0?batch_size=4", 404, "unknown_label_set"
    )
    assert "epoch" in error(TINY + "/epochs/-1/batches/0?batch_size=4", 422, "invalid_request")
    assert "epoch" in error(TINY + "/epochs/abc/batches/0?batch_size=4", 422, "invalid_request")
    assert "1..8192" in error(TINY + "/epochs/0/batches/0?batch_size=0", 400, "bad_batch_size")
    assert "1..8192" in error(TINY + "/epochs/0/batches/0?batch_size=8193", 400, "bad_batch_size")
    assert "batch_size" in error(TINY + "/epochs/0/batches/0", 422, "invalid_request")
    message = error(TINY + "/epochs/0/batches/0?batch_size=4&rank=2&world_size=2", 400, "bad_rank")
    assert "below world_size" in message
    assert "past the last" in error(
        TINY + "/epochs/0/batches/12?batch_size=4", 404, "bad_batch_index"
    )
    assert "include" in error(
        TINY + "/epochs/0/batches/0?batch_size=4&include=x", 400, "bad_include"
    )
    # tiny has 50 samples: no rank may be left without a batch
    assert "no batch of the 50" in error(TINY + "/epochs/0/stream?batch_size=51", 400, "no_batches")
    assert "no batch" in error(
        TINY + "/epochs/0/stream?batch_size=1&rank=0&world_size=51&drop_last=false",
        400, "no_batches",
    )  # fmt: skip
    with Client(server.url) as client:
        with pytest.raises(ValueError, match="no batch of the 50 samples"):
            list(client.labelset("tiny").batches(0, 64))
        with pytest.raises(ClientError, match="no label set named 'nope'") as caught:
            client.labelset("nope")
        assert caught.value.status == 404
        with pytest.raises(ValueError, match="batch_size must be at least 1"):
            client.labelset("tiny").loader(0)


def test_a_wrong_method_is_405_with_allow(server: Server) -> None:
    """A 405 says which methods the route takes (RFC 9110 requires ``Allow``), in the JSON
    error shape."""
    for path in ("/healthz", TINY):
        response = httpx.post(server.url + path)
        assert response.status_code == 405
        assert response.headers["allow"] == "GET"
        assert response.json()["error"]["code"] == "http_405"


def test_health_metrics_and_docs(server: Server) -> None:
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").json()["status"] == "ready"
    httpx.get(server.url + TINY + "/epochs/0/batches/0?batch_size=4")
    metrics = httpx.get(server.url + "/metrics").text
    assert (
        'softserve_requests_total{route="/v1/labelsets/{name}/epochs/{epoch}/batches/{index}"'
        in metrics
    )
    assert "softserve_batch_seconds_bucket" in metrics
    assert "softserve_response_bytes_total" in metrics
    spec = httpx.get(server.url + "/openapi.json").json()
    assert "/v1/labelsets/{name}/epochs/{epoch}/stream" in spec["paths"]
    assert httpx.get(server.url + "/docs").status_code == 404  # its scripts come from a CDN
    log = server.log.read_text()
    assert '"path": "/v1/labelsets/tiny/epochs/0/batches/0"' in log


def test_new_label_sets_appear_and_broken_ones_are_skipped(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    srv = Server(store).start()
    try:
        assert httpx.get(srv.url + "/v1/labelsets").json() == []
        built = build_label_set(tmp_path / "staging" / "fresh", n=12)
        broken = store / "broken"
        shutil.copytree(built, broken)
        (broken / "manifest.json").write_text("{not json")
        bogus = store / "bogus"  # valid JSON, a codec nobody knows: skipped, not fatal
        shutil.copytree(built, bogus)
        text = (bogus / "manifest.json").read_text()
        (bogus / "manifest.json").write_text(text.replace('"codec": "fp16"', '"codec": "bogus"'))
        incomplete = store / "incomplete"
        shutil.copytree(built, incomplete)
        (incomplete / "manifest.json").unlink()
        shutil.copytree(built, store / "fresh")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            names = [x["name"] for x in httpx.get(srv.url + "/v1/labelsets").json()]
            if names:
                break
            time.sleep(0.1)
        assert names == ["fresh"]
        assert httpx.get(srv.url + "/v1/labelsets/broken").status_code == 404
        log = srv.log.read_text()
        assert "skipping label set broken" in log
        assert "skipping label set bogus" in log and "unknown label codec 'bogus'" in log
        shutil.copytree(built, store / "later")  # rescans go on past the bad sets
        deadline = time.monotonic() + 20
        while "later" not in names and time.monotonic() < deadline:
            names = [x["name"] for x in httpx.get(srv.url + "/v1/labelsets").json()]
            time.sleep(0.1)
        assert names == ["fresh", "later"]
    finally:
        srv.stop()
    fresh = Server(store).start()  # and a fresh server starts over such a store
    try:
        assert len(httpx.get(fresh.url + "/v1/labelsets").json()) == 2
    finally:
        fresh.stop()


def test_not_ready_until_the_store_exists(tmp_path: Path) -> None:
    store = tmp_path / "later"
    srv = Server(store).start(probe="/healthz")
    try:
        answer = httpx.get(srv.url + "/readyz")
        assert answer.status_code == 503
        assert answer.json() == {
            "status": "not ready", "label_sets": 0, "unhealthy_sets": 0, "unhealthy": {}
        }  # fmt: skip
        built = build_label_set(tmp_path / "staging" / "fresh", n=12)
        built.parent.rename(store)  # appears whole: a copy could be scanned half-written
        deadline = time.monotonic() + 20
        while (answer := httpx.get(srv.url + "/readyz")).status_code != 200:
            assert time.monotonic() < deadline, "the background rescan never found the store"
            time.sleep(0.1)
        assert answer.json() == {
            "status": "ready", "label_sets": 1, "unhealthy_sets": 0, "unhealthy": {}
        }  # fmt: skip
        assert httpx.get(srv.url + "/v1/labelsets/fresh").status_code == 200
    finally:
        srv.stop()


ONE, TWO = "s3cret-one-0123456789", "s3cret-two-0123456789"


def test_readyz_gives_details_to_token_holders_only(store: Path, tmp_path: Path) -> None:
    """Without a token, /readyz is status and counts: no set names, reasons or paths. A
    token holder gets the reasons and the store as configured; an open server gives the
    reasons with the store's absolute path written STORE."""
    served = tmp_path / "served"
    shutil.copytree(store / "tiny", served / "tiny")
    shutil.copytree(store / "tiny", served / "broken")
    (served / "broken" / "manifest.json").write_text("{not json")
    tokens = tmp_path / "tokens"
    tokens.write_text(ONE + "\n")
    counts = {"status": "ready", "label_sets": 1, "unhealthy_sets": 1}
    guarded = Server(served, "--token-file", tokens).start()
    try:
        for headers in ({}, {"Authorization": "Bearer wrong-0123456789abcdef"}):
            answer = httpx.get(guarded.url + "/readyz", headers=headers)
            assert answer.status_code == 200 and answer.json() == counts
        detailed = httpx.get(guarded.url + "/readyz", headers={"Authorization": f"Bearer {ONE}"})
        assert detailed.json()["store"] == str(served)
        (reason,) = detailed.json()["unhealthy"].values()
        assert str(served / "broken" / "manifest.json") in reason
    finally:
        guarded.stop()
    assert f"skipping label set broken: {reason}" in guarded.log.read_text()  # in full
    open_server = Server(served).start()
    try:
        answer = httpx.get(open_server.url + "/readyz")
        assert str(tmp_path) not in answer.text
        assert answer.json()["unhealthy"] == {
            "broken": reason.replace(str(served), "STORE")
        } and "STORE/broken/manifest.json" in reason.replace(str(served), "STORE")
    finally:
        open_server.stop()


def test_auth(store: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# training jobs\n{ONE}\n  {TWO}  \n   # indented comment\n")
    srv = Server(store, "--token-file", tokens).start()
    try:
        url = srv.url + "/v1/labelsets"
        missing = httpx.get(url)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
        assert missing.headers["www-authenticate"] == "Bearer"
        assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(url, headers={"Authorization": f"Basic {ONE}"}).status_code == 401
        assert httpx.get(url, headers={"Authorization": f"Bearer {TWO}"}).status_code == 200
        comment = {"Authorization": "Bearer # indented comment"}
        assert httpx.get(url, headers=comment).status_code == 401
        assert httpx.get(srv.url + "/healthz").status_code == 200
        with Client(srv.url, token=ONE) as client:
            assert len(list(client.labelset("tiny").batches(0, 10))) == 5
        with Client(srv.url, token="nope") as client, pytest.raises(ClientError) as caught:
            client.labelsets()
        assert caught.value.status == 401
        assert "bearer tokens required" in srv.log.read_text()
    finally:
        srv.stop()
    open_log = Path(str(srv.log)).read_text()
    assert "open to anyone" not in open_log


def test_open_server_says_so(server: Server) -> None:
    assert "no --token-file: the API is open to anyone" in server.log.read_text()


def test_server_killed_mid_epoch(tmp_path: Path) -> None:
    """The client, with its default settings, rides out a server killed and restarted
    seconds later: the epoch completes, nothing lost or repeated.

    Batches carry 96×96 images (no client cache), so an epoch is ~20 MB and the kill
    really cuts the stream; the server log shows the client resuming mid-epoch.
    """
    store = tmp_path / "store"
    build_label_set(store / "big", n=240, h=96, w=96, epochs=1, shard_epochs=1)
    srv = Server(store).start()
    try:
        with Client(srv.url) as client:
            remote = client.labelset("big", image_cache_mb=0)
            reference = [b.indices.tolist() for b in remote.batches(0, 4)]
            got = []
            for batch in remote.batches(0, 4):
                got.append(batch.indices.tolist())
                assert batch.images.shape == (4, 3, 96, 96)
                if len(got) == 10:
                    srv.kill()
                    time.sleep(4)  # a restart takes seconds; the old client gave up in ~1
                    srv.start()
        assert got == reference
        assert len(got) == 60
        resumed = [line for line in srv.log.read_text().splitlines() if "stream" in line]
        assert any("start=" in line and "start=0" not in line for line in resumed), resumed
    finally:
        srv.stop()


def test_client_fails_over_to_the_next_url(server: Server) -> None:
    from conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    with Client([dead, server.url], retries=3, max_wait=0.2) as client:
        assert [s.name for s in client.labelsets()] == ["tiny", "tiny-int8"]
        assert client.url == server.url
    with (
        Client(dead, retries=2, max_wait=0.1) as client,
        pytest.raises(ClientError, match="no server"),
    ):
        client.labelsets()


def test_two_gloo_ranks_read_disjoint_halves(server: Server, tmp_path: Path) -> None:
    from test_distributed import torchrun

    done = torchrun(2, ["tests/dist_consumer.py", server.url, str(tmp_path)], module=False)
    assert done.returncode == 0, done.stderr
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["batches"] == ranks[1]["batches"] == 5
    a, b = set(ranks[0]["indices"]), set(ranks[1]["indices"])
    assert not a & b and a | b == set(range(50))


def test_settings_from_environment(store: Path) -> None:
    srv = Server(store, env={"SOFTSERVE_MAX_BATCH_SIZE": "16"}).start()
    try:
        url = srv.url + TINY + "/epochs/0/batches/0?batch_size="
        assert httpx.get(url + "16").status_code == 200
        assert "1..16" in httpx.get(url + "17").json()["error"]["message"]
    finally:
        srv.stop()


def test_serve_rejects_an_unreadable_token_file(store: Path, tmp_path: Path) -> None:
    from test_errors import assert_one_line_error

    done = run_cli("serve", "--store", store, "--token-file", tmp_path / "missing")
    assert_one_line_error(done, "cannot read --token-file")
    empty = tmp_path / "empty"
    empty.write_text("# no tokens yet\n   # nor here\n")
    assert_one_line_error(
        run_cli("serve", "--store", store, "--token-file", empty), "holds no token"
    )
    short = tmp_path / "short"
    short.write_text("# a guessable token\nhunter2\n")
    assert_one_line_error(
        run_cli("serve", "--store", store, "--token-file", short), "line 2", "16 characters"
    )


def test_one_stream_spans_epochs(server: Server) -> None:
    """``epochs=K`` streams K epochs in one response; ``start`` applies to the first. Every
    frame equals the batch requested alone, short last batches and wrapped epochs included."""
    params = {"batch_size": 8, "include": ",".join(TENSORS), "drop_last": "false"}
    response = httpx.get(
        server.url + TINY + "/epochs/2/stream", params={**params, "start": 3, "epochs": 3}
    )
    frames = list(read_frames(iter([response.content])))
    assert len(frames) == 4 + 7 + 7
    for payload, (epoch, index) in zip(
        frames, [(2, b) for b in range(3, 7)] + [(e, b) for e in (3, 4) for b in range(7)],
        strict=True,
    ):  # fmt: skip
        single = httpx.get(server.url + TINY + f"/epochs/{epoch}/batches/{index}", params=params)
        got, want = safetensors.numpy.load(bytes(payload)), safetensors.numpy.load(single.content)
        assert got.keys() == want.keys() and len(got["indices"]) == (2 if index == 6 else 8)
        for key in got:
            np.testing.assert_array_equal(got[key], want[key])


def test_the_image_cache_is_one_budget_for_all_sets(store: Path, tmp_path: Path) -> None:
    """SOFTSERVE_IMAGE_CACHE_MB bounds a process's cached images over all its sets (by name,
    first come): a set that no longer fits reads its images from disk, the same bytes."""
    tiny, tiny_int8 = 50 * 3 * 12 * 10, 20 * 3 * 12 * 10  # samples × C × H × W, uint8
    for budget, cached in [(tiny + tiny_int8, {"tiny", "tiny-int8"}), (tiny, {"tiny"}),
                           (tiny_int8, {"tiny-int8"}), (0, set())]:  # fmt: skip
        catalog = Catalog(store, image_cache_bytes=budget, locking=None)
        catalog.refresh()
        try:
            entries = {name: catalog.get(name) for name in catalog.names()}
            assert {n for n, e in entries.items() if e.images is not None} == cached
            held = sum(e.images.nbytes for e in entries.values() if e.images is not None)
            assert held <= budget
            ids = np.array([4, 0, 19])
            with LabelSetReader(store / "tiny-int8") as reader:
                want = reader.images()[ids]
            np.testing.assert_array_equal(entries["tiny-int8"].base_images(ids), want)
        finally:
            catalog.close()


def test_reading_the_catalog_while_it_rescans(tmp_path: Path) -> None:
    """Listing sets and health on the event loop while a rescan adds and drops sets in a
    thread never sees the catalog change under it."""
    store = tmp_path / "store"
    build_label_set(store / "a")
    shutil.copytree(store / "a", tmp_path / "spare")
    catalog = Catalog(store, image_cache_bytes=0, locking=None)
    catalog.refresh()
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            for i in itertools.count():
                if stop.is_set():
                    return
                shutil.copytree(tmp_path / "spare", store / f"b{i}")
                (store / f"c{i}").mkdir()
                (store / f"c{i}" / "manifest.json").write_text("{}")  # skipped: invalid
                catalog.refresh()
                shutil.rmtree(store / f"b{i}")
                shutil.rmtree(store / f"c{i}")
                catalog.refresh()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not errors:
            assert catalog.names()[0] == "a"
            assert all(name.startswith("c") for name in catalog.unhealthy())
    finally:
        stop.set()
        worker.join()
        catalog.close()
    assert not errors, errors
    assert catalog.unhealthy() == {}  # a skipped set that is gone is no longer reported


def test_consecutive_batches_are_read_together(store: Path) -> None:
    """Batches that follow each other in a stored epoch cost one read, with the same tensors
    as read one by one; a rank's batches of a larger world are apart and read one by one."""
    catalog = Catalog(store, image_cache_bytes=1 << 20, locking=None)
    catalog.refresh()
    entry = catalog.get("tiny")
    assert entry is not None
    reads: list[tuple[int, int, int]] = []
    read = entry.reader.read
    entry.reader.read = lambda *a, **k: reads.append(a[:3]) or read(*a, **k)  # type: ignore
    try:
        request = BatchRequest(entry, 3, Sharding(50, 8, drop_last=False), TENSORS)
        group = [(3, 5), (3, 6), (4, 0), (4, 1), (4, 2)]  # epoch 4 is stored epoch 0
        together = list(read_batches(request, group))
        assert reads == [(3, 40, 50), (0, 0, 24)]
        reads.clear()
        for (epoch, index), tensors in zip(group, together, strict=True):
            (alone,) = read_batches(request, [(epoch, index)])
            assert list(tensors) == list(alone) == list(TENSORS)
            for key in tensors:
                np.testing.assert_array_equal(tensors[key], alone[key])
        assert len(reads) == len(group)
        reads.clear()
        ranked = BatchRequest(entry, 0, Sharding(50, 8, 1, 2), ("indices", "soft"))
        assert [len(b["indices"]) for b in read_batches(ranked, [(0, 0), (0, 1), (0, 2)])] == [
            8
        ] * 3
        assert reads == [(0, 8, 16), (0, 24, 32), (0, 40, 48)]
    finally:
        catalog.close()


def damage(shard: Path) -> None:
    """Zero the first half of a file in place (same inode, same size)."""
    data = bytearray(shard.read_bytes())
    data[: len(data) // 2] = bytes(len(data) // 2)
    shard.write_bytes(bytes(data))


def test_corrupt_shard_is_a_clear_error_not_a_crash(store: Path, tmp_path: Path) -> None:
    """A shard damaged after serving began: JSON 500 for a batch, an error frame mid-stream,
    ClientError/PayloadError in the client without retries, and the server stays up. A set
    damaged before it was opened is not served at all, while the others are."""
    local = tmp_path / "store"
    shutil.copytree(store / "tiny", local / "tiny")
    shutil.copytree(store / "tiny", local / "broken")
    damage(local / "broken" / "labels-00001.h5")
    # no rescan during the test: one would find the damage first and withdraw the set
    # before the reads below could meet it
    srv = Server(local, env={"SOFTSERVE_RESCAN_SECONDS": "3600"}).start()
    try:
        assert [s["name"] for s in httpx.get(srv.url + "/v1/labelsets").json()] == ["tiny"]
        assert httpx.get(srv.url + "/v1/labelsets/broken").status_code == 404
        damage(local / "tiny" / "labels-00001.h5")  # epochs 2 and 3, under the open set
        ok = httpx.get(srv.url + TINY + "/epochs/0/batches/0?batch_size=10")
        assert ok.status_code == 200
        with Client(srv.url) as client:  # a store error is raised at once, never retried
            remote = client.labelset("tiny")
            batches = remote.raw_batches(1, remote.sharding(10), epochs=2)
            assert len([next(batches) for _ in range(5)]) == 5  # epoch 1 is intact
            started = time.monotonic()
            with pytest.raises(PayloadError, match="server error: cannot read"):
                next(batches)
            assert time.monotonic() - started < 5
            # the damaged version is withdrawn: a clear error, not retried either
            with pytest.raises(ClientError, match="withdrawn"):
                list(remote.batches(0, 10))
        withdrawn = httpx.get(srv.url + TINY + "/epochs/0/batches/0?batch_size=10")
        assert withdrawn.status_code == 503
        body = withdrawn.json()["error"]
        assert body["code"] == "withdrawn" and "softserve verify" in body["message"]
        assert httpx.get(srv.url + "/v1/labelsets").json() == []
        ready = httpx.get(srv.url + "/readyz").json()
        assert set(ready["unhealthy"]) == {"tiny", "broken"}
        assert "cannot read" in ready["unhealthy"]["tiny"]
        assert httpx.get(srv.url + "/healthz").status_code == 200
    finally:
        srv.stop()


def test_a_bug_mid_stream_is_reported_in_stream(store: Path) -> None:
    """An unexpected exception while a stream is read (a bug, not a damaged set) ends the
    stream with an error frame the client raises at once, instead of a cut stream it would
    retry for a minute; a single batch gets the JSON error shape, not a bare text 500. The
    traceback is in the server's log, and the set stays served."""
    buggy = [sys.executable, str(TESTS_DIR / "buggy_server.py")]
    srv = Server(store, command=buggy).start()
    try:
        with Client(srv.url) as client:
            remote = client.labelset("tiny")
            batches = remote.raw_batches(0, remote.sharding(10), epochs=2)
            assert len([next(batches) for _ in range(5)]) == 5  # epoch 0 is fine
            started = time.monotonic()
            with pytest.raises(PayloadError, match=r"internal error \(RuntimeError\) at epoch 1"):
                next(batches)
            assert time.monotonic() - started < 5
        one = httpx.get(srv.url + TINY + "/epochs/1/batches/0?batch_size=10")
        assert one.status_code == 500 and one.json()["error"] == {
            "code": "internal_error",
            "message": "internal error (RuntimeError); the server's log has the traceback",
        }
        deadline = time.monotonic() + 10  # logged just after the answer is sent
        while srv.log.read_text().count("RuntimeError: planted bug") < 2:
            assert time.monotonic() < deadline, srv.log.read_text()
            time.sleep(0.1)
        assert httpx.get(srv.url + TINY + "/epochs/0/batches/0?batch_size=10").status_code == 200
        assert [s["name"] for s in httpx.get(srv.url + "/v1/labelsets").json()] == [
            "tiny", "tiny-int8"
        ]  # fmt: skip
    finally:
        srv.stop()


def test_client_dropping_mid_stream_harms_nothing(server: Server) -> None:
    host, port = "127.0.0.1", server.port
    query = "batch_size=1&epochs=1000&include=indices,images,params,hard,soft,logits"
    for _ in range(3):
        with socket.create_connection((host, port)) as sock:
            sock.sendall(f"GET {TINY}/epochs/0/stream?{query} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        # the socket is gone mid-stream; the server carries on
    response = httpx.get(server.url + TINY + "/epochs/0/batches/0?batch_size=5")
    assert response.status_code == 200
    assert "Traceback" not in server.log.read_text()


def test_several_worker_processes(store: Path, tmp_path: Path) -> None:
    """--workers 2 serves, and /metrics sums what every worker process counted; the metrics
    folder goes when the server does. /docs is there when SOFTSERVE_DOCS asks for it."""
    env = {"SOFTSERVE_DOCS": "true", "TMPDIR": str(tmp_path)}
    srv = Server(store, "--workers", 2, env=env).start()
    try:
        assert len(list(tmp_path.glob("softserve-metrics-*"))) == 1
        assert httpx.get(srv.url + "/docs").status_code == 200
        url = srv.url + TINY + "/epochs/0/batches/0?batch_size=5"
        with httpx.Client() as http:  # a new connection each time spreads the requests
            for _ in range(12):
                assert http.get(url, headers={"Connection": "close"}).status_code == 200
        route = "/v1/labelsets/{name}/epochs/{epoch}/batches/{index}"
        metrics = httpx.get(srv.url + "/metrics").text
        line = next(x for x in metrics.splitlines() if x.startswith(
            f'softserve_requests_total{{route="{route}",status="200"}}'))  # fmt: skip
        assert float(line.split()[-1]) == 12
    finally:
        srv.stop()
    assert list(tmp_path.glob("softserve-metrics-*")) == []


def test_sigterm_with_a_stream_open_exits_within_the_deadline(store: Path) -> None:
    """A client in the middle of a long stream does not keep a SIGTERMed server alive: the
    stream is cut at SOFTSERVE_SHUTDOWN_SECONDS and the client can resume elsewhere."""
    srv = Server(store, env={"SOFTSERVE_SHUTDOWN_SECONDS": "2"}).start()
    with httpx.stream(
        "GET", srv.url + TINY + "/epochs/0/stream",
        params={"batch_size": 1, "epochs": 100_000, "include": "indices,images"},
    ) as response:  # fmt: skip
        chunks = response.iter_bytes()
        next(chunks)  # the stream is open and not being read
        started = time.monotonic()
        srv.proc.terminate()
        srv.proc.wait(timeout=20)
        assert time.monotonic() - started < 10
