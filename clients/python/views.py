"""Augmented views: explicit per-sample parameters, their seeded sampling, and one apply function.

A view is a RandomResizedCrop box (top, left, height, width, in base-image pixels) plus a
horizontal-flip bit. Parameters are drawn per (epoch, sample) from the label set's seed and
stored, so a label never depends on the batch size, the world size or an RNG state. The
worker builds the teacher's input with :func:`apply_views`; the client builds the student's
input with the same function, so both see the same pixels.

Resampling is bilinear with ``align_corners=False`` and no antialiasing, exactly what
``F.interpolate(crop, size, mode="bilinear", align_corners=False)`` does to the cropped box
(edge pixels clamp to the box, never bleed in from outside it), followed by the flip.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# a parameter row's columns: defined with the wire format, which the server shares (no torch)
from softserve.client.payload import NUM_PARAMS as NUM_PARAMS
from softserve.client.payload import PARAM_FIELDS as PARAM_FIELDS

_ORDER_STREAM = 0
_VIEW_STREAM = 1
_CROP_TRIES = 10


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


def _rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, stream])))


def epoch_order(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """The fixed sample order π_e of one epoch (int64, a permutation of range(num_samples))."""
    return _rng(seed, epoch, _ORDER_STREAM).permutation(num_samples)


def sample_views(
    policy: ViewPolicy, seed: int, epoch: int, num_samples: int, height: int, width: int
) -> np.ndarray:
    """View parameters of every sample for one epoch, indexed by sample id: int32 (N, 5).

    Follows torchvision's RandomResizedCrop: up to ten tries for a box of random area and
    log-uniform aspect ratio that fits, else the whole image clamped to the ratio range.
    """
    rng = _rng(seed, epoch, _VIEW_STREAM)
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


def _taps(params: torch.Tensor, out_h: int, out_w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices of both bilinear taps and the second tap's weight, for both axes.

    Returns ``index`` (2 taps, 2 axes, B, S) and ``frac`` (2 axes, B, S), S = max(out_h,
    out_w); axis 0 is rows (valid up to out_h), axis 1 columns (up to out_w), already
    mirrored for flipped views. Both axes in one pass: each op here costs more in dispatch
    than in arithmetic.
    """
    device = params.device
    size = max(out_h, out_w)
    out = torch.tensor([out_h, out_w], dtype=torch.float32, device=device).view(2, 1, 1)
    start = params[:, 0:2].T[:, :, None]  # (top, left) per sample
    length = params[:, 2:4].T[:, :, None]  # (height, width)
    grid = torch.arange(size, dtype=torch.float32, device=device)
    # a flipped view's column j samples where an unflipped one's column out_w-1-j does
    flip = params[:, 4, None].bool()
    cols = torch.where(flip, (out_w - 1) - grid, grid)
    grid = torch.stack([grid.expand_as(cols), cols])
    pos = ((grid + 0.5) * (length.to(torch.float32) / out) - 0.5).clamp_(min=0.0)
    lo = pos.floor()
    frac = pos.sub_(lo)
    lo = lo.to(torch.long)
    index = torch.minimum(torch.stack([lo, lo + 1]), length - 1).add_(start)
    return index, frac


def apply_views(
    images: torch.Tensor,
    params: torch.Tensor,
    size: int | Sequence[int],
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:
    """Crop, resize and flip a batch of base images by their view parameters.

    ``images`` is (B, C, H, W), uint8 or float in [0, 1], on any device; ``params`` is
    (B, 5) as from :func:`sample_views`. Returns float32 (B, C, *size) on the images' device,
    in [0, 1], or normalized by ``mean``/``std`` (per channel, in [0, 1] units) when given.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if params.ndim != 2 or params.shape[1] != NUM_PARAMS or params.shape[0] != images.shape[0]:
        raise ValueError(
            f"params must be ({images.shape[0]}, {NUM_PARAMS}), got {tuple(params.shape)}"
        )
    out_h, out_w = (size, size) if isinstance(size, int) else tuple(size)
    if (mean is None) != (std is None):
        raise ValueError("pass both mean and std, or neither")
    device = images.device
    params = params.to(device=device, dtype=torch.long)
    b, c, h_in, w_in = images.shape

    index, frac = _taps(params, out_h, out_w)

    # rows of both taps in one index_select over (B*C*H, W) rows, in the input dtype (less
    # traffic): far cheaper than a gather along dim 2 with an expanded index
    planes = (torch.arange(b * c, device=device) * h_in).view(1, b, c, 1)
    row_index = (planes + index[:, 0, :, None, :out_h]).reshape(-1)
    taken = images.reshape(b * c * h_in, w_in).index_select(0, row_index)
    rows = taken.view(2, b, c, out_h, w_in).to(torch.float32)
    # in place where possible: fewer fresh multi-MB buffers to allocate and fill
    x = rows[0].lerp_(rows[1], frac[0, :, None, :out_h, None])
    # columns of both taps in one gather along the last dim
    col_index = index[:, 1, :, :out_w].permute(1, 0, 2).reshape(b, 1, 1, 2 * out_w)
    pairs = torch.gather(x, 3, col_index.expand(b, c, out_h, 2 * out_w))
    x = torch.lerp(pairs[..., :out_w], pairs[..., out_w:], frac[1, :, None, None, :out_w])
    # one affine pass: uint8 to [0, 1], then the normalization
    scale = 1 / 255 if images.dtype == torch.uint8 else 1.0
    if mean is None or std is None:
        return x.mul_(scale) if scale != 1.0 else x
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return x.mul_(scale / s).sub_(m / s)
