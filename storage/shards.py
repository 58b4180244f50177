"""What a label shard holds, by format version: its datasets, their shapes and dtypes.

Format 3 (written today) stores one label per view, GIFT's refined soft label r, in the
label set's codec as ``soft`` (and ``soft_<part>``), plus ``norm``, the float32 norm ‖t‖ of
the teacher's logits, from which the logits are exact: t = ‖t‖·(r − β·s/‖s‖)
(:func:`softserve.format.refinement.recover_logits`). Format 2 is the same with r stored as
``refined``; format 1 stored r and t both, each in the codec. Their sets still open and
serve, under the same names as format 3 (:mod:`softserve.format.labels`).

Every shard also holds ``order`` (int32 (E_s, N)) and ``params`` (int16 (E_s, N, 5)): row j
of epoch e is sample order[e, j], seen through the view params[e, j]. A set relabelled with
``--mix`` also holds, in the same order, ``mix`` (float32 (E_s, N, 6), the mix rows of
:mod:`softserve.format.augment`) and ``partner_params`` (int16 (E_s, N, 5), each partner's
view in that epoch); the format version is the same, and sets without them read as before.
A set of DSA views (``--views dsa``, named so by its manifest's view policy) stores
``params`` and ``partner_params`` as float32 (E_s, N, 14) DSA rows, in the same format
version: the manifest says which, and crop sets read as before.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from softserve.errors import StoreError, brief
from softserve.format.codecs import Codec, part_name
from softserve.format.labels import NORM, SOFT
from softserve.format.payload import NUM_MIX, ViewKind, view_columns

ORDER_DTYPE = np.dtype(np.int32)
NORM_DTYPE = np.dtype(np.float32)
MIX_DTYPE = np.dtype(np.float32)
#: Datasets of a mixed set only, beside the view params.
MIX_DATASETS: tuple[str, ...] = ("mix", "partner_params")
#: Label fields stored in the codec, by format version: the soft label's first.
CODEC_FIELDS: dict[int, tuple[str, ...]] = {
    1: ("refined", "logits"),
    2: ("refined",),
    3: (SOFT,),
}

Layout = dict[str, tuple[tuple[int, ...], np.dtype]]


def dataset_layout(num_samples: int, image_shape: tuple[int, int, int]) -> Layout:
    """Every dataset of ``dataset.h5``: base images uint8 (N, C, H, W), hard labels int64 (N,)."""
    return {
        "images": ((num_samples, *image_shape), np.dtype(np.uint8)),
        "labels": ((num_samples,), np.dtype(np.int64)),
    }


def shard_layout(
    version: int, epochs: int, num_samples: int, num_classes: int, codec: Codec,
    mixed: bool = False, views: ViewKind = "rrc",
) -> Layout:  # fmt: skip
    """Every dataset of a shard of ``epochs`` epochs: name -> (shape, dtype)."""
    shape = (epochs, num_samples)
    columns, params_dtype = view_columns(views)
    params = ((*shape, len(columns)), params_dtype)
    layout: Layout = {"order": (shape, ORDER_DTYPE), "params": params}
    if mixed:
        layout["mix"] = ((*shape, NUM_MIX), MIX_DTYPE)
        layout["partner_params"] = params
    for field in CODEC_FIELDS[version]:
        for part in codec.parts(num_classes):
            row = part.row_shape(num_classes)
            layout[part_name(field, part.suffix)] = ((*shape, *row), part.dtype)
    if version >= 2:
        layout[NORM] = (shape, NORM_DTYPE)
    return layout


def bytes_per_row(
    version: int, num_classes: int, codec: Codec, mixed: bool = False, views: ViewKind = "rrc"
) -> int:
    """Stored bytes of one (epoch, sample): order, view, mix if any, and the label fields."""
    layout = shard_layout(version, 1, 1, num_classes, codec, mixed, views)
    return sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in layout.values())


def stored_version(path: Path) -> int:
    """The format version a shard file was written in."""
    try:
        with h5py.File(path, "r") as f:
            return int(f.attrs["format_version"])
    except (OSError, KeyError, ValueError) as exc:
        raise StoreError(f"cannot read the format of {path} ({brief(exc)}); delete it") from None
