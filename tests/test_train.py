"""``softserve train``: students trained through a real server, every optimizer and model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import Server, free_port, random_set, run_cli
from test_errors import assert_one_line_error

from softserve.client import Sharding


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images, labels = random_set(n=30, seed=9)
    path = tmp_path_factory.mktemp("eval") / "test.pt"
    torch.save({"data": torch.from_numpy(images), "label": torch.from_numpy(labels)}, path)
    return path


@pytest.mark.parametrize(
    ("model", "loss", "optimizer"),
    [("convnet", "gift", "adamw"), ("resnet18", "softce_ce", "sgd"), ("convnet", "mse", "adam")],
)
def test_train_reports_a_result(server: Server, eval_set: Path, model, loss, optimizer) -> None:
    done = run_cli(
        "train", "--url", server.url, "--labelset", "tiny", "--model", model, "--loss", loss,
        "--optimizer", optimizer, "--epochs", 2, "--batch-size", 8, "--eval", eval_set,
        "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["steps"] == 2 * len(Sharding(50, 8))
    assert (result["model"], result["loss"], result["optimizer"]) == (model, loss, optimizer)
    assert 0.0 <= result["top1"] <= 1.0 and result["samples_per_second"] > 0


def test_train_errors(server: Server, eval_set: Path) -> None:
    base = ["train", "--labelset", "tiny", "--epochs", 1, "--eval", eval_set, "--no-progress"]
    assert_one_line_error(run_cli(*base, "--url", server.url, "--model", "vgg"), "unknown --model")
    assert_one_line_error(run_cli(*base, "--url", server.url, "--loss", "l1"), "unknown loss")
    done = run_cli(*base, "--url", server.url, "--labelset", "nope")
    assert_one_line_error(done, "404", "no label set named 'nope'")
    dead = f"http://127.0.0.1:{free_port()}"
    done = run_cli(*base, "--url", dead)
    *retries, last = done.stderr.strip().splitlines()
    assert done.returncode == 1 and retries, done.stderr
    assert all("failed" in line and line.endswith("retrying") for line in retries)
    assert last.startswith("error: no server answered") and dead in last
