"""Shared fixtures: tiny synthetic image sets, a CLI runner, and relabel helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from softserve.storage.layout import sha256_file
from softserve.worker.relabel import RelabelOptions

TESTS_DIR = Path(__file__).parent
CLASSES = ["ant", "bee", "cat"]


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write uint8 (N, C, H, W) images as an ImageFolder tree of PNGs."""
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        Image.fromarray(array).save(folder / f"{i:03d}.png")
    return root


def random_set(n: int = 12, channels: int = 3, h: int = 12, w: int = 10, seed: int = 0):
    """Random uint8 images with labels cycling through the three classes."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, channels, h, w), dtype=np.uint8)
    labels = np.arange(n) % len(CLASSES)
    return images, labels


@pytest.fixture
def rgb_folder(tmp_path: Path) -> Path:
    """12 RGB 12×10 images in three class folders."""
    return write_folder(tmp_path / "rgb", *random_set())


@pytest.fixture
def gray_folder(tmp_path: Path) -> Path:
    """12 grayscale 12×10 images in three class folders."""
    return write_folder(tmp_path / "gray", *random_set(channels=1))


@pytest.fixture
def make_options(rgb_folder: Path, tmp_path: Path) -> Callable[..., RelabelOptions]:
    """RelabelOptions for the tiny RGB set and teacher, with overrides."""

    def make(**overrides: object) -> RelabelOptions:
        base = RelabelOptions(
            images=rgb_folder,
            teacher="teachers:tiny_rgb",
            out=tmp_path / "store" / "set",
            epochs=6,
            shard_epochs=2,
            batch_size=8,
            device="cpu",
            codec="fp32",
            progress=False,
        )
        return replace(base, **overrides)

    return make


def shard_digests(root: Path) -> dict[str, str]:
    """sha256 of every label shard of a label set, by file name."""
    return {p.name: sha256_file(p) for p in sorted(root.glob("labels-*.h5"))}


def cli_env() -> dict[str, str]:
    """Environment for CLI subprocesses: the test teachers importable, no colour codes."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "200"
    return env


def softserve_cmd(*args: object) -> list[str]:
    return [sys.executable, "-m", "softserve", *map(str, args)]


def run_cli(*args: object, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``softserve ARGS`` in a subprocess and capture its output."""
    return subprocess.run(
        softserve_cmd(*args), env=cli_env(), capture_output=True, text=True, timeout=timeout
    )


def relabel_args(opts: RelabelOptions) -> list[str]:
    """The ``softserve relabel`` arguments equivalent to the fixture's options."""
    args = [
        "relabel", "--images", opts.images, "--teacher", opts.teacher, "--out", opts.out,
        "--epochs", opts.epochs, "--shard-epochs", opts.shard_epochs,
        "--batch-size", opts.batch_size, "--device", opts.device, "--codec", opts.codec,
        "--seed", opts.seed, "--no-progress",
    ]  # fmt: skip
    if opts.weights is not None:
        args += ["--weights", opts.weights]
    return [str(a) for a in args]


@pytest.fixture(autouse=True)
def _quiet_threads() -> None:
    """Keep torch to the machine's two cores, as CI has."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))
