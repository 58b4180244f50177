"""Bad input: one clear line naming the problem and the fix, non-zero exit, nothing lost."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Proxy, random_set, relabel_args, run_cli, shard_digests, write_folder
from PIL import Image

from softserve import __version__
from softserve.client import Client, ClientError
from softserve.errors import InputError
from softserve.storage import verify_label_set
from softserve.storage.layout import PLAN_FILE
from softserve.storage.manifest import PlanProducer, RelabelPlan, write_model
from softserve.worker.relabel import relabel
from softserve.worker.runtime import resolve_device
from softserve.worker.sources import load_image_set
from softserve.worker.teacher import load_teacher


def assert_one_line_error(done: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Exit 1 and exactly one line on stderr, ``error: ...``, containing every fragment."""
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_missing_images(make_options, tmp_path: Path) -> None:
    opts = make_options(images=tmp_path / "nowhere")
    assert_one_line_error(run_cli(*relabel_args(opts)), "does not exist", "ImageFolder")
    assert not opts.out.exists()


def test_unreadable_image(make_options, rgb_folder: Path) -> None:
    (rgb_folder / "bee" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    opts = make_options()
    assert_one_line_error(run_cli(*relabel_args(opts)), "cannot read image", "broken.png")
    assert not opts.out.exists()


def test_images_of_different_sizes(make_options, tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "mixed", *random_set(n=3))
    write_folder(folder, *random_set(n=1, h=9, w=9))
    done = run_cli(*relabel_args(make_options(images=folder)))
    assert_one_line_error(done, "images differ in size", "9x9")


def _tensor_file(path: Path, data: torch.Tensor, label: torch.Tensor) -> Path:
    torch.save({"data": data, "label": label}, path)
    return path


@pytest.mark.parametrize(
    ("data", "label", "fragment"),
    [
        (torch.zeros(0, 3, 8, 8), torch.zeros(0, dtype=torch.long), "holds no images"),
        (torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), "has 1 class; soft labels"),
        (torch.full((2, 3, 8, 8), float("nan")), torch.tensor([0, 1]), "NaN or infinite"),
    ],
)
def test_tensor_files_that_cannot_be_labelled(
    make_options, tmp_path: Path, data: torch.Tensor, label: torch.Tensor, fragment: str
) -> None:
    opts = make_options(images=_tensor_file(tmp_path / "set.pt", data, label))
    assert_one_line_error(run_cli(*relabel_args(opts)), fragment)
    assert not opts.out.exists()


def test_one_class_folder_is_refused(make_options, tmp_path: Path) -> None:
    images, _ = random_set(n=4)
    folder = write_folder(tmp_path / "one", images, np.zeros(4, dtype=np.int64))
    assert_one_line_error(run_cli(*relabel_args(make_options(images=folder))), "has 1 class")


def test_wide_gray_images_are_read_exactly_or_refused(tmp_path: Path) -> None:
    """A 16-bit PNG is narrowed when its values fit 8 bits, and refused when they do not:
    PIL's conversion would clip 0..65535 to black and white without a word."""
    for name, values in (("narrow", [[0, 7], [200, 255]]), ("wide", [[0, 700], [40000, 63000]])):
        (tmp_path / name / "a").mkdir(parents=True)
        (tmp_path / name / "b").mkdir()
        pixels = np.array(values, dtype=np.uint16)
        for cls in ("a", "b"):
            Image.fromarray(pixels).save(tmp_path / name / cls / "x.png")
    assert Image.open(tmp_path / "wide" / "a" / "x.png").mode.startswith("I")
    narrow = load_image_set(tmp_path / "narrow")
    assert narrow.images.dtype == np.uint8 and narrow.images[0, 0].tolist() == [[0, 7], [200, 255]]
    with pytest.raises(InputError, match="uint16 pixels beyond 0..255"):
        load_image_set(tmp_path / "wide")


def test_teacher_class_count_differs(make_options) -> None:
    opts = make_options(teacher="teachers:four_classes")
    assert_one_line_error(run_cli(*relabel_args(opts)), "outputs shape", "3 classes")
    assert not opts.out.exists()


def test_teacher_reducing_over_the_batch(make_options) -> None:
    """One row of logits for a whole batch would broadcast into every sample's label."""
    opts = make_options(teacher="teachers:batch_mean")
    done = run_cli(*relabel_args(opts))
    assert_one_line_error(done, "outputs 1 rows for a batch of 2 images", "reduce over the batch")
    assert not opts.out.exists()


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ("nosuchmodule:make", ("cannot import", "PYTHONPATH")),
        ("teachers:missing", ("no attribute",)),
        ("teachers:not_a_module", ("not nn.Module",)),
        ("torchvision:resnet999", ("no classification model",)),
        ("what", ("not understood",)),
        (":make", ("absolute module.path:callable",)),
        ("..teachers:tiny_rgb", ("absolute module.path:callable",)),
        ("teachers:", ("absolute module.path:callable",)),
        ("teachers:broken", ("teacher factory 'teachers:broken' failed", "no weights here")),
    ],
)
def test_bad_teacher_spec(make_options, spec: str, fragments: tuple[str, ...]) -> None:
    assert_one_line_error(run_cli(*relabel_args(make_options(teacher=spec))), *fragments)


def test_teacher_module_that_fails_to_import(tmp_path: Path, monkeypatch) -> None:
    """An exception from the module's own code, not an ImportError, is one InputError too."""
    (tmp_path / "gpu_only_teacher.py").write_text("raise RuntimeError('needs a GPU')\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"importing 'gpu_only_teacher' .* failed .*needs a GPU"):
        load_teacher("gpu_only_teacher:make")


def test_weights_that_do_not_load(make_options, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"definitely not a checkpoint")
    done = run_cli(*relabel_args(make_options(weights=garbage)))
    assert_one_line_error(done, "cannot load weights", "garbage.pt")

    wrong = tmp_path / "wrong.pt"
    torch.save(torch.nn.Linear(4, 2).state_dict(), wrong)
    done = run_cli(*relabel_args(make_options(weights=wrong)))
    assert_one_line_error(done, "do not fit teacher", "--num-classes")


def test_bad_options(make_options) -> None:
    opts = make_options(batch_size=0)
    assert_one_line_error(run_cli(*relabel_args(opts)), "--batch-size must be positive")
    opts = make_options(codec="fp8")
    assert_one_line_error(run_cli(*relabel_args(opts)), "unknown label codec", "int8")
    done = run_cli(*relabel_args(make_options()), "--precision", "bf16")
    assert_one_line_error(done, "CUDA only")
    done = run_cli(*relabel_args(make_options()), "--min-scale", "0")
    assert_one_line_error(done, "crop scale range")
    done = run_cli(*relabel_args(make_options()), "--size", "0")
    assert_one_line_error(done, "--size must be positive")


def test_out_holds_a_different_label_set(make_options) -> None:
    opts = make_options()
    relabel(opts)
    before = shard_digests(opts.out)
    done = run_cli(*relabel_args(make_options(seed=7)))
    assert_one_line_error(done, "holds a different label set", "seed", "new --out")
    assert shard_digests(opts.out) == before
    assert verify_label_set(opts.out) == []


def test_a_resume_with_another_batch_size_is_refused(make_options) -> None:
    """The teacher's bytes depend on the batch (and the device): a relabel left part way
    resumes only with the batch size and device it started with, so a finished set never
    mixes two runs' numerics."""
    opts = make_options(batch_size=8)
    manifest = relabel(opts).manifest
    whole = shard_digests(opts.out)
    (opts.out / "manifest.json").unlink()
    (opts.out / "labels-00001.h5").unlink()  # as if killed before its last shard
    plan = RelabelPlan(config=manifest.config, producer=PlanProducer(batch_size=8, device="cpu"))
    write_model(opts.out / PLAN_FILE, plan)
    done = run_cli(*relabel_args(make_options(batch_size=7)))
    assert_one_line_error(done, "started with --batch-size 8 on cpu", "resume it with the same")
    assert not (opts.out / "labels-00001.h5").exists()
    assert relabel(opts).reused_shards == len(whole) - 1
    assert shard_digests(opts.out) == whole


def test_out_is_something_else(make_options) -> None:
    opts = make_options()
    opts.out.mkdir(parents=True)
    (opts.out / "notes.txt").write_text("mine")
    assert_one_line_error(run_cli(*relabel_args(opts)), "is not a label set")
    assert (opts.out / "notes.txt").read_text() == "mine"


def test_full_disk_mid_write(make_options, small_disk: Path, tmp_path: Path) -> None:
    reference = make_options(epochs=16, shard_epochs=1, out=tmp_path / "ref")
    relabel(reference)
    opts = make_options(epochs=16, shard_epochs=1, out=small_disk / "set")
    done = run_cli(*relabel_args(opts))
    assert_one_line_error(done, "disk is full", "rerun the same command to resume")
    written = shard_digests(opts.out)
    assert 0 < len(written) < 16
    assert all(reference_digest == written[name] for name, reference_digest in
               shard_digests(reference.out).items() if name in written)  # fmt: skip
    assert not list(opts.out.glob("*.tmp"))
    assert not (opts.out / "manifest.json").exists()

    # moved to a disk with room, the same command finishes the job
    moved = tmp_path / "moved"
    subprocess.run(["cp", "-r", str(opts.out), str(moved)], check=True)
    resumed = run_cli(*relabel_args(make_options(epochs=16, shard_epochs=1, out=moved)))
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(written)} reused" in resumed.stdout
    assert shard_digests(moved) == shard_digests(reference.out)


@pytest.mark.parametrize("url", ["store", "127.0.0.1:8000", "ftp://host/x", "http://"])
def test_a_url_without_scheme_or_host_is_refused_at_once(url: str) -> None:
    """A path or a bare host:port is a mistake to report, not a server to retry for a minute."""
    with pytest.raises(ClientError, match="not a server URL") as info:
        Client(url)
    assert info.value.code == "bad_url" and "open_local" in str(info.value)
    done = run_cli("train", "--url", url, "--labelset", "x", "--epochs", 1, timeout=60)
    assert_one_line_error(done, "not a server URL", "--store")


def _from_a_newer_server(path: str, body: bytes) -> bytes:
    """The server's answers with a view policy this client does not know, and a list of
    sets whose shapes have grown a dimension."""
    if path == "/v1/labelsets/tiny":
        detail = json.loads(body)
        detail["views"]["policy"] = "warp"
        return json.dumps(detail).encode()
    if path == "/v1/labelsets":
        listed = json.loads(body)
        listed[0]["image_shape"] = [*listed[0]["image_shape"], 2]
        return json.dumps(listed).encode()
    return body


def test_a_newer_servers_description_is_one_line_naming_the_field(server) -> None:
    """What this client cannot read is named, with its value and the fix (a newer client),
    not dumped as a pydantic schema error."""
    with Proxy(server.url, rewrite=_from_a_newer_server) as proxy:
        with Client(proxy.url) as client:
            with pytest.raises(ClientError) as detail:
                client.labelset("tiny")
            with pytest.raises(ClientError) as listed:
                client.labelsets()
        done = run_cli("train", "--url", proxy.url, "--labelset", "tiny", "--epochs", 1,
                       "--device", "cpu", timeout=120)  # fmt: skip
    assert_one_line_error(done, "views.policy", "'warp'", "newer")
    expected = [(detail, ("views.policy", "'warp'", "'rrc' or 'dsa'")),
                (listed, ("label sets, entry 0: image_shape", "at most 3"))]  # fmt: skip
    for info, fragments in expected:
        message = str(info.value)
        assert "\n" not in message and __version__ in message and "newer" in message, message
        assert all(f in message for f in fragments), message


@pytest.mark.parametrize(
    ("name", "env", "gpus", "expected"),
    [
        ("auto", {}, 0, "cpu"),
        ("auto", {"LOCAL_RANK": "1"}, 2, "cuda:1"),
        ("cuda", {"LOCAL_RANK": "3"}, 2, "cuda:1"),
        ("cuda:1", {}, 2, "cuda:1"),
        ("cuda:2", {}, 2, "only 2 CUDA device"),
        ("cuda:0", {"WORLD_SIZE": "2"}, 2, "every rank on one GPU"),
        ("cuda", {}, 0, "no CUDA device is visible"),
        ("mps", {}, 0, "unknown --device 'mps'"),
        ("cuda:x", {}, 1, "unknown --device 'cuda:x'"),
    ],
)
def test_device_choice(
    monkeypatch: pytest.MonkeyPatch, name: str, env: dict, gpus: int, expected: str
) -> None:
    """Where the teacher or student runs; GPUs are faked (this machine has none)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    for key in ("LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if expected in ("cpu", "cuda:1"):
        assert resolve_device(name) == torch.device(expected)
    else:
        with pytest.raises(InputError, match=expected):
            resolve_device(name)
