"""The one label decoder: stored codec parts plus norms to soft labels and teacher logits.

Names, from disk to wire to Python: ``soft`` is the GIFT-refined soft label of a view
(``Batch.soft``); a codec stores it as parts named ``soft`` and ``soft_<suffix>``
(:func:`~softserve.format.codecs.part_name`); ``norm`` is ‖t‖, the L2 norm of the teacher's
logits of the view, from which ``logits`` are recovered exactly
(:func:`~softserve.format.refinement.recover_logits`). The server's decoded mode, the
client and the report all decode here, on NumPy or torch.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from softserve.format.arrays import Array
from softserve.format.codecs import Codec, to_float16
from softserve.format.refinement import recover_logits

#: The refined soft label's field name (and its parts' prefix).
SOFT = "soft"
#: The field of the teacher logits' norms.
NORM = "norm"


def label_parts(
    codec: Codec, num_classes: int, arrays: Mapping[str, Array], field: str = SOFT
) -> dict[str, Array]:
    """A label field's codec parts by suffix, picked from arrays keyed by their names."""
    return {suffix: arrays[name] for suffix, name in codec.part_names(field, num_classes).items()}


def decode_labels(
    codec: Codec, num_classes: int, parts: Mapping[str, Array], *,
    hard: Array | None = None, norm: Array | None = None,
    alpha: float = 0.0, beta: float = 0.0, dtype: np.dtype | type = np.float32,
) -> tuple[Array, Array | None]:  # fmt: skip
    """Soft labels from a codec's ``parts`` (by suffix), and the teacher's logits when the
    rows' ``hard`` labels and logit ``norm`` are given (with the set's GIFT α and β).

    NumPy parts give NumPy arrays, in ``dtype`` (float32, or float16: the fp16 codec's own
    parts come back without a copy); tensors give float32 tensors on their device.
    """
    numpy = isinstance(next(iter(parts.values())), np.ndarray)
    narrow = numpy and np.dtype(dtype) != np.float32
    if narrow:
        soft = codec.decode_as(parts, num_classes, dtype)
    else:
        soft = codec.decode(parts, num_classes)
    if norm is None:
        return soft, None
    if hard is None:
        raise ValueError("recovering logits needs the rows' hard labels")
    wide = codec.decode(parts, num_classes) if narrow else soft
    logits = recover_logits(wide, hard, norm, alpha, beta)
    if narrow:
        logits = to_float16(logits)
    return soft, logits
