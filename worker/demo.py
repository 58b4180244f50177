"""The Fashion-MNIST demo: a real teacher, a synthetic IPC-k set, and its label set.

1. Train a small ConvNet teacher on the training split (a few minutes on two CPU cores).
2. Select k images per class by teacher confidence among random candidates: RDED's
   scoring idea (keep the candidates the teacher finds most typical of their class).
3. Write them as an ImageFolder tree plus the teacher weights, and relabel into a store.

``task="pairs"`` or ``"triplets"`` builds the K = 100 or K = 1000 composites of
:mod:`softserve.worker.garments` the same way, from the same tile teacher, with their own
test split (``DemoResult.eval_set``). ``views="dsa"`` relabels with the GIFT evaluator's DSA
views instead of crops, into a set of its own (``TASK-ipcK-dsa``) beside the crop set.

Every step is cached in the work folder, so rerunning continues where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from softserve.errors import InputError
from softserve.format.augment import VIEW_KINDS, DsaPolicy, ViewPolicy
from softserve.models import fashion_mnist_teacher
from softserve.worker import fashion_mnist, garments
from softserve.worker.relabel import RelabelOptions, relabel
from softserve.worker.runtime import resolve_device

TEACHER_SPEC = "softserve.models:fashion_mnist_teacher"
#: Views for 28-pixel images: crops below half the area lose the garment.
DEMO_POLICY = ViewPolicy(scale=(0.5, 1.0))


@dataclass
class DemoOptions:
    task: str = "fashion-mnist"
    workdir: Path = Path("demo")
    store: Path = Path("store")
    data: Path | None = None
    ipc: int = 10
    candidates: int = 10
    teacher_epochs: int = 3
    train_limit: int | None = None
    label_epochs: int = 300
    codec: str | None = None  # by class count (relabel's default_codec)
    #: "rrc": the task's crops + flip; "dsa": the GIFT evaluator's DSA views (a set of its own)
    views: str = "rrc"
    seed: int = 0
    device: str = "auto"
    batch_size: int = 128
    lr: float = 2e-3
    progress: bool = True

    @property
    def label_set_name(self) -> str:
        """TASK-ipcK, with ``-dsa`` for DSA views: both sets can share a store and teacher."""
        return f"{self.task}-ipc{self.ipc}" + ("-dsa" if self.views == "dsa" else "")

    @property
    def dsa(self) -> DsaPolicy | None:
        """What relabel takes for these views: the DSA policy, or None for crops."""
        return DsaPolicy() if self.views == "dsa" else None


#: The tasks prepare_demo builds: Fashion-MNIST itself and its composites.
TASKS = ("fashion-mnist", *garments.TASKS)


@dataclass
class DemoResult:
    label_set: Path
    images: Path
    weights: Path
    teacher_accuracy: float
    #: What ``softserve train --eval`` takes for this task's test split.
    eval_set: str = "fashion-mnist"


def _normalize(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255 - fashion_mnist.MEAN[0]) / fashion_mnist.STD[0]


@torch.inference_mode()
def predict(model: torch.nn.Module, images: np.ndarray, device: torch.device) -> torch.Tensor:
    """Class probabilities of uint8 images, in batches, on the CPU."""
    model.eval()
    out = []
    for start in range(0, len(images), 1024):
        batch = _normalize(torch.from_numpy(images[start : start + 1024]).to(device))
        out.append(F.softmax(model(batch).float(), dim=1).cpu())
    return torch.cat(out)


def accuracy(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, device) -> float:
    """Top-1 accuracy of ``model`` on uint8 images."""
    preds = predict(model, images, device).argmax(1).numpy()
    return float((preds == labels).mean())


def train_teacher(
    train: tuple[np.ndarray, np.ndarray], opts: DemoOptions, device: torch.device
) -> torch.nn.Module:
    """Adam with a one-cycle schedule; enough for ~90% test accuracy in three epochs."""
    torch.manual_seed(opts.seed)
    images, labels = train
    model = fashion_mnist_teacher().to(device)
    steps_per_epoch = -(-len(images) // opts.batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=opts.lr, total_steps=opts.teacher_epochs * steps_per_epoch
    )
    x_all = torch.from_numpy(images)
    y_all = torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(opts.seed)
    bar = tqdm(
        total=opts.teacher_epochs * len(images), unit="img", unit_scale=True,
        desc="train teacher", disable=not opts.progress, dynamic_ncols=True,
    )  # fmt: skip
    model.train()
    for _ in range(opts.teacher_epochs):
        for idx in torch.randperm(len(images), generator=generator).split(opts.batch_size):
            x = _normalize(x_all[idx].to(device))
            loss = F.cross_entropy(model(x), y_all[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(len(idx))
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model.eval()


def select_by_confidence(
    probs: torch.Tensor, labels: np.ndarray, ipc: int, candidates: int, seed: int
) -> np.ndarray:
    """Indices of ``ipc`` images per class: the most confident of ``ipc·candidates`` random ones."""
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in range(probs.shape[1]):
        pool = np.flatnonzero(labels == cls)
        picks = rng.choice(pool, size=min(len(pool), ipc * candidates), replace=False)
        score = probs[picks, cls].numpy()
        chosen.append(picks[np.argsort(-score, kind="stable")[:ipc]])
    return np.concatenate(chosen)


def class_folder(label: int, names: list[str]) -> str:
    """Folder name of a class: its index first, so sorted folders keep the dataset's order."""
    return f"{label:02d}-{names[label]}"


def write_image_folder(
    root: Path, images: np.ndarray, labels: np.ndarray, names: list[str]
) -> None:
    """Write uint8 (N, 1, H, W) images as ROOT/NN-CLASS/NNNNN.png."""
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / class_folder(int(label), names)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0]).save(folder / f"{index:05d}.png")


def _teacher(
    opts: DemoOptions, data_dir: Path, device: torch.device, log: Callable[[str], None]
) -> tuple[torch.nn.Module, float]:
    """The cached teacher when its settings match, else a newly trained one."""
    weights = opts.workdir / "teacher.pt"
    record = opts.workdir / "teacher.json"
    settings = {
        k: v for k, v in asdict(opts).items()
        if k in ("teacher_epochs", "train_limit", "seed", "batch_size", "lr")
    }  # fmt: skip
    model = fashion_mnist_teacher()
    if weights.exists() and record.exists():
        saved = json.loads(record.read_text())
        if saved.get("settings") == settings:
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            log(f"reusing teacher {weights} (test accuracy {saved['test_accuracy']:.4f})")
            return model.to(device).eval(), float(saved["test_accuracy"])
    train_images, train_labels = fashion_mnist.load_split(data_dir, "train")
    if opts.train_limit is not None:
        keep = np.random.default_rng(opts.seed).permutation(len(train_images))[: opts.train_limit]
        train_images, train_labels = train_images[keep], train_labels[keep]
    model = train_teacher((train_images, train_labels), opts, device)
    test_images, test_labels = fashion_mnist.load_split(data_dir, "test")
    acc = accuracy(model, test_images, test_labels, device)
    opts.workdir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights)
    record.write_text(json.dumps({"settings": settings, "test_accuracy": acc}, indent=2) + "\n")
    log(f"teacher test accuracy {acc:.4f} ({len(train_images)} training images)")
    return model, acc


def prepare_demo(opts: DemoOptions, log: Callable[[str], None] = print) -> DemoResult:
    """Run the whole demo preparation; see the module docstring."""
    if opts.task not in TASKS:
        raise InputError(f"unknown demo task {opts.task!r}; choose one of {', '.join(TASKS)}")
    if opts.views not in VIEW_KINDS:
        raise InputError(f"unknown views {opts.views!r}; choose one of {', '.join(VIEW_KINDS)}")
    data_dir = fashion_mnist.find_data(opts.data)
    device = resolve_device(opts.device)
    model, acc = _teacher(opts, data_dir, device, log)
    if opts.task != "fashion-mnist":
        return _prepare_garments(opts, garments.GarmentTask.named(opts.task), model, data_dir,
                                 device, log)  # fmt: skip

    train_images, train_labels = fashion_mnist.load_split(data_dir, "train")
    probs = predict(model, train_images, device)
    picks = select_by_confidence(probs, train_labels, opts.ipc, opts.candidates, opts.seed)
    images_dir = opts.workdir / f"ipc{opts.ipc}"
    write_image_folder(
        images_dir, train_images[picks], train_labels[picks], fashion_mnist.CLASS_NAMES
    )
    log(f"synthetic set: {len(picks)} images in {images_dir}")

    label_set = opts.store / opts.label_set_name
    relabel(
        RelabelOptions(
            images=images_dir,
            teacher=TEACHER_SPEC,
            weights=opts.workdir / "teacher.pt",
            out=label_set,
            mean=fashion_mnist.MEAN,
            std=fashion_mnist.STD,
            policy=DEMO_POLICY,
            dsa=opts.dsa,
            epochs=opts.label_epochs,
            seed=opts.seed,
            codec=opts.codec,
            device=opts.device,
            progress=opts.progress,
        )
    )
    return DemoResult(label_set, images_dir, opts.workdir / "teacher.pt", acc)


def _prepare_garments(
    opts: DemoOptions, task: garments.GarmentTask, tile: torch.nn.Module, data_dir: Path,
    device: torch.device, log: Callable[[str], None],
) -> DemoResult:  # fmt: skip
    """The composite task's teacher weights, synthetic set, test split and label set."""
    folder = opts.workdir / task.name
    weights = folder / "teacher.pt"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(garments.composite_state({k: v.cpu() for k, v in tile.state_dict().items()}),
               weights)  # fmt: skip
    names = task.class_names()

    def log_probs(images: np.ndarray) -> np.ndarray:
        return garments.tile_log_probs(lambda x: predict(tile, x, device), images)

    test_images, test_labels = fashion_mnist.load_split(data_dir, "test")
    per_class = max(1, 10_000 // task.num_classes)
    test_picks = task.draw(test_labels, per_class, np.random.default_rng(opts.seed + 1))
    test_classes = task.class_of(test_labels[test_picks])
    test_scores = log_probs(test_images)
    predicted = task.class_of(test_scores.argmax(1)[test_picks])  # argmax of a product
    acc = float((predicted == test_classes).mean())
    test_set = folder / "test.pt"
    garments.save_tensor_set(test_set, task.compose(test_images, test_picks), test_classes, names)
    log(f"{task.name}: {task.num_classes} classes, teacher test accuracy {acc:.4f} "
        f"on {len(test_classes)} test composites ({test_set})")  # fmt: skip

    train_images, train_labels = fashion_mnist.load_split(data_dir, "train")
    picks = garments.select(
        task, log_probs(train_images), train_labels, opts.ipc, opts.candidates, opts.seed
    )
    images = folder / f"ipc{opts.ipc}.pt"
    garments.save_tensor_set(
        images, task.compose(train_images, picks), task.class_of(train_labels[picks]), names
    )
    log(f"synthetic set: {len(picks)} composites in {images}")
    label_set = opts.store / opts.label_set_name
    relabel(
        RelabelOptions(
            images=images, teacher=task.teacher_spec, weights=weights, out=label_set,
            mean=fashion_mnist.MEAN, std=fashion_mnist.STD, policy=task.policy, dsa=opts.dsa,
            epochs=opts.label_epochs, seed=opts.seed, codec=opts.codec, device=opts.device,
            progress=opts.progress,
        )  # fmt: skip
    )
    return DemoResult(label_set, images, weights, acc, eval_set=str(test_set))
