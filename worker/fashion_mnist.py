"""Fashion-MNIST from its IDX files: Debian's ``dataset-fashion-mnist`` or any folder."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from softserve.errors import InputError, brief

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = [
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle-boot",
]  # fmt: skip
MEAN = (0.2860,)
STD = (0.3530,)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_HOW_TO_GET = (
    "install Debian's package (apt-get install dataset-fashion-mnist), or pass --data DIR "
    "holding train-images-idx3-ubyte.gz and the other three IDX files "
    "(torchvision.datasets.FashionMNIST downloads them into DIR/FashionMNIST/raw)"
)


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder, folder / "FashionMNIST" / "raw"):
        for name in (stem + ".gz", stem):
            if (candidate / name).is_file():
                return candidate / name
    return None


def find_data(folder: Path | None = None) -> Path:
    """The folder holding the IDX files: ``folder`` if given, else Debian's location."""
    folder = folder or DEBIAN_DIR
    if _find(folder, _FILES["train"][0]) is None:
        raise InputError(f"Fashion-MNIST not found in {folder}; {_HOW_TO_GET}")
    return folder


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise InputError(f"cannot read {path} ({brief(exc)}); {_HOW_TO_GET}") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise InputError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise InputError(f"{path} is truncated: {data.size} bytes for shape {dims}")
    return data.reshape(dims).copy()


def load_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 (N, 1, 28, 28) and labels int64 (N,) of ``train`` or ``test``."""
    image_stem, label_stem = _FILES[split]
    paths = [_find(folder, image_stem), _find(folder, label_stem)]
    if None in paths:
        raise InputError(f"Fashion-MNIST {split} split incomplete in {folder}; {_HOW_TO_GET}")
    images = _read_idx(paths[0])[:, None]  # type: ignore[arg-type]
    labels = _read_idx(paths[1]).astype(np.int64)  # type: ignore[arg-type]
    if len(images) != len(labels):
        raise InputError(f"{folder}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels
