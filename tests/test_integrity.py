"""Label sets as untrusted input: nothing in one reaches outside its folder, no damaged or
changed byte becomes a label, and one bad set harms no other (see softserve.storage.integrity)."""

from __future__ import annotations

import os
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import httpx
import numpy as np
import pytest
from conftest import Server, build_label_set, reseal_manifest, run_cli

from bench.fault_trials import outside_chunks
from softserve.client import Client, ClientError, PayloadError
from softserve.errors import StoreError
from softserve.format.codecs import part_name
from softserve.storage import LabelSetReader, integrity
from softserve.storage.manifest import load_manifest
from softserve.storage.open_set import OpenLabelSet

N, EPOCHS, BATCH = 20, 4, 5
#: What the outside file holds: bytes no image of the set has in a row.
OUTSIDE = 0xAB


def copy(source: Path, out: Path) -> Path:
    shutil.copytree(source, out)
    return out


def wait_until(condition: Callable[[], bool], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def listed(server: Server) -> list[str]:
    return [s["name"] for s in httpx.get(server.url + "/v1/labelsets").json()]


def unhealthy(server: Server) -> dict[str, str]:
    return httpx.get(server.url + "/readyz").json().get("unhealthy", {})


# ----------------------------------------------------------------- reaching outside


def _outside_file(root: Path) -> Path:
    """An HDF5 file beside the store with an ``images`` and a ``labels`` dataset of the set's
    shapes: what a crafted set would read in place of its own."""
    with h5py.File(root / "dataset.h5", "r") as f:
        shape, labels = f["images"].shape, f["labels"][...]
    outside = root.parent.parent / f"outside-{root.name}.h5"
    with h5py.File(outside, "w") as f:
        f["images"] = np.full(shape, OUTSIDE, np.uint8)
        f["labels"] = labels
    return outside


def _external_storage(f: h5py.File, outside: Path, images: np.ndarray) -> None:
    raw = outside.with_suffix(".bin")
    np.full(images.shape, OUTSIDE, np.uint8).tofile(raw)
    del f["images"]
    f.create_dataset("images", shape=images.shape, dtype=np.uint8,
                     external=[(str(raw), 0, images.nbytes)])  # fmt: skip


def _external_link(key: str) -> Callable[[h5py.File, Path, np.ndarray], None]:
    def craft(f: h5py.File, outside: Path, images: np.ndarray) -> None:
        del f[key]
        f[key] = h5py.ExternalLink(str(outside), key)

    return craft


def _virtual(f: h5py.File, outside: Path, images: np.ndarray) -> None:
    layout = h5py.VirtualLayout(shape=images.shape, dtype=np.uint8)
    layout[...] = h5py.VirtualSource(str(outside), "images", shape=images.shape)
    del f["images"]
    f.create_virtual_dataset("images", layout)


def _soft_link(f: h5py.File, outside: Path, images: np.ndarray) -> None:
    f.move("labels", "the-labels")
    f["labels"] = h5py.SoftLink("/the-labels")


CRAFTS = {
    "external-storage": (_external_storage, "'images' is stored in another file"),
    "external-link-images": (_external_link("images"), "'images' is an external link to"),
    "external-link-labels": (_external_link("labels"), "'labels' is an external link to"),
    "virtual-dataset": (_virtual, "'images' is a virtual dataset"),
    "soft-link": (_soft_link, "'labels' is a soft link"),
}


def crafted(source: Path, out: Path, kind: str) -> Path:
    """A copy of ``source`` whose dataset.h5 reads ``kind``-wise beyond its own bytes, its
    manifest rewritten to match (sizes and sha256s): only a check of the structure sees it."""
    root = copy(source, out)
    outside = _outside_file(root)
    with h5py.File(root / "dataset.h5", "r+") as f:
        CRAFTS[kind][0](f, outside, f["images"][...])
    reseal_manifest(root)
    return root


@pytest.mark.parametrize("kind", CRAFTS)
def test_a_set_that_reads_outside_its_files_is_refused(
    builds: tuple[Path, Path], tmp_path: Path, kind: str
) -> None:
    """External storage, external and soft links, virtual datasets: the reader refuses the
    set naming the dataset, and verify fails with one line naming it."""
    root = crafted(builds[0], tmp_path / "store" / "s", kind)
    message = CRAFTS[kind][1]
    with pytest.raises(StoreError, match=message):
        LabelSetReader(root)
    assert_verify_fails(root, message)


def assert_verify_fails(root: Path, message: str) -> None:
    """``softserve verify`` exits 1, a ``FAIL`` line a problem, one of them ``message``."""
    done = run_cli("verify", root)
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert all(line.startswith("FAIL ") for line in lines), done.stderr
    assert any(message in line for line in lines), done.stderr


def test_a_server_never_serves_bytes_from_outside_a_set(
    builds: tuple[Path, Path], tmp_path: Path
) -> None:
    """A real server over a store holding every crafted kind beside a good set: the good
    one is served, each crafted one is unhealthy with a line naming its dataset, and
    ``GET …/images`` of none returns the outside file's bytes."""
    store = tmp_path / "store"
    for kind in CRAFTS:
        crafted(builds[0], store / kind, kind)
    copy(builds[0], store / "good")
    server = Server(store).start()
    try:
        assert listed(server) == ["good"]
        reasons = unhealthy(server)
        for kind, (_, message) in CRAFTS.items():
            assert message in reasons[kind], (kind, reasons)
            images = httpx.get(f"{server.url}/v1/labelsets/{kind}/images?start=0&stop={N}")
            assert images.status_code == 404, (kind, images.status_code)
            assert bytes([OUTSIDE]) * 64 not in images.content
        good = httpx.get(f"{server.url}/v1/labelsets/good/images?start=0&stop={N}")
        assert good.status_code == 200 and bytes([OUTSIDE]) * 64 not in good.content
    finally:
        server.stop()


# ----------------------------------------------------------------- damaged bytes


def flip(path: Path, offset: int, mask: int = 0x5A) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def every_row(root: Path) -> list[dict[str, np.ndarray]]:
    with LabelSetReader(root) as reader:
        return [reader.read(e, 0, N) for e in range(EPOCHS)] + [{"hard": reader.hard_labels()}]


def same_rows(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> bool:
    return all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
               for x, y in zip(a, b, strict=True))  # fmt: skip


def test_a_flipped_metadata_byte_is_refused_at_open(
    builds: tuple[Path, Path], tmp_path: Path
) -> None:
    """A byte outside chunk data (which no chunk checksum covers) flipped in a shard: the
    shard's sha256 refuses the set when it is opened. With the manifest rewritten to match,
    the file format's own checksums or the reader's checks refuse it on open or on read:
    over 200 such flips, no read returns rows other than the intact set's."""
    root = copy(builds[0], tmp_path / "s")
    shard = root / "labels-00001.h5"
    offsets = outside_chunks(shard)
    flip(shard, int(offsets[len(offsets) // 2]))
    with pytest.raises(StoreError, match=r"labels-00001.h5: sha256 .* manifest says"):
        LabelSetReader(root)
    want = every_row(builds[0])
    outcomes = {"same": 0, "refused": 0}
    for offset in random.Random(0).sample(list(offsets), 200):
        forged = copy(builds[0], tmp_path / f"at-{offset}")
        flip(forged / shard.name, int(offset))
        reseal_manifest(forged)
        try:
            got = every_row(forged)
        except StoreError:
            outcomes["refused"] += 1
        else:
            assert same_rows(got, want), f"flipping byte {offset} changed what is read"
            outcomes["same"] += 1
        shutil.rmtree(forged)
    assert outcomes["refused"] > 0, outcomes


def test_a_zeroed_block_is_an_error_before_or_after_open(tmp_path: Path) -> None:
    """A 4 KiB block of a shard zeroed, spanning whole chunks of 64 epochs' labels with
    their checksums (fletcher32 takes a zeroed chunk with its zeroed checksum for intact):
    refused when the set opens, and a StoreError on the next read when it happens under an
    open set, never zero labels."""
    built = build_label_set(tmp_path / "built", n=N, epochs=64, shard_epochs=64)
    with h5py.File(built / "labels-00000.h5", "r") as f:
        chunks = [f["soft"].id.get_chunk_info(i) for i in range(64)]
    start = -(-min(c.byte_offset for c in chunks) // 4096) * 4096
    assert start + 4096 <= max(c.byte_offset + c.size for c in chunks)  # all label chunks

    def zero(shard: Path) -> None:
        with open(shard, "r+b") as f:  # in place: same inode, same size
            f.seek(start)
            f.write(bytes(4096))

    before = copy(built, tmp_path / "before")
    zero(before / "labels-00000.h5")
    with pytest.raises(StoreError, match="labels-00000.h5: sha256"):
        LabelSetReader(before)
    after = copy(built, tmp_path / "after")
    with LabelSetReader(after) as reader:
        want = [reader.read(e, 0, N)["soft"] for e in range(64)]
        zero(after / "labels-00000.h5")
        for e in range(64):
            with pytest.raises(StoreError, match="changed on disk since the set was opened"):
                reader.read(e, 0, N)
        with pytest.raises(StoreError, match="changed on disk"):
            reader.check_files()
    assert all(rows.any() for rows in want)


def test_only_what_changes_content_withdraws_an_open_set(
    builds: tuple[Path, Path], tmp_path: Path
) -> None:
    """An open set whose shard is chmodded and unlinked (its ctime moves, its bytes do not)
    reads on; one whose shard is overwritten by another build's and its mtime set back (as
    ``touch -d`` would) is refused, never read as the other build's labels."""
    a, b = builds
    root = copy(a, tmp_path / "s")
    shard = root / "labels-00000.h5"
    with LabelSetReader(root) as reader:
        want = reader.read(1, 0, N)
        shard.chmod(0o400)
        shard.unlink()
        np.testing.assert_array_equal(reader.read(1, 0, N)["soft"], want["soft"])
        np.testing.assert_array_equal(reader.read(0, 0, N)["order"], every_row(a)[0]["order"])
    root = copy(a, tmp_path / "t")
    shard = root / "labels-00000.h5"
    with LabelSetReader(root) as reader:
        before = shard.stat()
        shutil.copyfile(b / shard.name, shard)
        os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = shard.stat()
        assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
        with pytest.raises(StoreError, match="changed on disk"):
            reader.read(0, 0, N)


def test_an_unchanged_file_is_hashed_once_per_process(
    builds: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reopening a set (a rescan, a DataLoader worker) costs an fstat a file, not a hash;
    a file touched since is hashed again."""
    hashed: list[int] = []
    sha256_fd = integrity._sha256_fd
    monkeypatch.setattr(integrity, "_sha256_fd", lambda fd: hashed.append(fd) or sha256_fd(fd))
    root = copy(builds[0], tmp_path / "s")
    with LabelSetReader(root):
        assert len(hashed) == 3  # the dataset and both shards
    with LabelSetReader(root):
        assert len(hashed) == 3
    (root / "labels-00001.h5").touch()
    with LabelSetReader(root):
        assert len(hashed) == 4


# ----------------------------------------------------------------- changed under a stream


def _stream_through(
    server: Server, name: str, want: list[dict[str, np.ndarray]], fault: Callable[[], None]
) -> BaseException | None:
    """Stream 2,000 epochs of ``name`` (8,000 frames), checking every frame against
    ``want`` (the intact build's rows by stored epoch), with ``fault`` run after frame 20;
    the error that ends the stream."""
    with Client(server.url, retries=1) as client:
        remote = client.labelset(name, image_cache_mb=0)
        sharding = remote.sharding(BATCH)
        frames = remote.raw_batches(0, sharding, with_images=True, epochs=2000)
        try:
            for i, raw in enumerate(frames):
                start, stop = sharding.positions(raw.index)
                rows = want[raw.epoch % len(want)]
                got = raw.tensors["indices"].numpy()
                assert np.array_equal(got, rows["order"][start:stop]), f"frame {i}: other ids"
                soft = raw.tensors["soft"].numpy()
                assert np.array_equal(soft, rows["soft"][start:stop]), f"frame {i}: other labels"
                if i == 20:
                    fault()
        except (ClientError, PayloadError) as exc:
            return exc
    return None


def _stored_rows(root: Path) -> list[dict[str, np.ndarray]]:
    with LabelSetReader(root) as reader:
        rows = [reader.read(e, 0, N, ["order", "soft"], stored_labels=True)
                for e in range(reader.config.epochs)]  # fmt: skip
    return [{"order": r["order"], "soft": r[part_name("soft", "")]} for r in rows]


def test_a_set_overwritten_in_place_mid_stream_is_never_served_as_itself(
    long_builds: tuple[Path, Path], tmp_path: Path
) -> None:
    """Another build's shards and manifest copied over the open files of the set a stream
    reads (``cp``: same inodes, same sizes): the client gets an error, never the other
    build's labels under the digest it pinned (before, 7,232 of 8,000 frames were); the
    server serves the new build to new clients."""
    a, b = long_builds
    store = tmp_path / "store"
    target = copy(a, store / "s")
    server = Server(store).start()
    try:

        def overwrite() -> None:
            for name in ("labels-00000.h5", "labels-00001.h5", "manifest.json"):
                shutil.copyfile(b / name, target / name)

        error = _stream_through(server, "s", _stored_rows(a), overwrite)
        assert error is not None, "the stream ended without noticing the overwrite"
        digest = load_manifest(b)[1]
        url = server.url + "/v1/labelsets/s"
        wait_until(lambda: httpx.get(url).json().get("digest") == digest, "no new build served")
    finally:
        server.stop()


def test_a_shard_truncated_mid_stream_is_an_error(
    long_builds: tuple[Path, Path], tmp_path: Path
) -> None:
    """A shard truncated to half under an open stream: an error frame, and every batch
    before it the intact build's; the set is withdrawn."""
    store = tmp_path / "store"
    target = copy(long_builds[0], store / "s")
    server = Server(store).start()
    try:
        shard = target / "labels-00000.h5"
        error = _stream_through(server, "s", _stored_rows(long_builds[0]),
                                lambda: os.truncate(shard, shard.stat().st_size // 2))  # fmt: skip
        assert isinstance(error, PayloadError) and "changed on disk" in str(error), error
        assert "s" in unhealthy(server)
    finally:
        server.stop()


# ----------------------------------------------------------------- bad content, bad sets


def _shard_attr(value: object) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        with h5py.File(root / "labels-00001.h5", "r+") as f:
            f.attrs["epoch_start"] = value

    return edit


def _dataset(key: str, change: Callable[[np.ndarray], object]) -> Callable[[Path], None]:
    """Replace dataset.h5's ``key`` by ``change`` of it (an array, or a group's maker)."""

    def edit(root: Path) -> None:
        with h5py.File(root / "dataset.h5", "r+") as f:
            values = f[key][...]
            del f[key]
            made = change(values)
            if callable(made):
                made(f)
            else:
                f[key] = made

    return edit


def _as_group(key: str) -> Callable[[Path], None]:
    return _dataset(
        key, lambda values: lambda f: f.create_group(key).create_dataset("x", data=values)
    )


def _hard_label(value: int) -> Callable[[Path], None]:
    def change(labels: np.ndarray) -> np.ndarray:
        labels[5] = value
        return labels

    return _dataset("labels", change)


def _nan_label(root: Path) -> None:
    with h5py.File(root / "labels-00000.h5", "r+") as f:
        f["soft"][1, 3, 0] = np.nan


def _class_names(root: Path) -> None:
    path = root / "manifest.json"
    path.write_text(path.read_text().replace('"cat"', '"bee"').replace(',\n      "bee"\n', "\n", 1))


def _flip_64(root: Path) -> None:
    flip(root / "dataset.h5", 64, 0xFF)


#: name -> (edit, what verify says, what the reader says). Each edited set is resealed (its
#: manifest made to match its bytes) unless the edit is the damage itself.
BAD_SETS: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "nan-label": (_nan_label, "'soft' holds 1 non-finite values (NaN or inf), the first in "
                  "stored epoch 1", "non-finite labels in stored epoch 1"),
    "hard-negative": (_hard_label(-1), "hard labels outside [0, 3), the first -1 at sample 5",
                      "hard label -1 at sample 5, outside [0, 3)"),
    "hard-past-k": (_hard_label(3), "the first 3 at sample 5", "hard label 3 at sample 5"),
    "class-names": (_class_names, "class_names names 2 classes but has 3",
                    "class_names names 2 classes but has 3"),
    "labels-2d": (_dataset("labels", lambda v: v[:, None]),
                  "'labels' is int64(20, 1), expected int64(20,)",
                  "'labels' is int64(20, 1), expected int64(20,)"),
    "images-float64": (_dataset("images", lambda v: v.astype(np.float64)),
                       "'images' is float64(20, 3, 12, 10), expected uint8(20, 3, 12, 10)",
                       "'images' is float64(20, 3, 12, 10)"),
    "labels-group": (_as_group("labels"), "'labels' is a group, not a dataset",
                     "'labels' is a group, not a dataset"),
    "epoch-start-string": (_shard_attr("zero"), "holds epochs missing or not integers",
                           "labels-00001.h5 holds epochs missing or not integers"),
    "epoch-start-array": (_shard_attr(np.array([2, 3])), "holds epochs missing or not integers",
                          "holds epochs missing or not integers"),
    "epoch-start-empty": (_shard_attr(h5py.Empty("i8")), "holds epochs missing or not integers",
                          "holds epochs missing or not integers"),
    "flip-64": (_flip_64, "dataset.h5: sha256", "dataset.h5: sha256"),
    "flip-64-resealed": (_flip_64, "dataset.h5", "dataset.h5"),
}  # fmt: skip


def bad_set(source: Path, out: Path, kind: str) -> Path:
    root = copy(source, out)
    BAD_SETS[kind][0](root)
    if kind != "flip-64":
        reseal_manifest(root)
    return root


def read_everything(root: Path) -> None:
    """Open the set as a server does and read every field of every stored epoch."""
    entry = OpenLabelSet.open(root, image_cache_bytes=1 << 20)
    try:
        for epoch in range(EPOCHS):
            entry.reader.read(epoch, 0, N)
    finally:
        entry.close()


@pytest.mark.parametrize("kind", BAD_SETS)
def test_bad_content_fails_verify_and_is_never_served(
    builds: tuple[Path, Path], tmp_path: Path, kind: str
) -> None:
    """NaN labels, hard labels outside [0, K), too few class names, datasets of the wrong
    shape, dtype or kind, epochs that are not integers, a damaged header: verify fails in
    one line each, no traceback, and the reader refuses what it would otherwise serve."""
    root = bad_set(builds[0], tmp_path / "s", kind)
    _, says, refuses = BAD_SETS[kind]
    assert_verify_fails(root, says)
    with pytest.raises(StoreError, match=re.escape(refuses)):
        read_everything(root)


def test_a_manifest_that_is_a_folder_is_one_line(builds: tuple[Path, Path], tmp_path: Path) -> None:
    """verify and inspect on a set whose manifest.json is a folder: exit 1, one line."""
    root = copy(builds[0], tmp_path / "s")
    (root / "manifest.json").unlink()
    (root / "manifest.json").mkdir()
    for args in (["verify"], ["inspect"], ["inspect", "--json"]):
        done = run_cli(*args, root)
        assert done.returncode == 1, (args, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "manifest.json is a folder" in lines[0], (args, done.stderr)


#: The bad sets refused when opened (a NaN label is found when it is read).
UNOPENABLE = [kind for kind in BAD_SETS if kind != "nan-label"]


def test_one_bad_set_harms_no_other(builds: tuple[Path, Path], tmp_path: Path) -> None:
    """A real server over a good set beside every kind of bad one starts, serves the good
    one and lists each bad one unhealthy with a one-line reason; bad sets added while it
    runs are listed so too, and rescans still add new sets and drop deleted ones."""
    store = tmp_path / "store"
    for kind in UNOPENABLE:
        bad_set(builds[0], store / kind, kind)
    copy(builds[0], store / "good")
    server = Server(store).start()
    try:
        assert listed(server) == ["good"]
        assert_unhealthy(server, set(UNOPENABLE))
        with Client(server.url) as client:
            assert len(list(client.labelset("good").batches(0, BATCH))) == N // BATCH
        for kind in UNOPENABLE:
            bad_set(builds[0], store / f"later-{kind}", kind)
        copy(builds[1], store / "later")
        shutil.rmtree(store / "good")
        wait_until(lambda: listed(server) == ["later"], "rescans stopped")
        later = {f"later-{kind}" for kind in UNOPENABLE}
        wait_until(lambda: len(unhealthy(server)) == 2 * len(UNOPENABLE), "not all listed")
        assert_unhealthy(server, set(UNOPENABLE) | later)
    finally:
        server.stop()


def assert_unhealthy(server: Server, names: set[str]) -> None:
    reasons = unhealthy(server)
    assert set(reasons) == names, reasons
    assert all(reason and "\n" not in reason for reason in reasons.values()), reasons
