"""Fashion-MNIST composites: a real-image task with K = 100 or K = 1000 that builds offline.

Two (``pairs``, 28×56, K = 100) or three (``triplets``, 28×84, K = 1000) garments side by
side, class = the garments' classes read as a base-10 number (100·a + 10·b + c): the class
count the field's compact labels are measured at (ImageNet-1K), on real images, with no
download.

The teacher is factorized: the demo's Fashion-MNIST ConvNet scores each 28×28 tile and a
composite's logit is the sum of its tiles' logits, z[abc] = l₁[a] + l₂[b] + l₃[c], so its
softmax is the product of the tiles' softmaxes and its cross-entropy the sum of theirs.
Training it on triplets is therefore training the tile network on single garments, which
takes minutes on two cores, where a monolithic ConvNet on freshly drawn triplets reached
5.7% after a 329 s pass (issue 24's probe). Its soft labels are a real teacher's: the
product structure spreads mass over the classes that share two of three garments.

Synthetic sets are chosen as the demo chooses, by teacher confidence among random
candidates: for each class, ``ipc·candidates`` random composites of training images of its
garment classes, keeping the ``ipc`` the teacher scores highest. The test split composes
test images, balanced over the classes. Views keep the garments in place: no flip (a
flipped triplet abc shows cba) and crop ratios scaled by the composite's aspect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from softserve.format.augment import ViewPolicy
from softserve.worker import fashion_mnist

TILE = 28
#: The composites by task name: the number of garments side by side.
TASKS = {"pairs": 2, "triplets": 3}


@dataclass(frozen=True)
class GarmentTask:
    """``garments`` Fashion-MNIST images side by side, 10**garments classes."""

    name: str
    garments: int

    @classmethod
    def named(cls, name: str) -> GarmentTask:
        if name not in TASKS:
            raise ValueError(f"unknown garment task {name!r}; choose one of {', '.join(TASKS)}")
        return cls(name, TASKS[name])

    @property
    def num_classes(self) -> int:
        return 10**self.garments

    @property
    def teacher_spec(self) -> str:
        return f"softserve.models:{self.name}_teacher"

    @property
    def policy(self) -> ViewPolicy:
        """The demo's crop scales, ratios around the composite's aspect, no flip."""
        aspect = float(self.garments)
        return ViewPolicy(scale=(0.5, 1.0), ratio=(aspect * 3 / 4, aspect * 4 / 3), flip=False)

    def class_names(self) -> list[str]:
        """'t-shirt|bag|coat' for class 084: the garments' names, left to right."""
        return ["|".join(fashion_mnist.CLASS_NAMES[d] for d in self.digits(c))
                for c in range(self.num_classes)]  # fmt: skip

    def digits(self, cls: int) -> tuple[int, ...]:
        """The garment classes of composite class ``cls``, left to right."""
        return tuple(int(ch) for ch in f"{cls:0{self.garments}d}")

    def class_of(self, garment_labels: np.ndarray) -> np.ndarray:
        """Composite class of rows of garment classes (N, garments), int64 (N,)."""
        weights = 10 ** np.arange(self.garments - 1, -1, -1)
        return (np.asarray(garment_labels, np.int64) * weights).sum(axis=1)

    def compose(self, images: np.ndarray, picks: np.ndarray) -> np.ndarray:
        """Composites (N, 1, 28, 28·garments) of the images ``picks`` (N, garments) names."""
        return np.concatenate([images[picks[:, i]] for i in range(self.garments)], axis=3)

    def draw(
        self, labels: np.ndarray, per_class: int, rng: np.random.Generator
    ) -> np.ndarray:
        """Image indices (K·per_class, garments): for each class in order, ``per_class``
        composites of random images of its garment classes."""
        pools = [np.flatnonzero(labels == d) for d in range(10)]
        rows = np.empty((self.num_classes, per_class, self.garments), np.int64)
        for cls in range(self.num_classes):
            for i, d in enumerate(self.digits(cls)):
                rows[cls, :, i] = rng.choice(pools[d], size=per_class)
        return rows.reshape(-1, self.garments)


def tile_log_probs(
    predict: Callable[[np.ndarray], torch.Tensor], images: np.ndarray
) -> np.ndarray:
    """log p(class) of every single garment image under the tile network, float64 (M, 10)."""
    return np.log(np.clip(predict(images).double().numpy(), 1e-300, None))


def select(
    task: GarmentTask, log_probs: np.ndarray, labels: np.ndarray, ipc: int, candidates: int,
    seed: int,
) -> np.ndarray:  # fmt: skip
    """Image indices (K·ipc, garments) of the synthetic set: per class, the ``ipc`` most
    confident of ``ipc·candidates`` random composites. The factorized teacher's log p of a
    composite is the sum of its tiles' log p of their garment classes."""
    rng = np.random.default_rng(seed)
    drawn = task.draw(labels, ipc * candidates, rng).reshape(task.num_classes, -1, task.garments)
    chosen = []
    for cls, rows in enumerate(drawn):
        digits = task.digits(cls)
        score = sum(log_probs[rows[:, i], d] for i, d in enumerate(digits))
        chosen.append(rows[np.argsort(-score, kind="stable")[:ipc]])
    return np.concatenate(chosen)


def save_tensor_set(path: Path, images: np.ndarray, labels: np.ndarray, names: list[str]) -> None:
    """A tensor file ``{"data", "label", "class_names"}``, as relabel and --eval read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"data": torch.from_numpy(np.ascontiguousarray(images)),
               "label": torch.from_numpy(np.asarray(labels, np.int64)), "class_names": names}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def composite_state(tile_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The factorized teacher's weights from the tile network's."""
    return {f"tile.{k}": v for k, v in tile_state.items()}
