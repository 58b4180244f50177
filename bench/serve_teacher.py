"""A cheap teacher for the serving benchmarks: they need labels, not quality.

The teacher spec ``bench.serve_teacher:tiny_convnet`` (``bench.harness.TEACHER``), importable
wherever ``bench`` is: from the repository root.
"""

from __future__ import annotations

from softserve.models import ConvNet


def tiny_convnet(num_classes: int = 100) -> ConvNet:
    """ConvNet-3 with 8 channels for 3×32×32 inputs: relabels 3,000 views in about a second."""
    return ConvNet(channels=3, num_classes=num_classes, image_size=32, width=8, depth=3)
