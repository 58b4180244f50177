"""What views and mixes are: their policies and the parameters drawn per (epoch, sample).

A view is a RandomResizedCrop box (top, left, height, width, in base-image pixels) plus a
horizontal-flip bit, or (``--views dsa``) a row of DSA parameters (:class:`DsaPolicy`,
:data:`DSA_FIELDS`): the GIFT evaluator's ``color_crop_cutout_flip_scale_rotate``, drawn per
sample where the evaluator draws its choice of transform per batch. A mix (CutMix or
Mixup) gives every sample of every epoch a partner from the whole set, λ ~ Beta(α, α) and,
for CutMix, a box in output pixels; the partner is seen through its own view of that
epoch. Both are drawn from the label set's seed and stored, so a label never depends on the
batch size, the world size or an RNG state (SRe2L mixes within a batch, which pins the batch
its labels were made with).

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

from softserve.format.payload import DSA_FIELDS as DSA_FIELDS
from softserve.format.payload import MIX_FIELDS as MIX_FIELDS
from softserve.format.payload import NUM_DSA as NUM_DSA
from softserve.format.payload import NUM_MIX as NUM_MIX
from softserve.format.payload import NUM_PARAMS as NUM_PARAMS
from softserve.format.payload import PARAM_FIELDS as PARAM_FIELDS
from softserve.format.payload import VIEW_KINDS as VIEW_KINDS
from softserve.format.payload import ViewKind as ViewKind
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


#: The GIFT evaluator's DSA strategy, the only one ``--views dsa`` draws.
DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
#: Which of the transforms that run one at a time a DSA row applies (its ``transform``).
DSA_CROP, DSA_SCALE, DSA_ROTATE = 0, 1, 2


@dataclass(frozen=True)
class DsaPolicy:
    """DSA's ranges, defaults as the GIFT evaluator's ``DiffAug`` (= DSA's ``ParamDiffAug``).

    Every view is flipped with probability ``flip``, shifted in brightness by U(−b/2, b/2),
    scaled in saturation by U(0, s) and in contrast by U(c, c + 1) (in normalized pixels),
    then goes through one of: a shift of up to ``crop`` of each side, zero-padded; a scale
    of each axis by U(1/r, r); a rotation by U(−θ, θ) degrees; and last a ``cutout`` box of
    that fraction of each side set to zero.
    """

    flip: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    crop: float = 0.125
    scale: float = 1.2
    rotate: float = 15.0
    cutout: float = 0.5

    def __post_init__(self) -> None:
        for name in ("flip", "crop", "cutout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"DSA {name} must be in [0, 1], got {getattr(self, name)}")
        if self.scale < 1.0:
            raise ValueError(f"DSA scale must be at least 1, got {self.scale}")
        if min(self.brightness, self.saturation, self.contrast, self.rotate) < 0:
            raise ValueError("DSA brightness, saturation, contrast and rotate must be >= 0")


def identity_view(views: ViewKind, height: int, width: int) -> np.ndarray:
    """The one view row that leaves an image as it is (resized to the output size): the whole
    crop unflipped, or a DSA row that changes nothing. ``height`` and ``width`` are the base
    image's."""
    if views == "rrc":
        return np.array([0, 0, height, width, 0], dtype=np.int32)
    row = np.zeros(NUM_DSA, dtype=np.float32)
    for name in ("saturation", "contrast", "scale_x", "scale_y"):
        row[DSA_FIELDS.index(name)] = 1.0
    return row


def _round_half_up(x: float) -> int:
    """``int(x + 0.5)``: how DSA rounds a fraction of a side to pixels."""
    return int(x + 0.5)


def sample_dsa(
    policy: DsaPolicy, seed: int, epoch: int, num_samples: int, height: int, width: int
) -> np.ndarray:
    """DSA rows of every sample for one epoch, indexed by sample id: float32 (N, 14).

    ``height`` and ``width`` are the views' output size, where DSA works. Every value is drawn
    for every sample, so a sample's row does not depend on the others; the transforms a row
    does not choose are stored as identities (shift 0, scale 1, angle 0).
    """
    rng = seeded_rng(seed, epoch, VIEW_STREAM)
    n = num_samples
    flip = rng.random(n) < policy.flip
    brightness = (rng.random(n) - 0.5) * policy.brightness
    saturation = rng.random(n) * policy.saturation
    contrast = rng.random(n) + policy.contrast
    transform = rng.integers(0, 3, size=n)
    reach_y, reach_x = _round_half_up(height * policy.crop), _round_half_up(width * policy.crop)
    shift_y = rng.integers(-reach_y, reach_y + 1, size=n)
    shift_x = rng.integers(-reach_x, reach_x + 1, size=n)
    r = policy.scale
    scale_x = rng.random(n) * (r - 1.0 / r) + 1.0 / r
    scale_y = rng.random(n) * (r - 1.0 / r) + 1.0 / r
    angle = (rng.random(n) - 0.5) * 2.0 * math.radians(policy.rotate)
    cut_h, cut_w = _round_half_up(height * policy.cutout), _round_half_up(width * policy.cutout)
    # DSA's cutout centre: 0 .. side - (size mod 2), the box clipped to the image
    centre_y = rng.integers(0, height + 1 - cut_h % 2, size=n)
    centre_x = rng.integers(0, width + 1 - cut_w % 2, size=n)
    top = np.clip(centre_y - cut_h // 2, 0, height)
    left = np.clip(centre_x - cut_w // 2, 0, width)
    bottom = np.clip(centre_y - cut_h // 2 + cut_h, 0, height)
    right = np.clip(centre_x - cut_w // 2 + cut_w, 0, width)
    crop, scaled, rotated = (transform == t for t in (DSA_CROP, DSA_SCALE, DSA_ROTATE))
    rows = [
        flip, brightness, saturation, contrast, transform,
        np.where(crop, shift_y, 0), np.where(crop, shift_x, 0),
        np.where(scaled, scale_x, 1.0), np.where(scaled, scale_y, 1.0),
        np.where(rotated, angle, 0.0), top, left, bottom - top, right - left,
    ]  # fmt: skip
    return np.stack([np.asarray(row, dtype=np.float64) for row in rows], axis=1).astype(np.float32)


def sample_epoch_views(
    policy: ViewPolicy | DsaPolicy, seed: int, epoch: int, num_samples: int,
    base_size: tuple[int, int], output_size: tuple[int, int],
) -> np.ndarray:  # fmt: skip
    """The view rows of every sample for one epoch under either policy: crop boxes in base
    pixels (:func:`sample_views`) or DSA rows at the output size (:func:`sample_dsa`)."""
    if isinstance(policy, DsaPolicy):
        return sample_dsa(policy, seed, epoch, num_samples, *output_size)
    return sample_views(policy, seed, epoch, num_samples, *base_size)


def view_kind(policy: ViewPolicy | DsaPolicy) -> ViewKind:
    """``rrc`` for crops, ``dsa`` for DSA: how the pixels functions name a policy."""
    return "dsa" if isinstance(policy, DsaPolicy) else "rrc"


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
