"""CutMix and Mixup per (epoch, sample): the client rebuilds the teacher's input exactly."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import teachers
import torch
from conftest import Server, random_set, relabel_args, run_cli, write_folder
from recorded import (
    check_pictures,
    check_served_batches_equal_local,
    check_train_runs,
    client_batches,
)
from test_errors import assert_one_line_error

from softserve.client import (
    MixPolicy,
    apply_mix,
    open_local,
    sample_mix,
)
from softserve.report.figures import build_figures
from softserve.report.numbers import ReportData
from softserve.storage import LabelSetReader, verify_label_set
from softserve.worker.relabel import RelabelOptions, relabel
from softserve.worker.transcode import TranscodeOptions, transcode


@pytest.mark.parametrize("kind", ["cutmix", "mixup"])
def test_mix_rows_are_seeded_and_well_formed(kind: str) -> None:
    policy = MixPolicy(kind, prob=0.5, alpha=1.0)
    rows = sample_mix(policy, 7, 3, 400, 12, 10)
    assert rows.dtype == np.float32 and rows.shape == (400, 6)
    assert np.array_equal(rows, sample_mix(policy, 7, 3, 400, 12, 10))
    assert not np.array_equal(rows, sample_mix(policy, 7, 4, 400, 12, 10))
    # the mixed samples' draws do not depend on prob; the others are left alone
    full = sample_mix(replace(policy, prob=1.0), 7, 3, 400, 12, 10)
    unmixed = (rows != full).any(axis=1)
    assert 120 < unmixed.sum() < 280  # about half at prob 0.5
    partner, lam, box = rows[:, 0].astype(np.int64), rows[:, 1], rows[:, 2:].astype(np.int64)
    assert np.array_equal(partner[unmixed], np.flatnonzero(unmixed))
    assert (lam[unmixed] == 1).all() and not box[unmixed].any()
    top, left, h, w = box.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 12).all() and (left + w <= 10).all()
    if kind == "cutmix":
        assert np.allclose(lam, 1 - h * w / 120)
        assert (h[~unmixed] > 0).any()
    else:
        assert not box.any() and (lam[~unmixed] < 1).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "blend"}, "mix must be one of cutmix, mixup"),
        ({"kind": "mixup", "alpha": 0.0}, "alpha must be positive"),
        ({"kind": "cutmix", "prob": 1.5}, "probability must be in [0, 1]"),
        ({"kind": "cutmix", "prob": -0.1}, "probability must be in [0, 1]"),
    ],
)
def test_bad_mix_policies_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        MixPolicy(**kwargs)


def test_apply_mix_pastes_and_blends() -> None:
    views = torch.zeros(2, 1, 4, 4)
    partner = torch.ones(2, 1, 4, 4)
    mix = torch.tensor([[1, 0.75, 1, 2, 2, 1], [0, 1.0, 0, 0, 0, 0]])
    cut = apply_mix("cutmix", views, partner, mix)
    assert cut[0, 0].sum() == 2 and cut[0, 0, 1:3, 2].eq(1).all()
    assert not cut[1].any()
    blend = apply_mix("mixup", views + 2, partner, mix)
    assert torch.allclose(blend[0], torch.full((1, 4, 4), 0.75 * 2 + 0.25))
    assert torch.equal(blend[1], views[1] + 2)


@pytest.fixture(scope="module", params=["cutmix", "mixup"])
def mixed_set(request, tmp_path_factory) -> tuple[Path, list[torch.Tensor]]:
    """A set relabelled with --mix by a teacher that records its inputs: (path, inputs)."""
    root = tmp_path_factory.mktemp(f"mix-{request.param}")
    teachers.RECORDED.clear()
    opts = RelabelOptions(
        images=write_folder(root / "images", *random_set()), teacher="teachers:recorder",
        out=root / "store" / "set", epochs=2, shard_epochs=1, batch_size=5, device="cpu",
        codec="fp32", progress=False, mix=MixPolicy(request.param, prob=0.8, alpha=1.0),
    )  # fmt: skip
    relabel(opts)
    return opts.out, list(teachers.RECORDED[1:])  # the first batch is the worker's probe


@pytest.mark.parametrize("cache", [True, False], ids=["cached-images", "images-in-batch"])
def test_client_input_is_the_teacher_input_bit_for_bit(mixed_set, cache: bool) -> None:
    """For several batch and world sizes, every student input is the teacher's, exactly, and
    the served label is the teacher on it."""
    path, recorded = mixed_set
    for batch in client_batches(path, recorded, cache, world_sizes=(1, 2)):
        assert batch.mix is not None and batch.partner_params is not None
    with open_local(path) as labels:
        assert labels.detail.mix is not None and labels.detail.mix.prob == 0.8
        # some samples are mixed, with another sample
        rows = torch.cat([b.mix for b in labels.batches(0, 12)])
        n = labels.num_samples
        assert (rows[:, 1] < 1).any() and (rows[:, 0] != torch.arange(n)[None]).any()


def test_loader_yields_the_mixed_inputs(mixed_set) -> None:
    path, _ = mixed_set
    with open_local(path) as labels:
        expected = [b.images for e in range(2) for b in labels.batches(e, 5)]
        got = [b.images for b in labels.loader(5, epochs=2)]
    assert len(got) == len(expected) == 4
    assert all(torch.equal(x, y) for x, y in zip(got, expected, strict=True))


def test_mixed_set_verifies_and_inspects(mixed_set) -> None:
    path, _ = mixed_set
    assert verify_label_set(path) == []
    kind = LabelSetReader(path).config.mix.kind
    result = run_cli("inspect", path)
    assert result.returncode == 0, result.stderr
    assert f"{kind}, probability 0.8" in result.stdout


def test_transcode_keeps_the_mix(mixed_set, tmp_path: Path) -> None:
    path, _ = mixed_set
    out = tmp_path / "store" / "fp16"
    transcode(TranscodeOptions(path, out, codec="fp16", progress=False))
    assert verify_label_set(out) == []
    with LabelSetReader(path) as source, LabelSetReader(out) as copy:
        assert copy.config.mix == source.config.mix
        for epoch in range(2):
            fields = ["order", "params", "mix", "partner_params"]
            a, b = source.read(epoch, 0, 12, fields), copy.read(epoch, 0, 12, fields)
            assert all(np.array_equal(a[f], b[f]) for f in fields)


def test_train_runs_on_a_mixed_set(mixed_set, tmp_path: Path) -> None:
    """``softserve train --store`` takes the mixed inputs through the same LabelSet path."""
    check_train_runs(mixed_set[0], tmp_path)


def test_mix_prob_zero_is_no_mixing(make_options, tmp_path: Path) -> None:
    plain = make_options(epochs=2, shard_epochs=1, out=tmp_path / "store" / "plain")
    relabel(plain)
    zero = replace(plain, out=tmp_path / "store" / "zero", mix=MixPolicy("mixup", prob=0.0))
    relabel(zero)
    with LabelSetReader(plain.out) as a, LabelSetReader(zero.out) as b:
        assert a.config.mix is None and b.config.mix is not None
        for epoch in range(2):
            rows_a, rows_b = a.read(epoch, 0, 12), b.read(epoch, 0, 12)
            for field, value in rows_a.items():
                assert np.array_equal(value, rows_b[field]), field
    with open_local(plain.out) as a, open_local(zero.out) as b:
        for x, y in zip(a.batches(1, 5), b.batches(1, 5), strict=True):
            assert torch.equal(x.images, y.images) and torch.equal(x.soft, y.soft)
            assert x.mix is None and y.mix is not None


def test_unmixed_set_has_no_mix_rows(make_options) -> None:
    """No mix rows to read, and no ``mix`` key in its manifest: softserve versions that
    predate mixing (their manifest model forbids unknown keys) still read it."""
    opts = make_options(epochs=2, shard_epochs=1)
    relabel(opts)
    assert "mix" not in json.loads((opts.out / "manifest.json").read_text())["config"]
    with LabelSetReader(opts.out) as reader, pytest.raises(ValueError, match="without --mix"):
        reader.read(0, 0, 4, ["order", "mix"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mix", "blend"], "mix must be one of cutmix, mixup"),
        (["--mix", "cutmix", "--mix-alpha", "0"], "alpha must be positive"),
        (["--mix", "mixup", "--mix-prob", "2"], "probability must be in [0, 1]"),
    ],
)
def test_relabel_refuses_bad_mix_flags(make_options, flags: list[str], message: str) -> None:
    opts = make_options()
    assert_one_line_error(run_cli(*relabel_args(opts), *flags), message, "--mix-alpha > 0")
    assert not opts.out.exists()


def test_served_mixed_batches_equal_local_ones(mixed_set) -> None:
    """Over HTTP, with partner images in the batch or from the cache, the same inputs."""
    check_served_batches_equal_local(mixed_set[0])


def test_server_refuses_mix_tensors_of_an_unmixed_set(make_options) -> None:
    opts = make_options(epochs=2, shard_epochs=1)
    relabel(opts)
    server = Server(opts.out.parent).start()
    try:
        response = httpx.get(
            f"{server.url}/v1/labelsets/{opts.out.name}/epochs/0/batches/0",
            params={"batch_size": 4, "include": "indices,mix"},
        )
        assert response.status_code == 400
        assert "without --mix" in response.json()["error"]["message"]
    finally:
        server.stop()


def test_pictures_show_the_mixed_input(mixed_set) -> None:
    """The view PNG, and the report's grid from disk and through a server, show what the
    teacher saw: its recorded input, with the normalization undone; the grid's titles name
    the partner and λ of the mixed views."""

    def names_the_mixes(data: ReportData) -> None:
        cells = data.numbers["grid"]["cells"]
        assert any(cell["mix"]["lambda"] < 1 for cell in cells)
        titles = [ax.get_title() for ax in build_figures(data)["views"].axes
                  if ax.get_label().startswith("view-")]  # fmt: skip
        for cell, title in zip(cells, titles, strict=True):
            mix = cell["mix"]
            assert (f"#{mix['partner']} λ {mix['lambda']:.2f}" in title) == (mix["lambda"] < 1)

    check_pictures(*mixed_set, names_the_mixes)


@pytest.mark.slow
def test_ui_says_what_a_view_was_mixed_with(mixed_set, browser_page) -> None:
    path, _ = mixed_set
    with LabelSetReader(path) as reader:
        kind, n = reader.config.mix.kind, reader.config.num_samples
        rows = reader.read(1, 0, n, ["order", "mix"])
    j = int(np.flatnonzero(rows["mix"][:, 1] < 1)[0])
    sample, partner, lam = int(rows["order"][j]), int(rows["mix"][j, 0]), rows["mix"][j, 1]
    server = Server(path.parent).start()
    try:
        page = browser_page
        page.goto(f"{server.url}/ui?set={path.name}&epoch=1&sample={sample}")
        page.wait_for_selector(f"#facts dt:text-is('{kind}')")
        facts = dict(
            zip(page.locator("#facts dt").all_inner_texts(),
                page.locator("#facts dd").all_inner_texts(), strict=True)
        )  # fmt: skip
        assert facts[kind] == f"with sample {partner}, λ {lam:.3f}"
    finally:
        server.stop()
