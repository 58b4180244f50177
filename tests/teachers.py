"""Tiny deterministic teachers for tests, importable as ``teachers:NAME`` teacher specs."""

from __future__ import annotations

import time

import torch
from torch import nn


class TinyNet(nn.Module):
    """conv3x3 -> ReLU -> global average pool -> linear; any input size."""

    def __init__(self, channels: int, num_classes: int, delay: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.head = nn.Linear(8, num_classes)
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _seeded(channels: int, num_classes: int, delay: float = 0.0) -> TinyNet:
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return TinyNet(channels, num_classes, delay)


def tiny_rgb(num_classes: int = 3) -> TinyNet:
    return _seeded(3, num_classes)


def tiny_gray(num_classes: int = 3) -> TinyNet:
    return _seeded(1, num_classes)


def unseeded_rgb(num_classes: int = 3) -> TinyNet:
    """tiny_rgb's shape, its weights drawn from the global RNG as most factories draw them."""
    return TinyNet(3, num_classes)


def four_classes() -> TinyNet:
    """A teacher with a fixed class count, for the class-mismatch error."""
    return _seeded(3, 4)


def slow_rgb(num_classes: int = 3) -> TinyNet:
    """tiny_rgb that takes 0.3 s per batch, so a run can be killed part way."""
    return _seeded(3, num_classes, delay=0.3)


RECORDED: list[torch.Tensor] = []


class Recorder(TinyNet):
    """tiny_rgb that keeps every input batch it sees in RECORDED."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        RECORDED.append(x.detach().clone())
        return super().forward(x)


def _as_tiny_rgb(cls: type[TinyNet], num_classes: int) -> TinyNet:
    """A TinyNet subclass with tiny_rgb's weights."""
    model = cls(3, num_classes)
    model.load_state_dict(tiny_rgb(num_classes).state_dict())
    return model


def recorder(num_classes: int = 3) -> TinyNet:
    return _as_tiny_rgb(Recorder, num_classes)


class Overflowing(TinyNet):
    """tiny_rgb whose logits overflow to inf on the last input of every batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        out[-1, 0] = float("inf")
        return out


def overflowing(num_classes: int = 3) -> TinyNet:
    return _as_tiny_rgb(Overflowing, num_classes)


class BatchMean(TinyNet):
    """tiny_rgb averaged over the batch: one row of logits for the whole batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).mean(0, keepdim=True)


def batch_mean(num_classes: int = 3) -> TinyNet:
    return _as_tiny_rgb(BatchMean, num_classes)


def not_a_module() -> str:
    return "teacher"


def broken() -> TinyNet:
    """A factory that fails, as one with a bad path or missing file would."""
    raise RuntimeError("no weights here")
