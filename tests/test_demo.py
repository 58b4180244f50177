"""The Fashion-MNIST demo on the real data: teacher, IPC-10 selection, label set."""

from __future__ import annotations

import io
import json
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import Server, cli_env, free_port, run_cli, softserve_cmd
from PIL import Image
from test_codecs import error_bound
from test_errors import assert_one_line_error

from softserve.client import apply_views
from softserve.errors import InputError
from softserve.format.refinement import refine_labels
from softserve.models import fashion_mnist_teacher
from softserve.storage import LabelSetReader, verify_label_set
from softserve.worker import fashion_mnist

HAVE_DATA = (fashion_mnist.DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists()


def test_missing_data_says_how_to_get_it(tmp_path: Path) -> None:
    done = run_cli("demo", "prepare", "--data", tmp_path, "--workdir", tmp_path / "w")
    assert_one_line_error(done, "Fashion-MNIST not found", "apt-get install dataset-fashion-mnist")
    assert not (tmp_path / "w").exists()


def test_truncated_idx_file_is_reported(tmp_path: Path) -> None:
    header = b"\x00\x00\x08\x03" + (3).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (tmp_path / "train-images-idx3-ubyte").write_bytes(header + bytes(100))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + bytes([0, 0, 0, 3, 1]))
    with pytest.raises(InputError, match="truncated"):
        fashion_mnist.load_split(tmp_path, "train")


@pytest.mark.slow
@pytest.mark.skipif(
    not HAVE_DATA, reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)"
)
def test_demo_end_to_end(tmp_path: Path) -> None:
    """Full teacher (3 epochs on 60k images), IPC-10 selection, 30 epochs of labels."""
    workdir, store = tmp_path / "demo", tmp_path / "store"
    done = run_cli(
        "demo", "prepare", "--workdir", workdir, "--store", store, "--label-epochs", 30,
        "--device", "cpu", "--no-progress", timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    record = json.loads((workdir / "teacher.json").read_text())
    assert record["test_accuracy"] >= 0.88

    images = sorted((workdir / "ipc10").glob("*/*.png"))
    assert len(images) == 100
    assert {p.parent.name for p in images} == {
        f"{i:02d}-{name}" for i, name in enumerate(fashion_mnist.CLASS_NAMES)
    }

    root = store / "fashion-mnist-ipc10"
    assert verify_label_set(root) == []
    teacher = fashion_mnist_teacher()
    teacher.load_state_dict(torch.load(workdir / "teacher.pt", weights_only=True))
    teacher.eval()
    with LabelSetReader(root) as reader:
        config = reader.config
        assert (config.num_samples, config.num_classes, config.epochs) == (100, 10, 30)
        hard = reader.hard_labels()
        assert np.bincount(hard, minlength=10).tolist() == [10] * 10
        rows = reader.read(29, 0, 100)
        ids = torch.from_numpy(rows["order"].astype(np.int64))
        views = apply_views(
            torch.from_numpy(reader.images())[ids], torch.from_numpy(rows["params"]), (28, 28),
            mean=config.mean, std=config.std,
        )  # fmt: skip
        with torch.no_grad():
            logits = teacher(views)
        # what is stored is the refined label, within the set's codec bound (whatever the
        # default codec is), plus float32 noise between the relabel's batches and this one
        targets = torch.from_numpy(hard[rows["order"]]).long()
        ref = config.refinement
        refined = refine_labels(logits, targets, ref.alpha, ref.beta).double().numpy()
        err = np.abs(rows["soft"].astype(np.float64) - refined)
        assert (err <= error_bound(config.codec, refined) + 1e-5).all()
        # chosen by confidence: the teacher gets every base image right, most views too
        base = (torch.from_numpy(reader.images()).float() / 255 - config.mean[0]) / config.std[0]
        with torch.no_grad():
            assert (teacher(base).argmax(1).numpy() == hard).all()
        assert (rows["soft"].argmax(1) == hard[rows["order"]]).mean() > 0.5

    again = run_cli(
        "demo", "prepare", "--workdir", workdir, "--store", store, "--label-epochs", 30,
        "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "reusing teacher" in again.stdout

    # the README's main command: serve the (now cached) demo and say how to train
    port = free_port()
    demo = subprocess.Popen(
        softserve_cmd(
            "demo", "run", "--workdir", workdir, "--store", store, "--label-epochs", 30,
            "--device", "cpu", "--no-progress", "--port", port,
        ),
        env={**cli_env(), "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        lines = []
        ui = f"http://127.0.0.1:{port}/ui?set=fashion-mnist-ipc10"
        while not any(ui in line for line in lines):
            line = demo.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        train = f"--url http://127.0.0.1:{port} --labelset fashion-mnist-ipc10"
        assert any(train in line for line in lines)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                listed = httpx.get(f"http://127.0.0.1:{port}/v1/labelsets", timeout=2).json()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert [x["name"] for x in listed] == ["fashion-mnist-ipc10"]
        assert "<title>softserve</title>" in httpx.get(ui).text
        view = httpx.get(f"http://127.0.0.1:{port}/v1/labelsets/fashion-mnist-ipc10/views/0/0.png")
        assert Image.open(io.BytesIO(view.content)).size == (28, 28)
    finally:
        demo.terminate()
        demo.wait(timeout=30)

    # students trained through the server, scored on the real test split
    server = Server(store).start()
    try:
        for loss, epochs, floor in (("gift", 30, 0.4), ("kl", 5, 0.2)):
            trained = run_cli(
                "train", "--url", server.url, "--labelset", "fashion-mnist-ipc10",
                "--loss", loss, "--epochs", epochs, "--batch-size", 50, "--device", "cpu",
                "--no-progress", timeout=600,
            )  # fmt: skip
            assert trained.returncode == 0, trained.stderr
            result = json.loads(trained.stdout.strip().splitlines()[-1])
            assert result["steps"] == epochs * 2 and result["loss"] == loss
            assert result["top1"] >= floor, result  # chance is 0.1
    finally:
        server.stop()
