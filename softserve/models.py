"""Small networks of the dataset-distillation literature, for teachers and students.

Each factory here is usable as a teacher spec, e.g. ``--teacher
softserve.models:resnet18_small``; the spec passes ``num_classes`` only, so ``convnet`` as a
spec takes its default 3×32×32 input.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvNet(nn.Module):
    """The distillation ConvNet: depth × [conv3x3, instance norm, ReLU, avg-pool 2], linear.

    Instance norm is GroupNorm with one group per channel (affine), as in DC/DM/MTT.
    """

    def __init__(
        self,
        channels: int = 3,
        num_classes: int = 10,
        image_size: int | tuple[int, int] = 32,
        width: int = 128,
        depth: int = 3,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        for i in range(depth):
            layers += [
                nn.Conv2d(channels if i == 0 else width, width, 3, padding=1),
                nn.GroupNorm(width, width, affine=True),
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
) -> ConvNet:
    """ConvNet-3 with 128 channels: the distillation literature's default student."""
    return ConvNet(channels, num_classes, image_size, width, depth)


def fashion_mnist_teacher(num_classes: int = 10) -> ConvNet:
    """The demo's teacher: a narrow ConvNet-3 for 1×28×28 inputs, fast to train on a CPU."""
    return ConvNet(channels=1, num_classes=num_classes, image_size=28, width=32, depth=3)


def resnet18_small(num_classes: int = 10, channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 for small inputs: 3×3 stem, stride 1, no max-pool (CIFAR style)."""
    import torchvision  # here, not at the top: importing it costs a second or more

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model
