"""Teacher, weights and tensor files are data: a crafted file is refused in one line and runs
nothing, unless --allow-pickle says a .pt2 is trusted (then each of these files does run its
payload, which is what shows that it is malicious)."""

from __future__ import annotations

import contextlib
import copy
import json
import pathlib
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import teachers
import torch
from conftest import random_set, relabel_args, run_cli, write_folder
from test_errors import assert_one_line_error

from softserve.errors import InputError
from softserve.worker import exported as exported_module
from softserve.worker.sources import load_image_set
from softserve.worker.teacher import load_teacher

Records = dict[str, bytes]


class Touch:
    """Unpickling this creates ``marker``: what a planted pickle can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (pathlib.Path.touch, (self.marker,))


def touch_code(marker: Path) -> str:
    """A Python expression that creates ``marker``."""
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


@pytest.fixture(scope="module")
def clean_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real exported tiny_rgb teacher, static shapes (its archive is edited below)."""
    program = torch.export.export(teachers.tiny_rgb().eval(), (torch.zeros(2, 3, 12, 10),))
    path = tmp_path_factory.mktemp("pt2") / "clean.pt2"
    torch.export.save(program, str(path))
    return path


def edited(clean: Path, path: Path, edit: Callable[[Records, Path], None], marker: Path) -> Path:
    """``clean`` with its records (named below the archive's root folder) edited."""
    with zipfile.ZipFile(clean) as src:
        root = src.namelist()[0].split("/")[0]
        records = {n.removeprefix(f"{root}/"): src.read(n) for n in src.namelist()}
    edit(records, marker)
    with zipfile.ZipFile(path, "w") as dst:
        for name, data in records.items():
            dst.writestr(f"{root}/{name}", data)
    return path


def _json(records: Records, name: str, change: Callable[[dict], None]) -> None:
    content = json.loads(records[name])
    change(content)
    records[name] = json.dumps(content).encode()


def _constant(path_name: str, use_pickle: bool) -> Callable[[Records, Path], None]:
    """A constant ``path_name`` holding a planted pickle, listed with ``use_pickle`` (without
    it, as a float tensor: torch unpickles opaque_obj_* records all the same)."""

    def edit(records: Records, marker: Path) -> None:
        weights = json.loads(records["data/weights/model_weights_config.json"])["config"]
        meta = None if use_pickle else next(iter(weights.values()))["tensor_meta"]
        entry = {"path_name": path_name, "is_param": False, "use_pickle": use_pickle,
                 "tensor_meta": meta}  # fmt: skip
        config = "data/constants/model_constants_config.json"
        _json(records, config, lambda c: c["config"].update(planted=entry))
        planted = pickle.dumps(Touch(marker))
        records[f"data/constants/{path_name}"] = planted + b"\0" * (-len(planted) % 4)

    return edit


def _sample_inputs(records: Records, marker: Path) -> None:
    records["data/sample_inputs/model.pt"] = pickle.dumps(Touch(marker))


def _shape_expression(records: Records, marker: Path) -> None:
    """A tensor size that sympy evaluates as Python."""

    def change(program: dict) -> None:
        size = {"as_expr": {"expr_str": f"{touch_code(marker)} or 2", "hint": {"as_int": 2}}}
        program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0] = size

    _json(records, "models/model.json", change)


def _input_name(records: Records, marker: Path) -> None:
    """An input named so that FX writes a default argument into the code it generates."""
    evil = f"x={touch_code(marker)}"

    def rename(value: object) -> object:
        if isinstance(value, dict):
            return {(evil if k == "x" else k): rename(v) for k, v in value.items()}
        if isinstance(value, list):
            return [rename(v) for v in value]
        return evil if value == "x" else value

    records["models/model.json"] = json.dumps(rename(json.loads(records["models/model.json"])))


def _file_operator(records: Records, marker: Path) -> None:
    """A node calling aten.from_file(shared=True), which creates the file it maps."""

    def change(program: dict) -> None:
        graph = program["graph_module"]["graph"]
        graph["nodes"].insert(0, {
            "target": "torch.ops.aten.from_file.default",
            "inputs": [
                {"name": "filename", "arg": {"as_string": str(marker)}, "kind": 1},
                {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                {"name": "size", "arg": {"as_int": 4}, "kind": 1},
            ],
            "outputs": [{"as_tensor": {"name": "mapped"}}],
            "metadata": {},
        })  # fmt: skip
        meta = copy.deepcopy(graph["tensor_values"]["x"])
        graph["tensor_values"]["mapped"] = {
            **meta, "sizes": [{"as_int": 4}], "strides": [{"as_int": 1}]
        }  # fmt: skip

    _json(records, "models/model.json", change)


#: Crafted .pt2 files, each the payload in another place torch reads: pickles (opaque
#: objects with use_pickle, the review's file, and without; pickled tensor constants;
#: sample inputs), Python in a shape expression or in a name FX writes into code, and an
#: operator that writes files.
MALICIOUS = {
    "opaque object": _constant("opaque_obj_0", use_pickle=True),
    "opaque object without use_pickle": _constant("opaque_obj_0", use_pickle=False),
    "pickled constant": _constant("tensor_0", use_pickle=True),
    "pickled sample inputs": _sample_inputs,
    "shape expression": _shape_expression,
    "input name": _input_name,
    "file operator": _file_operator,
}


def _load_and_run(path: Path, allow_pickle: bool) -> None:
    model = load_teacher(str(path), allow_pickle=allow_pickle).model
    model(torch.zeros(2, 3, 12, 10))


@pytest.mark.parametrize("check_archive", [True, False], ids=["archive-checked", "load-only"])
@pytest.mark.parametrize("kind", MALICIOUS)
def test_crafted_pt2_is_refused_and_runs_nothing(
    clean_pt2: Path, tmp_path: Path, monkeypatch, kind: str, check_archive: bool
) -> None:
    """Refused in one line naming the file, and nothing runs; also by the load-time guard
    alone (the archive check skipped), so a path the check misses still runs no code."""
    marker = tmp_path / "marker"
    path = edited(clean_pt2, tmp_path / "evil.pt2", MALICIOUS[kind], marker)
    with monkeypatch.context() as patch:
        if not check_archive:
            patch.setattr(exported_module, "_check_archive", lambda _: None)
        with pytest.raises(InputError, match="evil.pt2 holds .*--allow-pickle only if") as info:
            _load_and_run(path, allow_pickle=False)
    assert "\n" not in str(info.value)
    assert not marker.exists()
    with contextlib.suppress(InputError):  # trusted: torch runs the payload (and may fail)
        _load_and_run(path, allow_pickle=True)
    assert marker.exists()


def test_guards_code_from_the_file_is_never_run(clean_pt2: Path, tmp_path: Path) -> None:
    """An archive's guards are Python that .module() compiles into the graph: the teacher
    is built without them (their checks on the input come from the range constraints)."""
    marker = tmp_path / "marker"

    def edit(records: Records, marker: Path) -> None:
        code = [f"{touch_code(marker)} is None"]
        _json(records, "models/model.json", lambda p: p.update(guards_code=code))

    path = edited(clean_pt2, tmp_path / "evil.pt2", edit, marker)
    _load_and_run(path, allow_pickle=False)
    assert not marker.exists()
    _load_and_run(path, allow_pickle=True)
    assert marker.exists()


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("custom object", "holds pickled objects (constant 'planted')"),
        ("compiled code", "'data/aotinductor/model/model.so' (not a graph, tensor"),
    ],
)
def test_pt2_records_torch_would_run_are_refused(
    clean_pt2: Path, tmp_path: Path, kind: str, fragment: str
) -> None:
    """A TorchScript object (torch's own unpickler) and AOTInductor's shared libraries,
    which torch.export.load loads and links, are refused before torch opens the file."""

    def edit(records: Records, marker: Path) -> None:
        if kind == "custom object":
            _constant("custom_obj_0", use_pickle=True)(records, marker)
        else:
            records["data/aotinductor/model/model.so"] = b"\x7fELF"

    path = edited(clean_pt2, tmp_path / "evil.pt2", edit, tmp_path / "marker")
    with pytest.raises(InputError, match="--allow-pickle only if") as info:
        load_teacher(str(path))
    assert fragment in str(info.value)


def test_exported_teachers_still_load(tmp_path: Path) -> None:
    """What torch.export writes for a real network passes: a dynamic batch, batch norm,
    dropout, pooling, a no_grad block (a higher-order operator) and size arithmetic."""
    import torchvision

    class Mixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
            self.drop, self.head = torch.nn.Dropout(0.1), torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                y = self.bn(self.conv(x))
            y = torch.nn.functional.max_pool2d(y, 2).flatten(2).amax(-1)
            return self.head(self.drop(y)) * (x.shape[0] // 2)

    batch = torch.export.Dim("batch", min=2)
    for model, x in [
        (torchvision.models.resnet18(num_classes=3), torch.rand(4, 3, 32, 32)),
        (Mixed(), torch.rand(4, 3, 12, 12)),
    ]:
        model.eval()
        program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
        path = tmp_path / "teacher.pt2"
        torch.export.save(program, str(path))
        loaded = load_teacher(str(path)).model
        torch.testing.assert_close(loaded(x[:3]), model(x[:3]))


def test_cli_refuses_a_crafted_pt2_teacher(clean_pt2: Path, make_options, tmp_path: Path) -> None:
    """The review's file (an opaque object with use_pickle) through relabel and train."""
    marker = tmp_path / "marker"
    path = edited(clean_pt2, tmp_path / "evil.pt2", MALICIOUS["opaque object"], marker)
    opts = make_options(teacher=str(path), out=tmp_path / "out")
    assert_one_line_error(run_cli(*relabel_args(opts)), "evil.pt2 holds", "--allow-pickle")
    assert not marker.exists() and not opts.out.exists()
    eval_set = _tensor_file(tmp_path / "eval.pt", *_tensors())
    done = run_cli(
        "train", "--teacher", path, "--images", opts.images, "--eval", eval_set, "--epochs", 1,
        "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert_one_line_error(done, "evil.pt2 holds", "--allow-pickle")
    assert not marker.exists()


def _tensors() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = random_set(n=6)
    return torch.from_numpy(images), torch.from_numpy(labels)


def _tensor_file(path: Path, data: object, label: object) -> Path:
    torch.save({"data": data, "label": label}, path)
    return path


def test_weights_and_tensor_files_run_no_pickled_code(make_options, tmp_path: Path) -> None:
    """--weights, --images and --eval tensor files are loaded weights-only: a planted
    pickle is one line and runs nothing (torch.load without weights_only would run it)."""
    marker = tmp_path / "marker"
    weights = tmp_path / "weights.pt"
    torch.save({**teachers.tiny_rgb().state_dict(), "conv.bias": Touch(marker)}, weights)
    images = _tensor_file(tmp_path / "images.pt", Touch(marker), _tensors()[1])
    with pytest.raises(InputError, match="cannot load weights .*weights.pt .*Unpickling"):
        load_teacher("teachers:tiny_rgb", weights=weights)
    with pytest.raises(InputError, match="cannot load tensor file .*images.pt .*Unpickling"):
        load_image_set(images)
    opts = make_options(weights=weights, out=tmp_path / "out")
    assert_one_line_error(run_cli(*relabel_args(opts)), "cannot load weights", "weights.pt")
    opts = make_options(images=images, out=tmp_path / "out")
    assert_one_line_error(run_cli(*relabel_args(opts)), "cannot load tensor file", "images.pt")
    folder = write_folder(tmp_path / "set", *random_set(n=6))
    done = run_cli(
        "train", "--teacher", "teachers:tiny_rgb", "--images", folder, "--eval", images,
        "--epochs", 1, "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert_one_line_error(done, "cannot load tensor file", "images.pt")
    assert not marker.exists() and not opts.out.exists()
    for path in (weights, images):  # the files are malicious: an unrestricted load runs them
        torch.load(path, weights_only=False)
        assert marker.exists()
        marker.unlink()
