"""Student training: the official GIFT evaluator's protocol, fed by a label set or a teacher.

A student learns from batches with a bundled loss and is scored top-1 on a real test split.
Two feeds give the same student, schedule, losses and evaluation:

- **served**: a label set's precomputed labels, through a softserve server or read from a
  local store (``--store``, no server);
- **online**: a teacher run on the fly on fresh views every step, as RDED and GIFT's own
  evaluator do (no label set, no server): the reference for what precomputation costs.

Defaults follow LINs-lab/GIFT ``validate/evaluator_benchmark.py``: AdamW (lr 1e-3, weight
decay 1e-4), MultiStepLR with gamma 0.2 at epochs 2E/3 and 5E/6, and the batch size by set
size (:func:`official_batch_size`). Adam and SGD are there for the cross-optimizer study.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from softserve.client import (
    NEEDS_LOGITS,
    Batch,
    Client,
    LabelSet,
    apply_views,
    epoch_order,
    get_loss,
    open_local,
    refine_labels,
)
from softserve.errors import InputError
from softserve.format.augment import sample_epoch_views, view_kind
from softserve.models import convnet, resnet18_small
from softserve.pixels import views_of
from softserve.worker.sources import TeacherInputs, check_teacher_inputs

#: Students by --model name: (channels, classes, view size, width) -> a fresh model; width
#: None is the model's own (ConvNet: 128 channels).
STUDENTS: dict[str, Callable[[int, int, tuple[int, int], int | None], nn.Module]] = {
    "convnet": lambda channels, classes, size, width: convnet(
        classes, channels, image_size=size, width=width or 128
    ),
    "convnet_bn": lambda channels, classes, size, width: convnet(
        classes, channels, image_size=size, width=width or 128, norm="batch"
    ),
    "resnet18": lambda channels, classes, size, width: resnet18_small(classes, channels),
}
#: The students whose width --width sets.
WIDE_STUDENTS = ("convnet", "convnet_bn")
#: Default learning rate per optimizer: the evaluator's AdamW lr for Adam too; SGD's is ours.
OPTIMIZERS = {"adamw": 1e-3, "adam": 1e-3, "sgd": 0.01}
#: The evaluator's MultiStepLR: decay by 0.2 at these fractions of the epochs.
LR_GAMMA = 0.2
#: Online views are drawn from the student's seed plus this, apart from any label set's seed.
ONLINE_VIEW_SEED = 1_000_003


def official_batch_size(num_samples: int) -> int:
    """The evaluator's batch size by set size: 10 up to 10, 50 to 500, 100 to 20,000, else 200."""
    if num_samples <= 10:
        return 10
    if num_samples <= 500:
        return 50
    if num_samples <= 20_000:
        return 100
    return 200


def lr_milestones(epochs: int, batches_per_epoch: int) -> list[int]:
    """Steps at which the learning rate decays: the starts of epochs 2E//3 and 5E//6.

    The evaluator steps its scheduler once per epoch with milestones [2E//3, 5E//6]; stepping
    per batch at these steps gives every batch the same learning rate as it would get there.
    """
    return [batches_per_epoch * (2 * epochs // 3), batches_per_epoch * (5 * epochs // 6)]


@dataclass
class TrainOptions:
    """One student run. Exactly one feed: ``urls`` or ``store``, + ``labelset`` (served), or
    ``online``."""

    urls: Sequence[str] = ()
    store: Path | None = None
    labelset: str | None = None
    online: TeacherInputs | None = None
    model: str = "convnet"
    width: int | None = None
    loss: str = "gift"
    optimizer: str = "adamw"
    epochs: int = 300
    lr: float | None = None
    weight_decay: float = 1e-4
    batch_size: int | None = None
    eval: str = "fashion-mnist"
    device: str = "auto"
    token: str | None = None
    retry_seconds: float = 60.0
    seed: int = 0
    prefetch: int = 8
    progress: bool = True


@dataclass
class Feed:
    """What a student trains on: batches for every epoch, and the shape of its inputs."""

    batches: Iterable[Batch]
    batches_per_epoch: int
    num_samples: int
    num_classes: int
    class_names: list[str]
    channels: int
    output_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    batch_size: int
    describe: dict


def build_student(
    name: str, channels: int, num_classes: int, size: tuple[int, int], width: int | None = None
) -> nn.Module:
    """A fresh student for the feed's channels, view size and classes (``name`` in STUDENTS)."""
    return STUDENTS[name](channels, num_classes, size, width)


def build_optimizer(opts: TrainOptions, params) -> torch.optim.Optimizer:
    """The run's optimizer (checked options: a name in OPTIMIZERS, lr > 0, weight decay >= 0)."""
    lr = opts.lr if opts.lr is not None else OPTIMIZERS[opts.optimizer]
    if opts.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=opts.weight_decay)
    if opts.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=opts.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=opts.weight_decay)


def build_schedule(
    optimizer: torch.optim.Optimizer, epochs: int, batches_per_epoch: int
) -> torch.optim.lr_scheduler.MultiStepLR:
    """The evaluator's schedule, stepped once per batch."""
    milestones = lr_milestones(epochs, batches_per_epoch)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=LR_GAMMA)


@dataclass
class EvalSet:
    """A real test split: uint8 N×C×H×W images, labels, and class names when it has them."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str] | None


def _named(names: Sequence[str]) -> bool:
    """Whether class names say something (a tensor file without names gets "0", "1", ...)."""
    return list(names) != [str(i) for i in range(len(names))]


def _unnumbered(index: int, name: str) -> str:
    """A class name without its index prefix ("03-dress" -> "dress"), which ImageFolder sets
    use to keep their classes in order when sorted."""
    return re.sub(rf"^0*{index}[-_. ]", "", name) if index else re.sub(r"^0+[-_. ]", "", name)


def first_other_class(test: Sequence[str], train: Sequence[str]) -> int | None:
    """The first class whose names differ (index prefixes aside), or None when they agree or
    the training set's classes are unnamed."""
    if not _named(train):
        return None
    for i, (a, b) in enumerate(zip(test, train, strict=True)):
        if _unnumbered(i, a) != _unnumbered(i, b):
            return i
    return None


def load_eval_set(spec: str) -> EvalSet:
    """``fashion-mnist`` (Debian's test split) or an image set path."""
    if spec == "fashion-mnist":
        from softserve.worker import fashion_mnist

        images, labels = fashion_mnist.load_split(fashion_mnist.find_data(), "test")
        return EvalSet(images, labels, fashion_mnist.CLASS_NAMES)
    from softserve.worker.sources import load_image_set

    data = load_image_set(Path(spec), option="--eval")
    names = data.class_names if _named(data.class_names) else None
    return EvalSet(data.images, data.labels, names)


def check_eval_set(test: EvalSet, feed: Feed) -> None:
    """Refuse a test set of another task: other channels, classes, or class names would
    score an accuracy that means nothing."""
    if test.images.shape[1] != feed.channels:
        raise InputError(
            f"--eval images have {test.images.shape[1]} channels, the training set {feed.channels}"
        )
    if len(test.labels) and int(test.labels.max()) >= feed.num_classes:
        raise InputError(
            f"--eval labels go up to class {int(test.labels.max())}, the training set has "
            f"{feed.num_classes} classes: a test set of another task scores nothing real"
        )
    if test.class_names is None:
        return
    if len(test.class_names) != feed.num_classes:
        raise InputError(
            f"--eval has {len(test.class_names)} classes, the training set {feed.num_classes}: "
            "a test set of another task scores nothing real"
        )
    at = first_other_class(test.class_names, feed.class_names)
    if at is not None:
        raise InputError(
            f"--eval class {at} is {test.class_names[at]!r}, the training set's is "
            f"{feed.class_names[at]!r}: the test set's classes are other classes or in another "
            "order"
        )


@torch.inference_mode()
def evaluate(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, feed: Feed, device: torch.device
) -> float:
    """Top-1 accuracy on whole images, resized to the view size and normalized."""
    model.eval()
    mean = torch.tensor(feed.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(feed.std, device=device).view(1, -1, 1, 1)
    correct = 0
    for start in range(0, len(images), 1024):
        x = torch.from_numpy(images[start : start + 1024]).to(device).float() / 255
        if tuple(x.shape[2:]) != tuple(feed.output_size):
            x = F.interpolate(x, size=feed.output_size, mode="bilinear", align_corners=False)
        pred = model((x - mean) / std).argmax(1).cpu().numpy()
        correct += int((pred == labels[start : start + 1024]).sum())
    model.train()
    return correct / len(images)


class OnlineTeacherBatches:
    """Batches labelled by a teacher on fresh views, every epoch, with no label set.

    Epoch e's order and views (crops or DSA) are drawn as a relabel would draw them, from
    ``ONLINE_VIEW_SEED + seed``; the teacher labels each batch's views as the student trains.
    """

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, teacher: nn.Module, online: TeacherInputs,
        mean: tuple[float, ...], std: tuple[float, ...], size: tuple[int, int],
        batch_size: int, epochs: int, seed: int, device: torch.device, logits: bool,
    ) -> None:  # fmt: skip
        self.images = torch.from_numpy(images).to(device)
        self.labels = torch.from_numpy(labels.astype(np.int64)).to(device)
        self.teacher = teacher
        self.online = online
        self.mean, self.std, self.size = mean, std, size
        self.batch_size = batch_size
        self.epochs = epochs
        self.seed = ONLINE_VIEW_SEED + seed
        self.device = device
        self.logits = logits

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        n, _, h, w = self.images.shape
        for epoch in range(self.epochs):
            order = torch.from_numpy(epoch_order(self.seed, epoch, n)).to(self.device)
            views = sample_epoch_views(self.online.views, self.seed, epoch, n, (h, w), self.size)
            params = torch.from_numpy(views).to(self.device)
            for index in range(len(self)):
                ids = order[index * self.batch_size : (index + 1) * self.batch_size]
                yield self._batch(epoch, index, ids, params[ids])

    def _batch(self, epoch: int, index: int, ids: torch.Tensor, params: torch.Tensor) -> Batch:
        kind = view_kind(self.online.views)
        images = views_of(kind, self.images[ids], params, self.size, mean=self.mean, std=self.std)
        hard = self.labels[ids]
        with torch.no_grad():
            teacher = self.teacher(images).float()
        soft = refine_labels(teacher, hard, self.online.alpha, self.online.beta)
        return Batch(
            epoch=epoch, index=index, indices=ids, images=images, params=params, hard=hard,
            soft=soft, logits=teacher if self.logits else None,
        )  # fmt: skip


def online_feed(opts: TrainOptions, device: torch.device) -> Feed:
    """The online-teacher feed: the teacher loaded onto ``device``, views drawn per epoch."""
    from softserve.worker.sources import default_normalization, load_image_set
    from softserve.worker.teacher import check_teacher_output, load_teacher_of

    online = opts.online
    assert online is not None
    data = load_image_set(online.images, online.num_classes)
    n, c, h, w = data.images.shape
    mean, std = default_normalization(c, online.mean, online.std)
    size = online.size or (h, w)
    model = load_teacher_of(online, data).model.to(device)
    probe = torch.from_numpy(data.images[:2]).to(device)
    whole = torch.tensor([[0, 0, h, w, 0]], dtype=torch.int32, device=device)

    @torch.no_grad()
    def on_whole_images() -> torch.Tensor:
        views = apply_views(probe, whole.expand(len(probe), -1), size, mean=mean, std=std)
        return model(views)

    check_teacher_output(online.teacher, on_whole_images, (len(probe), c, *size), data.num_classes)
    batch_size = opts.batch_size or official_batch_size(n)
    batches = OnlineTeacherBatches(
        data.images, data.labels, model, online, mean, std, size, batch_size, opts.epochs,
        opts.seed, device, logits=opts.loss in NEEDS_LOGITS,
    )  # fmt: skip
    return Feed(
        batches=batches, batches_per_epoch=len(batches), num_samples=n,
        num_classes=data.num_classes, class_names=data.class_names, channels=c,
        output_size=size, mean=mean, std=std,
        batch_size=batch_size,
        describe={
            "feed": "online", "teacher": online.teacher, "images": str(online.images),
            "views": view_kind(online.views),
        },
    )  # fmt: skip


def open_labelset(opts: TrainOptions, client: Client | None) -> LabelSet:
    """The run's label set: on the server, or read from the local store."""
    assert opts.labelset is not None
    if client is not None:
        return client.labelset(opts.labelset)
    assert opts.store is not None
    return open_local(opts.store / opts.labelset)


def served_feed(opts: TrainOptions, labelset: LabelSet, device: torch.device) -> Feed:
    """The served feed: the label set's loader, one stream (or read) for every epoch."""
    batch_size = opts.batch_size or official_batch_size(labelset.num_samples)
    try:
        loader = labelset.loader(
            batch_size, epochs=opts.epochs, device=device, logits=opts.loss in NEEDS_LOGITS,
            drop_last=False, prefetch=opts.prefetch,
        )  # fmt: skip
    except ValueError as exc:
        raise InputError(f"--batch-size: {exc}") from None
    return Feed(
        batches=loader, batches_per_epoch=loader.batches_per_epoch,
        num_samples=labelset.num_samples, num_classes=labelset.num_classes,
        class_names=labelset.class_names, channels=labelset.image_shape[0],
        output_size=tuple(labelset.output_size),
        mean=tuple(labelset.mean), std=tuple(labelset.std), batch_size=batch_size,
        describe={
            "feed": "served" if opts.urls else "local", "labelset": opts.labelset,
            "codec": labelset.detail.codec,
        },
    )  # fmt: skip


def _check(opts: TrainOptions) -> None:
    served = bool(opts.urls) or opts.store is not None or opts.labelset is not None
    if served == (opts.online is not None):
        raise InputError(
            "train from a label set (--url or --store, and --labelset) or from a teacher "
            "(--teacher and --images), not both and not neither"
        )
    if served and bool(opts.urls) == (opts.store is not None):
        raise InputError(
            "a label set comes from a server (--url) or a local store (--store), not both "
            "and not neither"
        )
    if served and not opts.labelset:
        raise InputError("a run on a label set needs --labelset NAME")
    if opts.epochs < 1 or (opts.batch_size is not None and opts.batch_size < 1):
        raise InputError("--epochs and --batch-size must be positive")
    for option, value, choices in (("--model", opts.model, STUDENTS),
                                   ("--optimizer", opts.optimizer, OPTIMIZERS)):  # fmt: skip
        if value not in choices:
            raise InputError(f"unknown {option} {value!r}; choose one of {', '.join(choices)}")
    if opts.width is not None and (opts.width < 1 or opts.model not in WIDE_STUDENTS):
        raise InputError(
            f"--width must be positive and is for {' and '.join(WIDE_STUDENTS)}, "
            f"got {opts.width} for {opts.model}"
        )
    if opts.lr is not None and opts.lr <= 0:
        raise InputError(f"--lr must be positive, got {opts.lr}")
    if opts.weight_decay < 0:
        raise InputError(f"--weight-decay must be non-negative, got {opts.weight_decay}")
    if opts.online is not None:
        check_teacher_inputs(opts.online)


def evaluation_epochs(epochs: int) -> list[int]:
    """The epochs after which the official evaluator scores the student: every quarter of
    the run (``epoch_print_freq`` = E/4), the last included."""
    return sorted({max(1, round(epochs * k / 4)) for k in (1, 2, 3, 4)})


def fit(
    model: nn.Module, feed: Feed, loss_fn: nn.Module, opts: TrainOptions,
    after_epoch: Callable[[int], None] | None = None,
) -> tuple[int, int, float]:  # fmt: skip
    """Train ``model`` on every batch of ``feed``, calling ``after_epoch(epoch)`` (1-based)
    after each epoch; returns steps, samples and the seconds spent training (not in
    ``after_epoch``)."""
    steps = opts.epochs * feed.batches_per_epoch
    if steps == 0:
        raise InputError(
            f"--batch-size {feed.batch_size} exceeds the set's {feed.num_samples} samples; lower it"
        )
    optimizer = build_optimizer(opts, model.parameters())
    schedule = build_schedule(optimizer, opts.epochs, feed.batches_per_epoch)
    name = f"train {opts.model}/{opts.loss}"
    bar = tqdm(total=steps, unit="step", desc=name, disable=not opts.progress, dynamic_ncols=True)
    started = time.perf_counter()
    samples, aside = 0, 0.0
    model.train()
    for step, batch in enumerate(feed.batches, 1):
        loss = loss_fn(model(batch.images), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        samples += len(batch)
        bar.update()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if after_epoch is not None and step % feed.batches_per_epoch == 0:
            paused = time.perf_counter()
            after_epoch(step // feed.batches_per_epoch)
            aside += time.perf_counter() - paused
    bar.close()
    return steps, samples, time.perf_counter() - started - aside


def train(opts: TrainOptions, log: Callable[[str], None] = print) -> dict:
    """Train a student from the chosen feed and score it; returns the result record."""
    from softserve.worker.runtime import resolve_device

    _check(opts)
    device = resolve_device(opts.device)
    try:
        loss_fn = get_loss(opts.loss)
    except ValueError as exc:
        raise InputError(f"--loss: {exc}") from None
    client_context = (
        Client(list(opts.urls), token=opts.token, retry_seconds=opts.retry_seconds)
        if opts.urls else nullcontext()
    )  # fmt: skip
    test = load_eval_set(opts.eval)
    with client_context as client:
        if opts.online is not None:
            feed = online_feed(opts, device)
        else:
            feed = served_feed(opts, open_labelset(opts, client), device)
        check_eval_set(test, feed)
        torch.manual_seed(opts.seed)  # here: one seed, one student, whichever feed built
        model = build_student(
            opts.model, feed.channels, feed.num_classes, feed.output_size, opts.width
        )
        model = model.to(device)
        scored = evaluation_epochs(opts.epochs)
        evaluations: dict[int, float] = {}

        def score(epoch: int) -> None:
            if epoch in scored:
                evaluations[epoch] = evaluate(model, test.images, test.labels, feed, device)

        steps, samples, seconds = fit(model, feed, loss_fn, opts, after_epoch=score)
    top1 = evaluations[opts.epochs]
    return {
        **feed.describe,
        "model": opts.model,
        "width": opts.width,
        "loss": opts.loss,
        "optimizer": opts.optimizer,
        "seed": opts.seed,
        "epochs": opts.epochs,
        "batch_size": feed.batch_size,
        "steps": steps,
        "top1": round(top1, 4),
        # the official evaluator's number: the best of its evaluations at E/4, E/2, 3E/4, E
        "top1_best4": round(max(evaluations.values()), 4),
        "evaluations": {str(e): round(v, 4) for e, v in sorted(evaluations.items())},
        "train_seconds": round(seconds, 2),
        "samples_per_second": round(samples / seconds, 1) if seconds > 0 else None,
        "device": str(device),
    }
