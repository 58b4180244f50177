"""A relabel's memory: one copy of the base images, whatever the input format; an ImageFolder
tree decoded in parallel exactly as a sequential decode; dataset.h5 written to disk, not
assembled in memory, with the same bytes and the same full-disk behaviour."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import cli_env
from PIL import Image

from bench.harness import peak_rss
from softserve.errors import InputError
from softserve.storage.manifest import FORMAT_VERSION
from softserve.storage.writer import LIBVER, chunk_rows_for, write_dataset
from softserve.worker import sources
from softserve.worker.sources import ImageSet, load_image_set

CLASSES = 4
#: Sizes of the memory test: enough image bytes (301 MB at ImageNet's 224 px) that the peak
#: RSS noise of a torch process (up to 40 MB: at 128 px it read as 1.53x) stays near 0.1x,
#: and a small run with batches as large as the large one's.
SMALL, LARGE, PIXELS, BATCH = 40, 2000, 224, 32
#: Peak RSS growth allowed, as a multiple of the base images' bytes. Measured: 1.06 to 1.17;
#: before one copy was held, 2.0 to 2.3 (tensor file) and 2.3 to 3.3 (JPEG tree); a second
#: copy held reads 2.06, while one made and dropped as the file loads peaks under the
#: relabel's own batches (1.24), so this bounds the copies a relabel holds.
GROWTH_BOUND = 1.5


def _images(n: int, size: int = PIXELS, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def _jpeg_tree(root: Path, images: Iterable[np.ndarray]) -> Path:
    """Images as ROOT/cK/NNNN.jpg, class i % CLASSES; a 1×H×W image is saved gray."""
    for i, image in enumerate(images):
        folder = root / f"c{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=95)
    return root


def _tensor_file(path: Path, images: np.ndarray) -> Path:
    labels = torch.arange(len(images)) % CLASSES
    torch.save({"data": torch.from_numpy(images), "label": labels}, path)
    return path


def _one_thread() -> dict[str, str]:
    """The CLI's environment on one thread: fewer threads, fewer per-thread buffers."""
    return {**cli_env(), "OMP_NUM_THREADS": "1"}


def _growth(tmp_path: Path, kind: str, peak: Callable[[Path, int], int]) -> float:
    """How much ``peak(source, n)`` grows from SMALL to LARGE images of ``kind`` (a tensor
    file or a JPEG tree), as a multiple of the images' bytes."""
    peaks = {}
    for n in (SMALL, LARGE):
        images = _images(n, seed=n)
        if kind == "tensor file":
            source = _tensor_file(tmp_path / f"set-{n}.pt", images)
        else:
            source = _jpeg_tree(tmp_path / f"tree-{n}", images)
        peaks[n] = peak(source, n)
    return (peaks[LARGE] - peaks[SMALL]) / ((LARGE - SMALL) * 3 * PIXELS**2)


def _peak_rss(images: Path, out: Path) -> int:
    """Peak RSS in bytes of ``softserve relabel`` of ``images`` in a process of its own."""
    args = [
        "relabel", "--images", images, "--teacher", "teachers:tiny_rgb",
        "--num-classes", CLASSES, "--out", out, "--epochs", 1, "--batch-size", BATCH,
        "--codec", "fp16", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    return peak_rss(args, env=_one_thread(), timeout=300)


@pytest.mark.parametrize("kind", ["tensor file", "JPEG tree"])
def test_relabel_holds_one_copy_of_the_images(tmp_path: Path, kind: str) -> None:
    """2,000 images of 224 px grow the peak RSS by about their bytes over 40 images (the
    same batches, so the fixed cost cancels): no list of arrays stacked, no copy to hash,
    no dataset file built in memory."""
    grown = _growth(tmp_path, kind, lambda src, n: _peak_rss(src, tmp_path / "store" / f"set-{n}"))
    assert grown <= GROWTH_BOUND, f"peak RSS grew by {grown:.2f}x the image bytes"


_LOAD_AND_HASH = """
import sys
from pathlib import Path
from softserve.worker.sources import load_image_set
load_image_set(Path(sys.argv[1])).sha256()
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
print(int(status["VmHWM"].split()[0]) << 10)
"""
#: Peak RSS growth allowed while an image set loads and hashes. Measured: 1.00 for both
#: kinds (a copy made and dropped as a tensor file loads: 2.00).
LOAD_BOUND = 1.25


@pytest.mark.parametrize("kind", ["tensor file", "JPEG tree"])
def test_loading_and_hashing_make_no_copy_of_the_images(tmp_path: Path, kind: str) -> None:
    """Loading an image set and hashing it peak at one copy of its pixels, none made and
    dropped on the way: what the relabel's own peak would hide."""

    def load_and_hash(source: Path, n: int) -> int:
        done = subprocess.run([sys.executable, "-c", _LOAD_AND_HASH, source], capture_output=True,
                              text=True, env=_one_thread(), timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1])

    grown = _growth(tmp_path, kind, load_and_hash)
    assert grown <= LOAD_BOUND, f"peak RSS grew by {grown:.2f}x the image bytes"


def test_parallel_decode_equals_a_sequential_one(tmp_path: Path, monkeypatch) -> None:
    """Decoded by 4 threads, a tree of JPEGs (gray first, then RGB: the array is widened
    part way) is the sequential decode: same order, same pixels, same digest."""
    monkeypatch.setattr(sources, "_decoders", lambda: 4)
    monkeypatch.setattr(sources, "SLAB_BYTES", 10_000)  # the digest over many slabs
    images = _images(60, size=20)
    gray = [np.ascontiguousarray(image[:1]) for image in images[:8]]  # 2 a class, first
    root = _jpeg_tree(tmp_path / "tree", [*gray, *images[8:]])
    loaded = load_image_set(root)

    files = sorted(root.glob("*/*.jpg"))
    decoded = []
    for file in files:
        with Image.open(file) as img:
            decoded.append(np.asarray(img.convert("RGB")).transpose(2, 0, 1))
    expected = np.stack(decoded)
    np.testing.assert_array_equal(loaded.images, expected)
    assert loaded.labels.tolist() == [int(f.parent.name[1:]) for f in files]

    digest = hashlib.sha256()  # the digest as a whole-array hash computes it
    digest.update(json.dumps([list(expected.shape), loaded.class_names]).encode())
    digest.update(expected.tobytes())
    digest.update(loaded.labels.astype("<i8").tobytes())
    assert loaded.sha256() == digest.hexdigest()
    assert ImageSet(expected, loaded.labels, loaded.class_names).sha256() == loaded.sha256()


def test_a_corrupt_jpeg_is_one_line_naming_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sources, "_decoders", lambda: 4)
    root = _jpeg_tree(tmp_path / "tree", _images(40, size=16))
    broken = root / "c1" / "0013.jpg"
    broken.write_bytes(broken.read_bytes()[:120])  # a truncated JPEG
    with pytest.raises(InputError) as info:
        load_image_set(root)
    message = str(info.value)
    assert "\n" not in message and "cannot read image" in message and str(broken) in message


def test_float_tensors_convert_slab_by_slab_as_a_whole(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sources, "SLAB_BYTES", 5_000)
    data = torch.rand(30, 3, 9, 7, dtype=torch.float64)
    data[0, 0, 0, :2] = torch.tensor([0.0, 1.0])
    path = tmp_path / "set.pt"
    torch.save({"data": data, "label": torch.arange(30) % CLASSES}, path)
    expected = (data.float() * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(load_image_set(path).images, expected)


def _in_memory_build(images: np.ndarray, labels: np.ndarray, names: list[str]) -> bytes:
    """dataset.h5 as it was assembled before, in memory with HDF5's core driver."""
    rows = chunk_rows_for(images.shape[0], int(np.prod(images.shape[1:])))
    with h5py.File("image.h5", "w", driver="core", backing_store=False, track_order=True,
                   libver=LIBVER) as f:  # fmt: skip
        f.create_dataset("images", data=images, chunks=(rows, *images.shape[1:]),
                         fletcher32=True, track_times=False)  # fmt: skip
        f.create_dataset("labels", data=labels, chunks=labels.shape, fletcher32=True,
                         track_times=False)  # fmt: skip
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["class_names"] = json.dumps(names)
        f.attrs["mean"] = np.asarray((0.5,) * images.shape[1], dtype=np.float64)
        f.attrs["std"] = np.asarray((0.25,) * images.shape[1], dtype=np.float64)
        f.flush()
        return f.id.get_file_image()


@pytest.mark.parametrize(("n", "channels", "size", "classes"),
                         [(1, 1, 2, 2), (37, 3, 12, 3), (300, 3, 40, 1000)])  # fmt: skip
def test_dataset_file_has_the_bytes_of_an_in_memory_build(
    tmp_path: Path, n: int, channels: int, size: int, classes: int
) -> None:
    images = np.random.default_rng(n).integers(0, 256, (n, channels, size, size), np.uint8)
    labels = np.arange(n, dtype=np.int64) % classes
    names = [f"class {i}" for i in range(classes)]
    path = tmp_path / "dataset.h5"
    info = write_dataset(path, images, labels, names, (0.5,) * channels, (0.25,) * channels)
    assert path.read_bytes() == _in_memory_build(images, labels, names)
    assert info.size == path.stat().st_size
    assert not list(tmp_path.glob("*.tmp"))


_WRITE_ON_SMALL_DISK = """
import sys
from pathlib import Path
import numpy as np
from softserve.storage.writer import write_dataset
images = np.zeros((400, 3, 16, 16), np.uint8)  # 300 KB for a 100 KiB disk
try:
    write_dataset(Path(sys.argv[1]), images, np.arange(400) % 2, ["a", "b"], (0.5,) * 3, (0.2,) * 3)
except OSError as exc:
    print(exc.errno)
"""


def test_a_full_disk_is_a_plain_error_before_hdf5_writes(small_disk: Path) -> None:
    """The dataset that does not fit fails as one OSError (ENOSPC), leaves no file, and the
    process exits normally (an HDF5 write failing in place can crash it at exit)."""
    done = subprocess.run([sys.executable, "-c", _WRITE_ON_SMALL_DISK, small_disk / "dataset.h5"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "28" and done.stderr == ""
    assert list(small_disk.iterdir()) == []
