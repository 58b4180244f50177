"""Bad input: one clear line naming the problem and the fix, non-zero exit, nothing lost."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from conftest import random_set, relabel_args, run_cli, shard_digests, write_folder

from softserve.client import Client, ClientError
from softserve.errors import InputError
from softserve.storage import verify_label_set
from softserve.worker.relabel import relabel
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


def test_out_is_something_else(make_options) -> None:
    opts = make_options()
    opts.out.mkdir(parents=True)
    (opts.out / "notes.txt").write_text("mine")
    assert_one_line_error(run_cli(*relabel_args(opts)), "is not a label set")
    assert (opts.out / "notes.txt").read_text() == "mine"


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 100 KiB tmpfs: room for the dataset and a few shards of the tiny set, no more."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_mid_write(make_options, small_disk: Path, tmp_path: Path) -> None:
    reference = make_options(epochs=8, shard_epochs=1, out=tmp_path / "ref")
    relabel(reference)
    opts = make_options(epochs=8, shard_epochs=1, out=small_disk / "set")
    done = run_cli(*relabel_args(opts))
    assert_one_line_error(done, "disk is full", "rerun the same command to resume")
    written = shard_digests(opts.out)
    assert 0 < len(written) < 8
    assert all(reference_digest == written[name] for name, reference_digest in
               shard_digests(reference.out).items() if name in written)  # fmt: skip
    assert not list(opts.out.glob("*.tmp"))
    assert not (opts.out / "manifest.json").exists()

    # moved to a disk with room, the same command finishes the job
    moved = tmp_path / "moved"
    subprocess.run(["cp", "-r", str(opts.out), str(moved)], check=True)
    resumed = run_cli(*relabel_args(make_options(epochs=8, shard_epochs=1, out=moved)))
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
