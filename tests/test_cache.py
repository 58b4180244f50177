"""The node's base-image cache: one verified, memory-mapped copy per label-set version for
every DataLoader worker and rank of a machine, fetched once, refetched when damaged, and a
logged fallback to the process's own copy when it cannot be written."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import Server, run_cli
from torch.utils.data import DataLoader, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from softserve.client import Batch, Client, LabelSet, open_local
from softserve.client.cache import ENV, HEADER_BYTES, Version, mapped_images
from softserve.storage import LabelSetReader

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
BATCH_SIZE, RANKS = 6, 2  # tiny: 50 samples, 4 batches a rank
IMAGE_ROUTE = "/v1/labelsets/{name}/images"


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's cache folder, for this process and the workers it starts."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(ENV, str(folder))
    return folder


@pytest.fixture(scope="module")
def expected(store: Path) -> dict[int, list[Batch]]:
    """Each rank's batches with the cache off (images in memory): what the cache must give."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV, "off")
        labels = open_local(store / "tiny")
        return {r: list(labels.loader(BATCH_SIZE, epochs=1, rank=r, world_size=RANKS))
                for r in range(RANKS)}  # fmt: skip


def image_requests(server: Server) -> float:
    """``GET …/images`` answered 200 by the server so far."""
    head = f'softserve_requests_total{{route="{IMAGE_ROUTE}",status="200"}}'
    lines = httpx.get(server.url + "/metrics").text.splitlines()
    return next((float(x.split()[-1]) for x in lines if x.startswith(head)), 0.0)


def stored(root: Path) -> tuple[np.ndarray, bytes]:
    """The set's base images as stored, and what its cache file holds after the header."""
    with LabelSetReader(root) as reader:
        images = reader.images()
        return images, images.tobytes() + reader.hard_labels().astype("<i8").tobytes()


def open_set(kind: str, store: Path, server: Server) -> LabelSet:
    return open_local(store / "tiny") if kind == "local" else Client(server.url).labelset("tiny")


def mapped_file(images: torch.Tensor) -> str | None:
    """The file whose mapping in this process holds ``images``' first byte, if any."""
    address = images.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, _, _, _, _, *path = line.split()
        start, stop = (int(x, 16) for x in span.split("-"))
        if start <= address < stop:
            return path[0] if path else None
    return None


def with_source(batch: Batch) -> tuple[Batch, str | None, int]:
    """A DataLoader worker's collate_fn: the batch, the file its base images are mapped
    from in this worker, and the worker's pid."""
    info = get_worker_info()
    assert info is not None
    return batch, mapped_file(info.dataset.labelset.base_images()), os.getpid()


def assert_same(got: list[Batch], expected: list[Batch]) -> None:
    """Every tensor of every batch equal, byte for byte."""
    assert [(b.epoch, b.index) for b in got] == [(b.epoch, b.index) for b in expected]
    for a, b in zip(got, expected, strict=True):
        for name in ("indices", "images", "params", "hard", "soft"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and torch.equal(x, y), name


def only_file(cache: Path) -> Path:
    (path,) = cache.glob("*.images")
    return path


@pytest.mark.parametrize("kind", ["local", "remote"])
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_workers_and_ranks_map_one_copy(
    kind: str, context: str, store: Path, server: Server, cache: Path,
    expected: dict[int, list[Batch]],
) -> None:  # fmt: skip
    """2 ranks × 2 workers: one file on the node, one download for a served set, every
    worker's images mapped from that file, and the batches of the cache off."""
    before = image_requests(server)
    labels = open_set(kind, store, server)
    for rank in range(RANKS):
        loader = labels.loader(BATCH_SIZE, epochs=1, rank=rank, world_size=RANKS)
        data = DataLoader(loader, batch_size=None, num_workers=2, collate_fn=with_source,
                          multiprocessing_context=context)  # fmt: skip
        got = list(data)
        assert {source for _, source, _ in got} == {str(only_file(cache))}
        workers = {pid for _, _, pid in got}
        assert len(workers) == 2 and os.getpid() not in workers
        assert_same([batch for batch, _, _ in got], expected[rank])
    assert image_requests(server) - before == (1 if kind == "remote" else 0)
    assert sorted(p.suffix for p in cache.iterdir()) == [".images", ".lock", ".verified"]


def race(url: str, start: multiprocessing.synchronize.Barrier, out: multiprocessing.Queue) -> None:
    labels = Client(url).labelset("tiny")
    start.wait()
    images = labels.base_images()
    out.put((mapped_file(images), images.numpy().tobytes()))


def test_processes_racing_on_first_use_download_once(
    store: Path, server: Server, cache: Path
) -> None:
    """Three processes asking at once: one fetches under the lock, the others map its file."""
    before = image_requests(server)
    context = multiprocessing.get_context("fork")
    start, out = context.Barrier(3), context.Queue()
    procs = [context.Process(target=race, args=(server.url, start, out)) for _ in range(3)]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    truth = stored(store / "tiny")[0].tobytes()
    assert results == [(str(only_file(cache)), truth)] * 3
    assert image_requests(server) - before == 1


@pytest.mark.parametrize("damage", ["image byte", "label byte", "header", "truncated"])
def test_a_damaged_file_is_fetched_again_never_served(
    damage: str, store: Path, server: Server, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A flipped byte anywhere, a foreign header or a short file is found on first use by a
    process, logged, and fetched again; the images are always the store's."""
    truth, content = stored(store / "tiny")
    assert np.array_equal(Client(server.url).labelset("tiny").base_images().numpy(), truth)
    path = only_file(cache)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        del data[-1]
    else:
        spot = {"image byte": HEADER_BYTES + 777, "label byte": len(data) - 3,
                "header": data.index(b'"digest"') + 20}  # fmt: skip
        data[spot[damage]] ^= 0x01
    stat = path.stat()
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the mtime back: ctime tells
    before = image_requests(server)
    with caplog.at_level(logging.WARNING, "softserve.client"):
        images = Client(server.url).labelset("tiny").base_images()
    assert np.array_equal(images.numpy(), truth)
    assert "fetching its images again" in caplog.text
    assert image_requests(server) - before == 1
    assert path.read_bytes()[HEADER_BYTES:] == content


def test_a_file_as_verified_costs_no_hash(store: Path, cache: Path, monkeypatch) -> None:
    """A later process checks size, header and the identity recorded when the file was
    hashed; it hashes only a file written since."""
    open_local(store / "tiny").base_images()
    import softserve.client.cache as module

    def no_hash(*args: object) -> None:
        raise AssertionError("hashed a file as it was verified")

    monkeypatch.setattr(module, "_hash_problem", no_hash)
    images = open_local(store / "tiny").base_images()
    assert mapped_file(images) == str(only_file(cache))


def test_stateful_data_loader_resumes_over_the_cache(
    store: Path, server: Server, cache: Path, expected: dict[int, list[Batch]]
) -> None:
    """A job stopped mid-epoch and a new one restored from its StatefulDataLoader state: the
    rank's batches exactly once, from one download."""
    before = image_requests(server)

    def job() -> StatefulDataLoader:
        labels = Client(server.url).labelset("tiny")
        loader = labels.loader(BATCH_SIZE, epochs=1, rank=1, world_size=RANKS)
        return StatefulDataLoader(loader, batch_size=None, num_workers=2,
                                  multiprocessing_context="fork")  # fmt: skip

    first_job, first = job(), []
    for batch in first_job:
        first.append(batch)
        if len(first) == 3:
            break
    second_job = job()
    second_job.load_state_dict(first_job.state_dict())
    assert_same(first + list(second_job), expected[1])
    assert image_requests(server) - before == 1 and only_file(cache)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_views_on_the_gpu_from_the_mapped_cache(store: Path, cache: Path) -> None:
    """Batches built on the GPU from the mapped file: those of the cache off, on the GPU."""
    labels = open_local(store / "tiny")
    assert mapped_file(labels.base_images()) == str(only_file(cache))
    got = list(labels.batches(1, BATCH_SIZE, device="cuda"))
    assert got[0].images.device.type == "cuda"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV, "off")
        want = list(open_local(store / "tiny").batches(1, BATCH_SIZE, device="cuda"))
    assert_same(got, want)


@pytest.mark.parametrize("kind", ["local", "remote"])
@pytest.mark.parametrize("folder", ["unwritable", "full"])
def test_a_cache_that_cannot_be_written_falls_back(
    kind: str, folder: str, store: Path, server: Server, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    expected: dict[int, list[Batch]], request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    """A folder that cannot be made, or a disk without room: one log line, the images in
    the process's memory, the same batches."""
    if folder == "unwritable":
        (tmp_path / "a-file").write_text("")
        target = tmp_path / "a-file" / "cache"  # below a file: not even root can make it
    else:
        target = request.getfixturevalue("small_disk")
        (target / "filler").write_bytes(bytes(96 << 10))
    monkeypatch.setenv(ENV, str(target))
    with caplog.at_level(logging.WARNING, "softserve.client"):
        labels = open_set(kind, store, server)
        got = list(labels.loader(BATCH_SIZE, epochs=1, rank=0, world_size=RANKS))
    assert "node image cache unusable" in caplog.text
    assert mapped_file(labels.base_images()) is None
    assert_same(got, expected[0])
    assert not target.exists() or list(target.glob("*.images*")) == []


def test_images_unlike_the_manifest_are_not_cached(
    store: Path, cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A source whose images do not hash to the manifest's dataset_sha256 leaves no file."""
    labels = open_local(store / "tiny")
    version = Version("tiny", labels.digest, "0" * 64, (labels.num_samples, *labels.image_shape),
                      tuple(labels.class_names))  # fmt: skip
    with caplog.at_level(logging.WARNING, "softserve.client"):
        assert mapped_images(version, labels.image_chunks) is None
    assert "dataset_sha256" in caplog.text
    assert list(cache.glob("*.images*")) == []


def test_cache_list_and_clear(store: Path, server: Server, cache: Path) -> None:
    """``softserve cache list`` shows each version; ``clear NAME`` removes that set's."""
    open_local(store / "tiny").base_images()
    Client(server.url).labelset("tiny-int8").base_images()
    env = {ENV: str(cache)}
    done = run_cli("cache", "list", env=env)
    assert done.returncode == 0, done.stderr
    assert "2 versions" in done.stdout and "tiny-int8" in done.stdout
    assert done.stdout.count("verified") == 2
    done = run_cli("cache", "clear", "tiny-int8", env=env)
    assert done.returncode == 0 and "removed 1 version" in done.stdout, done.stderr
    (left,) = cache.glob("*.images")
    assert json.loads(left.read_bytes()[:HEADER_BYTES].split(b"\n")[1])["name"] == "tiny"
    assert run_cli("cache", "clear", env=env).returncode == 0
    assert list(cache.iterdir()) == []
