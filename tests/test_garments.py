"""The K = 100 / K = 1000 Fashion-MNIST composites: classes, the factorized teacher, the
selection, and `demo prepare --task triplets` on the real data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from softserve.models import pairs_teacher, triplets_teacher
from softserve.storage import LabelSetReader, verify_label_set
from softserve.worker import fashion_mnist
from softserve.worker.garments import GarmentTask, composite_state, select

HAVE_DATA = (fashion_mnist.DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists()
TRIPLETS = GarmentTask.named("triplets")


def test_classes_are_the_garments_read_as_a_number() -> None:
    assert TRIPLETS.num_classes == 1000 and GarmentTask.named("pairs").num_classes == 100
    assert TRIPLETS.digits(84) == (0, 8, 4)
    assert TRIPLETS.class_of(np.array([[0, 8, 4], [9, 9, 9]])).tolist() == [84, 999]
    names = TRIPLETS.class_names()
    assert len(set(names)) == 1000 and names[84] == "t-shirt|bag|coat"
    with pytest.raises(ValueError, match="unknown garment task"):
        GarmentTask.named("quads")


def test_views_keep_the_garments_in_place() -> None:
    """No flip (abc flipped shows cba) and crop ratios around the composite's 3:1 aspect."""
    policy = TRIPLETS.policy
    assert policy.flip is False
    assert policy.ratio[0] < 3.0 < policy.ratio[1]


@pytest.mark.parametrize(("factory", "garments"), [(pairs_teacher, 2), (triplets_teacher, 3)])
def test_teacher_logit_is_the_sum_of_its_tiles_logits(factory, garments: int) -> None:
    """z[abc] = l1[a] + l2[b] + l3[c], so softmax(z) is the product of the tiles' softmaxes."""
    teacher = factory().double().eval()
    x = torch.randn(5, 1, 28, 28 * garments, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = teacher(x.double())
        tiles = [teacher.tile(x[..., 28 * i : 28 * (i + 1)].double()) for i in range(garments)]
    task = GarmentTask.named("pairs" if garments == 2 else "triplets")
    for cls in (0, 7, task.num_classes - 1, task.num_classes // 3):
        expected = sum(t[:, d] for t, d in zip(tiles, task.digits(cls), strict=True))
        torch.testing.assert_close(z[:, cls], expected, rtol=1e-12, atol=1e-12)
    product = torch.ones(5, 1, dtype=torch.float64)
    for t in tiles:
        product = (product[:, :, None] * t.softmax(1)[:, None, :]).flatten(1)
    torch.testing.assert_close(z.softmax(1), product, rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="square tiles"):
        teacher(torch.zeros(1, 1, 28, 30, dtype=torch.float64))


def test_composite_weights_load_into_the_teacher() -> None:
    tile = fashion_mnist_teacher_state()
    teacher = triplets_teacher()
    teacher.load_state_dict(composite_state(tile))
    assert torch.equal(teacher.tile.classifier.weight, tile["classifier.weight"])


def fashion_mnist_teacher_state() -> dict[str, torch.Tensor]:
    from softserve.models import fashion_mnist_teacher

    torch.manual_seed(3)
    return fashion_mnist_teacher().state_dict()


def test_selection_keeps_the_most_confident_composites_of_each_class() -> None:
    """Per class: ipc composites of images of its garment classes, the highest summed
    tile log-probability among ipc·candidates drawn."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 6)
    log_probs = np.log(rng.dirichlet(np.ones(10), size=len(labels)))
    picks = select(GarmentTask.named("pairs"), log_probs, labels, ipc=2, candidates=3, seed=1)
    assert picks.shape == (200, 2)
    classes = GarmentTask.named("pairs").class_of(labels[picks])
    assert classes.tolist() == np.repeat(np.arange(100), 2).tolist()
    again = GarmentTask.named("pairs").draw(labels, 6, np.random.default_rng(1)).reshape(100, 6, 2)
    for cls in (0, 42, 99):
        a, b = divmod(cls, 10)
        score = log_probs[again[cls, :, 0], a] + log_probs[again[cls, :, 1], b]
        best = again[cls][np.argsort(-score, kind="stable")[:2]]
        assert picks[2 * cls : 2 * cls + 2].tolist() == best.tolist()


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_DATA, reason="needs Debian's dataset-fashion-mnist")
def test_demo_prepares_the_triplets_task(tmp_path: Path) -> None:
    """Teacher, IPC-1 set of 1,000 classes, test split and label set, on the real data."""
    workdir, store = tmp_path / "work", tmp_path / "store"
    done = run_cli(
        "demo", "prepare", "--task", "triplets", "--ipc", "1", "--workdir", workdir,
        "--store", store, "--label-epochs", 2, "--teacher-epochs", 1, "--train-limit", 3000,
        "--codec", "topk:10", "--device", "cpu", "--no-progress", timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    test = torch.load(workdir / "triplets" / "test.pt", weights_only=True)
    assert test["data"].shape == (10_000, 1, 28, 84) and test["data"].dtype == torch.uint8
    assert torch.bincount(test["label"], minlength=1000).tolist() == [10] * 1000
    assert "teacher test accuracy" in done.stdout and f"--eval {workdir}" in done.stdout.replace(
        "\n", "")  # fmt: skip
    root = store / "triplets-ipc1"
    assert verify_label_set(root) == []
    with LabelSetReader(root) as reader:
        config = reader.config
        assert (config.num_classes, config.num_samples, config.image_shape) == (1000, 1000,
                                                                                 (1, 28, 84))
        assert config.views.flip is False and config.codec == "topk:10"
        assert sorted(reader.hard_labels().tolist()) == list(range(1000))
        assert config.class_names[999] == "ankle-boot|ankle-boot|ankle-boot"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["config"]["teacher"]["spec"] == "softserve.models:triplets_teacher"
