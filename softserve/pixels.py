"""Views and mixes as pixels: the one function the teacher's and the student's inputs
come from.

The worker builds the teacher's input with :func:`mixed_views`; the client builds the
student's input with the same function from the stored rows
(:mod:`softserve.format.augment`), so both see the same pixels. The server's view previews
use it too.

Resampling follows the label set's view policy (its ``interpolation``). ``"bilinear"``
(every set's before antialiased views, and relabel's): bilinear with ``align_corners=False``
and no antialiasing, exactly what ``F.interpolate(crop, size, mode="bilinear",
align_corners=False)`` does to the cropped box (edge pixels clamp to the box, never bleed in
from outside it), followed by the flip. ``"bilinear-antialias"``: PIL's bilinear resize
(SRe2L's teacher's), which ``F.interpolate(crop, size, mode="bilinear", antialias=True)``
also computes: along each axis that shrinks by s > 1, the triangle filter's half-width grows
from 1 to s input pixels, so every input pixel counts (plain bilinear reads 2 per output
pixel, wherever s is); along an axis that does not shrink, the two are the same filter. It
is applied batched, as weighted taps along rows and then columns. CutMix pastes the
partner's box into the view; Mixup blends λ·view + (1 − λ)·partner.

DSA views (:func:`apply_dsa`) resize the whole image by the same interpolation (flipped by
the row's flip bit), normalize it, and then run DSA in normalized pixels, as the GIFT
evaluator does:
brightness, saturation, contrast, one of an integer shift with zero padding or a scale or
rotation by ``grid_sample`` (bilinear, zero padding, ``align_corners=False``, as
``F.affine_grid`` + ``F.grid_sample`` with their defaults), and the cutout box set to zero.
Every op is per sample and elementwise or a fixed-order reduction, so a view does not depend
on the batch it is computed in: on one device, teacher and client get the same bits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from softserve.format.augment import (
    DSA_CROP,
    DSA_FIELDS,
    MIX_KINDS,
    NUM_DSA,
    NUM_MIX,
    NUM_PARAMS,
    MixKind,
    ViewKind,
)

#: a view policy's resampling (the manifest's ``views.interpolation``)
INTERPOLATIONS = ("bilinear", "bilinear-antialias")


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


def _filter_taps(
    params: torch.Tensor, axis: int, out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Antialiased bilinear's taps along ``axis`` (0 rows, 1 columns, mirrored for flipped
    views): source indices and weights, both (T, B, out), T the widest window of the batch.
    Output pixel i of a crop [a, a + n) resized to m weighs input pixel x by the triangle
    1 − |x + ½ − c| / f, c = a + (i + ½)·n/m, f = max(n/m, 1), over the crop, normalized to
    sum 1 (PIL's ``precompute_coeffs``); a tap past the window weighs 0."""
    device = params.device
    start = params[:, axis, None].to(torch.float32)
    length = params[:, axis + 2, None].to(torch.float32)
    grid = torch.arange(out, dtype=torch.float32, device=device).expand(len(params), out)
    if axis == 1:
        grid = torch.where(params[:, 4, None].bool(), (out - 1) - grid, grid)
    scale = length / out
    support = scale.clamp(min=1.0)
    centre = start + (grid + 0.5) * scale
    first = torch.maximum((centre - support + 0.5).floor(), start)
    stop = torch.minimum((centre + support + 0.5).floor(), start + length)
    taps = int((stop - first).max().item())
    x = first + torch.arange(taps, dtype=torch.float32, device=device).view(-1, 1, 1)
    weight = (1 - (x + 0.5 - centre).abs() / support).clamp_(min=0.0) * (x < stop)
    index = torch.minimum(x, start + length - 1).to(torch.long)
    return index, weight / weight.sum(dim=0)


def _antialiased(
    images: torch.Tensor, params: torch.Tensor, out_h: int, out_w: int
) -> torch.Tensor:
    """The views resized by antialiased bilinear, float32 (B, C, out_h, out_w), unscaled:
    rows, then columns, each a weighted sum over its taps in a fixed order (deterministic,
    and no matrix product, whose precision a job may lower to TF32)."""
    b, c, h_in, w_in = images.shape
    rows, row_weight = _filter_taps(params, 0, out_h)
    cols, col_weight = _filter_taps(params, 1, out_w)
    planes = (torch.arange(b * c, device=images.device) * h_in).view(b, c, 1)
    flat = images.reshape(b * c * h_in, w_in)
    x = torch.zeros(b, c, out_h, w_in, dtype=torch.float32, device=images.device)
    for index, weight in zip(rows, row_weight, strict=True):
        taken = flat.index_select(0, (planes + index[:, None]).reshape(-1))
        x += taken.view(b, c, out_h, w_in).to(torch.float32) * weight[:, None, :, None]
    y = torch.zeros(b, c, out_h, out_w, dtype=torch.float32, device=images.device)
    for index, weight in zip(cols, col_weight, strict=True):
        taken = torch.gather(x, 3, index.view(b, 1, 1, out_w).expand(b, c, out_h, out_w))
        y += taken * weight[:, None, None, :]
    return y


def apply_views(
    images: torch.Tensor,
    params: torch.Tensor,
    size: int | Sequence[int],
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """Crop, resize and flip a batch of base images by their view parameters.

    ``images`` is (B, C, H, W), uint8 or float in [0, 1], on any device; ``params`` is
    (B, 5) as from :func:`sample_views`; ``interpolation`` one of :data:`INTERPOLATIONS`
    (the module docstring). Returns float32 (B, C, *size) on the images' device, in [0, 1],
    or normalized by ``mean``/``std`` (per channel, in [0, 1] units) when given.
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
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}")
    device = images.device
    params = params.to(device=device, dtype=torch.long)
    b, c, h_in, w_in = images.shape
    if interpolation == "bilinear-antialias":
        return _normalized(_antialiased(images, params, out_h, out_w), images.dtype, mean, std)

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
    return _normalized(x, images.dtype, mean, std)


def _normalized(
    x: torch.Tensor,
    dtype: torch.dtype,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
) -> torch.Tensor:
    """Resampled views ``x`` of images of ``dtype`` in one affine pass, in place: uint8 to
    [0, 1], then the normalization."""
    scale = 1 / 255 if dtype == torch.uint8 else 1.0
    if mean is None or std is None:
        return x.mul_(scale) if scale != 1.0 else x
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.mul_(scale / s).sub_(m / s)


def apply_mix(
    kind: MixKind, views: torch.Tensor, partner_views: torch.Tensor, mix: torch.Tensor
) -> torch.Tensor:
    """Mix a batch of views (B, C, H, W) with their partners' views by mix rows (B, 6).

    CutMix pastes the partner's box into the view; Mixup blends λ·view + (1 − λ)·partner.
    """
    if views.shape != partner_views.shape:
        raise ValueError(
            f"views {tuple(views.shape)} and partner views {tuple(partner_views.shape)} differ"
        )
    if mix.ndim != 2 or mix.shape != (views.shape[0], NUM_MIX):
        raise ValueError(f"mix must be ({views.shape[0]}, {NUM_MIX}), got {tuple(mix.shape)}")
    mix = mix.to(device=views.device, dtype=torch.float32)
    if kind == "mixup":
        lam = mix[:, 1].view(-1, 1, 1, 1)
        return views * lam + partner_views * (1.0 - lam)
    if kind != "cutmix":
        raise ValueError(f"mix must be one of {', '.join(MIX_KINDS)}, got {kind!r}")
    _, _, h, w = views.shape
    return torch.where(_inside(mix[:, 2:6], h, w), partner_views, views)


def _inside(box: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Which pixels of an (h, w) view lie in each sample's box (top, left, height, width)
    (B, 4): a bool mask (B, 1, h, w)."""
    box = box.to(torch.long)
    rows = torch.arange(h, device=box.device)
    cols = torch.arange(w, device=box.device)
    in_rows = (rows >= box[:, 0:1]) & (rows < box[:, 0:1] + box[:, 2:3])
    in_cols = (cols >= box[:, 1:2]) & (cols < box[:, 1:2] + box[:, 3:4])
    return in_rows[:, None, :, None] & in_cols[:, None, None, :]


#: Column of each DSA field in a row.
_DSA = {name: i for i, name in enumerate(DSA_FIELDS)}


def _sample_means(x: torch.Tensor) -> torch.Tensor:
    """Each sample's mean over (C, H, W), (B, 1, 1, 1): reduced one axis at a time, so that
    no reduction has a single output (torch splits those over threads, in an order that
    would depend on the batch size)."""
    _, c, h, w = x.shape
    return x.sum(3).sum(2).sum(1).div_(c * h * w).view(-1, 1, 1, 1)


def _shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Move each sample by whole pixels (rows, columns) (B, 2), zeros shifted in: DSA's
    crop (pad, then crop back to size)."""
    b, c, h, w = x.shape
    rows = torch.arange(h, device=x.device) + shift[:, 0:1]  # output row i reads row i + dy
    cols = torch.arange(w, device=x.device) + shift[:, 1:2]
    in_rows, in_cols = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)
    inside = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    x = torch.gather(x, 2, rows.clamp(0, h - 1)[:, None, :, None].expand(b, c, h, w))
    x = torch.gather(x, 3, cols.clamp(0, w - 1)[:, None, None, :].expand(b, c, h, w))
    return torch.where(inside, x, 0.0)


def _affine(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Scale or rotate each sample about its centre by DSA rows (b, 14), as
    ``F.affine_grid(theta)`` + ``F.grid_sample`` with theta = diag(sx, sy)·R(angle): the grid
    built elementwise (affine_grid's batched matmul could round by batch size)."""
    _, _, h, w = x.shape
    device = x.device
    sx, sy, angle = (rows[:, _DSA[k]].view(-1, 1, 1) for k in ("scale_x", "scale_y", "angle"))
    cos, sin = torch.cos(angle), torch.sin(angle)
    xs = ((torch.arange(w, device=device, dtype=torch.float32) * 2 + 1) / w - 1).view(1, 1, w)
    ys = ((torch.arange(h, device=device, dtype=torch.float32) * 2 + 1) / h - 1).view(1, h, 1)
    gx = (sx * cos) * xs - (sx * sin) * ys
    gy = (sy * sin) * xs + (sy * cos) * ys
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def apply_dsa(
    images: torch.Tensor,
    params: torch.Tensor,
    size: int | Sequence[int],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """DSA views of a batch of base images by their DSA rows.

    ``images`` is (B, C, H, W), uint8 or float in [0, 1], on any device; ``params`` is
    (B, 14) float32 as from :func:`softserve.format.augment.sample_dsa`, in pixels of
    ``size``, which the whole image is first resized to by ``interpolation``. Returns
    float32 (B, C, *size), normalized by ``mean``/``std`` (DSA works on normalized pixels:
    its zeros are the mean colour).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    b = images.shape[0]
    if params.ndim != 2 or params.shape != (b, NUM_DSA):
        raise ValueError(f"DSA params must be ({b}, {NUM_DSA}), got {tuple(params.shape)}")
    device = images.device
    rows = params.to(device=device, dtype=torch.float32)
    _, _, h_in, w_in = images.shape
    whole = torch.tensor([0, 0, h_in, w_in, 0], dtype=torch.long, device=device).repeat(b, 1)
    whole[:, 4] = rows[:, _DSA["flip"]].to(torch.long)
    x = apply_views(images, whole, size, mean=mean, std=std, interpolation=interpolation)

    def factor(name: str) -> torch.Tensor:
        return rows[:, _DSA[name], None, None, None]

    x = x.add_(factor("brightness"))
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey).mul_(factor("saturation")).add_(grey)
    level = _sample_means(x)
    x = (x - level).mul_(factor("contrast")).add_(level)
    # the crop's shift is zero unless the row chose it; scale or rotate for the others
    x = _shift(x, rows[:, _DSA["shift_y"] : _DSA["shift_x"] + 1].to(torch.long))
    warped = torch.nonzero(rows[:, _DSA["transform"]] != DSA_CROP).squeeze(1)
    if warped.numel():
        x = x.index_copy(0, warped, _affine(x.index_select(0, warped), rows[warped]))
    _, _, out_h, out_w = x.shape
    cutout = rows[:, _DSA["cut_top"] : _DSA["cut_width"] + 1]
    return torch.where(_inside(cutout, out_h, out_w), 0.0, x)


def views_of(
    views: ViewKind,
    images: torch.Tensor,
    params: torch.Tensor,
    size: int | Sequence[int],
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str = "bilinear",
) -> torch.Tensor:
    """The views of a set's view policy: crops (:func:`apply_views`) or DSA
    (:func:`apply_dsa`, which needs the normalization)."""
    if views == "rrc":
        return apply_views(images, params, size, mean=mean, std=std, interpolation=interpolation)
    if views != "dsa":
        raise ValueError(f"views must be rrc or dsa, got {views!r}")
    if mean is None or std is None:
        raise ValueError("DSA views work on normalized pixels: pass mean and std")
    return apply_dsa(images, params, size, mean=mean, std=std, interpolation=interpolation)


def mixed_views(
    kind: MixKind | None,
    images: torch.Tensor,
    params: torch.Tensor,
    size: int | Sequence[int],
    *,
    partner_images: torch.Tensor | None = None,
    partner_params: torch.Tensor | None = None,
    mix: torch.Tensor | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str = "bilinear",
    views: ViewKind = "rrc",
) -> torch.Tensor:
    """The teacher's (and the student's) input: the views (of policy ``views``), mixed with
    their partners' views when ``kind`` is set. What the worker labels and the client trains
    on."""
    how = {"mean": mean, "std": std, "interpolation": interpolation}
    out = views_of(views, images, params, size, **how)
    if kind is None:
        return out
    if partner_images is None or partner_params is None or mix is None:
        raise ValueError("a mixed set needs partner_images, partner_params and mix")
    partner = views_of(views, partner_images, partner_params, size, **how)
    return apply_mix(kind, out, partner, mix)


def stored_views(
    kind: MixKind | None, images_of: Callable[[np.ndarray], np.ndarray], ids: np.ndarray,
    params: np.ndarray, size: int | Sequence[int], mix: np.ndarray | None = None,
    partner_params: np.ndarray | None = None, interpolation: str = "bilinear", *,
    views: ViewKind = "rrc", mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:  # fmt: skip
    """Stored rows as pictures: samples ``ids`` through their view ``params``, mixed by their
    stored ``mix`` rows with their partners' views, unnormalized in [0, 1]. ``images_of``
    gives the base images (uint8) of sample ids. DSA views need the set's ``mean`` and
    ``std`` (they are made in normalized pixels, then shown unnormalized, clipped)."""
    dtype = np.float32 if views == "dsa" else np.int64

    def tensor(a: np.ndarray | None, dtype: type = dtype) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=dtype))

    partners = None if mix is None else torch.from_numpy(images_of(mix[:, 0].astype(np.int64)))
    out = mixed_views(
        kind, torch.from_numpy(images_of(np.asarray(ids, dtype=np.int64))), tensor(params),
        size, partner_images=partners, partner_params=tensor(partner_params),
        mix=tensor(mix, np.float32), mean=mean if views == "dsa" else None,
        std=std if views == "dsa" else None, interpolation=interpolation, views=views,
    )  # fmt: skip
    if views == "rrc":
        return out
    assert mean is not None and std is not None
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    return out.mul_(s).add_(m).clamp_(0.0, 1.0)
