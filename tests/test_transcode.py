"""``softserve transcode``: other codecs and fewer epochs from stored labels, no teacher."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import safetensors.numpy
from conftest import Server, run_cli, shard_digests
from test_errors import assert_one_line_error

from softserve.errors import InputError, StoreError
from softserve.storage import LabelSetReader, read_manifest, verify_label_set
from softserve.storage.layout import PLAN_FILE, sha256_file
from softserve.storage.manifest import write_model
from softserve.storage.summary import describe
from softserve.worker.relabel import RelabelOptions, relabel
from softserve.worker.transcode import TranscodeOptions, transcode


@pytest.fixture
def fp32_set(make_options: Callable[..., RelabelOptions], tmp_path: Path) -> Path:
    """The tiny RGB set relabelled at fp32: 6 epochs, 2 per shard."""
    relabel(make_options(out=tmp_path / "store" / "fp32", codec="fp32"))
    return tmp_path / "store" / "fp32"


@pytest.mark.parametrize(
    ("codec", "epochs"), [("fp16", None), ("int8", None), ("topk:2", None), ("fp32", 4),
                          ("topk:1", 2)],
)  # fmt: skip
def test_transcode_equals_relabelling_with_that_codec(
    fp32_set: Path, make_options: Callable[..., RelabelOptions], codec: str, epochs: int | None
) -> None:
    """Same label bytes, same dataset, same identity as a relabel with --codec (--epochs)."""
    direct = fp32_set.parent / "direct"
    relabel(make_options(out=direct, codec=codec, epochs=epochs or 6))
    out = fp32_set.parent / "transcoded"
    manifest = transcode(
        TranscodeOptions(fp32_set, out, codec=codec, epochs=epochs, shard_epochs=2, progress=False)
    )
    assert shard_digests(out) == shard_digests(direct) and shard_digests(out)
    assert sha256_file(out / "dataset.h5") == sha256_file(direct / "dataset.h5")
    assert manifest.config == read_manifest(direct).config
    assert verify_label_set(out) == []
    assert not (out / PLAN_FILE).exists()


def test_transcoded_set_serves(fp32_set: Path) -> None:
    """What the server sends from a transcoded set is what its reader decodes."""
    out = fp32_set.parent / "small"
    transcode(TranscodeOptions(fp32_set, out, codec="topk:1", epochs=3, progress=False))
    server = Server(fp32_set.parent).start()
    try:
        listed = {x["name"]: x for x in httpx.get(server.url + "/v1/labelsets").json()}
        assert (listed["small"]["codec"], listed["small"]["epochs"]) == ("topk:1", 3)
        response = httpx.get(
            server.url + "/v1/labelsets/small/epochs/2/batches/0",
            params={"batch_size": 12, "include": "indices,soft,logits"},
        )
        batch = safetensors.numpy.load(response.content)
        with LabelSetReader(out) as reader, LabelSetReader(fp32_set) as source:
            rows = reader.read(2, 0, 12)
            np.testing.assert_array_equal(batch["soft"], rows["soft"])
            np.testing.assert_array_equal(batch["logits"], rows["logits"])
            np.testing.assert_array_equal(rows["order"], source.read(2, 0, 12)["order"])
            np.testing.assert_array_equal(rows["norm"], source.read(2, 0, 12)["norm"])
    finally:
        server.stop()


def test_transcode_resumes_and_refuses_bad_requests(fp32_set: Path) -> None:
    out = fp32_set.parent / "int8"
    opts = TranscodeOptions(fp32_set, out, codec="int8", shard_epochs=2, progress=False)
    manifest = transcode(opts)
    whole = shard_digests(out)
    (out / "manifest.json").unlink()
    (out / "labels-00001.h5").unlink()
    write_model(out / PLAN_FILE, manifest.config)
    (out / "labels-00001.h5.tmp").write_bytes(b"half a shard")
    with pytest.raises(StoreError, match="'softserve transcode' command that started it"):
        read_manifest(out)  # the advice fits a transcode left part way, not only a relabel
    assert "'softserve transcode'" in dict(describe(out))["status"]
    assert transcode(opts).config == manifest.config
    assert shard_digests(out) == whole and not (out / "labels-00001.h5.tmp").exists()
    assert transcode(opts).created == read_manifest(out).created  # complete: nothing to do

    for epochs in (7, 0, -1):
        with pytest.raises(InputError, match="keep 1 to 6"):
            transcode(replace(opts, out=fp32_set.parent / "x", epochs=epochs))
    for shard_epochs in (0, -3):
        with pytest.raises(InputError, match="--shard-epochs must be positive"):
            transcode(replace(opts, out=fp32_set.parent / "x", shard_epochs=shard_epochs))
    assert not (fp32_set.parent / "x").exists()  # refused before writing anything
    with pytest.raises(InputError, match="topk:3 keeps all 3"):
        transcode(replace(opts, out=fp32_set.parent / "x", codec="topk:3"))
    with pytest.raises(StoreError, match="differs in: codec"):
        transcode(replace(opts, codec="fp16"))
    (fp32_set.parent / "a-file").write_text("keep me")
    for where, message in (("a-file", "is a file"), ("a-file/sub", "lies under")):
        with pytest.raises(StoreError, match=message):
            transcode(replace(opts, out=fp32_set.parent / where))
    assert (fp32_set.parent / "a-file").read_text() == "keep me"


def test_transcode_cli(fp32_set: Path) -> None:
    out = fp32_set.parent / "cli"
    done = run_cli("transcode", fp32_set, "--out", out, "--codec", "topk:1", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}: topk:1, 6 epochs" in done.stdout and "bytes per view" in done.stdout
    bad = run_cli("transcode", fp32_set, "--out", fp32_set.parent / "bad", "--codec", "fp8")
    assert_one_line_error(bad, "unknown label codec 'fp8'")


def test_transcode_on_a_full_disk_stops_cleanly_and_resumes(
    fp32_set: Path, small_disk: Path, tmp_path: Path
) -> None:
    """A full disk is one line, leaves no partial file and no manifest; moved to a disk with
    room, the same command finishes the set as an uninterrupted transcode writes it."""
    reference = transcode(TranscodeOptions(fp32_set, tmp_path / "ref", shard_epochs=1,
                                           progress=False))  # fmt: skip
    free = shutil.disk_usage(small_disk).free
    (small_disk / "filler").write_bytes(bytes(max(0, free - 40_000)))  # dataset + ~1 shard
    out = small_disk / "set"
    args = ("transcode", fp32_set, "--out", out, "--shard-epochs", 1, "--no-progress")
    assert_one_line_error(run_cli(*args), "disk is full", "rerun the same command to resume")
    assert not list(out.glob("*.tmp")) and not (out / "manifest.json").exists()
    written = shard_digests(out)
    assert len(written) < len(reference.shards)
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    resumed = run_cli("transcode", fp32_set, "--out", moved, "--shard-epochs", 1, "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert shard_digests(moved) == shard_digests(tmp_path / "ref") and written.items() <= (
        shard_digests(tmp_path / "ref").items()
    )
