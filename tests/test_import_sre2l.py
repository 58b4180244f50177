"""``softserve import sre2l``: relabel files in SRe2L's layout (and LPLD's and LPQLD's
variants of it), written by tests/sre2l_files.py, imported as label sets, served, and
compared with what the relabel's teacher saw; and every refusal, with nothing written."""

from __future__ import annotations

import itertools
import os
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import teachers
import torch
from conftest import Server, random_set, run_cli, write_folder
from sre2l_files import IMAGENET, Relabelled, write_relabel

from softserve.client import Client, open_local
from softserve.client.remote import RemoteLabelSet
from softserve.errors import InputError
from softserve.pixels import stored_views
from softserve.storage import LabelSetReader
from softserve.worker.sources import load_image_set
from softserve.worker.sre2l import ImportOptions, import_sre2l

N, EPOCHS, BATCH, SIZE = 20, 2, 8, 16
STD = torch.tensor(IMAGENET[1]).view(3, 1, 1)
#: PIL resizes in 8 bits (an 8-bit intermediate pass, then 8-bit output): where no crop
#: is downscaled, the teacher's input is within one gray level of the client's view
ONE_LEVEL = 1.001 / 255
#: the tiny teacher on the client's view against the file's logits, relative to the
#: row's largest logit (measured: at most 2e-3 with views within one gray level)
TEACHER_RTOL = 5e-3
#: name -> how the relabel ran, and the codec it is imported in
SETS = {
    "cutmix": ({"mix": "cutmix"}, "fp32"),
    "mixup-lpld": ({"mix": "mixup", "record": True}, "int8"),
    "views-lpqld": ({"mix": None, "flat": True}, "fp16"),
    "cutmix-lpqld": ({"mix": "cutmix", "flat": True}, "fp32"),
}
#: relabels whose epochs dropped their last partial batch (4 of the 20 images an epoch),
#: 5 epochs of files: every image has at least 2 views (seed 42), the set 2 epochs
DROPPED = {
    "dropped-lpld": {"mix": "cutmix", "record": True, "drop_last": True, "epochs": 5},
    "dropped-lpqld": {"mix": "cutmix", "flat": True, "drop_last": True, "epochs": 5},
}


def teacher() -> torch.nn.Module:
    return teachers.tiny_rgb().eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 RGB 16×16 images in three class folders."""
    root = tmp_path_factory.mktemp("sre2l-images")
    return write_folder(root / "images", *random_set(n=N, h=SIZE, w=SIZE))


@pytest.fixture(scope="module")
def relabels(tmp_path_factory: pytest.TempPathFactory, images: Path) -> dict[str, Relabelled]:
    """Every set of SETS relabelled (2 epochs in batches of 8), and of DROPPED, imported
    into one store."""
    root = tmp_path_factory.mktemp("sre2l")
    done = {}
    runs = {**SETS, **{name: (how, "fp32") for name, how in DROPPED.items()}}
    for name, (how, codec) in runs.items():
        done[name] = write_relabel(images, root / "labels" / name, teacher(), **how)
        opts = ImportOptions(
            labels=done[name].root,
            images=images,
            out=root / "store" / name,
            codec=codec,
            progress=False,
        )
        import_sre2l(opts)
    return done


@pytest.fixture(scope="module")
def served(relabels: dict[str, Relabelled]):
    store = next(iter(relabels.values())).root.parent.parent / "store"
    with Server(store) as server:
        yield server


def codec_tolerance(codec: str, logits: torch.Tensor) -> dict[str, float]:
    """The codec's stated bound on logits recovered from GIFT labels of ``logits`` (the
    bound on r times ‖t‖), for assert_close."""
    r = torch.nn.functional.normalize(logits, dim=1)  # r up to β·ŝ, which shifts no bound
    norm = logits.norm(dim=1, keepdim=True)
    if codec == "fp16":
        bound = 2**-11 * (r.abs().max(1, keepdim=True).values + 0.1)
    elif codec == "int8":
        bound = (r.max(1, keepdim=True).values - r.min(1, keepdim=True).values + 0.2) / 510
    else:
        bound = torch.full_like(norm, 2**-20)
    return {"rtol": 0, "atol": (bound * norm * 1.01).max().item() + 1e-6}


def check_served_epoch(
    remote: RemoteLabelSet, epoch: int, relabel: Relabelled, model: torch.nn.Module, codec: str,
    file_key: Callable[[tuple[int, int]], tuple[int, int]],
) -> None:  # fmt: skip
    """Every sample of ``epoch`` served once: the file's logits (at ``file_key`` of its
    (epoch, sample)) within the codec's bound, a view within one gray level of the teacher's
    input, and the teacher on it gives the logits."""
    seen = []
    for batch in remote.batches(epoch, batch_size=6, logits=True, drop_last=False):
        keys = [file_key((epoch, i)) for i in batch.indices.tolist()]
        files = torch.stack([relabel.logits[k] for k in keys])
        torch.testing.assert_close(batch.logits, files, **codec_tolerance(codec, files))
        inputs = torch.stack([relabel.inputs[k] for k in keys])
        assert ((batch.images - inputs).abs() * STD).max() <= ONE_LEVEL
        with torch.no_grad():
            again = model(batch.images)
        scale = files.abs().max(1, keepdim=True).values
        assert ((again - files).abs() / scale).max() <= TEACHER_RTOL
        seen += batch.indices.tolist()
    assert sorted(seen) == list(range(N))


@pytest.mark.parametrize("name", list(SETS))
def test_served_labels_are_the_files_and_the_teacher_on_the_client_views(
    served: Server, relabels: dict[str, Relabelled], name: str
) -> None:
    """Every (epoch, sample) served: the file's logits within the codec's bound, a view
    within one gray level of the teacher's input, and the teacher on it gives the logits."""
    relabel, codec = relabels[name], SETS[name][1]
    model = teacher()
    with Client(served.url) as client:
        remote = client.labelset(name)
        for epoch in range(EPOCHS):
            check_served_epoch(remote, epoch, relabel, model, codec, lambda key: key)


def test_any_batch_size_and_world_size(served: Server, relabels: dict[str, Relabelled]) -> None:
    """The same labels at batch sizes 1, 3, 8 over 1, 2 and 3 ranks: each sample of an epoch
    once (a short tail padded by repeats), each with the file's logits."""
    relabel = relabels["cutmix"]
    with Client(served.url) as client:
        remote = client.labelset("cutmix")
        for batch_size, world_size, epoch in itertools.product((1, 3, 8), (1, 2, 3), (0, 1)):
            seen = []
            for rank in range(world_size):
                for batch in remote.batches(
                    epoch,
                    batch_size,
                    rank=rank,
                    world_size=world_size,
                    logits=True,
                    drop_last=False,
                ):
                    ids = batch.indices.tolist()
                    files = torch.stack([relabel.logits[(epoch, i)] for i in ids])
                    torch.testing.assert_close(batch.logits, files, rtol=0, atol=1e-4)
                    seen += ids
            assert set(seen) == set(range(N)) and len(seen) < N + world_size


@pytest.mark.parametrize("name", list(SETS))
def test_stored_orders_views_and_mixes_are_the_relabels(
    relabels: dict[str, Relabelled], name: str
) -> None:
    """Each epoch's order is the sampler's, each row's view its crop and flip in pixels,
    each mix its partner (the row the batch's permutation names), λ and box."""
    relabel = relabels[name]
    path = relabel.root.parent.parent / "store" / name
    with LabelSetReader(path) as reader:
        config = reader.config
        assert config.teacher.spec == "sre2l" and config.precision == "fp16"
        assert config.views.output_size == (SIZE, SIZE)
        mixed = SETS[name][0]["mix"]
        assert (config.mix and config.mix.kind) == mixed
        fields = ("order", "params", "mix") if mixed else ("order", "params")
        for epoch in range(EPOCHS):
            rows = reader.read(epoch, 0, N, fields)
            assert rows["order"].tolist() == relabel.orders[epoch]
            for j, sample in enumerate(rows["order"].tolist()):
                key = (epoch, sample)
                assert tuple(rows["params"][j]) == relabel.views[key]
                if not mixed:
                    continue
                partner, box, lam = relabel.mixes[key]
                assert rows["mix"][j, 0] == partner
                if box is None:
                    assert rows["mix"][j, 1] == np.float32(lam)
                    continue
                r0, c0, r1, c1 = box
                assert tuple(rows["mix"][j, 2:]) == (r0, c0, r1 - r0, c1 - c0)
                assert rows["mix"][j, 1] == np.float32(1 - (r1 - r0) * (c1 - c0) / SIZE**2)


def kth_views(relabel: Relabelled) -> tuple[int, dict[tuple[int, int], tuple[int, int]]]:
    """The set a relabel with dropped batches imports as: its epoch count (the fewest views
    an image has) and, per (set epoch k, sample), the files' (epoch, sample) of that image's
    k-th view."""
    seen: dict[int, list[int]] = {}
    for epoch, order in sorted(relabel.orders.items()):
        for sample in order:
            seen.setdefault(sample, []).append(epoch)
    kept = min(len(v) for v in seen.values())
    return kept, {(k, i): (e[k], i) for i, e in seen.items() for k in range(kept)}


@pytest.mark.parametrize("name", list(DROPPED))
def test_dropped_batches_import_each_images_kth_view_as_epoch_k(
    served: Server, relabels: dict[str, Relabelled], images: Path, name: str
) -> None:
    """A relabel that dropped 4 images an epoch: set epoch k serves each image's k-th view
    of the files (logits, view, mix, order), over HTTP, for as many epochs as every image has
    views; some views of the files are not the first ones' own epoch, and some are left out."""
    relabel = relabels[name]
    kept, source = kth_views(relabel)
    assert kept == 2 and any(e != k for (k, _), (e, _) in source.items())
    model = teacher()
    with Client(served.url) as client:
        remote = client.labelset(name)
        assert remote.epochs == kept
        for epoch in range(kept):
            check_served_epoch(remote, epoch, relabel, model, "fp32", source.__getitem__)
    with LabelSetReader(relabel.root.parent.parent / "store" / name) as reader:
        for epoch in range(kept):
            rows = reader.read(epoch, 0, N, ("order", "params", "mix"))
            stream = [
                i
                for e, order in sorted(relabel.orders.items())
                for i in order
                if source[(epoch, i)][0] == e
            ]
            assert rows["order"].tolist() == stream  # the files' order
            for j, sample in enumerate(rows["order"].tolist()):
                key = source[(epoch, sample)]
                assert tuple(rows["params"][j]) == relabel.views[key]
                assert rows["mix"][j, 0] == relabel.mixes[key][0]
    views = sum(len(order) for order in relabel.orders.values())
    again = import_sre2l(
        ImportOptions(
            labels=relabel.root,
            images=images,
            out=relabel.root.parent.parent / "store" / name,
            codec="fp32",
            progress=False,
        )
    )
    assert again.computed_shards == 0 and again.left_out == views - kept * N > 0


def test_downscaled_views_are_antialiased_as_pil_resized_them(tmp_path: Path) -> None:
    """Crops of 24×24 images resized to 16 with CutMix: the import counts the views PIL
    downscaled and names the set's interpolation bilinear-antialias; then every served view
    (each row's and its partner's crop) is within one gray level of PIL's, the teacher's
    input, and the teacher on it gives the file's logits. Plain bilinear views of the same
    rows, as before antialiased views, are many levels off where a crop was downscaled."""
    folder = write_folder(tmp_path / "images", *random_set(n=N, h=24, w=24, seed=3))
    relabel = write_relabel(folder, tmp_path / "labels", teacher(), size=SIZE)
    out = tmp_path / "store" / "down"
    opts = ImportOptions(labels=relabel.root, images=folder, size=(SIZE, SIZE), out=out)
    opts.progress = False
    result = import_sre2l(opts)
    downscaled = {k for k, v in relabel.views.items() if v[2] > SIZE or v[3] > SIZE}
    assert result.views == N * EPOCHS and result.downscaled == len(downscaled) > 0
    labels = open_local(out)
    assert labels.detail.views.interpolation == "bilinear-antialias"
    model, mean = teacher(), torch.tensor(IMAGENET[0]).view(3, 1, 1)
    base = load_image_set(folder).images
    plain_gap = 0.0
    with LabelSetReader(out) as reader:
        for epoch in range(EPOCHS):
            rows = reader.read(epoch, 0, N, ("order", "params", "mix", "partner_params"))
            teacher_saw = torch.stack([relabel.inputs[(epoch, i)] for i in rows["order"]])
            plain = stored_views(
                "cutmix", base.__getitem__, rows["order"], rows["params"], SIZE, rows["mix"],
                rows["partner_params"],
            )  # fmt: skip
            plain_gap = max(plain_gap, ((plain - (teacher_saw * STD + mean)).abs()).max().item())
            for batch in labels.batches(epoch, batch_size=N, logits=True):
                keys = [(epoch, i) for i in batch.indices.tolist()]
                inputs = torch.stack([relabel.inputs[k] for k in keys])
                assert ((batch.images - inputs).abs() * STD).max() <= ONE_LEVEL
                files = torch.stack([relabel.logits[k] for k in keys])
                with torch.no_grad():
                    again = model(batch.images)
                scale = files.abs().max(1, keepdim=True).values
                assert ((again - files).abs() / scale).max() <= TEACHER_RTOL
    assert plain_gap > 10 / 255


def test_a_rerun_finds_the_set_complete(relabels: dict[str, Relabelled], images: Path) -> None:
    relabel = relabels["cutmix"]
    out = relabel.root.parent.parent / "store" / "cutmix"
    again = import_sre2l(
        ImportOptions(labels=relabel.root, images=images, out=out, codec="fp32", progress=False)
    )
    assert again.computed_shards == 0


# --------------------------------------------------------------------------- refusals


def _edit(path: Path, change) -> None:
    """Rewrite one of our own test files (trusted: loaded in full) with ``change`` applied."""
    items = torch.load(path, weights_only=False)
    torch.save(change(items), path)


def _short(items: list) -> list:
    coords, flip, perm, lam, box, logits = items
    return [coords[:7], flip[:7], torch.randperm(7), lam, box, logits[:7]]


def _four_classes(items: list) -> list:
    return [*items[:5], torch.cat([items[5], items[5][:, :1]], dim=1)]


def _top_k(items: list) -> list:
    values, indices = items[5].topk(2, dim=1)
    return [*items[:5], values, indices.short()]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("layout", "is not in SRe2L's layout"),
        ("missing", "missing batch file .*epoch_0/batch_1.tar"),
        ("batch size", "has 7 rows where the sampler .* puts 8; the batch size disagrees"),
        ("images", "holds 19 images .* the labels' epoch 0 has 20 rows"),
        ("image size", "is not a box of pixels of the 18x18 images"),
        ("classes", "logits of 4 classes, the first batch's have 3"),
        ("cut short", "epoch 1 is cut short .* --epochs 1"),
        ("seed", "records other images for epoch 0 than a RandomSampler seeded 41"),
        ("top-k", "top-k logits .*--label_quantization"),
        ("no view", "sample 16 has no label in the 3 epochs imported .*each dropped 4 images"),
        ("gray", "holds gray images, which SRe2L's ImageFolder read as RGB"),
    ],
)
def test_refused_in_one_line_and_nothing_written(
    tmp_path: Path, relabels: dict[str, Relabelled], images: Path, case: str, message: str
) -> None:
    labels = tmp_path / "labels"
    shutil.copytree(relabels["dropped-lpld" if case == "no view" else "mixup-lpld"].root, labels)
    opts = ImportOptions(labels=labels, images=images, out=tmp_path / "store" / "x", progress=False)
    if case == "layout":
        shutil.rmtree(labels)
        labels.mkdir()
        (labels / "notes.txt").write_text("not a relabel")
    elif case == "missing":
        (labels / "epoch_0" / "batch_1.tar").unlink()
    elif case == "batch size":
        _edit(labels / "epoch_1" / "batch_1.tar", _short)
    elif case in ("images", "image size"):
        n, side = (19, SIZE) if case == "images" else (N, 18)
        opts.images = write_folder(tmp_path / "other", *random_set(n=n, h=side, w=side))
    elif case == "classes":
        _edit(labels / "epoch_1" / "batch_2.tar", _four_classes)
    elif case == "cut short":
        (labels / "epoch_1" / "batch_2.tar").unlink()
    elif case == "seed":
        opts.seed = 41
    elif case == "top-k":
        _edit(labels / "epoch_0" / "batch_0.tar", _top_k)
    elif case == "no view":  # 3 of the 5 epochs that dropped 4 images each: sample 16 has none
        opts.epochs = 3
    elif case == "gray":
        opts.images = write_folder(tmp_path / "gray", *random_set(n=N, channels=1, h=SIZE, w=SIZE))
    with pytest.raises(InputError, match=message) as caught:
        import_sre2l(opts)
    assert "\n" not in str(caught.value)
    assert not opts.out.exists() and not opts.out.parent.exists()
    if case == "cut short":  # the complete epoch imports
        opts.epochs = 1
        assert import_sre2l(opts).manifest.config.epochs == 1


class _Payload:
    """A pickled object whose unpickling writes a marker file: code in a 'batch file'."""

    def __init__(self, marker: Path, call: str) -> None:
        self.marker, self.call = marker, call

    def __reduce__(self):
        if self.call == "exec":
            return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))
        return (os.system, (f"echo ran > {shlex.quote(str(self.marker))}",))


@pytest.mark.parametrize(("call", "named"), [("exec", "exec"), ("system", "posix.system")])
def test_a_malicious_pickle_is_refused_and_runs_nothing(
    tmp_path: Path, relabels: dict[str, Relabelled], images: Path, call: str, named: str
) -> None:
    labels = tmp_path / "labels"
    shutil.copytree(relabels["cutmix"].root, labels)
    marker = tmp_path / "marker"
    bad = labels / "epoch_1" / "batch_0.tar"
    torch.save([_Payload(marker, call), *torch.load(bad, weights_only=False)[1:]], bad)
    out = tmp_path / "store" / "x"
    with pytest.raises(InputError, match=rf"batch_0.tar is refused: its pickle calls {named},"):
        import_sre2l(ImportOptions(labels=labels, images=images, out=out, progress=False))
    assert not marker.exists() and not out.parent.exists()
    torch.load(bad, weights_only=False)  # the file is live: a free unpickle runs it
    assert marker.read_text().strip() == "ran"


def test_the_cli_imports_and_refuses_in_one_line(
    tmp_path: Path, relabels: dict[str, Relabelled], images: Path
) -> None:
    labels, out = relabels["cutmix"].root, tmp_path / "store" / "cli"
    done = run_cli(
        "import",
        "sre2l",
        labels,
        "--images",
        images,
        "--out",
        out,
        "--codec",
        "fp16",
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout and "cutmix" in done.stdout
    assert open_local(out).num_samples == N
    dropped = relabels["dropped-lpld"]
    views = sum(len(order) for order in dropped.orders.values())
    left = views - kth_views(dropped)[0] * N
    noted = run_cli(
        "import", "sre2l", dropped.root, "--images", images, "--out", tmp_path / "store" / "d",
        "--no-progress",
    )  # fmt: skip
    assert noted.returncode == 0, noted.stderr
    assert "2 epochs of 20 samples" in noted.stdout
    assert f"{left} of {views} views" in " ".join(noted.stderr.split())
    refused = run_cli(
        "import",
        "sre2l",
        tmp_path / "nowhere",
        "--images",
        images,
        "--out",
        tmp_path / "store" / "none",
    )
    assert refused.returncode == 1
    assert refused.stderr.strip().startswith("error:") and refused.stderr.count("\n") == 1
