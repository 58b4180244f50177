"""Label sets of DSA views (``relabel --views dsa``): stored rows, the client's input equal to
the teacher's bit for bit, locally and over HTTP, for several batch and world sizes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import teachers
import torch
from conftest import Server, random_set, relabel_args, run_cli, shard_digests, write_folder
from recorded import (
    check_pictures,
    check_served_batches_equal_local,
    check_train_runs,
    client_batches,
)
from test_errors import assert_one_line_error

from softserve.client import Client, MixPolicy, open_local
from softserve.format.augment import DSA_FIELDS, DSA_ROTATE, NUM_DSA, DsaPolicy, sample_dsa
from softserve.format.sampling import epoch_order
from softserve.report.numbers import ReportData
from softserve.storage import LabelSetReader, verify_label_set
from softserve.worker.relabel import RelabelOptions, relabel
from softserve.worker.transcode import TranscodeOptions, transcode


@pytest.fixture(scope="module", params=[None, "cutmix"], ids=["dsa", "dsa-cutmix"])
def dsa_set(request, tmp_path_factory) -> tuple[Path, list[torch.Tensor]]:
    """A set relabelled with DSA views (and CutMix on top) by a teacher that records its
    inputs: (path, inputs)."""
    root = tmp_path_factory.mktemp("dsa")
    teachers.RECORDED.clear()
    mix = None if request.param is None else MixPolicy(request.param, prob=0.8, alpha=1.0)
    opts = RelabelOptions(
        images=write_folder(root / "images", *random_set()), teacher="teachers:recorder",
        out=root / "store" / "set", epochs=3, shard_epochs=2, batch_size=5, device="cpu",
        codec="fp32", progress=False, dsa=DsaPolicy(), mix=mix,
    )  # fmt: skip
    relabel(opts)
    return opts.out, list(teachers.RECORDED[1:])  # the first batch is the worker's probe


def test_dsa_rows_are_stored_and_named(dsa_set) -> None:
    """The manifest names the policy and its ranges; each epoch's rows are sample_dsa's of
    the seed, in the epoch's order, float32 on disk."""
    path, _ = dsa_set
    views = json.loads((path / "manifest.json").read_text())["config"]["views"]
    assert views["policy"] == "dsa"
    assert views["dsa"]["strategy"] == "color_crop_cutout_flip_scale_rotate"
    assert views["dsa"]["rotate"] == 15.0 and views["dsa"]["crop"] == 0.125
    assert verify_label_set(path) == []
    with LabelSetReader(path) as reader:
        config, n = reader.config, reader.config.num_samples
        for epoch in range(config.epochs):
            rows = reader.read(epoch, 0, n, ["order", "params"])
            order = epoch_order(config.seed, epoch, n)
            assert rows["params"].dtype == np.float32 and rows["params"].shape == (n, NUM_DSA)
            drawn = sample_dsa(DsaPolicy(), config.seed, epoch, n, *config.views.output_size)
            assert np.array_equal(rows["params"], drawn[order])
            if config.mix is not None:
                partner = reader.read(epoch, 0, n, ["mix", "partner_params"])
                ids = partner["mix"][:, 0].astype(np.int64)
                assert np.array_equal(partner["partner_params"], drawn[ids])


@pytest.mark.parametrize("cache", [True, False], ids=["cached-images", "images-in-batch"])
def test_client_input_is_the_teacher_input_bit_for_bit(dsa_set, cache: bool) -> None:
    """For several batch and world sizes, every student input is the teacher's, exactly, and
    the served label is the teacher on it."""
    path, recorded = dsa_set
    for batch in client_batches(path, recorded, cache, world_sizes=(1, 2, 3)):
        assert batch.params.dtype == torch.float32 and batch.params.shape[1] == NUM_DSA
    with open_local(path) as labels:
        assert labels.detail.views.policy == "dsa"


def test_served_dsa_batches_equal_local_ones(dsa_set) -> None:
    """Over HTTP, with images in the batch or from the cache, the same inputs and labels;
    the served detail names the policy."""
    path, _ = dsa_set
    check_served_batches_equal_local(path)
    server = Server(path.parent).start()
    try:
        views = Client(server.url).labelset(path.name).detail.views
        assert views.policy == "dsa" and views.dsa is not None and views.dsa.rotate == 15.0
        assert views.scale is None
    finally:
        server.stop()


def test_transcode_keeps_the_dsa_rows(dsa_set, tmp_path: Path) -> None:
    path, _ = dsa_set
    out = tmp_path / "store" / "fp16"
    transcode(TranscodeOptions(path, out, codec="fp16", progress=False))
    assert verify_label_set(out) == []
    with LabelSetReader(path) as source, LabelSetReader(out) as copy:
        assert copy.config.views == source.config.views
        for epoch in range(3):
            a, b = (r.read(epoch, 0, 12, ["order", "params"]) for r in (source, copy))
            assert np.array_equal(a["params"], b["params"])


def test_relabel_views_flag(make_options, tmp_path: Path) -> None:
    """``--views dsa`` writes the DSA set that RelabelOptions(dsa=...) writes; ``--views
    rrc`` (the default) writes the crop set, whose manifest has no ``policy`` key (softserve
    versions before DSA read it)."""
    opts = make_options(epochs=2, shard_epochs=1, dsa=DsaPolicy())
    done = run_cli(*relabel_args(opts))
    assert done.returncode == 0, done.stderr
    direct = make_options(epochs=2, shard_epochs=1, dsa=DsaPolicy(), out=tmp_path / "direct")
    relabel(direct)
    assert shard_digests(opts.out) == shard_digests(direct.out)
    with LabelSetReader(opts.out) as reader:
        assert reader.config.views.policy == "dsa"
    crops = make_options(epochs=2, shard_epochs=1, out=tmp_path / "store" / "crops")
    done = run_cli(*relabel_args(crops))
    assert done.returncode == 0, done.stderr
    views = json.loads((crops.out / "manifest.json").read_text())["config"]["views"]
    assert "policy" not in views and views["flip"] is True


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--views", "jitter"], "--views must be one of rrc, dsa"),
        (["--views", "dsa", "--min-scale", "0.5"], "--views dsa draws the DSA views"),
    ],
)
def test_relabel_refuses_bad_view_flags(make_options, flags: list[str], message: str) -> None:
    opts = make_options()
    assert_one_line_error(run_cli(*relabel_args(opts), *flags), message)
    assert not opts.out.exists()


def test_pictures_show_the_dsa_input(dsa_set) -> None:
    """The view PNG, and the report's grid from disk and through a server, show what the
    teacher saw: its recorded input with the normalization undone, clipped to [0, 1] (DSA's
    brightness and contrast leave it); the report names the policy and counts DSA rows."""
    path, recorded = dsa_set
    with LabelSetReader(path) as reader:
        config = reader.config
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in (config.mean, config.std))
    assert (torch.cat(recorded) * std + mean).gt(1).any()  # clipping is exercised

    def counts_dsa_rows(data: ReportData) -> None:
        assert data.numbers["label_set"]["views"] == "dsa"
        fp32 = next(r for r in data.numbers["storage"]["codecs"] if r["codec"] == "fp32")
        # order (int32), the DSA row (14 float32), 3 fp32 labels and the norm
        assert fp32["bytes_per_view"] == 4 + 14 * 4 + 3 * 4 + 4
        assert all(len(cell["params"]) == NUM_DSA for cell in data.numbers["grid"]["cells"])

    check_pictures(path, recorded, counts_dsa_rows)


def test_inspect_names_the_view_policy(dsa_set, make_options) -> None:
    path, _ = dsa_set
    result = run_cli("inspect", path)
    assert result.returncode == 0, result.stderr
    assert "dsa color_crop_cutout_flip_scale_rotate" in result.stdout
    assert "rotate 15.0°" in result.stdout
    crops = make_options(epochs=2, shard_epochs=1)
    relabel(crops)
    result = run_cli("inspect", crops.out)
    assert result.returncode == 0, result.stderr
    assert "rrc: crop scale (0.08, 1.0)" in result.stdout


@pytest.mark.slow
def test_ui_says_what_a_dsa_view_went_through(dsa_set, browser_page) -> None:
    path, _ = dsa_set
    with LabelSetReader(path) as reader:
        n = reader.config.num_samples
        rows = reader.read(1, 0, n, ["order", "params"])
    kinds = rows["params"][:, DSA_FIELDS.index("transform")]
    j = int(np.flatnonzero(kinds == DSA_ROTATE)[0])
    sample, angle = int(rows["order"][j]), float(rows["params"][j, DSA_FIELDS.index("angle")])
    server = Server(path.parent).start()
    try:
        page = browser_page
        page.goto(f"{server.url}/ui?set={path.name}&epoch=1&sample={sample}")
        page.wait_for_selector("#facts dt:text-is('DSA')")
        facts = dict(
            zip(page.locator("#facts dt").all_inner_texts(),
                page.locator("#facts dd").all_inner_texts(), strict=True)
        )  # fmt: skip
        assert facts["views"] == "DSA (color_crop_cutout_flip_scale_rotate)"
        assert f"rotate {math.degrees(angle):.1f}°" in facts["DSA"]
        assert "cutout" in facts["DSA"]
    finally:
        server.stop()


def test_train_runs_on_a_dsa_set(dsa_set, tmp_path: Path) -> None:
    """``softserve train --store`` takes the DSA inputs through the same LabelSet path."""
    check_train_runs(dsa_set[0], tmp_path)
