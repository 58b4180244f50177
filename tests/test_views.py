"""Views: apply_views against a per-sample F.interpolate reference (plain and antialiased
bilinear, and PIL's for the latter), and sample_views' contract."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from softserve.format.augment import NUM_PARAMS, ViewPolicy, sample_views
from softserve.format.sampling import epoch_order
from softserve.pixels import apply_views

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]


def reference_views(
    images: torch.Tensor,
    params: torch.Tensor,
    size: tuple[int, int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    antialias: bool = False,
) -> torch.Tensor:
    """Crop, resize and flip one sample at a time with plain torch ops (the documented recipe).

    Works in float32, as apply_views documents (uint8 / 255, float inputs cast to float32).
    """
    out = []
    for i in range(images.shape[0]):
        top, left, h, w, flip = (int(v) for v in params[i].tolist())
        crop = images[i : i + 1, :, top : top + h, left : left + w]
        crop = crop.float() / 255.0 if crop.dtype == torch.uint8 else crop.float()
        view = F.interpolate(
            crop, size=size, mode="bilinear", align_corners=False, antialias=antialias
        )
        if flip:
            view = torch.flip(view, dims=[3])
        if mean is not None and std is not None:
            m = torch.tensor(mean, dtype=torch.float32, device=view.device).view(1, -1, 1, 1)
            s = torch.tensor(std, dtype=torch.float32, device=view.device).view(1, -1, 1, 1)
            view = (view - m) / s
        out.append(view)
    return torch.cat(out)


def make_images(
    n: int, c: int, h: int, w: int, dtype: torch.dtype, device: str, seed: int = 0
) -> torch.Tensor:
    """Random images: uint8 in [0, 255] or float in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        x = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    else:
        x = torch.rand((n, c, h, w), generator=g, dtype=torch.float64).to(dtype)
    return x.to(device)


def make_params(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Sampled views plus hand-picked edge boxes (whole image, 1x1, one row/column, corner)."""
    sampled = sample_views(ViewPolicy(scale=(0.05, 1.0), ratio=(0.5, 2.0)), seed, 0, n, h, w)
    edges = np.array(
        [
            [0, 0, h, w, 0],
            [0, 0, h, w, 1],
            [h - 1, w - 1, 1, 1, 0],
            [0, w - 1, 1, 1, 1],
            [h // 2, 0, 1, w, 1],
            [0, w // 2, h, 1, 0],
            [h - 2, w - 3, 2, 3, 1],
        ],
        dtype=np.int32,
    )
    return torch.from_numpy(np.concatenate([sampled, edges]))


# (base H, base W, output size): square/non-square, down- and upscaling, int and tuple size.
GEOMETRIES = [
    (20, 24, (16, 12)),
    (20, 24, (40, 52)),
    (16, 16, 16),
    (16, 16, 7),
    (9, 31, (13, 5)),
]


#: the interpolation, and apply_views' float32 tolerance against the reference (the
#: antialiased filter sums more taps, each weight rounded once)
INTERPOLATIONS = [("bilinear", 1e-6), ("bilinear-antialias", 4e-6)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("height", "width", "size"), GEOMETRIES)
@pytest.mark.parametrize(("interpolation", "atol"), INTERPOLATIONS)
def test_apply_views_matches_reference(
    device: str,
    dtype: torch.dtype,
    channels: int,
    height: int,
    width: int,
    size: int | tuple[int, int],
    interpolation: str,
    atol: float,
) -> None:
    """Batched apply_views equals per-sample crop + bilinear interpolate (antialiased for
    bilinear-antialias) + flip."""
    params = make_params(25, height, width)
    images = make_images(len(params), channels, height, width, dtype, device)
    out = apply_views(images, params, size, interpolation=interpolation)
    out_hw = (size, size) if isinstance(size, int) else size
    assert out.shape == (len(params), channels, *out_hw)
    assert out.dtype == torch.float32
    assert out.device.type == torch.device(device).type
    antialias = interpolation == "bilinear-antialias"
    expected = reference_views(images, params, out_hw, antialias=antialias)
    torch.testing.assert_close(out, expected, atol=atol, rtol=0)
    assert float(out.min()) >= -atol and float(out.max()) <= 1.0 + atol


def test_antialiased_views_are_pils_resize_and_plain_ones_where_nothing_shrinks() -> None:
    """bilinear-antialias against PIL's bilinear resize of each crop (SRe2L's teacher's
    input: PIL rounds to 8 bits after each pass, so within one gray level), where plain
    bilinear of downscaled crops is many levels off; and, where no axis of any crop shrinks,
    the same views as plain bilinear."""
    from PIL import Image

    params = make_params(25, 20, 24)
    images = make_images(len(params), 3, 20, 24, torch.uint8, "cpu")
    size = (9, 11)
    pil = []
    for image, (top, left, h, w, flip) in zip(images, params.tolist(), strict=True):
        crop = Image.fromarray(image.permute(1, 2, 0).numpy()).crop((left, top, left + w, top + h))
        view = np.asarray(crop.resize(size[::-1], Image.Resampling.BILINEAR), dtype=np.float32)
        view = np.ascontiguousarray(view[:, ::-1] if flip else view)
        pil.append(torch.from_numpy(view).permute(2, 0, 1) / 255)
    pil = torch.stack(pil)
    antialiased = apply_views(images, params, size, interpolation="bilinear-antialias")
    assert (antialiased - pil).abs().max() <= 1.001 / 255
    assert (apply_views(images, params, size) - pil).abs().max() > 20 / 255
    small = make_params(25, 8, 9)  # crops of at most 8×9, resized up to 9×11
    images = make_images(len(small), 3, 8, 9, torch.uint8, "cpu")
    torch.testing.assert_close(
        apply_views(images, small, size, interpolation="bilinear-antialias"),
        apply_views(images, small, size),
        atol=1e-6,
        rtol=0,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [1, 3])
def test_apply_views_normalization(device: str, channels: int) -> None:
    """mean/std normalize per channel after resampling."""
    mean = [0.485, 0.456, 0.406][:channels]
    std = [0.229, 0.224, 0.225][:channels]
    params = make_params(20, 20, 24, seed=3)
    images = make_images(len(params), channels, 20, 24, torch.uint8, device, seed=3)
    out = apply_views(images, params, (16, 12), mean=mean, std=std)
    expected = reference_views(images, params, (16, 12), mean=mean, std=std)
    # 1e-6 in [0, 1] pixel units, scaled by the normalization's 1/std.
    torch.testing.assert_close(out, expected, atol=1e-6 / min(std), rtol=0)


def test_apply_views_params_on_other_dtype() -> None:
    """Parameters as int16 (how shards store them) or int64 give the same result."""
    params = make_params(10, 20, 24)
    images = make_images(len(params), 3, 20, 24, torch.uint8, "cpu")
    a = apply_views(images, params.to(torch.int16), 12)
    b = apply_views(images, params.to(torch.int64), 12)
    assert torch.equal(a, b)


def test_apply_views_flip_bit_mirrors() -> None:
    """Setting the flip bit mirrors the unflipped view exactly."""
    params = make_params(10, 20, 24)
    params[:, 4] = 0
    flipped = params.clone()
    flipped[:, 4] = 1
    images = make_images(len(params), 3, 20, 24, torch.float32, "cpu")
    assert torch.equal(
        apply_views(images, flipped, (9, 14)), apply_views(images, params, (9, 14)).flip(3)
    )


def test_apply_views_rejects_bad_shapes() -> None:
    """Wrong image rank, parameter width, parameter rank or batch mismatch raise ValueError."""
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    params = torch.tensor([[0, 0, 8, 8, 0]] * 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="images"):
        apply_views(images[0], params, 4)
    with pytest.raises(ValueError, match="params"):
        apply_views(images, params[:, :4], 4)
    with pytest.raises(ValueError, match="params"):
        apply_views(images, params[:3], 4)
    with pytest.raises(ValueError, match="params"):
        apply_views(images, params[0], 4)
    with pytest.raises(ValueError, match="mean"):
        apply_views(images, params, 4, mean=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="interpolation"):
        apply_views(images, params, 4, interpolation="bicubic")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scale": (0.0, 1.0)},
        {"scale": (0.5, 0.4)},
        {"scale": (0.5, 1.5)},
        {"scale": (-0.1, 0.5)},
        {"ratio": (0.0, 1.0)},
        {"ratio": (2.0, 1.0)},
        {"ratio": (-1.0, 1.0)},
    ],
)
def test_view_policy_rejects_bad_ranges(kwargs: dict) -> None:
    """Empty, inverted or out-of-range scale/ratio ranges raise ValueError."""
    with pytest.raises(ValueError):
        ViewPolicy(**kwargs)


def test_view_policy_accepts_degenerate_ranges() -> None:
    """Single-point ranges are valid (a fixed scale or ratio)."""
    ViewPolicy(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)


POLICIES = [
    ViewPolicy(),
    ViewPolicy(scale=(0.5, 1.0)),
    ViewPolicy(scale=(1.0, 1.0)),
    ViewPolicy(scale=(0.01, 0.05), ratio=(0.5, 2.0)),
    ViewPolicy(ratio=(0.2, 5.0), flip=False),
]
SHAPES = [(7, 31), (31, 7), (1, 5), (5, 1), (2, 2), (24, 24), (3, 100), (13, 17)]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_sample_views_boxes_inside_image(policy: ViewPolicy, height: int, width: int) -> None:
    """Every box is non-empty and inside the image, over many epochs and odd shapes."""
    n = 300
    for epoch in range(12):
        p = sample_views(policy, 11, epoch, n, height, width)
        assert p.shape == (n, NUM_PARAMS)
        assert p.dtype == np.int32
        top, left, h, w, flip = p.T
        assert (top >= 0).all() and (left >= 0).all()
        assert (h >= 1).all() and (w >= 1).all()
        assert (top + h <= height).all() and (left + w <= width).all()
        assert np.isin(flip, [0, 1]).all()


@pytest.mark.parametrize(
    ("policy", "height", "width"),
    [(ViewPolicy(ratio=(0.01, 0.02)), 10, 40), (ViewPolicy(ratio=(50.0, 100.0)), 40, 10)],
)
def test_sample_views_fallback_never_empty(policy: ViewPolicy, height: int, width: int) -> None:
    """When no try fits, the ratio-clamped whole-image box still has both sides >= 1."""
    p = sample_views(policy, 0, 0, 50, height, width)
    assert (p[:, 2] >= 1).all() and (p[:, 3] >= 1).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sample_views_flips_about_half(seed: int) -> None:
    """Flip bits are Bernoulli(1/2): the count of 10k lies within 5 sigma of 5000."""
    n = 10_000
    flips = int(sample_views(ViewPolicy(), seed, 4, n, 24, 24)[:, 4].sum())
    assert abs(flips - n / 2) <= 5 * math.sqrt(n * 0.25)


def test_sample_views_no_flip_policy() -> None:
    """ViewPolicy(flip=False) never sets the flip bit."""
    for epoch in range(5):
        assert not sample_views(ViewPolicy(flip=False), 0, epoch, 2000, 24, 24)[:, 4].any()


def fallback_box(policy: ViewPolicy, height: int, width: int) -> tuple[int, int, int, int]:
    """torchvision's fallback: the whole image clamped to the ratio range, centred."""
    whole = width / height
    if whole < policy.ratio[0]:
        w, h = width, int(round(width / policy.ratio[0]))
    elif whole > policy.ratio[1]:
        h, w = height, int(round(height * policy.ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def check_area_and_ratio(policy: ViewPolicy, p: np.ndarray, height: int, width: int) -> None:
    """Sampled area fraction and aspect ratio lie in range, up to rounding h and w to integers.

    h = rint(h*) and w = rint(w*) with h* w* = scale * H * W and w*/h* = ratio, so
    (h-.5)(w-.5) <= scale*H*W <= (h+.5)(w+.5) and (w-.5)/(h+.5) <= ratio <= (w+.5)/(h-.5).
    """
    area = float(height * width)
    h = p[:, 2].astype(np.float64)
    w = p[:, 3].astype(np.float64)
    lo, hi = policy.scale
    rlo, rhi = policy.ratio
    assert ((h + 0.5) * (w + 0.5) >= lo * area - 1e-9).all()
    assert ((h - 0.5) * (w - 0.5) <= hi * area + 1e-9).all()
    assert ((w + 0.5) / (h - 0.5) >= rlo - 1e-9).all()
    assert ((w - 0.5) / (h + 0.5) <= rhi + 1e-9).all()


@pytest.mark.parametrize(("height", "width"), [(64, 48), (48, 64), (40, 40)])
def test_sample_views_area_in_scale_range(height: int, width: int) -> None:
    """With a policy whose tries always fit, every box's area and ratio respect the policy."""
    policy = ViewPolicy(scale=(0.25, 0.5))
    p = sample_views(policy, 5, 0, 4000, height, width)
    check_area_and_ratio(policy, p, height, width)
    frac = p[:, 2] * p[:, 3] / (height * width)
    # The whole scale range is used, not one corner of it.
    assert frac.min() < 0.27 and frac.max() > 0.48
    ratio = p[:, 3] / p[:, 2]
    assert ratio.min() < 0.8 and ratio.max() > 1.25


@pytest.mark.parametrize(("height", "width"), [(24, 24), (7, 31), (31, 7), (20, 30)])
def test_sample_views_successful_crops_in_range(height: int, width: int) -> None:
    """Default policy: boxes other than the fallback box satisfy the scale and ratio ranges."""
    policy = ViewPolicy()
    p = sample_views(policy, 9, 2, 5000, height, width)
    fb = fallback_box(policy, height, width)
    successful = ~(p[:, :4] == np.array(fb)).all(axis=1)
    assert successful.mean() > 0.5
    check_area_and_ratio(policy, p[successful], height, width)


@pytest.mark.parametrize(("height", "width"), [(20, 30), (30, 20), (20, 20)])
def test_sample_views_fallback_box(height: int, width: int) -> None:
    """When no try can fit (scale 1, ratio 1 on a non-square image), the fallback is used."""
    policy = ViewPolicy(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    p = sample_views(policy, 0, 0, 100, height, width)
    side = min(height, width)
    expected = ((height - side) // 2, (width - side) // 2, side, side)
    assert (p[:, :4] == np.array(expected)).all()


def test_sample_views_deterministic() -> None:
    """Same (seed, epoch) gives identical params; another epoch or seed gives different ones."""
    policy = ViewPolicy()
    a = sample_views(policy, 123, 7, 500, 32, 28)
    assert np.array_equal(a, sample_views(policy, 123, 7, 500, 32, 28))
    assert not np.array_equal(a, sample_views(policy, 123, 8, 500, 32, 28))
    assert not np.array_equal(a, sample_views(policy, 124, 7, 500, 32, 28))


@pytest.mark.parametrize("n", [1, 2, 37, 1000])
def test_epoch_order_is_deterministic_permutation(n: int) -> None:
    """epoch_order is a permutation of range(n), the same for the same (seed, epoch)."""
    order = epoch_order(42, 3, n)
    assert order.shape == (n,)
    assert np.issubdtype(order.dtype, np.integer)
    assert np.array_equal(np.sort(order), np.arange(n))
    assert np.array_equal(order, epoch_order(42, 3, n))


def test_epoch_order_varies() -> None:
    """Different epochs and seeds give different orders."""
    base = epoch_order(42, 3, 500)
    assert not np.array_equal(base, epoch_order(42, 4, 500))
    assert not np.array_equal(base, epoch_order(43, 3, 500))
    assert not np.array_equal(base, np.arange(500))
