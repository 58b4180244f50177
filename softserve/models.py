"""Small networks of the dataset-distillation literature, for teachers and students.

Each factory here is usable as a teacher spec, e.g. ``--teacher
softserve.models:resnet18_small``; the spec passes ``num_classes`` only, so ``convnet`` as a
spec takes its default 3×32×32 input.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: ConvNet's norm layers by name, for ``width`` channels. Instance norm is GroupNorm with one
#: group per channel (affine), as in DC/DM/MTT; the GIFT evaluator's ConvNet uses batch norm.
NORMS: dict[str, Callable[[int], nn.Module]] = {
    "instance": lambda width: nn.GroupNorm(width, width, affine=True),
    "batch": lambda width: nn.BatchNorm2d(width),
}


class ConvNet(nn.Module):
    """The distillation ConvNet: depth × [conv3x3, norm, ReLU, avg-pool 2], linear."""

    def __init__(
        self,
        channels: int = 3,
        num_classes: int = 10,
        image_size: int | tuple[int, int] = 32,
        width: int = 128,
        depth: int = 3,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
        layers: list[nn.Module] = []
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        for i in range(depth):
            layers += [
                nn.Conv2d(channels if i == 0 else width, width, 3, padding=1),
                NORMS[norm](width),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(2),
            ]
            h, w = h // 2, w // 2
        if min(h, w) < 1:
            raise ValueError(f"depth {depth} pools a {image_size} image away; use a smaller depth")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def convnet(
    num_classes: int = 10,
    channels: int = 3,
    image_size: int | tuple[int, int] = 32,
    width: int = 128,
    depth: int = 3,
    norm: str = "instance",
) -> ConvNet:
    """ConvNet-3 with 128 channels: the distillation literature's default student, with
    instance norm (DC, DM, MTT; GIFT's evaluator for DATM's sets) or ``norm="batch"`` (the
    GIFT evaluator's default: ``net_norm="batch"`` in LINs-lab/GIFT's ``utils/load_model.py``)."""
    return ConvNet(channels, num_classes, image_size, width, depth, norm)


def fashion_mnist_teacher(num_classes: int = 10) -> ConvNet:
    """The demo's teacher: a narrow ConvNet-3 for 1×28×28 inputs, fast to train on a CPU."""
    return ConvNet(channels=1, num_classes=num_classes, image_size=28, width=32, depth=3)


class GarmentTeacher(nn.Module):
    """A factorized teacher of ``garments`` 28×28 tiles side by side: the tile network's
    logits summed over the tiles, z[abc] = l₁[a] + l₂[b] + l₃[c] (softmax: their product)."""

    def __init__(self, garments: int) -> None:
        super().__init__()
        self.garments = garments
        self.tile = fashion_mnist_teacher()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if w != self.garments * h:
            raise ValueError(f"expected {self.garments} square tiles side by side, got {h}×{w}")
        tiles = x.reshape(b, c, h, self.garments, h).permute(0, 3, 1, 2, 4)
        logits = self.tile(tiles.reshape(b * self.garments, c, h, h)).view(b, self.garments, -1)
        total = logits[:, 0]
        for i in range(1, self.garments):
            total = (total[:, :, None] + logits[:, i, None, :]).flatten(1)
        return total


def pairs_teacher() -> GarmentTeacher:
    """The teacher of Fashion-MNIST pairs (28×56, K = 100); see softserve.worker.garments."""
    return GarmentTeacher(2)


def triplets_teacher() -> GarmentTeacher:
    """The teacher of Fashion-MNIST triplets (28×84, K = 1000)."""
    return GarmentTeacher(3)


def resnet18_small(num_classes: int = 10, channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 for small inputs: 3×3 stem, stride 1, no max-pool (CIFAR style)."""
    import torchvision  # here, not at the top: importing it costs a second or more

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model
