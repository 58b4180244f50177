"""Synthetic image sets as the worker accepts them (an ImageFolder tree or a tensor file),
and the teacher inputs that a relabel and an online-teacher training run share."""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from softserve.errors import InputError, brief
from softserve.format.augment import DsaPolicy, ViewPolicy
from softserve.format.refinement import DEFAULT_ALPHA, DEFAULT_BETA


@dataclass(kw_only=True)
class TeacherInputs:
    """A teacher, the images it labels, the views it sees them through, and GIFT's
    refinement: what ``softserve relabel`` and ``softserve train --teacher`` both take."""

    images: Path
    teacher: str
    weights: Path | None = None
    num_classes: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    size: tuple[int, int] | None = None
    policy: ViewPolicy = field(default_factory=ViewPolicy)
    #: DSA views (``--views dsa``) instead of the crops of ``policy``; None: crops
    dsa: DsaPolicy | None = None
    alpha: float = DEFAULT_ALPHA
    beta: float = DEFAULT_BETA
    allow_pickle: bool = False
    random_teacher: bool = False

    @property
    def views(self) -> ViewPolicy | DsaPolicy:
        """The policy the teacher's views are drawn by."""
        return self.policy if self.dsa is None else self.dsa


def check_teacher_inputs(inputs: TeacherInputs) -> None:
    """Refuse a view size or GIFT weights that cannot work, before images or teacher load."""
    if inputs.size is not None and min(inputs.size) <= 0:
        raise InputError(f"--size must be positive, got {inputs.size}")
    if inputs.alpha < 0 or inputs.beta < 0:
        raise InputError("--alpha and --beta must be non-negative")


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_GRAY_MODES = {"1", "L"}
#: Gray modes of more than 8 bits a pixel: PIL's convert("L") clips them, never scales.
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}

#: About the bytes the hash and the float-to-uint8 conversion take at a time.
SLAB_BYTES = 64 << 20
#: Most threads that decode an ImageFolder tree (PIL decodes with the GIL released).
_MAX_DECODERS = 16

#: Normalization used when none is given, by channel count (ImageNet's for RGB).
DEFAULT_NORMALIZATION: dict[int, tuple[tuple[float, ...], tuple[float, ...]]] = {
    1: ((0.5,), (0.5,)),
    3: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass
class ImageSet:
    """Base images (uint8 N×C×H×W), hard labels (int64 N) and class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def sha256(self) -> str:
        """Digest of the content (pixels, labels, class names), independent of the file format.

        The pixels are hashed in place, a slab of images at a time (no copy of the set)."""
        digest = hashlib.sha256()
        digest.update(json.dumps([list(self.images.shape), self.class_names]).encode())
        step = slab_rows(self.images[0].nbytes)
        for start in range(0, self.images.shape[0], step):
            digest.update(np.ascontiguousarray(self.images[start : start + step]))
        digest.update(self.labels.astype("<i8").tobytes())
        return digest.hexdigest()


def slab_rows(row_bytes: int) -> int:
    """Rows of ``row_bytes`` each that fill about ``SLAB_BYTES``; at least 1."""
    return max(1, SLAB_BYTES // max(1, row_bytes))


def load_image_set(
    path: Path, num_classes: int | None = None, option: str = "--images", progress: bool = False
) -> ImageSet:
    """Load an ImageFolder tree or a ``{"data", "label"}`` tensor file into one uint8 array;
    errors name the ``option`` that gave ``path``; ``progress`` shows a bar while a tree
    decodes."""
    if not path.exists():
        raise InputError(f"{option} {path} does not exist; pass an ImageFolder tree or a .pt file")
    if path.is_dir():
        result = _load_image_folder(path, progress)
    else:
        result = _load_tensor_file(path, num_classes)
    if num_classes is not None and num_classes != result.num_classes and path.is_dir():
        raise InputError(
            f"--num-classes {num_classes} but {path} has {result.num_classes} class folders"
        )
    if result.num_classes < 2:
        raise InputError(
            f"{path} has {result.num_classes} class; soft labels need at least 2 classes"
        )
    return result


def _read_image(file: Path) -> np.ndarray:
    try:
        with Image.open(file) as img:
            img.load()
            if img.mode in _WIDE_MODES:
                return _narrowed(np.asarray(img), file)
            if img.mode in _GRAY_MODES:
                return np.asarray(img.convert("L"))[None]
            return np.asarray(img.convert("RGB")).transpose(2, 0, 1)
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"cannot read image {file} ({brief(exc)}); remove or replace it") from None


def _narrowed(pixels: np.ndarray, file: Path) -> np.ndarray:
    """A wide gray image as 8 bits (1×H×W) when its values are 8-bit values; refused else,
    since any rescaling would be a guess about what its range means."""
    whole = np.array_equal(pixels, np.round(pixels)) if pixels.dtype.kind == "f" else True
    if whole and pixels.size and pixels.min() >= 0 and pixels.max() <= 255:
        return pixels.astype(np.uint8)[None]
    raise InputError(
        f"image {file} has {pixels.dtype} pixels beyond 0..255 (a 16-bit or float image); "
        "convert the set to 8-bit gray or RGB first"
    )


def _image_files(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """An ImageFolder tree's image files and their labels, in sorted class and file order,
    and its class names."""
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not class_dirs:
        raise InputError(
            f"{root} has no class folders; an ImageFolder tree is ROOT/CLASS_NAME/IMAGE.png"
        )
    files: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        found = sorted(f for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            raise InputError(
                f"class folder {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})"
            )
        files.extend(found)
        labels.extend([label] * len(found))
    return files, labels, [d.name for d in class_dirs]


def _decoders() -> int:
    """Threads to decode with: the CPUs this process may use, at most ``_MAX_DECODERS``."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(_MAX_DECODERS, cpus or 1))


def _load_image_folder(root: Path, progress: bool = False) -> ImageSet:
    """Decode a tree in parallel into one preallocated (N, C, H, W) array, in file order.

    A bounded window of images is decoding at any time and each is copied into its row
    as it arrives, so memory is the array plus that window; gray images in a set with
    RGB ones are repeated to 3 channels, as a sequential decode does."""
    files, labels, class_names = _image_files(root)
    workers = _decoders()
    images: np.ndarray | None = None
    bar = tqdm(total=len(files), unit="image", desc=f"decode {root.name}", disable=not progress)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="softserve-decode")
    try:
        window: deque[Future[np.ndarray]] = deque()
        upcoming = iter(files)
        for index, file in enumerate(files):
            while len(window) < 4 * workers and (ahead := next(upcoming, None)) is not None:
                window.append(pool.submit(_read_image, ahead))
            array = window.popleft().result()
            images = _placed(images, index, array, file, files)
            bar.update()
    finally:
        pool.shutdown(cancel_futures=True)
        bar.close()
    assert images is not None  # a tree has at least one image (_image_files)
    return ImageSet(
        images=images, labels=np.asarray(labels, dtype=np.int64), class_names=class_names
    )


def _placed(
    images: np.ndarray | None, index: int, array: np.ndarray, file: Path, files: list[Path]
) -> np.ndarray:
    """``images`` with row ``index`` set to ``array``: allocated at the first image, widened
    to 3 channels (earlier gray rows repeated) at the first RGB image after gray ones."""
    if images is None:
        images = np.empty((len(files), *array.shape), dtype=np.uint8)
    size = images.shape[2:]
    if array.shape[1:] != size:
        raise InputError(
            f"images differ in size: {file} is {array.shape[1]}x{array.shape[2]}, "
            f"{files[0]} is {size[0]}x{size[1]}; resize the set to one size first"
        )
    if array.shape[0] > images.shape[1]:
        wide = np.empty((len(files), array.shape[0], *size), dtype=np.uint8)
        wide[:index] = images[:index]
        images = wide
    images[index] = array  # a gray image broadcasts to 3 channels, as np.repeat would
    return images


def _load_tensor_file(path: Path, num_classes: int | None) -> ImageSet:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a checkpoint
        raise InputError(f"cannot load tensor file {path} ({brief(exc)})") from None
    if not isinstance(payload, dict) or "data" not in payload or "label" not in payload:
        raise InputError(f'{path} must hold a dict {{"data": N×C×H×W, "label": N}}')
    data, label = torch.as_tensor(payload["data"]), torch.as_tensor(payload["label"])
    if data.ndim == 3:
        data = data[:, None]
    if data.ndim != 4 or data.shape[1] not in (1, 3):
        raise InputError(f"{path}: data must be N×C×H×W with C in (1, 3), got {tuple(data.shape)}")
    if len(data) == 0:
        raise InputError(f"{path} holds no images")
    if data.dtype == torch.uint8:
        images = data.numpy()
    elif data.is_floating_point():
        images = _float_to_uint8(data, path)
    else:
        raise InputError(f"{path}: data must be uint8 or float in [0, 1], got {data.dtype}")
    labels = label.reshape(-1).long().numpy()
    if labels.shape[0] != images.shape[0]:
        raise InputError(f"{path}: {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.min() < 0:
        raise InputError(f"{path}: labels must be non-negative class indices")
    k = num_classes if num_classes is not None else int(labels.max()) + 1
    if labels.max() >= k:
        raise InputError(f"{path}: label {int(labels.max())} is out of range for {k} classes")
    names = payload.get("class_names")
    class_names = [str(n) for n in names] if names is not None else [str(i) for i in range(k)]
    if len(class_names) != k:
        raise InputError(f"{path}: {len(class_names)} class names for {k} classes")
    return ImageSet(images=np.ascontiguousarray(images), labels=labels, class_names=class_names)


def _float_to_uint8(data: torch.Tensor, path: Path) -> np.ndarray:
    """Float pixels in [0, 1] as uint8 (x·255 rounded), checked and converted a slab at a
    time into one preallocated array, so no full-size float temporary exists."""
    step = slab_rows(data[0].numel() * data.element_size())
    finite, lo, hi = True, float("inf"), float("-inf")
    for start in range(0, len(data), step):
        part = data[start : start + step]
        finite = finite and bool(part.isfinite().all())
        lo, hi = min(lo, float(part.min())), max(hi, float(part.max()))
    if not finite:
        raise InputError(f"{path}: data holds NaN or infinite values")
    if lo < 0 or hi > 1:
        raise InputError(
            f"{path}: float data must be in [0, 1], found [{lo:.3g}, {hi:.3g}]; "
            "undo the normalization before saving (the worker applies --mean/--std)"
        )
    images = np.empty(tuple(data.shape), dtype=np.uint8)
    out = torch.from_numpy(images)
    for start in range(0, len(data), step):
        part = data[start : start + step].float()
        out[start : start + step] = (part * 255).round().to(torch.uint8)
    return images


def default_normalization(
    channels: int, mean: tuple[float, ...] | None, std: tuple[float, ...] | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The given mean/std, completed from the channel-count default, checked for length."""
    fallback = DEFAULT_NORMALIZATION.get(channels)
    if (mean is None or std is None) and fallback is None:
        raise InputError(f"no default normalization for {channels} channels; pass --mean and --std")
    mean = tuple(mean) if mean is not None else fallback[0]  # type: ignore[index]
    std = tuple(std) if std is not None else fallback[1]  # type: ignore[index]
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != channels:
            raise InputError(f"--{name} has {len(values)} values for {channels}-channel images")
    if any(s <= 0 for s in std):
        raise InputError("--std values must be positive")
    return mean, std
