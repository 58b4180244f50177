"""softserve report: its numbers and figures against an independent NumPy computation from
the reader's arrays, determinism, the CLI from disk and from a server."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import Server, build_label_set, reseal_manifest, run_cli

from softserve.errors import InputError, StoreError
from softserve.report import RemoteSource, ReportOptions, StoreSource, compute_report
from softserve.report.figures import build_figures
from softserve.report.numbers import ReportData
from softserve.report.page import write_report
from softserve.storage.reader import LabelSetReader


def independent(root: Path) -> dict:
    """Per-view statistics straight from the reader's decoded arrays, in NumPy."""
    with LabelSetReader(root) as reader:
        config = reader.config
        n, k, epochs = config.num_samples, config.num_classes, config.epochs
        hard = reader.hard_labels()
        agree_class, views_class = np.zeros(k), np.zeros(k)
        entropy_counts = np.zeros((k, 40), np.int64)
        cosine_sum, per_epoch, p_hard = np.zeros(k), [], np.zeros(n)
        rows_by_epoch = {}
        for epoch in range(epochs):
            rows = reader.read(epoch, 0, n, ["order", "params", "logits", "soft"])
            rows_by_epoch[epoch] = rows
            y = hard[rows["order"]]
            t = rows["logits"].astype(np.float64)
            p = np.exp(t) / np.exp(t).sum(axis=1, keepdims=True)
            entropy = -(p * np.log(p)).sum(axis=1)
            agree = p.argmax(axis=1) == y
            per_epoch.append(agree.mean())
            for c in range(k):
                agree_class[c] += agree[y == c].sum()
                views_class[c] += (y == c).sum()
                counts, _ = np.histogram(entropy[y == c], bins=40, range=(0, math.log(k)))
                entropy_counts[c] += counts
            r = rows["soft"].astype(np.float64)
            cos = (t * r).sum(1) / np.sqrt((t * t).sum(1) * (r * r).sum(1))
            cosine_sum += np.array([cos[y == c].sum() for c in range(k)])
            p_hard[rows["order"]] += p[np.arange(n), y]
        return {
            "agreement": agree_class / views_class, "per_epoch": per_epoch,
            "entropy_counts": entropy_counts, "cosine_mean": cosine_sum / views_class,
            "mean_p_hard": p_hard / epochs, "rows": rows_by_epoch, "hard": hard,
            "images": reader.images(), "shard_bytes": sum(
                p.stat().st_size for p in root.glob("labels-*.h5")),
            "size": config.views.output_size,
        }  # fmt: skip


def crop_view(image: np.ndarray, params: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One view by F.interpolate on the cropped box, then the flip: the documented rule."""
    top, left, h, w, flip = (int(v) for v in params)
    box = torch.from_numpy(image[None, :, top : top + h, left : left + w]).float() / 255
    view = F.interpolate(box, size=size, mode="bilinear", align_corners=False)[0]
    return (view.flip(-1) if flip else view).numpy()


@pytest.fixture(scope="module")
def tiny_report(store: Path):
    source = StoreSource(store / "tiny")
    try:
        data = compute_report(source, ReportOptions(grid_classes=2, grid_epochs=3, hardest=5))
    finally:
        source.close()
    return data, independent(store / "tiny")


def test_numbers_match_an_independent_computation(tiny_report) -> None:
    data, truth = tiny_report
    numbers = data.numbers
    np.testing.assert_allclose(numbers["agreement"]["per_class"], truth["agreement"], atol=1e-12)
    np.testing.assert_allclose(numbers["agreement"]["per_epoch"], truth["per_epoch"], atol=1e-12)
    # counts may move by one view where float rounding lands exactly on a bin edge
    counts = np.asarray(numbers["entropy"]["counts"])
    assert counts.sum() == truth["entropy_counts"].sum() == numbers["views"] == 50 * 4
    assert np.abs(counts - truth["entropy_counts"]).sum() <= 2
    np.testing.assert_allclose(
        numbers["refinement_cosine"]["mean_per_class"], truth["cosine_mean"], rtol=1e-5
    )
    lo, hi = numbers["refinement_cosine"]["edges"][0], numbers["refinement_cosine"]["edges"][-1]
    assert lo == pytest.approx(math.sqrt(1 - 0.1**2)) and hi == 1.0
    hardest = np.argsort(truth["mean_p_hard"], kind="stable")[:5]
    assert [h["sample"] for h in numbers["hardest"]] == hardest.tolist()
    np.testing.assert_allclose(
        [h["mean_hard_prob"] for h in numbers["hardest"]], truth["mean_p_hard"][hardest],
        rtol=1e-5,
    )  # fmt: skip
    storage = numbers["storage"]
    assert storage["label_bytes"] == truth["shard_bytes"]
    fp16 = next(c for c in storage["codecs"] if c["codec"] == "fp16")
    assert fp16["bytes_per_label"] == 2 * 3
    assert numbers["topk_mass"] is None


def test_figures_show_the_numbers(tiny_report) -> None:
    data, truth = tiny_report
    axes = {ax.get_label(): ax for fig in build_figures(data).values() for ax in fig.axes}
    heights = [bar.get_height() for bar in axes["agreement-per-class"].patches]
    np.testing.assert_allclose(heights, truth["agreement"], atol=1e-12)
    line = axes["agreement-per-epoch"].lines[0].get_ydata()
    np.testing.assert_allclose(line, truth["per_epoch"], atol=1e-12)
    shown = np.asarray(axes["entropy-per-class"].images[0].get_array())
    counts = truth["entropy_counts"]
    np.testing.assert_allclose(shown, counts / counts.sum(1, keepdims=True), atol=0.02)

    cells = data.numbers["grid"]["cells"]
    assert len(cells) == 2 * 3  # two classes, three epochs
    for i, cell in enumerate(cells):
        rows = truth["rows"][cell["epoch"]]
        row = int(np.flatnonzero(rows["order"] == cell["sample"])[0])
        view = crop_view(truth["images"][cell["sample"]], rows["params"][row], truth["size"])
        pixels = np.asarray(axes[f"view-{i}"].images[0].get_array())
        np.testing.assert_allclose(pixels, view.transpose(1, 2, 0), atol=1e-5)
        t = rows["logits"][row].astype(np.float64)
        p = np.exp(t - t.max()) / np.exp(t - t.max()).sum()
        widths = sorted((bar.get_width() for bar in axes[f"top3-{i}"].patches), reverse=True)
        np.testing.assert_allclose(widths, np.sort(p)[::-1][:3], rtol=1e-5)
        hard_bars = [b for b in axes[f"top3-{i}"].patches if b.get_facecolor()[0] > 0.7]
        assert truth["hard"][cell["sample"]] == cell["class"]
        assert [b.get_width() for b in hard_bars] == pytest.approx([p[cell["class"]]])


def test_topk_mass_is_the_teacher_mass_on_the_stored_classes(tmp_path: Path) -> None:
    root = build_label_set(tmp_path / "store" / "top", codec="topk:1", n=12, epochs=2)
    source = StoreSource(root)
    try:
        numbers = compute_report(source).numbers
    finally:
        source.close()
    masses = []
    with LabelSetReader(root) as reader:
        for epoch in range(2):
            kept = reader.read(epoch, 0, 12, ["soft"], stored_labels=True)["soft_index"]
            t = reader.read(epoch, 0, 12, ["logits"])["logits"].astype(np.float64)
            p = np.exp(t) / np.exp(t).sum(1, keepdims=True)
            masses.append(np.take_along_axis(p, kept.astype(np.int64), 1).sum(1))
    mass = numbers["topk_mass"]
    assert mass["mean"] == pytest.approx(np.concatenate(masses).mean(), rel=1e-5)
    assert sum(mass["counts"]) == 24
    assert 1 / 3 < mass["mean"] < 1  # one of three classes, the teacher's top one


def _files(out: Path) -> dict[Path, bytes]:
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*.*"))}


def test_report_is_deterministic_and_self_contained(store: Path, tmp_path: Path) -> None:
    outputs = []
    for run in ("a", "b"):
        source = StoreSource(store / "tiny")
        try:
            write_report(compute_report(source), tmp_path / run)
        finally:
            source.close()
        outputs.append(_files(tmp_path / run))
    assert outputs[0] == outputs[1]
    files = {str(p) for p in outputs[0]}
    assert {"report.html", "report.json", "figures/views.png", "figures/entropy.png"} <= files
    html = outputs[0][Path("report.html")].decode()
    assert html.count("data:image/png;base64,") == len([f for f in files if f.endswith(".png")])
    assert "http://" not in html and "https://" not in html and "<script" not in html
    numbers = json.loads(outputs[0][Path("report.json")])
    assert numbers["label_set"]["name"] == "tiny" and numbers["views"] == 200


def test_cli_report_from_a_server_matches_the_one_from_disk(
    store: Path, server, tmp_path: Path
) -> None:
    source = StoreSource(store / "tiny")
    try:
        write_report(compute_report(source), tmp_path / "disk")
    finally:
        source.close()
    served = run_cli(
        "report", "--url", server.url, "--labelset", "tiny", "--out", tmp_path / "served",
        "--no-progress",
    )  # fmt: skip
    assert served.returncode == 0, served.stderr
    assert "report written" in served.stdout
    assert _files(tmp_path / "disk") == _files(tmp_path / "served")


def test_report_through_a_server_keeps_to_its_batch_limit(store: Path) -> None:
    """A server whose max batch size is below the set's size: the report reads in its steps."""
    server = Server(store, "--max-batch-size", "7").start()
    try:
        remote = RemoteSource(server.url, "tiny")
        served = compute_report(remote).numbers
        remote.close()
    finally:
        server.stop()
    local = StoreSource(store / "tiny")
    try:
        assert served == compute_report(local).numbers
    finally:
        local.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [((), "give a label set directory"), (("nowhere",), "nowhere")],
)
def test_bad_input_says_what_to_give(args: tuple[str, ...], message: str) -> None:
    result = run_cli("report", *args, "--no-progress")
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def _forged(base: Path, out: Path, edit: Callable[[Path], None]) -> Path:
    """A copy of ``base`` edited by ``edit`` and resealed: its checksums all agree."""
    shutil.copytree(base, out)
    edit(out)
    reseal_manifest(out)
    return out


def _report_of(root: Path, opts: ReportOptions | None = None) -> ReportData:
    source = StoreSource(root)
    try:
        return compute_report(source, opts)
    finally:
        source.close()


def _nan_label(root: Path) -> None:
    with h5py.File(root / "labels-00000.h5", "r+") as f:
        name = next(k for k in f if k.startswith("soft"))
        rows = f[name][...]
        rows[0, 1] = np.nan
        f[name][...] = rows


def _hard_label(value: int) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        with h5py.File(root / "dataset.h5", "r+") as f:
            labels = f["labels"][...]
            labels[5] = value
            f["labels"][...] = labels

    return edit


def _class_names(names: list[str]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = root / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["config"]["class_names"] = names
        path.write_text(json.dumps(manifest))
        with h5py.File(root / "dataset.h5", "r+") as f:
            f.attrs["class_names"] = json.dumps(names)

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_nan_label, "non-finite labels in stored epoch 0"),
        (_hard_label(-1), "hard label -1 at sample 5, outside"),
        (_hard_label(12), "hard label 12 at sample 5, outside"),
        (_class_names(["ant"]), "names 1 classes but has 3"),
    ],
    ids=["nan", "negative-hard", "hard-past-k", "too-few-names"],
)
def test_a_damaged_set_is_refused_in_one_line(
    store: Path, tmp_path: Path, edit: Callable[[Path], None], message: str
) -> None:
    """Content the figures index by, or cannot draw, is a StoreError naming it."""
    forged = _forged(store / "tiny", tmp_path / "forged", edit)
    with pytest.raises(StoreError, match=message):
        _report_of(forged)


def test_cli_refuses_non_finite_labels_in_one_line(store: Path, tmp_path: Path) -> None:
    forged = _forged(store / "tiny", tmp_path / "forged", _nan_label)
    result = run_cli("report", forged, "--out", tmp_path / "out", "--no-progress")
    assert result.returncode == 1
    assert "non-finite labels" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_class_names_are_shown_as_typed(store: Path, tmp_path: Path) -> None:
    """A '$' in a class name is text, not the start of matplotlib's mathtext."""
    names = ["$x^{$", "b$c", "cat"]
    forged = _forged(store / "tiny", tmp_path / "forged", _class_names(names))
    data = _report_of(forged, ReportOptions(grid_classes=3))
    figure = build_figures(data)["agreement"]
    figure.canvas.draw()
    shown = {t.get_text() for ax in figure.axes for t in ax.get_xticklabels()}
    assert {r"\$x^{\$", r"b\$c"} <= shown
    page = write_report(data, tmp_path / "report")
    assert "$x^{$" in json.loads((tmp_path / "report" / "report.json").read_text())[
        "label_set"]["class_names"]  # fmt: skip
    assert page.exists()


@pytest.mark.parametrize("where", ["a-file", "a-file/sub"])
def test_out_that_cannot_be_a_folder_is_refused(tiny_report, tmp_path: Path, where: str) -> None:
    (tmp_path / "a-file").write_text("keep me")
    with pytest.raises(InputError, match="cannot write the report into"):
        write_report(tiny_report[0], tmp_path / where)
    assert (tmp_path / "a-file").read_text() == "keep me"
