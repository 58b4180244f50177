"""SRe2L's relabel files, read safely: their layout, one batch file's contents, and the
sampler that says which image each row is.

SRe2L's relabel (``relabel/generate_soft_label.py``; CDA uses it as is, LPLD and LPQLD
modify it) runs a DataLoader whose RandomSampler draws from a ``torch.Generator`` seeded
``--fkd-seed`` (42) and saves one file per batch: ``epoch_E/batch_B.tar`` (LPQLD:
``batch_N.tar``, N counted across epochs), a ``torch.save`` of the list

- coords, float (B, 4): each row's RandomResizedCrop box as (top/H, left/W, height/H,
  width/W) of its base image (float16 in LPQLD);
- flip, bool (B,): the row was flipped after the crop;
- permutation (B,) int, λ (a float from ``np.random.beta``) and box (r0, c0, r1, c1),
  NumPy ints from ``np.clip`` (LPQLD: 0-dim uint8 tensors): the batch's CutMix pasted
  rows r0:r1, columns c0:c1 of row ``permutation[j]``'s output into row j (their
  ``bbx`` is the row axis); Mixup blended λ·row j + (1 − λ)·row ``permutation[j]`` and
  has no box; without a mix all three are None;
- logits (B, K): the teacher on the mixed batch (float16 with ``--use-fp16``).

No file names an image: row j of batch b of epoch e is whichever image the sampler put
there, which replaying the sampler tells (or LPLD's and LPQLD's ``sampler_indices_*.json``,
which record it).

The files are pickles that hold NumPy scalars, which ``torch.load(weights_only=True)``
refuses; they are loaded with its weights-only unpickler allowing exactly NumPy's scalar
and dtype reconstructors on top of what it allows anyway (tensors, lists, numbers, None),
so loading a file runs no code from it.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import RandomSampler

from softserve.errors import InputError, brief

#: SRe2L's --fkd-seed default: the seed of the relabel's sampler.
SAMPLER_SEED = 42
#: LPLD's record of each epoch's sample ids, and LPQLD's of each batch's.
EPOCH_INDICES = "sampler_indices_epoch.json"
BATCH_INDICES = "sampler_indices_batch.json"
_EPOCH = re.compile(r"epoch_(0|[1-9][0-9]*)")
_BATCH = re.compile(r"batch_(0|[1-9][0-9]*)\.tar")
_FIELDS = "coords, flip, permutation, λ, box, logits"


def _numpy_globals() -> list[object]:
    """What the unpickler may call besides its defaults: NumPy's scalar reconstructor,
    under NumPy 1's and NumPy 2's names, and the dtypes of the scalars SRe2L saves."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # NumPy 1
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    dtypes = [type(np.dtype(t)) for t in (np.int64, np.int32, np.float64, np.float32)]
    return [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *dtypes,
    ]


def load_batch_file(path: Path) -> tuple[object, str]:
    """What a batch file holds, unpickled weights-only (see the module docstring), and the
    sha256 of its bytes; a one-line InputError for a file that is not data."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path} ({brief(exc)})") from None
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a file it refuses
        called = re.search(r"GLOBAL (\S+)", str(exc))
        if called:
            raise InputError(
                f"{path} is refused: its pickle calls {called[1]}, which is not data (a batch "
                "file may hold tensors, numbers, lists and NumPy scalars; nothing in it is run)"
            ) from None
        raise InputError(f"{path} is not a file torch.load reads ({brief(exc)})") from None
    return obj, hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """Where a relabel's batch files are: ``epoch_E/batch_B.tar`` (SRe2L, CDA, LPLD) or
    ``batch_N.tar`` numbered across epochs (``flat``: LPQLD)."""

    root: Path
    flat: bool
    #: the batch numbers each epoch folder holds; flat: one set, every number
    batches: list[set[int]]
    #: LPLD's or LPQLD's record of the sampler, if there is one
    indices: Path | None

    def path(self, epoch: int, batch: int, per_epoch: int) -> Path:
        """File of batch ``batch`` of ``epoch``, with ``per_epoch`` batches an epoch."""
        if self.flat:
            return self.root / f"batch_{epoch * per_epoch + batch}.tar"
        return self.root / f"epoch_{epoch}" / f"batch_{batch}.tar"

    def available(self, per_epoch: int) -> int:
        """Epochs begun: epoch folders, or flat files in groups of ``per_epoch``."""
        if self.flat:
            return -(-(max(self.batches[0]) + 1) // per_epoch)
        return len(self.batches)

    def present(self, epoch: int, per_epoch: int) -> set[int]:
        """Batch numbers (within the epoch) that ``epoch`` has files for."""
        if not self.flat:
            return self.batches[epoch]
        first = epoch * per_epoch
        return {n - first for n in self.batches[0] if first <= n < first + per_epoch}


def _numbers(folder: Path, pattern: re.Pattern[str], want_dir: bool) -> dict[int, Path]:
    found = {}
    for entry in folder.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir() == want_dir:
            found[int(match[1])] = entry
    return found


def scan_layout(root: Path) -> Layout:
    """The layout of the relabel folder ``root``, from file names alone (nothing loaded)."""
    if not root.is_dir():
        what = "is a file" if root.exists() else "does not exist"
        raise InputError(f"{root} {what}; pass the relabel's --fkd-path folder")
    epochs = _numbers(root, _EPOCH, want_dir=True)
    flat = _numbers(root, _BATCH, want_dir=False)
    if epochs and flat:
        raise InputError(
            f"{root} holds both epoch_E folders and batch_N.tar files: not one relabel's layout"
        )
    if not epochs and not flat:
        raise InputError(
            f"{root} is not in SRe2L's layout: no epoch_E/batch_B.tar files (SRe2L, CDA, LPLD) "
            "and no batch_N.tar files (LPQLD); pass the relabel's --fkd-path folder"
        )
    if flat:
        indices = root / BATCH_INDICES
        return Layout(root, True, [set(flat)], indices if indices.is_file() else None)
    missing = min(set(range(max(epochs) + 2)) - set(epochs))
    if missing <= max(epochs):
        raise InputError(
            f"{root / f'epoch_{missing}'} is missing; the epochs run 0 to {max(epochs)}"
        )
    batches = [set(_numbers(epochs[e], _BATCH, want_dir=False)) for e in range(len(epochs))]
    indices = root / EPOCH_INDICES
    return Layout(root, False, batches, indices if indices.is_file() else None)


# --------------------------------------------------------------------------- a batch file


@dataclass(frozen=True)
class BatchFile:
    """One batch file's contents, checked, rows in batch order."""

    #: float64 (B, 4): (top/H, left/W, height/H, width/W)
    coords: np.ndarray
    #: the coords were stored in float16 (LPQLD), good to about 2⁻¹² of a side
    coarse: bool
    #: bool (B,)
    flip: np.ndarray
    #: int64 (B,): row j's partner is row permutation[j]; None without a mix
    permutation: np.ndarray | None
    lam: float | None
    #: CutMix's box (r0, c0, r1, c1) in output pixels; None for Mixup and without a mix
    box: tuple[int, int, int, int] | None
    #: (B, K) as stored (float16 or float32)
    logits: torch.Tensor

    @property
    def rows(self) -> int:
        return self.coords.shape[0]

    @property
    def kind(self) -> str | None:
        """The batch's mix: None, "cutmix" or "mixup"."""
        if self.permutation is None:
            return None
        return "mixup" if self.box is None else "cutmix"


def _variant(obj: list | tuple, where: str) -> str | None:
    """Why a file of another relabel variant cannot be imported, if it is one."""
    second = obj[1] if len(obj) > 1 else None
    if isinstance(second, torch.Tensor) and second.is_floating_point() and second.ndim == 2:
        return (
            f"{where} holds Cutout parameters in place of flips (LPLD's ImageNet-21K-P "
            "relabel), which softserve's views cannot replay"
        )
    if len(obj) in (7, 8) and not isinstance(obj[2], torch.Tensor | type(None)):
        return (
            f"{where} holds RandAugment parameters (LPQLD's --use_rand_aug), which "
            "softserve's views cannot replay"
        )
    last = obj[-1] if obj else None
    if len(obj) == 7 and isinstance(last, torch.Tensor) and not last.is_floating_point():
        return (
            f"{where} holds top-k logits and their class indices (LPQLD's "
            "--label_quantization): softserve stores every class's logit, so import a "
            "relabel without label quantization"
        )
    return None


def _number(value: object, integer: bool) -> float | int | None:
    """A Python, NumPy or 0-dim tensor number as a Python one; None if it is none."""
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        if integer and value.is_floating_point():
            return None
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if integer:
        return value if isinstance(value, int) else None
    return float(value)


def _coords(value: object, where: str) -> tuple[np.ndarray, bool]:
    if not (
        isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and value.ndim == 2
        and value.shape[1] == 4
    ):
        raise InputError(f"{where}: the crop coords are not a float (B, 4) tensor")
    coords = value.double().numpy()
    if not (np.isfinite(coords).all() and (coords >= 0).all() and (coords <= 1).all()):
        raise InputError(f"{where}: crop coords outside [0, 1]; they are fractions of a side")
    return coords, value.dtype == torch.float16


def _flip(value: object, rows: int, where: str) -> np.ndarray:
    if not (
        isinstance(value, torch.Tensor) and value.shape == (rows,) and not value.is_floating_point()
    ):
        raise InputError(f"{where}: the flips are not a bool or integer ({rows},) tensor")
    flip = value.long().numpy()
    if not np.isin(flip, (0, 1)).all():
        raise InputError(f"{where}: flips other than 0 and 1")
    return flip.astype(bool)


def _mix(
    perm: object, lam: object, box: object, rows: int, where: str
) -> tuple[np.ndarray | None, float | None, tuple[int, int, int, int] | None]:
    """The permutation, λ and box, or three Nones; refused unless a CutMix, a Mixup or none."""
    if perm is None and lam is None and box is None:
        return None, None, None
    if not (
        isinstance(perm, torch.Tensor) and perm.shape == (rows,) and not perm.is_floating_point()
    ):
        raise InputError(f"{where}: the mix permutation is not an integer ({rows},) tensor")
    permutation = perm.long().numpy()
    if not np.array_equal(np.sort(permutation), np.arange(rows)):
        raise InputError(f"{where}: the mix permutation is not a permutation of the batch's rows")
    weight = _number(lam, integer=False)
    if weight is None or not 0 <= weight <= 1:
        raise InputError(f"{where}: the mix λ is not a number in [0, 1]")
    if box is None:
        return permutation, weight, None
    corners = [_number(v, integer=True) for v in box] if isinstance(box, list | tuple) else []
    if len(corners) != 4 or None in corners:
        raise InputError(f"{where}: the CutMix box is not 4 integers (bbx1, bby1, bbx2, bby2)")
    return permutation, weight, tuple(corners)  # type: ignore[return-value]


def parse_batch(obj: object, where: str) -> BatchFile:
    """A loaded batch file as a :class:`BatchFile`; a one-line InputError naming ``where``
    for anything but SRe2L's six fields (and naming the variant for LPLD's and LPQLD's
    others)."""
    if not isinstance(obj, list | tuple):
        raise InputError(f"{where} is not an SRe2L batch file: a list of ({_FIELDS})")
    refusal = _variant(obj, where)
    if refusal is not None:
        raise InputError(refusal)
    if len(obj) != 6:
        raise InputError(
            f"{where} is not an SRe2L batch file: a list of 6 ({_FIELDS}), found {len(obj)} items"
        )
    coords, coarse = _coords(obj[0], where)
    rows = coords.shape[0]
    flip = _flip(obj[1], rows, where)
    permutation, lam, box = _mix(obj[2], obj[3], obj[4], rows, where)
    logits = obj[5]
    if not (
        isinstance(logits, torch.Tensor)
        and logits.is_floating_point()
        and logits.ndim == 2
        and logits.shape[0] == rows
        and logits.shape[1] >= 2
    ):
        raise InputError(f"{where}: the logits are not a float ({rows}, K) tensor, K ≥ 2")
    if not bool(torch.isfinite(logits).all()):
        raise InputError(f"{where}: the logits hold NaN or infinite values")
    return BatchFile(coords, coarse, flip, permutation, lam, box, logits)


# --------------------------------------------------------------------------- the sampler


def sampler_epochs(num_samples: int, seed: int) -> Iterator[np.ndarray]:
    """Each epoch's sample ids in the relabel's order, epoch after epoch: a RandomSampler
    on a ``torch.Generator`` seeded ``seed``, each epoch run to its end as the DataLoader
    does (the sampler then draws a second, empty permutation: stopping early would shift
    every later epoch). Cut into batches, epoch e is SRe2L's ``get_img2batch_idx_list``."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    sampler = RandomSampler(range(num_samples), generator=generator)
    while True:
        yield np.fromiter(iter(sampler), dtype=np.int64)


def recorded_epochs(
    layout: Layout, num_samples: int, batches_of: Callable[[int], list[int]], epochs: int
) -> list[np.ndarray] | None:
    """Each epoch's sample ids as LPLD's or LPQLD's json records them, for the first
    ``epochs`` epochs (``batches_of(e)``: the flat batch numbers of epoch e); None without
    one. Refused if it is not a record of ids."""
    if layout.indices is None:
        return None
    try:
        record = json.loads(layout.indices.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {layout.indices} ({brief(exc)})") from None
    keys = [[str(n) for n in batches_of(e)] for e in range(epochs)] if layout.flat else None
    result = []
    for epoch in range(epochs):
        try:
            lists = [record[k] for k in keys[epoch]] if keys else [record[str(epoch)]]
            ids = np.asarray([i for part in lists for i in part], dtype=np.int64)
        except (KeyError, TypeError, ValueError, OverflowError):
            raise InputError(
                f"{layout.indices} does not record epoch {epoch}'s sample ids as lists of integers"
            ) from None
        if ids.ndim != 1 or ((ids < 0) | (ids >= num_samples)).any():
            raise InputError(
                f"{layout.indices}: epoch {epoch} names samples outside 0..{num_samples - 1}"
            )
        result.append(ids)
    return result
