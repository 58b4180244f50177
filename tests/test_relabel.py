"""The relabel worker: contents, determinism, input formats, teacher specs, inspect/verify."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import teachers
import torch
from conftest import random_set, relabel_args, run_cli, shard_digests
from test_errors import assert_one_line_error

from softserve.client import apply_views, epoch_order, refine_labels
from softserve.errors import InputError
from softserve.storage import LabelSetReader, read_manifest, verify_label_set
from softserve.storage.layout import sha256_file
from softserve.worker.relabel import relabel
from softserve.worker.teacher import load_teacher


def test_labels_are_the_teacher_on_the_stored_views(make_options) -> None:
    """Every stored logit is the teacher on exactly the view its params describe."""
    teachers.RECORDED.clear()
    opts = make_options(teacher="teachers:recorder", epochs=3, shard_epochs=2, batch_size=5)
    relabel(opts)
    # the first batch is the worker's 2-row probe; then batches of 5 through each shard
    shard_rows = [2 * 12, 12]
    sizes = [min(5, rows - start) for rows in shard_rows for start in range(0, rows, 5)]
    assert [len(b) for b in teachers.RECORDED] == [2, *sizes]
    seen = torch.cat(teachers.RECORDED[1:])
    model = teachers.tiny_rgb()
    with LabelSetReader(opts.out) as reader:
        config = reader.config
        images = torch.from_numpy(reader.images())
        hard = torch.from_numpy(reader.hard_labels())
        n = config.num_samples
        offset = 0
        for epoch in range(config.epochs):
            rows = reader.read(epoch, 0, n)
            assert np.array_equal(rows["order"], epoch_order(config.seed, epoch, n))
            ids = torch.from_numpy(rows["order"].astype(np.int64))
            views = apply_views(
                images[ids], torch.from_numpy(rows["params"]), config.views.output_size,
                mean=config.mean, std=config.std,
            )  # fmt: skip
            assert torch.equal(seen[offset : offset + n], views)
            offset += n
            with torch.no_grad():
                logits = model(views)
            torch.testing.assert_close(torch.from_numpy(rows["logits"]), logits)
            refined = refine_labels(logits, hard[ids], 0.1, 0.1)
            torch.testing.assert_close(torch.from_numpy(rows["soft"]), refined)


def test_manifest_describes_the_set(make_options) -> None:
    opts = make_options()
    result = relabel(opts)
    manifest = read_manifest(opts.out)
    assert result.manifest == manifest
    assert result.computed_shards == 3 and result.reused_shards == 0
    config = manifest.config
    assert (config.num_samples, config.num_classes, config.image_shape) == (12, 3, (3, 12, 10))
    assert config.class_names == ["ant", "bee", "cat"]
    assert config.mean == (0.485, 0.456, 0.406)  # the RGB default
    assert [(s.epoch_start, s.epoch_stop) for s in manifest.shards] == [(0, 2), (2, 4), (4, 6)]
    for shard in manifest.shards:
        assert sha256_file(opts.out / shard.file) == shard.sha256
    assert not list(opts.out.glob("*.tmp")) and not (opts.out / "relabel-plan.json").exists()
    assert verify_label_set(opts.out) == []


def test_same_inputs_same_bytes(make_options, tmp_path: Path) -> None:
    first = make_options(out=tmp_path / "a" / "set")
    second = make_options(out=tmp_path / "b" / "set")
    relabel(first)
    relabel(second)
    assert shard_digests(first.out) == shard_digests(second.out)
    other_seed = make_options(out=tmp_path / "c" / "set", seed=1)
    relabel(other_seed)
    assert shard_digests(other_seed.out) != shard_digests(first.out)


def test_rerun_of_a_complete_set_does_nothing(make_options) -> None:
    opts = make_options()
    relabel(opts)
    before = shard_digests(opts.out)
    again = relabel(opts)
    assert again.computed_shards == 0 and again.reused_shards == 3
    assert shard_digests(opts.out) == before


def test_grayscale_folder_and_size(make_options, gray_folder: Path) -> None:
    opts = make_options(images=gray_folder, teacher="teachers:tiny_gray", size=(8, 6))
    relabel(opts)
    config = read_manifest(opts.out).config
    assert config.image_shape == (1, 12, 10)
    assert config.views.output_size == (8, 6)
    assert config.mean == (0.5,)


@pytest.mark.parametrize("as_float", [False, True])
def test_tensor_file_input(make_options, tmp_path: Path, as_float: bool) -> None:
    images, labels = random_set()
    folder_order = np.argsort(labels, kind="stable")  # class folders, then file names
    images, labels = images[folder_order], labels[folder_order]
    data = torch.from_numpy(images)
    path = tmp_path / "set.pt"
    torch.save(
        {
            "data": data.float() / 255 if as_float else data,
            "label": torch.from_numpy(labels)[:, None],
        },
        path,
    )
    folder_opts = make_options(out=tmp_path / "from-folder")
    relabel(folder_opts)
    opts = make_options(images=path, out=tmp_path / "from-tensor")
    relabel(opts)
    with LabelSetReader(opts.out) as reader, LabelSetReader(folder_opts.out) as ref:
        assert np.array_equal(reader.images(), images)
        assert np.array_equal(reader.hard_labels(), labels)
        assert reader.config.class_names == ["0", "1", "2"]
        # same pixels and labels: same labels, whatever the file format
        np.testing.assert_array_equal(reader.read(0, 0, 12)["logits"], ref.read(0, 0, 12)["logits"])


def _save_weights(tmp_path: Path, wrap: str) -> tuple[Path, torch.nn.Module]:
    model = teachers.TinyNet(3, 3)
    torch.nn.init.constant_(model.head.bias, 0.5)
    state = model.state_dict()
    if wrap == "module":
        state = {f"module.{k}": v for k, v in state.items()}
    elif wrap:
        state = {wrap: state, "epoch": 3}
    path = tmp_path / f"weights-{wrap or 'plain'}.pt"
    torch.save(state, path)
    return path, model


@pytest.mark.parametrize("wrap", ["", "state_dict", "model", "module"])
def test_weights_are_loaded_and_recorded(make_options, tmp_path: Path, wrap: str) -> None:
    weights, model = _save_weights(tmp_path, wrap)
    opts = make_options(weights=weights, epochs=1, shard_epochs=1)
    relabel(opts)
    manifest = read_manifest(opts.out)
    assert manifest.config.teacher.weights_sha256 == sha256_file(weights)
    with LabelSetReader(opts.out) as reader:
        rows = reader.read(0, 0, 12)
        ids = torch.from_numpy(rows["order"].astype(np.int64))
        views = apply_views(
            torch.from_numpy(reader.images())[ids], torch.from_numpy(rows["params"]), (12, 10),
            mean=reader.config.mean, std=reader.config.std,
        )  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(rows["logits"]), model(views))


def test_torchvision_teacher(make_options, tmp_path: Path, capsys) -> None:
    """Without weights it is refused (random labels), unless --random-teacher says so; the
    run then says loudly what it resolved."""
    opts = make_options(teacher="torchvision:resnet18", num_classes=3, epochs=1, shard_epochs=1)
    with pytest.raises(InputError, match="without --weights.*--random-teacher"):
        relabel(opts)
    assert not opts.out.exists()
    relabel(replace(opts, random_teacher=True))
    out = capsys.readouterr().out
    assert "teacher torchvision:resnet18 = ResNet, RANDOM weights" in out
    assert "device cpu; dtype float32" in out
    manifest = read_manifest(opts.out)
    assert manifest.config.teacher.spec == "torchvision:resnet18"
    assert manifest.config.teacher.weights_sha256 is None
    # the same random network every time (every rank, every resume), the caller's RNG intact
    torch.manual_seed(7)
    expected_draw = torch.rand(3)
    torch.manual_seed(7)
    first = load_teacher("torchvision:resnet18", num_classes=3, random_teacher=True)
    torch.testing.assert_close(torch.rand(3), expected_draw)
    second = load_teacher("torchvision:resnet18", num_classes=3, random_teacher=True)
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(a, b)
    again = tmp_path / "again"
    relabel(replace(opts, out=again, random_teacher=True))
    assert shard_digests(again) == shard_digests(opts.out)


def test_relabel_says_what_it_resolved(make_options, tmp_path: Path, capsys) -> None:
    """Teacher class and weights (path and sha256), device and dtype, even without progress."""
    weights = tmp_path / "tiny.pt"
    torch.save(teachers.tiny_rgb().state_dict(), weights)
    relabel(make_options(weights=weights, epochs=1, shard_epochs=1))
    line = capsys.readouterr().out.strip().splitlines()[0]
    assert line.startswith("relabel: teacher teachers:tiny_rgb = ")
    assert f"weights {weights} (sha256 {sha256_file(weights)[:12]})" in line
    assert line.endswith("device cpu; dtype float32")


def test_exported_teacher(make_options, tmp_path: Path) -> None:
    model = teachers.tiny_rgb().eval()
    batch = torch.export.Dim("batch")
    example = torch.zeros(8, 3, 12, 10)
    program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
    path = tmp_path / "teacher.pt2"
    torch.export.save(program, str(path))
    exported = make_options(teacher=str(path), out=tmp_path / "exported", epochs=2)
    eager = make_options(out=tmp_path / "eager", epochs=2)
    relabel(exported)
    relabel(eager)
    assert read_manifest(exported.out).config.teacher.weights_sha256 == sha256_file(path)
    with LabelSetReader(exported.out) as a, LabelSetReader(eager.out) as b:
        np.testing.assert_allclose(
            a.read(1, 0, 12)["logits"], b.read(1, 0, 12)["logits"], atol=1e-5
        )


def test_cli_relabel_inspect_verify(make_options) -> None:
    opts = make_options(codec="int8")
    done = run_cli(*relabel_args(opts))
    assert done.returncode == 0, done.stderr
    assert "3 shards computed" in done.stdout
    inspect = run_cli("inspect", opts.out)
    assert inspect.returncode == 0, inspect.stderr
    for fragment in ("complete", "teachers:tiny_rgb", "int8: 11 bytes per label", "samples"):
        assert fragment in inspect.stdout
    as_json = run_cli("inspect", opts.out, "--json")
    assert json.loads(as_json.stdout)["config"]["codec"] == "int8"
    ok = run_cli("verify", opts.out)
    assert ok.returncode == 0 and "OK" in ok.stdout


@pytest.mark.parametrize("codec", ["fp32", "int8", "topk:2"])
def test_non_finite_teacher_logits_are_refused(make_options, codec: str) -> None:
    """A teacher that overflows (inf) is one clear error, and no shard stores its labels:
    a NaN target would pass checksums and verify, and be served."""
    opts = make_options(teacher="teachers:overflowing", codec=codec)
    done = run_cli(*relabel_args(opts))
    assert_one_line_error(done, "not finite (NaN or inf)", "row 7 of epoch 0", "bf16 or fp32")
    assert not list(opts.out.glob("labels-*.h5"))
    assert not (opts.out / "manifest.json").exists()


def test_verify_finds_corruption(make_options) -> None:
    opts = make_options()
    relabel(opts)
    shard = opts.out / "labels-00001.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify_label_set(opts.out)
    assert len(problems) == 1 and "labels-00001.h5: sha256" in problems[0]
    (opts.out / "labels-00002.h5").unlink()
    done = run_cli("verify", opts.out)
    assert done.returncode == 1
    assert "labels-00001.h5: sha256" in done.stderr and "labels-00002.h5: missing" in done.stderr


def test_module_teacher_leaves_sys_path_as_it_was(tmp_path: Path, monkeypatch) -> None:
    """The working folder is on sys.path for the teacher's import only."""
    import sys

    from softserve.worker.teacher import load_teacher

    (tmp_path / "my_teacher_mod.py").write_text(
        "import torch\ndef make():\n    return torch.nn.Linear(2, 2)\n"
    )
    monkeypatch.chdir(tmp_path)
    before = list(sys.path)
    assert load_teacher("my_teacher_mod:make").model.in_features == 2
    assert sys.path == before


class _Planted:
    """Unpickling this writes a file: what a crafted .pt2 payload can do."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def crafted_pt2(path: Path, target: Path) -> Path:
    """A real exported teacher whose first weight is replaced by a planted pickle."""
    import pickle
    import zipfile

    program = torch.export.export(teachers.tiny_rgb().eval(), (torch.zeros(2, 3, 12, 10),))
    clean = path.with_suffix(".clean.pt2")
    torch.export.save(program, str(clean))
    with zipfile.ZipFile(clean) as src:
        config_name = next(n for n in src.namelist() if n.endswith("model_weights_config.json"))
        config = json.loads(src.read(config_name))
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        weight_name = config_name.rsplit("/", 1)[0] + "/" + first["path_name"]
        replaced = {
            config_name: json.dumps(config).encode(),
            weight_name: pickle.dumps(_Planted(str(target))),
        }
        with zipfile.ZipFile(path, "w") as dst:
            for info in src.infolist():
                dst.writestr(info, replaced.get(info.filename, src.read(info.filename)))
    return path


def test_exported_teacher_runs_no_pickled_code(make_options, tmp_path: Path) -> None:
    """A .pt2 with a planted pickle is refused with a clear error and nothing runs, unless
    --allow-pickle says the file is trusted."""
    target = tmp_path / "planted"
    path = crafted_pt2(tmp_path / "evil.pt2", target)
    opts = make_options(teacher=str(path), out=tmp_path / "evil-out", epochs=2)
    with pytest.raises(InputError, match="pickled objects.*--allow-pickle"):
        relabel(opts)
    assert not target.exists() and not opts.out.exists()
    done = run_cli(*relabel_args(opts))
    assert done.returncode == 1 and "--allow-pickle" in done.stderr and not target.exists()
    with pytest.raises(InputError):  # trusted: the pickle runs (and is no tensor)
        relabel(replace(opts, allow_pickle=True))
    assert target.exists()


def test_a_timm_teacher_labels_with_its_weights(make_options, tmp_path: Path) -> None:
    """timm:ARCH is built for the set's classes and channels, takes --weights as torchvision
    does (refused without them unless --random-teacher), and its logits are what is stored."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(3)
    model = timm.create_model("resnet18", pretrained=False, num_classes=3, in_chans=3).eval()
    weights = tmp_path / "resnet18.pt"
    torch.save(model.state_dict(), weights)
    with pytest.raises(InputError, match="without --weights"):
        relabel(make_options(teacher="timm:resnet18", out=tmp_path / "none"))
    with pytest.raises(InputError, match="timm has no model 'resnet-nope'"):
        relabel(make_options(teacher="timm:resnet-nope", weights=weights))
    opts = make_options(teacher="timm:resnet18", weights=weights, epochs=2, shard_epochs=1)
    relabel(opts)
    manifest = read_manifest(opts.out)
    assert manifest.config.teacher.spec == "timm:resnet18"
    assert manifest.config.teacher.weights_sha256 == sha256_file(weights)
    with LabelSetReader(opts.out) as reader:
        config = reader.config
        images = torch.from_numpy(reader.images())
        for epoch in range(config.epochs):
            rows = reader.read(epoch, 0, config.num_samples)
            ids = torch.from_numpy(rows["order"].astype(np.int64))
            views = apply_views(
                images[ids], torch.from_numpy(rows["params"]), config.views.output_size,
                mean=config.mean, std=config.std,
            )  # fmt: skip
            with torch.no_grad():
                logits = model(views)
            torch.testing.assert_close(torch.from_numpy(rows["logits"]), logits)
    gray = load_teacher("timm:resnet18", num_classes=4, random_teacher=True, in_chans=1)
    assert gray.model(torch.zeros(2, 1, 32, 32)).shape == (2, 4)


def test_the_default_codec_is_the_verdict_of_the_nearest_class_count(monkeypatch) -> None:
    """With studies at K = 10 and K = 1000, each rules up to the midpoint on a log scale
    (K = 100, which goes to the larger); fp16 wherever it is no larger."""
    from softserve.format import codecs

    monkeypatch.setattr(codecs, "STUDY_VERDICTS", {10: "int8", 1000: "topk:10+int4"})
    assert [codecs.default_codec(k) for k in (8, 9, 99, 100, 1000, 50_000)] == [
        "fp16", "int8", "int8", "topk:10+int4", "topk:10+int4", "topk:10+int4"
    ]  # fmt: skip
    assert codecs.default_codec_reason(1000) == (
        "no measured accuracy cost in the label budget at K = 1000"
    )


def test_without_a_codec_relabel_chooses_by_class_count_and_says_so(
    make_options, capsys
) -> None:
    """No --codec: fp16 for 3 classes (6 bytes a label against int8's 11), int8 from 9
    classes on, the choice printed."""
    from softserve.format.codecs import default_codec

    assert [default_codec(k) for k in (2, 8, 9, 10, 1000)] == [
        "fp16", "fp16", "int8", "int8", "topk:10+int4"
    ]  # fmt: skip
    opts = make_options(codec=None, epochs=2)
    relabel(opts)
    assert read_manifest(opts.out).config.codec == "fp16"
    assert "codec fp16, the default for 3 classes: no larger than int8, the label budget's " \
        "verdict at K = 10 (6 bytes a label" in capsys.readouterr().out
    relabel(opts)  # resumes: the same choice, nothing to redo
    assert read_manifest(opts.out).config.codec == "fp16"
