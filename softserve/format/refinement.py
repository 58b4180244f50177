"""GIFT's label refinement r = t/‖t‖ + β·s/‖s‖ and its inverse, for NumPy and torch.

Written once against :mod:`softserve.format.arrays`: the worker refines with torch, a
training job recovers logits with torch on its device, and the server recovers them with
NumPy (it imports no torch). :mod:`softserve.client.losses` builds the losses on these.
"""

from __future__ import annotations

from softserve.format.arrays import Array, ops_for

DEFAULT_ALPHA = 0.1
DEFAULT_BETA = 0.1


def beta_from_gamma(gamma: float) -> float:
    """β of the additive form that gives the direction of the paper's convex γ·ŝ + (1-γ)·t̂."""
    if not 0 <= gamma < 1:
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")
    return gamma / (1 - gamma)


def flat_labels(hard: Array) -> Array:
    """Hard labels (B,) or (B, 1) as int64 (B,)."""
    if hard.ndim == 2 and hard.shape[1] == 1:
        hard = hard[:, 0]
    if hard.ndim != 1:
        raise ValueError(f"hard labels must be (B,) or (B, 1), got {tuple(hard.shape)}")
    return ops_for(hard).int64(hard)


def smooth_labels(hard: Array, num_classes: int, alpha: float = DEFAULT_ALPHA) -> Array:
    """Label smoothing as GIFT defines it: 1-α on the label, α/(C-1) on every other class."""
    if num_classes < 2:
        raise ValueError("label smoothing needs at least two classes")
    ops = ops_for(hard)
    y = flat_labels(hard)
    s = ops.full((y.shape[0], num_classes), alpha / (num_classes - 1), like=y)
    return ops.scatter_last(s, y[:, None], 1.0 - alpha)


def refine_labels(
    teacher_logits: Array,
    hard_labels: Array,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
) -> Array:
    """GIFT's refined soft label r = t/‖t‖ + β·s/‖s‖, in float32."""
    ops = ops_for(teacher_logits)
    t = ops.float32(teacher_logits)
    s = ops.to_device_of(smooth_labels(hard_labels, t.shape[1], alpha), t)
    return ops.normalize_last(t) + beta * ops.normalize_last(s)


def recover_logits(
    refined: Array,
    hard_labels: Array,
    norm: Array,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
) -> Array:
    """The teacher's logits from GIFT's refined label and their norm: t = ‖t‖·(r − β·s/‖s‖).

    The inverse of :func:`refine_labels`, given ‖t‖: why a label set stores one label field
    per view (the refined one) and one norm per row, yet serves exact logits.
    """
    ops = ops_for(refined)
    r = ops.float32(refined)
    s = ops.to_device_of(smooth_labels(hard_labels, r.shape[-1], alpha), r)
    scale = ops.to_device_of(ops.float32(norm), r)[:, None]
    return scale * (r - beta * ops.normalize_last(s))
