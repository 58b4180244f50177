"""Label-set format versions: format 3 stores one label field per view as ``soft``; format 2
(the same field named ``refined``) and format 1 still serve."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import httpx
import numpy as np
import pytest
import safetensors.numpy
import torch
from conftest import Server, build_label_set, run_cli

from softserve.client import Client, open_local, recover_logits, refine_labels
from softserve.errors import InputError, StoreError
from softserve.format.codecs import get_codec, part_name
from softserve.storage import LabelSetReader, read_manifest, verify_label_set
from softserve.storage.manifest import FORMAT_VERSION, write_model
from softserve.storage.shards import NORM
from softserve.storage.writer import shard_info
from softserve.worker.relabel import RelabelOptions, relabel


def downgrade_to_format_1(root: Path) -> dict[str, dict[str, np.ndarray]]:
    """Rewrite a label set as format 1 wrote it (refined labels and logits, both in the
    codec, no norms), the way a store made by an older softserve holds it. Returns each
    shard's stored label parts."""
    manifest = read_manifest(root)
    config = manifest.config
    codec = get_codec(config.codec)
    with LabelSetReader(root) as reader:
        rows = {
            s.file: [reader.read(e, 0, config.num_samples) for e in range(*s.epochs)]
            for s in manifest.shards
        }  # fmt: skip
    stored, shards = {}, []
    for shard in manifest.shards:
        path = root / shard.file
        epochs = rows[shard.file]
        stored[shard.file] = {}
        with h5py.File(path, "w") as f:
            f.attrs.update(format_version=1, epoch_start=shard.epoch_start,
                           epoch_stop=shard.epoch_stop, codec=config.codec)  # fmt: skip
            for key in ("order", "params"):
                f[key] = np.stack([r[key] for r in epochs])
            for field, key in (("refined", "soft"), ("logits", "logits")):
                encoded = codec.encode(np.stack([r[key] for r in epochs]))
                for suffix, array in encoded.items():
                    f[part_name(field, suffix)] = array
                stored[shard.file][field] = codec.decode(encoded, config.num_classes)
        shards.append(shard_info(path, shard.epoch_start, shard.epoch_stop))
    old = manifest.model_copy(update={"format_version": 1, "shards": shards})
    write_model(root / "manifest.json", old)
    return stored


def test_format_1_label_sets_open_verify_and_serve(tmp_path: Path) -> None:
    """A format-1 set: verify passes, inspect says so, the server serves its stored logits
    and refined labels as stored, and the client trains on them."""
    root = build_label_set(tmp_path / "store" / "old", codec="fp32", n=20)
    stored = downgrade_to_format_1(root)
    assert verify_label_set(root) == []
    done = run_cli("inspect", root)
    assert done.returncode == 0 and "version 1" in done.stdout, done.stderr
    with LabelSetReader(root) as reader:
        assert reader.version == 1
        first = reader.manifest.shards[0].file
        got = reader.read(0, 0, 20, fields=["soft", "logits", NORM])
        np.testing.assert_array_equal(got["soft"], stored[first]["refined"][0])
        np.testing.assert_array_equal(got["logits"], stored[first]["logits"][0])
        np.testing.assert_allclose(got[NORM], np.linalg.norm(got["logits"], axis=1), rtol=1e-6)

    server = Server(tmp_path / "store").start()
    try:
        path = "/v1/labelsets/old/epochs/1/batches/0"

        detail = httpx.get(server.url + "/v1/labelsets/old").json()
        assert detail["format_version"] == 1
        response = httpx.get(server.url + path, params={"batch_size": 20, "include": "soft,logits"})
        batch = safetensors.numpy.load(response.content)
        np.testing.assert_array_equal(batch["logits"], stored[first]["logits"][1])
        np.testing.assert_array_equal(batch["soft"], stored[first]["refined"][1])
        with Client(server.url) as client:
            (b,) = client.labelset("old").batches(2, 20, logits=True)
            torch.testing.assert_close(b.soft, refine_labels(b.logits, b.hard), atol=1e-6, rtol=0)
    finally:
        server.stop()


def downgrade_to_format_2(root: Path) -> None:
    """Rewrite a label set as format 2 wrote it: the soft labels' datasets named
    ``refined``."""
    manifest = read_manifest(root)
    shards = []
    for shard in manifest.shards:
        path = root / shard.file
        with h5py.File(path, "a") as f:
            for name in [k for k in f if k == "soft" or k.startswith("soft_")]:
                f.move(name, "refined" + name[len("soft") :])
            f.attrs["format_version"] = 2
        shards.append(shard_info(path, shard.epoch_start, shard.epoch_stop))
    old = manifest.model_copy(update={"format_version": 2, "shards": shards})
    write_model(root / "manifest.json", old)


@pytest.mark.parametrize("codec", ["fp16", "topk:2"])
def test_format_2_label_sets_read_and_serve_under_format_3_names(
    tmp_path: Path, codec: str
) -> None:
    """A format-2 set (labels stored as ``refined``) verifies, reads and serves the same
    soft labels and logits, under the names format 3 gives them."""
    root = build_label_set(tmp_path / "store" / "old", codec=codec, n=20)
    with LabelSetReader(root) as reader:
        want = reader.read(1, 0, 20, ["soft", "logits"])
        want_stored = reader.read(1, 0, 20, ["soft"], stored_labels=True)
    downgrade_to_format_2(root)
    assert verify_label_set(root) == []
    with LabelSetReader(root) as reader:
        assert reader.version == 2
        got = reader.read(1, 0, 20, ["soft", "logits"])
        got_stored = reader.read(1, 0, 20, ["soft"], stored_labels=True)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    assert set(got_stored) == set(want_stored)
    for key in want_stored:
        np.testing.assert_array_equal(got_stored[key], want_stored[key])
    server = Server(tmp_path / "store").start()
    try:
        with Client(server.url) as client:
            (b,) = client.labelset("old").batches(1, 20, logits=True)
            order = b.indices.numpy()
            with LabelSetReader(root) as reader:
                rows = reader.read(1, 0, 20, ["order", "soft", "logits"])
            assert np.array_equal(rows["order"], order)
            torch.testing.assert_close(b.soft, torch.from_numpy(rows["soft"]), rtol=0, atol=0)
            torch.testing.assert_close(
                b.logits, torch.from_numpy(rows["logits"]), rtol=1e-6, atol=1e-5
            )
    finally:
        server.stop()


#: How far refine_labels(served logits) may be from the served soft labels: float32
#: rounding for fp32, else the codec's error on the stored labels (K = 3, |r| < 1.1).
CONSISTENCY = {"fp32": 1e-6, "fp16": 2e-3, "int8": 6e-3, "topk:2": 2e-3}


def test_a_newer_format_is_named_with_the_fix(tmp_path: Path) -> None:
    """A set a newer softserve wrote (a later format, with views this one does not know) is
    one StoreError naming its format and the fix, to the client and to inspect."""
    root = build_label_set(tmp_path / "store" / "s")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    manifest["config"]["views"]["policy"] = "warp"
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError) as info:
        open_local(root)
    message = str(info.value)
    assert f"format {FORMAT_VERSION + 1}, written by a newer softserve" in message
    assert f"reads formats 1 to {FORMAT_VERSION}: upgrade it" in message and "\n" not in message
    done = run_cli("inspect", root)
    assert done.returncode == 1 and "written by a newer softserve" in done.stderr


def test_served_logits_and_soft_are_consistent(tmp_path: Path) -> None:
    """For every codec, what is served satisfies soft = refine_labels(logits, hard), within
    the codec's error: both come from the one stored label field."""
    for codec in CONSISTENCY:
        build_label_set(tmp_path / "store" / codec.replace(":", "-"), codec=codec, n=20)
    server = Server(tmp_path / "store").start()
    try:
        with Client(server.url) as client:
            for codec, atol in CONSISTENCY.items():
                labelset = client.labelset(codec.replace(":", "-"))
                assert labelset.detail.codec == codec
                for b in labelset.batches(1, 10, logits=True):
                    torch.testing.assert_close(
                        b.soft, refine_labels(b.logits, b.hard), atol=atol, rtol=0
                    )
                    norm = b.logits.norm(dim=1)
                    torch.testing.assert_close(
                        recover_logits(b.soft, b.hard, norm), b.logits, atol=2e-3, rtol=2e-3
                    )
    finally:
        server.stop()


def test_resuming_a_format_1_relabel_is_refused(tmp_path: Path) -> None:
    """Complete shards of an older format are not mixed with new ones: a clear error."""
    root = build_label_set(tmp_path / "set", codec="fp16", n=12)
    opts = RelabelOptions(
        images=tmp_path / "set-images", teacher="teachers:tiny_rgb", out=root, epochs=4,
        shard_epochs=2, batch_size=32, device="cpu", codec="fp16", progress=False,
    )  # fmt: skip
    downgrade_to_format_1(root)
    plan = read_manifest(root).config
    (root / "manifest.json").unlink()
    write_model(root / "relabel-plan.json", plan)
    (root / "labels-00001.h5").unlink()
    try:
        relabel(opts)
    except InputError as exc:
        assert "format 1" in str(exc) and "new folder" in str(exc)
    else:
        raise AssertionError("a format-1 shard was resumed into a format-2 set")


def test_topk_labels_travel_in_their_stored_form(tmp_path: Path) -> None:
    """K = 1000, topk:10, a batch of 256: ~12 KB of labels on the wire (values, uint16
    indices, tail, norm) instead of 2 MB of float32 soft labels and logits; the client
    decodes them to what the server's decoding gives."""
    import httpx
    import teachers

    n, classes = 256, 1000
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(n, 3, 8, 8), dtype=np.uint8)
    images = tmp_path / "k1000.pt"
    torch.save({"data": torch.from_numpy(data), "label": torch.arange(n) * 3 % classes}, images)
    relabel(RelabelOptions(
        images=images, teacher="teachers:tiny_rgb", num_classes=classes,
        out=tmp_path / "store" / "k1000", epochs=1, device="cpu", codec="topk:10",
        progress=False,
    ))  # fmt: skip
    server = Server(tmp_path / "store").start()
    try:
        path = server.url + "/v1/labelsets/k1000/epochs/0/batches/0"
        query = {"batch_size": n, "include": "soft,logits"}
        stored = httpx.get(path, params={**query, "label_encoding": "stored"})
        tensors = safetensors.numpy.load(stored.content)
        assert {k: (v.dtype, v.shape) for k, v in tensors.items()} == {
            "soft": (np.float16, (n, 10)), "soft_index": (np.uint16, (n, 10)),
            "soft_tail": (np.float16, (n,)), "norm": (np.float32, (n,)),
        }  # fmt: skip
        label_bytes = sum(v.nbytes for v in tensors.values())
        assert label_bytes == n * (20 + 20 + 2 + 4) and len(stored.content) < 13_000
        decoded = httpx.get(path, params=query)
        assert len(decoded.content) > 2 * n * classes * 4
        wide = safetensors.numpy.load(decoded.content)
        with Client(server.url) as client:
            labelset = client.labelset("k1000")
            (batch,) = labelset.batches(0, n, logits=True)
            np.testing.assert_array_equal(batch.soft.numpy(), wide["soft"])
            np.testing.assert_allclose(batch.logits.numpy(), wide["logits"], rtol=1e-5, atol=1e-5)
        teacher = teachers.tiny_rgb(num_classes=classes).eval()
        with torch.no_grad():
            exact = teacher(batch.images)
        kept = torch.from_numpy(tensors["soft_index"].astype(np.int64))
        top = refine_labels(exact, batch.hard).topk(10, dim=1).indices
        assert (kept.sort(1).values == top.sort(1).values).float().mean() > 0.95
    finally:
        server.stop()


@pytest.mark.parametrize("name", ["../outside.h5", "/etc/passwd", "a/b.h5", ".hidden", ""])
def test_manifest_files_stay_inside_the_set(tmp_path: Path, name: str) -> None:
    """A manifest naming a file outside its folder is not a valid manifest: never opened."""
    import json

    root = build_label_set(tmp_path / "store" / "s", n=12)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"][0]["file"] = name
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="not a valid manifest"):
        read_manifest(root)
    assert any("not a valid manifest" in p for p in verify_label_set(root))


def flip_byte_in_chunk(path: Path, dataset: str) -> None:
    """Flip one byte inside the first stored chunk of ``dataset``, in place."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(0)
    with open(path, "r+b") as out:
        out.seek(info.byte_offset + info.size // 2)
        byte = out.read(1)
        out.seek(-1, 1)
        out.write(bytes([byte[0] ^ 0x40]))


def test_a_flipped_byte_is_an_error_not_a_label(tmp_path: Path) -> None:
    """One flipped byte in the stored labels: the file's sha256 no longer matches, so the
    set is refused when opened (and not served); with the manifest made to match, every
    chunk's fletcher32 checksum still makes it a StoreError on read (a JSON error from the
    server), never a wrong label."""
    root = build_label_set(tmp_path / "store" / "s", n=20, epochs=2, shard_epochs=2)
    flip_byte_in_chunk(root / "labels-00000.h5", "soft")
    with pytest.raises(StoreError, match="labels-00000.h5: sha256 .*manifest says"):
        LabelSetReader(root)
    shards = [shard_info(root / "labels-00000.h5", 0, 2)]
    write_model(root / "manifest.json", read_manifest(root).model_copy(update={"shards": shards}))
    with LabelSetReader(root) as reader:
        assert reader.read(0, 0, 20, ["order", "params"])["order"].shape == (20,)
        with pytest.raises(StoreError, match="cannot read 'soft'"):
            reader.read(0, 0, 20, ["soft"])
    server = Server(tmp_path / "store").start()
    try:
        response = httpx.get(server.url + "/v1/labelsets/s/epochs/0/batches/0?batch_size=10")
        assert response.status_code == 500 and response.json()["error"]["code"] == "store_error"
    finally:
        server.stop()


@pytest.mark.parametrize("bad", [-1, 20, 1 << 30])
def test_sample_ids_outside_the_set_are_refused(tmp_path: Path, bad: int) -> None:
    """An order entry that is not a sample id (checksum intact) is a StoreError: -1 would
    otherwise serve the last sample's image, N an IndexError."""
    root = build_label_set(tmp_path / "s", n=20, epochs=2, shard_epochs=2)
    with h5py.File(root / "labels-00000.h5", "r+") as f:
        f["order"][1, 3] = bad
    assert any("labels-00000.h5: sha256" in p for p in verify_label_set(root))
    manifest = read_manifest(root)  # even with a manifest made to match the file:
    shards = [shard_info(root / "labels-00000.h5", 0, 2)]
    write_model(root / "manifest.json", manifest.model_copy(update={"shards": shards}))
    with LabelSetReader(root) as reader:
        reader.read(0, 0, 20)
        with pytest.raises(StoreError, match="sample ids outside 0..19"):
            reader.read(1, 0, 20, ["order"])
        with pytest.raises(StoreError, match="sample ids outside"):
            reader.read(1, 0, 20, ["logits"])
    assert verify_label_set(root) == [
        "labels-00000.h5: order of epoch 1 (in the shard) is not a permutation"
    ]


def test_a_view_of_a_sample_missing_from_its_epoch_is_a_store_error(tmp_path: Path) -> None:
    """An order that repeats a sample and so lacks another (checksums made to match): the
    view is a JSON store error and the set is withdrawn, not a bare 500."""
    root = build_label_set(tmp_path / "store" / "s", n=20, epochs=2, shard_epochs=2)
    with h5py.File(root / "labels-00000.h5", "r+") as f:
        missing = int(f["order"][1, 3])
        f["order"][1, 3] = f["order"][1, 4]
    shards = [shard_info(root / "labels-00000.h5", 0, 2)]
    write_model(root / "manifest.json", read_manifest(root).model_copy(update={"shards": shards}))
    server = Server(tmp_path / "store").start()
    try:
        response = httpx.get(f"{server.url}/v1/labelsets/s/views/1/{missing}.png", timeout=30)
        assert response.status_code == 500, response.text
        error = response.json()["error"]
        assert error["code"] == "store_error"
        assert f"never shows sample {missing}" in error["message"]
        again = httpx.get(f"{server.url}/v1/labelsets/s/epochs/0/batches/0?batch_size=10")
        assert again.status_code == 503 and again.json()["error"]["code"] == "withdrawn"
    finally:
        server.stop()
