"""Checks shared by the tests of sets that ``teachers:recorder`` labelled (mixed sets, DSA
sets): what the client, the server, the pictures and ``train`` give, against the inputs the
teacher recorded."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import teachers
import torch
from conftest import Server, random_set, run_cli
from PIL import Image

from softserve.client import Batch, Client, open_local, refine_labels
from softserve.report import RemoteSource, StoreSource, compute_report
from softserve.report.numbers import ReportData
from softserve.storage import LabelSetReader


def client_batches(
    path: Path, recorded: list[torch.Tensor], cache: bool, world_sizes: tuple[int, ...]
) -> Iterator[Batch]:
    """Every batch of batch sizes 1, 5, 12 and each world size, each rank, each epoch, with
    the images drawn by the client (from its cache or carried by the batch): each checked to
    be the teacher's recorded input bit for bit, its label the teacher on it, and every
    epoch covered once."""
    seen = torch.cat(recorded)
    model = teachers.tiny_rgb()
    with open_local(path, image_cache_mb=2048 if cache else 0) as labels:
        assert (labels.base_images() is not None) == cache
        n, refinement = labels.num_samples, labels.detail.refinement
        for batch_size in (1, 5, 12):
            for world_size in world_sizes:
                covered = 0
                for rank in range(world_size):
                    sharding = labels.sharding(batch_size, rank, world_size, drop_last=False)
                    for epoch in range(labels.epochs):
                        for batch in labels.batches(
                            epoch, batch_size, rank, world_size, drop_last=False
                        ):
                            start, stop = sharding.positions(batch.index)
                            teacher_input = seen[epoch * n + start : epoch * n + stop]
                            assert torch.equal(batch.images, teacher_input)
                            with torch.no_grad():
                                logits = model(batch.images)
                            expected = refine_labels(
                                logits, batch.hard, refinement.alpha, refinement.beta
                            )
                            assert torch.allclose(batch.soft, expected, atol=1e-5, rtol=1e-5)
                            covered += len(batch)
                            yield batch
                assert covered == n * labels.epochs


def check_served_batches_equal_local(path: Path) -> None:
    """Over HTTP, with images in the batch or from the cache, the same inputs and labels."""
    server = Server(path.parent).start()
    try:
        with open_local(path) as local:
            expected = [(b.images, b.soft) for b in local.batches(1, 5, 1, 2)]
        for cache_mb in (2048, 0):
            remote = Client(server.url).labelset(path.name, image_cache_mb=cache_mb)
            got = [(b.images, b.soft) for b in remote.batches(1, 5, 1, 2)]
            assert len(got) == len(expected)
            for (xi, xs), (yi, ys) in zip(got, expected, strict=True):
                assert torch.equal(xi, yi) and torch.equal(xs, ys)
    finally:
        server.stop()


def check_pictures(
    path: Path, recorded: list[torch.Tensor], check_report: Callable[[ReportData], None]
) -> None:
    """The view PNG, and the report's grid from disk and through a server, show what the
    teacher saw: its recorded input with the normalization undone, clipped to [0, 1].
    ``check_report`` checks each report further."""
    with LabelSetReader(path) as reader:
        config, n = reader.config, reader.config.num_samples
        orders = [reader.read(e, 0, n, ["order"])["order"] for e in range(config.epochs)]
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in (config.mean, config.std))
    seen = (torch.cat(recorded) * std + mean).clamp(0, 1)

    def teacher_view(epoch: int, sample: int) -> torch.Tensor:
        return seen[epoch * n + int(np.flatnonzero(orders[epoch] == sample)[0])]

    server = Server(path.parent).start()
    try:
        for epoch in range(config.epochs):
            for sample in range(n):
                url = f"{server.url}/v1/labelsets/{path.name}/views/{epoch}/{sample}.png"
                png = httpx.get(url, timeout=60)  # the first view loads torch in the server
                assert png.status_code == 200
                pixels = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB"))
                shown = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float()
                assert (shown - teacher_view(epoch, sample) * 255).abs().max() < 0.501
        for source in (StoreSource(path), RemoteSource(server.url, path.name)):
            data = compute_report(source)
            source.close()
            cells = data.numbers["grid"]["cells"]
            for cell, image in zip(cells, data.grid_images, strict=True):
                expected = teacher_view(cell["epoch"], cell["sample"])
                torch.testing.assert_close(torch.from_numpy(image), expected, atol=1e-5, rtol=0)
            check_report(data)
    finally:
        server.stop()


def check_train_runs(path: Path, tmp_path: Path) -> None:
    """``softserve train --store`` trains on the set through the same LabelSet path."""
    images, labels = random_set(n=9, seed=3)
    eval_set = tmp_path / "test.pt"
    torch.save({"data": torch.from_numpy(images), "label": torch.from_numpy(labels)}, eval_set)
    done = run_cli(
        "train", "--store", path.parent, "--labelset", path.name, "--epochs", 2,
        "--batch-size", 4, "--eval", eval_set, "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["steps"] == 2 * 3 and 0.0 <= result["top1"] <= 1.0
