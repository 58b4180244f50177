"""The CUDA path: relabel on the GPU (fp32 and bf16 autocast) against the bare teacher,
mixed inputs rebuilt on the GPU bit for bit, and training there.

Skipped without CUDA, so CI (CPU only) skips it; ``scripts/device_check.sh`` runs it on a
GPU host. ``SOFTSERVE_TEST_DEVICE=cpu`` runs the fp32 tests on the CPU, to check the tests
themselves where no GPU is.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import teachers
import torch
from conftest import random_set, run_cli

from softserve.client import MixPolicy, apply_views, open_local
from softserve.storage import LabelSetReader
from softserve.worker.relabel import relabel

DEVICE = os.environ.get("SOFTSERVE_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device"
)
on_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="reduced precision runs on CUDA only")


def stored_logits_and_bare_teacher(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every stored (epoch, sample)'s logits, and the bare teacher (fp32, CPU) on its view."""
    model = teachers.tiny_rgb()
    stored, bare = [], []
    with LabelSetReader(root) as reader:
        config, n = reader.config, reader.config.num_samples
        images = torch.from_numpy(reader.images())
        for epoch in range(config.epochs):
            rows = reader.read(epoch, 0, n, ["order", "params", "logits"])
            ids = torch.from_numpy(rows["order"].astype(np.int64))
            views = apply_views(
                images[ids], torch.from_numpy(rows["params"].astype(np.int64)),
                config.views.output_size, mean=config.mean, std=config.std,
            )  # fmt: skip
            with torch.no_grad():
                bare.append(model(views))
            stored.append(torch.from_numpy(rows["logits"]))
    return torch.cat(stored), torch.cat(bare)


def test_fp32_relabel_is_the_bare_teacher(make_options) -> None:
    opts = make_options(device=DEVICE, epochs=3)
    relabel(opts)
    stored, bare = stored_logits_and_bare_teacher(opts.out)
    torch.testing.assert_close(stored, bare, atol=1e-4, rtol=1e-4)


@on_cuda
def test_bf16_relabel_is_close_to_the_bare_teacher(make_options) -> None:
    """bf16 autocast keeps 8 bits of mantissa: logits within bf16's rounding of fp32, and
    the same top class wherever fp32's margin is beyond that rounding."""
    opts = make_options(device=DEVICE, precision="bf16", epochs=3)
    relabel(opts)
    stored, bare = stored_logits_and_bare_teacher(opts.out)
    scale = bare.abs().amax(dim=1, keepdim=True).clamp_min(1e-6)
    assert ((stored - bare).abs() / scale).max() < 0.05
    top2 = bare.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05 * scale[:, 0]
    assert clear.any()
    assert torch.equal(stored[clear].argmax(1), bare[clear].argmax(1))


@pytest.mark.parametrize("kind", ["cutmix", "mixup"])
def test_mixed_inputs_are_rebuilt_on_the_device_bit_for_bit(make_options, kind: str) -> None:
    teachers.RECORDED.clear()
    opts = make_options(
        teacher="teachers:recorder", device=DEVICE, epochs=2, shard_epochs=1, batch_size=12,
        mix=MixPolicy(kind, prob=0.8),
    )  # fmt: skip
    relabel(opts)
    seen = torch.cat(teachers.RECORDED[1:])  # the first batch is the worker's probe
    assert seen.device.type == torch.device(DEVICE).type
    with open_local(opts.out) as labels:
        batches = [b for e in range(2) for b in labels.batches(e, 12, device=DEVICE, logits=True)]
    assert torch.equal(torch.cat([b.images for b in batches]), seen)
    for batch in batches:  # every tensor on the device, the small ones (indices, mix) too
        tensors = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
        devices = {k: v.device.type for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        assert devices == dict.fromkeys(devices, torch.device(DEVICE).type)
        assert {"indices", "params", "mix", "partner_params", "logits"} <= devices.keys()


def test_train_runs_on_the_device(make_options, tmp_path: Path) -> None:
    opts = make_options(device=DEVICE, epochs=2)
    relabel(opts)
    images, labels = random_set(n=9, seed=3)
    eval_set = tmp_path / "test.pt"
    torch.save({"data": torch.from_numpy(images), "label": torch.from_numpy(labels)}, eval_set)
    done = run_cli(
        "train", "--store", opts.out.parent, "--labelset", opts.out.name, "--epochs", 2,
        "--batch-size", 4, "--eval", eval_set, "--device", DEVICE, "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["device"].startswith(DEVICE) and 0.0 <= result["top1"] <= 1.0
