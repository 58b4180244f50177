"""``softserve train``: the evaluator's protocol, through a real server or an online teacher."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from conftest import Server, build_label_set, free_port, random_set, run_cli, write_folder
from test_errors import assert_one_line_error

from softserve import cli
from softserve import train as train_module
from softserve.client import Sharding, ViewPolicy, refine_labels
from softserve.format.augment import DsaPolicy, sample_dsa
from softserve.pixels import views_of
from softserve.train import (
    ONLINE_VIEW_SEED,
    OnlineTeacherBatches,
    TrainOptions,
    build_optimizer,
    build_schedule,
    build_student,
    first_other_class,
    official_batch_size,
    train,
)
from softserve.worker.sources import TeacherInputs


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images, labels = random_set(n=30, seed=9)
    path = tmp_path_factory.mktemp("eval") / "test.pt"
    torch.save({"data": torch.from_numpy(images), "label": torch.from_numpy(labels)}, path)
    return path


@pytest.mark.parametrize(
    ("model", "loss", "optimizer"),
    [("convnet", "gift", "adamw"), ("resnet18", "softce_ce", "sgd"), ("convnet", "mse", "adam"),
     ("convnet_bn", "kl", "adamw")],
)  # fmt: skip
def test_train_reports_a_result(server: Server, eval_set: Path, model, loss, optimizer) -> None:
    done = run_cli(
        "train", "--url", server.url, "--labelset", "tiny", "--model", model, "--loss", loss,
        "--optimizer", optimizer, "--epochs", 2, "--batch-size", 8, "--eval", eval_set,
        "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["steps"] == 2 * len(Sharding(50, 8, drop_last=False))  # the last, partial too
    assert (result["model"], result["loss"], result["optimizer"]) == (model, loss, optimizer)
    assert 0.0 <= result["top1"] <= 1.0 and result["samples_per_second"] > 0


def _layers(model: torch.nn.Module, kind: type) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


@pytest.mark.parametrize(
    ("name", "norm", "other"),
    [("convnet", torch.nn.GroupNorm, torch.nn.BatchNorm2d),
     ("convnet_bn", torch.nn.BatchNorm2d, torch.nn.GroupNorm)],
)  # fmt: skip
def test_convnet_students_are_the_evaluators_convnet(name: str, norm: type, other: type) -> None:
    """Depth 3, width 128, conv3x3 + norm + ReLU + avg-pool 2, one linear layer (LINs-lab/
    GIFT's ``utils/load_model.py``: ``net_norm="batch"`` by default, ``"instance"`` for DATM)."""
    nn = torch.nn
    model = build_student(name, 3, 10, (32, 32))
    convs = _layers(model, nn.Conv2d)
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (3, 128, (3, 3), (1, 1)), (128, 128, (3, 3), (1, 1)), (128, 128, (3, 3), (1, 1))
    ]  # fmt: skip
    assert len(_layers(model, nn.AvgPool2d)) == 3 and len(_layers(model, nn.ReLU)) == 3
    norms = _layers(model, norm)
    assert len(norms) == 3 and not _layers(model, other)
    if norm is nn.GroupNorm:  # one group per channel: each channel normalized on its own
        assert all(g.num_groups == g.num_channels == 128 and g.affine for g in norms)
    (linear,) = _layers(model, nn.Linear)
    assert (linear.in_features, linear.out_features) == (128 * 4 * 4, 10)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["convnet", "convnet_bn"])
def test_width_sets_a_convnet_students_channels(name: str) -> None:
    """--width 32 (the K = 1000 study's student) narrows every conv layer, for any input."""
    model = build_student(name, 1, 1000, (28, 84), width=32)
    assert [c.out_channels for c in _layers(model, torch.nn.Conv2d)] == [32, 32, 32]
    (linear,) = _layers(model, torch.nn.Linear)
    assert (linear.in_features, linear.out_features) == (32 * 3 * 10, 1000)


def test_resnet18_student_is_the_evaluators_small_input_resnet() -> None:
    """torchvision's ResNet-18 with a 3×3 stride-1 stem and no max-pool, every other layer as
    torchvision builds it (``resnet18_modified`` in LINs-lab/GIFT's ``utils/load_model.py``)."""
    import torchvision

    model = build_student("resnet18", 3, 10, (32, 32))
    stem = model.conv1
    assert (stem.kernel_size, stem.stride, stem.padding) == ((3, 3), (1, 1), (1, 1))
    assert stem.bias is None
    assert isinstance(model.maxpool, torch.nn.Identity)
    reference = torchvision.models.resnet18(weights=None, num_classes=10)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    expected = {k: v.shape for k, v in reference.state_dict().items()}
    expected["conv1.weight"] = torch.Size([64, 3, 3, 3])
    assert shapes == expected
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_train_errors(server: Server, eval_set: Path) -> None:
    base = ["train", "--labelset", "tiny", "--epochs", 1, "--eval", eval_set, "--no-progress"]
    assert_one_line_error(run_cli(*base, "--url", server.url, "--model", "vgg"), "unknown --model")
    assert_one_line_error(run_cli(*base, "--url", server.url, "--loss", "l1"), "unknown loss")
    done = run_cli(*base, "--url", server.url, "--labelset", "nope")
    assert_one_line_error(done, "404", "no label set named 'nope'")
    dead = f"http://127.0.0.1:{free_port()}"
    done = run_cli(*base, "--url", dead, "--retry-seconds", 1)
    *retries, last = done.stderr.strip().splitlines()
    assert done.returncode == 1 and retries, done.stderr
    assert all("failed" in line and line.endswith("retrying") for line in retries)
    assert last.startswith("error: no server answered") and dead in last


@pytest.mark.parametrize(
    ("samples", "expected"),
    [(1, 10), (10, 10), (11, 50), (500, 50), (501, 100), (20_000, 100), (20_001, 200)],
)
def test_official_batch_size(samples: int, expected: int) -> None:
    """The evaluator's rule: 10 up to 10 images, 50 to 500, 100 to 20,000, 200 above."""
    assert official_batch_size(samples) == expected


@pytest.mark.parametrize(("epochs", "per_epoch"), [(12, 3), (300, 2), (7, 1)])
def test_schedule_matches_the_evaluators_epoch_schedule(epochs: int, per_epoch: int) -> None:
    """Stepped per batch, every batch gets the learning rate of the evaluator's schedule:
    MultiStepLR stepped once per epoch, milestones [2E//3, 5E//6], gamma 0.2."""
    model = torch.nn.Linear(2, 2)
    opts = TrainOptions(urls=["http://x"], labelset="x")
    optimizer = build_optimizer(opts, model.parameters())
    schedule = build_schedule(optimizer, epochs, per_epoch)
    seen = []
    for _ in range(epochs * per_epoch):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    decays = [sum(e >= m for m in (2 * epochs // 3, 5 * epochs // 6)) for e in range(epochs)]
    expected = [1e-3 * 0.2**d for d in decays for _ in range(per_epoch)]
    assert seen == pytest.approx(expected, rel=1e-9)
    first, second = (2 * epochs // 3) * per_epoch, (5 * epochs // 6) * per_epoch
    assert seen[first - 1] == pytest.approx(1e-3) and seen[first] == pytest.approx(2e-4)
    assert seen[second] == pytest.approx(4e-5)


def test_served_run_defaults_to_the_official_batch_size(server: Server, eval_set: Path) -> None:
    """Without --batch-size, the 50-sample set trains in batches of 50 (one per epoch)."""
    done = run_cli(
        "train", "--url", server.url, "--labelset", "tiny", "--epochs", 3, "--eval", eval_set,
        "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["batch_size"], result["steps"], result["feed"]) == (50, 3, "served")


def test_online_run_trains_without_a_server(tmp_path: Path, eval_set: Path) -> None:
    """--teacher and --images train the same student with labels computed on the fly, on
    crops or (--views dsa) DSA views; crop options with DSA are refused."""
    images, labels = random_set(n=30, seed=4)
    folder = write_folder(tmp_path / "set", images, labels)
    done = run_cli(
        "train", "--teacher", "teachers:tiny_rgb", "--images", folder, "--loss", "kl",
        "--epochs", 2, "--batch-size", 8, "--eval", eval_set, "--device", "cpu",
        "--min-scale", 0.5, "--no-progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["feed"], result["teacher"], result["loss"]) == (
        "online",
        "teachers:tiny_rgb",
        "kl",
    )
    assert result["steps"] == 2 * 4 and 0.0 <= result["top1"] <= 1.0  # 8 + 8 + 8 + 6
    assert result["views"] == "rrc"
    dsa = run_cli(
        "train", "--teacher", "teachers:tiny_rgb", "--images", folder, "--views", "dsa",
        "--epochs", 1, "--batch-size", 8, "--eval", eval_set, "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert dsa.returncode == 0, dsa.stderr
    assert json.loads(dsa.stdout.strip().splitlines()[-1])["views"] == "dsa"
    mixed = run_cli("train", "--teacher", "teachers:tiny_rgb", "--images", folder,
                    "--views", "dsa", "--min-scale", 0.5, "--epochs", 1)  # fmt: skip
    assert_one_line_error(mixed, "--views dsa", "drop them")
    served = run_cli("train", "--store", tmp_path, "--labelset", "s", "--views", "dsa",
                     "--no-flip", "--epochs", 1)  # fmt: skip
    assert_one_line_error(served, "--no-flip, --views shape an online teacher", "the set's own")


def test_one_seed_one_student_whichever_feed(
    tmp_path: Path, eval_set: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One --seed starts the served and the online student from the same weights, whatever
    the teacher's own init draws, so the two arms differ in their labels only. A set smaller
    than the official batch size (20 < 50) trains on one partial batch an epoch, as the
    evaluator's DataLoader keeps its last batch."""
    root = build_label_set(tmp_path / "store" / "s", n=20)
    starts: list[list[torch.Tensor]] = []

    def recording(*args: object) -> torch.nn.Module:
        model = build_student(*args)  # type: ignore[arg-type]
        starts.append([p.detach().clone() for p in model.parameters()])
        return model

    monkeypatch.setattr(train_module, "build_student", recording)
    common = {"epochs": 2, "eval": str(eval_set), "device": "cpu", "progress": False, "seed": 5}
    quiet = lambda _: None  # noqa: E731
    served = train(TrainOptions(store=root.parent, labelset="s", **common), log=quiet)
    teacher = TeacherInputs(images=root.parent / "s-images", teacher="teachers:unseeded_rgb")
    online = train(TrainOptions(online=teacher, **common), log=quiet)
    for a, b in zip(*starts, strict=True):
        torch.testing.assert_close(a, b)
    for result in (served, online):
        assert (result["batch_size"], result["steps"]) == (50, 2)


@pytest.mark.parametrize("dsa", [None, DsaPolicy()], ids=["crops", "dsa"])
def test_online_batches_are_the_teacher_on_fresh_views(tmp_path: Path, dsa) -> None:
    """Each online batch: the views of its params (crops, or the DSA rows a relabel with the
    online seed stores), the teacher's logits on exactly those views, GIFT's refinement of
    them; every epoch a new permutation and new views."""
    from teachers import tiny_rgb

    images, labels = random_set(n=20, seed=5)
    teacher = tiny_rgb().eval()
    online = TeacherInputs(
        teacher="teachers:tiny_rgb", images=tmp_path, policy=ViewPolicy((0.3, 1)), dsa=dsa
    )
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    feed = OnlineTeacherBatches(
        images, labels, teacher, online, mean, std, (8, 8), batch_size=6, epochs=2, seed=3,
        device=torch.device("cpu"), logits=True,
    )  # fmt: skip
    batches = list(feed)
    assert len(feed) == 4 and [(b.epoch, b.index) for b in batches] == [
        (e, i) for e in range(2) for i in range(4)
    ]
    assert [len(b.indices) for b in batches[:4]] == [6, 6, 6, 2]  # the last batch is kept
    kind = "rrc" if dsa is None else "dsa"
    for b in batches:
        if dsa is not None:
            rows = sample_dsa(dsa, ONLINE_VIEW_SEED + 3, b.epoch, 20, 8, 8)[b.indices.numpy()]
            assert torch.equal(b.params, torch.from_numpy(rows))
        views = views_of(
            kind, torch.from_numpy(images)[b.indices], b.params, (8, 8), mean=mean, std=std
        )
        torch.testing.assert_close(b.images, views, rtol=0, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(b.logits, teacher(views), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(b.soft, refine_labels(b.logits, b.hard))
        assert b.hard.tolist() == labels[b.indices.numpy()].tolist()
    epoch_ids = [torch.cat([b.indices for b in batches if b.epoch == e]) for e in range(2)]
    assert sorted(epoch_ids[0].tolist()) == list(range(20)) and not torch.equal(*epoch_ids)
    params = [torch.cat([b.params for b in batches if b.epoch == e]) for e in range(2)]
    assert not torch.equal(params[0], params[1])


def test_eval_set_of_another_task_is_refused(server: Server, tmp_path: Path) -> None:
    """A test set with more classes than the label set is an error, not an accuracy."""
    images, _ = random_set(n=10, seed=2)
    path = tmp_path / "other.pt"
    labels = torch.arange(10) % 7  # 7 classes; tiny has 3
    torch.save({"data": torch.from_numpy(images), "label": labels}, path)
    done = run_cli(
        "train", "--url", server.url, "--labelset", "tiny", "--epochs", 1, "--eval", path,
        "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert_one_line_error(done, "--eval labels go up to class 6", "3 classes")


def test_train_needs_exactly_one_feed(tmp_path: Path, eval_set: Path) -> None:
    base = ["train", "--epochs", 1, "--eval", eval_set, "--no-progress"]
    done = run_cli(*base)
    assert_one_line_error(done, "--url or --store, and --labelset", "--teacher and --images")
    both = [
        "--url",
        "http://127.0.0.1:1",
        "--labelset",
        "x",
        "--teacher",
        "t:x",
        "--images",
        tmp_path,
    ]
    assert_one_line_error(run_cli(*base, *both), "not both")
    assert_one_line_error(
        run_cli(*base, "--teacher", "teachers:tiny_rgb"), "--teacher and --images"
    )


@pytest.mark.parametrize(
    ("names", "fragments"),
    [
        (["ant", "cat", "bee"], ("--eval class 1 is 'cat'", "'bee'", "another order")),
        (["ant", "bee"], ("--eval has 2 classes", "training set 3")),
    ],
)
def test_eval_set_with_other_class_names_is_refused(
    store: Path, tmp_path: Path, names: list[str], fragments: tuple[str, ...]
) -> None:
    """Same class count but other names (or order), or fewer named classes: refused."""
    images, labels = random_set(n=9, seed=3)
    labels = labels % len(names)
    path = tmp_path / "named.pt"
    torch.save(
        {"data": torch.from_numpy(images), "label": torch.from_numpy(labels), "class_names": names},
        path,
    )
    done = run_cli(
        "train", "--store", store, "--labelset", "tiny", "--epochs", 1, "--eval", path,
        "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert_one_line_error(done, *fragments)


def test_class_names_compare_without_index_prefixes() -> None:
    """The demo's folders are "00-t-shirt", ...: the same classes as Fashion-MNIST's names."""
    from softserve.worker.fashion_mnist import CLASS_NAMES

    numbered = [f"{i:02d}-{name}" for i, name in enumerate(CLASS_NAMES)]
    assert first_other_class(CLASS_NAMES, numbered) is None
    assert first_other_class(numbered, CLASS_NAMES) is None
    assert first_other_class(["ant", "bee"], ["0-ant", "1_bee"]) is None
    assert first_other_class(["ant", "bee"], ["0-ant", "0-bee"]) == 1
    assert first_other_class(["ant", "bee"], ["bee", "ant"]) == 0
    assert first_other_class(["ant", "bee"], ["0", "1"]) is None  # unnamed training classes


def test_train_defaults_are_the_evaluators_adamw() -> None:
    """Without --optimizer, --lr or --weight-decay: AdamW with lr 1e-3 and weight decay 1e-4,
    the official GIFT evaluator's optimizer."""
    opts = TrainOptions(urls=["http://x"], labelset="x")
    flags = inspect.signature(cli.train).parameters
    assert [flags[name].default for name in ("optimizer", "lr", "weight_decay")] == [
        opts.optimizer, opts.lr, opts.weight_decay,
    ]  # fmt: skip
    optimizer = build_optimizer(opts, torch.nn.Linear(2, 2).parameters())
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (1e-3, 1e-4)


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--lr", "-1"], "--lr must be positive"),
        (["--lr", "0"], "--lr must be positive"),
        (["--weight-decay", "-1"], "--weight-decay must be non-negative"),
        (["--model", "vgg"], "unknown --model 'vgg'; choose one of convnet, convnet_bn, resnet18"),
        (["--optimizer", "lbfgs"], "unknown --optimizer 'lbfgs'; choose one of adamw, adam, sgd"),
        (["--size", "0"], "--size must be positive"),
        (["--size", "-4x8"], "--size must be positive"),
        (["--alpha", "-0.1"], "--alpha and --beta must be non-negative"),
        (["--beta", "-1"], "--alpha and --beta must be non-negative"),
        (["--width", "0"], "--width must be positive"),
        (["--model", "resnet18", "--width", "32"], "--width must be positive and is for convnet"),
    ],
)
def test_train_options_are_checked_before_anything_loads(
    tmp_path: Path, flags: list[str], fragment: str
) -> None:
    """Bad options fail first: not after the test set, images or teacher load (none of them
    exists here), and not as a traceback inside the training loop."""
    done = run_cli(
        "train", "--teacher", "nosuchmodule:make", "--images", tmp_path / "no-images",
        "--eval", tmp_path / "no-eval", "--epochs", 1, "--no-progress", *flags, timeout=60,
    )  # fmt: skip
    assert_one_line_error(done, fragment)


def test_a_missing_eval_set_is_named_as_eval(tmp_path: Path) -> None:
    done = run_cli(
        "train", "--store", tmp_path, "--labelset", "x", "--eval", tmp_path / "no-eval",
        "--epochs", 1, "--no-progress", timeout=60,
    )  # fmt: skip
    assert_one_line_error(done, f"--eval {tmp_path / 'no-eval'} does not exist")
    assert "--images" not in done.stderr


def test_online_teacher_gets_num_classes_only_when_given(tmp_path: Path, eval_set: Path) -> None:
    """As for relabel: a factory without num_classes works when --num-classes is not given,
    and a teacher whose outputs are not the set's classes is one line, before training."""
    images, _ = random_set(n=16, seed=6)
    four = tmp_path / "four.pt"
    torch.save({"data": torch.from_numpy(images), "label": torch.arange(16) % 4}, four)
    base = ["train", "--teacher", "teachers:four_classes", "--epochs", 1, "--batch-size", 8,
            "--eval", eval_set, "--device", "cpu", "--no-progress"]  # fmt: skip
    done = run_cli(*base, "--images", four)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["steps"] == 2
    three = write_folder(tmp_path / "three", *random_set(n=6, seed=7))
    done = run_cli(*base, "--images", three)
    assert_one_line_error(done, "outputs shape (2, 4)", "3 classes", "--num-classes")


@pytest.mark.parametrize(("epochs", "expected"), [(1000, [250, 500, 750, 1000]), (300, [75, 150,
                         225, 300]), (6, [2, 3, 4, 6]), (2, [1, 2]), (1, [1])])  # fmt: skip
def test_evaluations_are_the_evaluators_quarters(epochs: int, expected: list[int]) -> None:
    """The evaluator scores every epoch_print_freq = E/4 epochs and reports the best."""
    assert train_module.evaluation_epochs(epochs) == expected


def test_best_of_four_beside_the_last_and_training_unchanged(
    tmp_path: Path, eval_set: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """top1 is the last epoch's, top1_best4 the best of the evaluator's four evaluations; the
    evaluations in between leave the student's training as it was."""
    root = build_label_set(tmp_path / "store" / "s", n=20)
    finals: list[list[torch.Tensor]] = []
    real_fit = train_module.fit

    def recording_fit(model, feed, loss_fn, opts, after_epoch=None):  # noqa: ANN001, ANN202
        out = real_fit(model, feed, loss_fn, opts, after_epoch)
        finals.append([p.detach().clone() for p in model.parameters()])
        return out

    monkeypatch.setattr(train_module, "fit", recording_fit)
    opts = TrainOptions(store=root.parent, labelset="s", epochs=8, eval=str(eval_set),
                        device="cpu", progress=False, seed=3)  # fmt: skip
    result = train(opts, log=lambda _: None)
    assert list(result["evaluations"]) == ["2", "4", "6", "8"]
    assert result["top1"] == result["evaluations"]["8"]
    assert result["top1_best4"] == max(result["evaluations"].values())

    monkeypatch.setattr(train_module, "evaluation_epochs", lambda epochs: [epochs])
    again = train(opts, log=lambda _: None)
    assert list(again["evaluations"]) == ["8"] and again["top1"] == result["top1"]
    assert all(torch.equal(a, b) for a, b in zip(*finals, strict=True))
