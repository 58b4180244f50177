"""Cheap teachers for the benchmarks: they need labels, not quality.

Teacher specs ``bench.serve_teacher:NAME`` (``bench.harness.TEACHER`` is ``tiny_convnet``),
importable wherever ``bench`` is: from the repository root.
"""

from __future__ import annotations

from torch import nn

from softserve.models import ConvNet


def tiny_convnet(num_classes: int = 100) -> ConvNet:
    """ConvNet-3 with 8 channels for 3×32×32 inputs: relabels 3,000 views in about a second."""
    return ConvNet(channels=3, num_classes=num_classes, image_size=32, width=8, depth=3)


def patch_convnet(num_classes: int = 1000) -> nn.Module:
    """A small teacher for RGB inputs of 64 px or more on a CPU: an 8×8 patch stem (stride
    8, 32 channels), ConvNet-3's blocks of width 32 on that grid, a global average and a
    linear layer; at 224 px ~3 ms a sample on one core, about what building its view costs."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 8, stride=8), nn.ReLU(inplace=True),
        ConvNet(channels=32, image_size=8, width=32, depth=3).features,
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    )  # fmt: skip


def resnet18(num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-18 for 224 px, randomly initialised: the GPU teacher of the scale
    benchmark (the weights change nothing a benchmark measures)."""
    import torchvision  # here: importing it costs a second or more

    return torchvision.models.resnet18(weights=None, num_classes=num_classes)
