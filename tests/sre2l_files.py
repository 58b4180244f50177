"""Relabel files in SRe2L's layout, made here on the CPU for the import tests.

Our own re-creation of the data path of SRe2L's relabel (and LPLD's and LPQLD's variants
of its files), written from their layout: a torchvision ImageFolder over the images, each
row cropped by RandomResizedCrop and resized by PIL (bilinear), flipped, turned into a
tensor and normalized; a DataLoader whose RandomSampler draws from a generator seeded 42;
CutMix or Mixup within each batch (one permutation, λ ~ Beta and one box a batch, from
NumPy's legacy RNG); a tiny teacher on the mixed batch; one ``torch.save`` per batch. It
records, per (epoch, sample), the teacher's input and logits and the view and mix, so the
tests can compare what the import serves with what the teacher saw.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader, RandomSampler
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as tf

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class _CropFolder(torchvision.datasets.ImageFolder):
    """An ImageFolder whose items are (view, class, flip, coords, index), as SRe2L's
    relabel dataset returns them (coords: the crop as fractions of the image's sides)."""

    def __init__(self, root: Path, size: int) -> None:
        super().__init__(str(root))
        self.size = size
        self.crop = RandomResizedCrop(size, interpolation=InterpolationMode.BILINEAR)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        image = self.loader(path)
        top, left, h, w = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        width, height = image.size
        coords = torch.tensor([top / height, left / width, h / height, w / width])
        view = tf.resized_crop(
            image, top, left, h, w, [self.size, self.size], InterpolationMode.BILINEAR
        )
        flip = bool(torch.rand(1) < 0.5)
        if flip:
            view = tf.hflip(view)
        x = tf.normalize(tf.to_tensor(view), *IMAGENET)
        return x, target, flip, coords, index


def _cut_box(rng: np.random.RandomState, rows: int, cols: int, lam: float) -> list[np.int64]:
    """CutMix's box (r0, c0, r1, c1) of side √(1-λ) around a uniform centre, clipped, as
    NumPy ints (SRe2L's rand_bbox; its bbx is the row axis)."""
    side = np.sqrt(1.0 - lam)
    half_r, half_c = int(rows * side) // 2, int(cols * side) // 2
    r, c = rng.randint(rows), rng.randint(cols)
    return [
        np.clip(r - half_r, 0, rows),
        np.clip(c - half_c, 0, cols),
        np.clip(r + half_r, 0, rows),
        np.clip(c + half_c, 0, cols),
    ]


@dataclass
class Relabelled:
    """What the relabel wrote and saw, per (epoch, sample id)."""

    root: Path
    batch_size: int
    #: each epoch's sample ids in the order the sampler drew them
    orders: dict[int, list[int]] = field(default_factory=dict)
    inputs: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    logits: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    #: (top, left, height, width, flip) in base-image pixels
    views: dict[tuple[int, int], tuple[int, ...]] = field(default_factory=dict)
    #: (partner id, box (r0, c0, r1, c1) or None, λ as drawn)
    mixes: dict[tuple[int, int], tuple[int, tuple[int, ...] | None, float]] = field(
        default_factory=dict
    )


def write_relabel(
    images: Path,
    out: Path,
    teacher: torch.nn.Module,
    *,
    epochs: int = 2,
    batch_size: int = 8,
    size: int = 16,
    mix: str | None = "cutmix",
    flat: bool = False,
    record: bool = False,
    drop_last: bool = False,
    seed: int = 42,
) -> Relabelled:
    """Relabel ``images`` into ``out`` as SRe2L does (``flat``: as LPQLD does, with its
    float16 coords, uint8 permutations and boxes and its per-batch record; ``record``
    without ``flat``: with LPLD's per-epoch record of the sampler; ``drop_last``: each
    epoch's last partial batch dropped, as LPLD and LPQLD do with --prune_ratio > 0)."""
    dataset = _CropFolder(images, size)
    generator = torch.Generator()
    generator.manual_seed(seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=RandomSampler(dataset, generator=generator),
        drop_last=drop_last,
    )
    rng = np.random.RandomState(0)
    result = Relabelled(out, batch_size)
    indices: dict[str, list[int]] = {}
    counter = 0
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        for epoch in range(epochs):
            for b, (x, _, flip, coords, index) in enumerate(loader):
                perm = lam = box = None
                mixed = x.clone()
                if mix == "cutmix":
                    perm, lam = torch.randperm(len(x)), rng.beta(1.0, 1.0)
                    box = _cut_box(rng, size, size, lam)
                    r0, c0, r1, c1 = (int(v) for v in box)
                    mixed[:, :, r0:r1, c0:c1] = x[perm, :, r0:r1, c0:c1]
                elif mix == "mixup":
                    perm, lam = torch.randperm(len(x)), rng.beta(0.8, 0.8)
                    mixed = lam * x + (1 - lam) * x[perm]
                logits = teacher(mixed).half()
                result.orders.setdefault(epoch, []).extend(index.tolist())
                _record(
                    result, epoch, x, mixed, flip, coords, index, perm, lam, box, logits, dataset
                )
                if flat:
                    coords = coords.half()
                    perm = None if perm is None else perm.to(torch.uint8)
                    box = (
                        None
                        if box is None
                        else [torch.tensor(int(v), dtype=torch.uint8) for v in box]
                    )
                    path = out / f"batch_{counter}.tar"
                    indices[str(counter)] = index.tolist()
                else:
                    path = out / f"epoch_{epoch}" / f"batch_{b}.tar"
                    indices.setdefault(str(epoch), []).extend(index.tolist())
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save([coords, flip, perm, lam, box, logits], path)
                counter += 1
    if record or flat:
        name = "sampler_indices_batch.json" if flat else "sampler_indices_epoch.json"
        (out / name).write_text(json.dumps(indices))
    return result


def _record(
    result: Relabelled,
    epoch: int,
    x,
    mixed,
    flip,
    coords,
    index,
    perm,
    lam,
    box,
    logits,
    dataset: _CropFolder,
) -> None:
    """Keep what the teacher saw of each row, by (epoch, sample id)."""
    for row, sample in enumerate(index.tolist()):
        key = (epoch, sample)
        width, height = dataset.loader(dataset.samples[sample][0]).size
        top, left, h, w = (
            round(float(v) * s)
            for v, s in zip(coords[row], (height, width, height, width), strict=True)
        )
        result.views[key] = (top, left, h, w, int(flip[row]))
        result.inputs[key] = mixed[row]
        result.logits[key] = logits[row].float()
        if perm is not None:
            corners = None if box is None else tuple(int(v) for v in box)
            result.mixes[key] = (int(index[perm[row]]), corners, float(lam))
