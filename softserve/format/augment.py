"""What views and mixes are: their policies and the parameters drawn per (epoch, sample).

A view is a RandomResizedCrop box (top, left, height, width, in base-image pixels) plus a
horizontal-flip bit. A mix (CutMix or Mixup) gives every sample of every epoch a partner
from the whole set, λ ~ Beta(α, α) and, for CutMix, a box in output pixels; the partner is
seen through its own view of that epoch. Both are drawn from the label set's seed and
stored, so a label never depends on the batch size, the world size or an RNG state (SRe2L
mixes within a batch, which pins the batch its labels were made with).

A mix row (float32, :data:`MIX_FIELDS`) is (partner id, λ, box top, left, height, width);
a sample left unmixed (probability 1 − prob) has itself as partner, λ = 1 and an empty
box, which both kinds leave exactly as it was. For CutMix λ is the area left to the sample,
as CutMix's label mixing uses it.

Torch-free: the server and the storage layer read these rows; :mod:`softserve.pixels`
turns them into the pixels both teacher and student see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from softserve.format.payload import MIX_FIELDS as MIX_FIELDS
from softserve.format.payload import NUM_MIX as NUM_MIX
from softserve.format.payload import NUM_PARAMS as NUM_PARAMS
from softserve.format.payload import PARAM_FIELDS as PARAM_FIELDS
from softserve.format.sampling import MIX_STREAM, VIEW_STREAM, seeded_rng

MixKind = Literal["cutmix", "mixup"]
MIX_KINDS: tuple[str, ...] = ("cutmix", "mixup")
_CROP_TRIES = 10
#: Partner ids travel in float32 mix rows: exact up to 2**24.
_MAX_SAMPLES = 1 << 24


@dataclass(frozen=True)
class ViewPolicy:
    """How views are drawn: RandomResizedCrop's scale and ratio ranges, and flipping."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop scale range must satisfy 0 < min <= max <= 1, got {self.scale}")
        rlo, rhi = self.ratio
        if not 0 < rlo <= rhi:
            raise ValueError(f"crop ratio range must satisfy 0 < min <= max, got {self.ratio}")


def sample_views(
    policy: ViewPolicy, seed: int, epoch: int, num_samples: int, height: int, width: int
) -> np.ndarray:
    """View parameters of every sample for one epoch, indexed by sample id: int32 (N, 5).

    Follows torchvision's RandomResizedCrop: up to ten tries for a box of random area and
    log-uniform aspect ratio that fits, else the whole image clamped to the ratio range.
    """
    rng = seeded_rng(seed, epoch, VIEW_STREAM)
    area = float(height * width)
    shape = (num_samples, _CROP_TRIES)
    target = area * rng.uniform(policy.scale[0], policy.scale[1], size=shape)
    log_ratio = rng.uniform(math.log(policy.ratio[0]), math.log(policy.ratio[1]), size=shape)
    aspect = np.exp(log_ratio)
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = np.argmax(fits, axis=1)
    rows = np.arange(num_samples)
    ok = fits[rows, first]
    h = np.where(ok, h[rows, first], 0)
    w = np.where(ok, w[rows, first], 0)

    whole_ratio = width / height
    if whole_ratio < policy.ratio[0]:
        fw, fh = width, max(1, int(round(width / policy.ratio[0])))
    elif whole_ratio > policy.ratio[1]:
        fh, fw = height, max(1, int(round(height * policy.ratio[1])))
    else:
        fh, fw = height, width
    h = np.where(ok, h, fh)
    w = np.where(ok, w, fw)

    unit = rng.random(size=(num_samples, 3))
    top = np.where(ok, np.floor(unit[:, 0] * (height - h + 1)), (height - h) // 2)
    left = np.where(ok, np.floor(unit[:, 1] * (width - w + 1)), (width - w) // 2)
    flip = (unit[:, 2] < 0.5) if policy.flip else np.zeros(num_samples, dtype=bool)
    return np.stack([top, left, h, w, flip], axis=1).astype(np.int32)


@dataclass(frozen=True)
class MixPolicy:
    """Which mix, how often (``prob``), and the Beta(α, α) that λ is drawn from."""

    kind: MixKind
    prob: float = 1.0
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in MIX_KINDS:
            raise ValueError(f"mix must be one of {', '.join(MIX_KINDS)}, got {self.kind!r}")
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"mix probability must be in [0, 1], got {self.prob}")
        if not self.alpha > 0:
            raise ValueError(f"mix alpha must be positive, got {self.alpha}")


def sample_mix(
    policy: MixPolicy, seed: int, epoch: int, num_samples: int, height: int, width: int
) -> np.ndarray:
    """Mix rows of every sample for one epoch, indexed by sample id: float32 (N, 6).

    ``height`` and ``width`` are the views' output size (CutMix boxes are in its pixels).
    Every draw is made for every sample whatever ``prob`` is, so the partners and λs of the
    mixed samples do not depend on which others are mixed.
    """
    if num_samples > _MAX_SAMPLES:
        raise ValueError(f"mixing takes sets of up to {_MAX_SAMPLES} samples, got {num_samples}")
    rng = seeded_rng(seed, epoch, MIX_STREAM)
    n = num_samples
    partner = rng.integers(0, n, size=n)
    lam = rng.beta(policy.alpha, policy.alpha, size=n)
    center = rng.random(size=(n, 2))
    applied = rng.random(size=n) < policy.prob
    box = np.zeros((n, 4), dtype=np.int64)
    if policy.kind == "cutmix":
        cut = np.sqrt(1.0 - lam)
        half_h = (np.floor(height * cut) // 2).astype(np.int64)
        half_w = (np.floor(width * cut) // 2).astype(np.int64)
        cy = np.floor(center[:, 0] * height).astype(np.int64)
        cx = np.floor(center[:, 1] * width).astype(np.int64)
        top, bottom = np.clip(cy - half_h, 0, height), np.clip(cy + half_h, 0, height)
        left, right = np.clip(cx - half_w, 0, width), np.clip(cx + half_w, 0, width)
        box = np.stack([top, left, bottom - top, right - left], axis=1)
        lam = 1.0 - box[:, 2] * box[:, 3] / (height * width)
    own = np.arange(n)
    partner = np.where(applied, partner, own)
    lam = np.where(applied, lam, 1.0)
    box = np.where(applied[:, None], box, 0)
    return np.concatenate([partner[:, None], lam[:, None], box], axis=1).astype(np.float32)
