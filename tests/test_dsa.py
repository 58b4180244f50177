"""DSA views: sample_dsa's draws against the GIFT evaluator's ranges, and apply_dsa against a
per-sample reference built from torch's own ops (F.pad, F.affine_grid, F.grid_sample)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from softserve.format.augment import (
    DSA_CROP,
    DSA_FIELDS,
    DSA_ROTATE,
    DSA_SCALE,
    NUM_DSA,
    DsaPolicy,
    sample_dsa,
)
from softserve.pixels import apply_dsa, mixed_views, views_of

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]
COL = {name: i for i, name in enumerate(DSA_FIELDS)}
CUT = ("cut_top", "cut_left", "cut_height", "cut_width")
MEAN3, STD3 = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def reference_dsa(
    images: torch.Tensor, rows: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """One sample at a time, at the base size, in float64: flip, normalize, brightness,
    saturation, contrast, then the chosen crop (pad and slice) / scale / rotate (affine_grid +
    grid_sample with their defaults), then the cutout box zeroed."""
    out = []
    m = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    for i in range(images.shape[0]):
        p = [float(v) for v in rows[i]]
        x = images[i : i + 1].to(torch.float64) / 255.0
        if p[COL["flip"]]:
            x = torch.flip(x, dims=[3])
        x = (x - m) / s
        x = x + p[COL["brightness"]]
        grey = x.mean(dim=1, keepdim=True)
        x = (x - grey) * p[COL["saturation"]] + grey
        level = x.mean(dim=[1, 2, 3], keepdim=True)
        x = (x - level) * p[COL["contrast"]] + level
        _, _, h, w = x.shape
        kind = int(p[COL["transform"]])
        if kind == DSA_CROP:
            dy, dx = int(p[COL["shift_y"]]), int(p[COL["shift_x"]])
            pad = max(h, w)
            padded = F.pad(x, (pad, pad, pad, pad))
            x = padded[:, :, pad + dy : pad + dy + h, pad + dx : pad + dx + w]
        else:
            a = p[COL["angle"]]
            sx, sy = p[COL["scale_x"]], p[COL["scale_y"]]
            theta = torch.tensor(
                [[[sx * math.cos(a), -sx * math.sin(a), 0.0],
                  [sy * math.sin(a), sy * math.cos(a), 0.0]]],
                dtype=torch.float64,
            )  # fmt: skip
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, align_corners=False)
        top, left, ch, cw = (int(p[COL[k]]) for k in CUT)
        x = x.clone()
        x[:, :, top : top + ch, left : left + cw] = 0.0
        out.append(x)
    return torch.cat(out)


def make_images(n: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("channels", "height", "width"), [(3, 28, 84), (1, 32, 32), (3, 17, 9)])
def test_apply_dsa_matches_reference(device: str, channels: int, height: int, width: int) -> None:
    n = 60
    images = make_images(n, channels, height, width)
    rows = torch.from_numpy(sample_dsa(DsaPolicy(), 3, 1, n, height, width))
    mean, std = (MEAN3, STD3) if channels == 3 else ((0.5,), (0.5,))
    got = apply_dsa(images.to(device), rows.to(device), (height, width), mean=mean, std=std)
    assert got.dtype == torch.float32 and got.device.type == device
    want = reference_dsa(images, rows, mean, std)
    assert set(rows[:, COL["transform"]].tolist()) == {DSA_CROP, DSA_SCALE, DSA_ROTATE}
    # float32 sampling positions: ~1e-6 of the half-width off, times pixel steps of up to
    # 1/0.224 per grey level range, times saturation and contrast
    torch.testing.assert_close(got.cpu().double(), want, atol=1e-3, rtol=0)


def test_apply_dsa_resizes_before_dsa() -> None:
    """At another output size the base image is resized (as a whole-image crop) first."""
    images = make_images(8, 3, 20, 30)
    rows = torch.from_numpy(sample_dsa(DsaPolicy(), 0, 0, 8, 10, 15))
    got = apply_dsa(images, rows, (10, 15), mean=MEAN3, std=STD3)
    resized = F.interpolate(images.double() / 255, size=(10, 15), mode="bilinear",
                            align_corners=False, antialias=False)  # fmt: skip
    want = reference_dsa((resized * 255).round().clamp(0, 255).to(torch.uint8), rows, MEAN3, STD3)
    assert got.shape == (8, 3, 10, 15)
    # the reference rounds the resized image to uint8: within half a grey level per pixel
    # (times the normalization, saturation and contrast factors, at most 1/0.224 · 2 · 1.5)
    torch.testing.assert_close(got.double(), want, atol=0.5 / 255 / 0.224 * 3 + 1e-4, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_apply_dsa_does_not_depend_on_the_batch(device: str) -> None:
    """A sample's view is the same bits alone, in any sub-batch, and in the whole batch:
    the labels made at one batch size are the labels of the client's batches of any other.
    3×112×104 values a sample: more than torch reduces in one thread, where a lone sample's
    mean over (C, H, W) would be split over threads (and round otherwise)."""
    n, h, w = 41, 112, 104
    images = make_images(n, 3, h, w, seed=1).to(device)
    rows = torch.from_numpy(sample_dsa(DsaPolicy(), 5, 2, n, h, w)).to(device)
    whole = apply_dsa(images, rows, (h, w), mean=MEAN3, std=STD3)
    for size in (1, 2, 7, 16):
        for start in range(0, n, size):
            part = apply_dsa(images[start : start + size], rows[start : start + size], (h, w),
                             mean=MEAN3, std=STD3)  # fmt: skip
            assert torch.equal(part, whole[start : start + size]), (size, start)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(device)
    shuffled = apply_dsa(images[order], rows[order], (h, w), mean=MEAN3, std=STD3)
    assert torch.equal(shuffled, whole[order])


def test_apply_dsa_identity_row_is_the_normalized_image() -> None:
    """No flip, no colour change, a zero shift and an empty cutout leave the image as is."""
    images = make_images(3, 3, 12, 10)
    rows = torch.zeros(3, NUM_DSA)
    rows[:, COL["saturation"]] = 1.0
    rows[:, COL["contrast"]] = 1.0
    rows[:, COL["scale_x"]] = rows[:, COL["scale_y"]] = 1.0
    got = apply_dsa(images, rows, (12, 10), mean=MEAN3, std=STD3)
    m = torch.tensor(MEAN3).view(1, 3, 1, 1)
    s = torch.tensor(STD3).view(1, 3, 1, 1)
    torch.testing.assert_close(got, (images.float() / 255 - m) / s, atol=1e-5, rtol=0)


def test_apply_dsa_rejects_bad_input() -> None:
    images = make_images(2, 3, 8, 8)
    with pytest.raises(ValueError, match="DSA params must be"):
        apply_dsa(images, torch.zeros(2, 5), 8, mean=MEAN3, std=STD3)
    with pytest.raises(ValueError, match="images must be"):
        apply_dsa(images[0], torch.zeros(2, NUM_DSA), 8, mean=MEAN3, std=STD3)
    with pytest.raises(ValueError, match="normalized pixels"):
        views_of("dsa", images, torch.zeros(2, NUM_DSA), 8)
    with pytest.raises(ValueError, match="rrc or dsa"):
        views_of("jitter", images, torch.zeros(2, NUM_DSA), 8)  # type: ignore[arg-type]


def test_mixed_views_mix_dsa_views() -> None:
    """CutMix over DSA views pastes the partner's DSA view into the sample's DSA view."""
    n, h, w = 6, 16, 16
    images = make_images(n, 3, h, w)
    rows = torch.from_numpy(sample_dsa(DsaPolicy(), 0, 0, n, h, w))
    partner = torch.roll(torch.arange(n), 1)
    mix = torch.tensor([[0, 0.75, 4, 4, 8, 8]] * n, dtype=torch.float32)
    mix[:, 0] = partner.float()
    got = mixed_views("cutmix", images, rows, (h, w), partner_images=images[partner],
                      partner_params=rows[partner], mix=mix, mean=MEAN3, std=STD3,
                      views="dsa")  # fmt: skip
    own = apply_dsa(images, rows, (h, w), mean=MEAN3, std=STD3)
    assert torch.equal(got[:, :, 4:12, 4:12], own[partner][:, :, 4:12, 4:12])
    assert torch.equal(got[:, :, :4], own[:, :, :4])


# --------------------------------------------------------------------------- sample_dsa


@pytest.mark.parametrize(("height", "width"), [(28, 84), (32, 32), (7, 5)])
def test_sample_dsa_ranges(height: int, width: int) -> None:
    """Every draw in the evaluator's range (GIFT utils/transforms.py DiffAug), and the
    transforms a row does not choose stored as identities."""
    n = 20000
    p = sample_dsa(DsaPolicy(), 0, 0, n, height, width).astype(np.float64)
    assert p.shape == (n, NUM_DSA)
    col = {k: p[:, i] for k, i in COL.items()}
    assert set(np.unique(col["flip"])) == {0.0, 1.0}
    assert abs(col["flip"].mean() - 0.5) < 0.02
    assert col["brightness"].min() >= -0.5 and col["brightness"].max() < 0.5
    assert col["saturation"].min() >= 0 and col["saturation"].max() < 2.0
    assert col["contrast"].min() >= 0.5 and col["contrast"].max() < 1.5
    kind = col["transform"]
    assert set(np.unique(kind)) == {DSA_CROP, DSA_SCALE, DSA_ROTATE}
    assert all(abs((kind == k).mean() - 1 / 3) < 0.02 for k in range(3))
    reach = (int(height * 0.125 + 0.5), int(width * 0.125 + 0.5))
    crop = kind == DSA_CROP
    for axis, name in enumerate(("shift_y", "shift_x")):
        shift = col[name]
        assert np.all(shift[~crop] == 0)
        assert set(np.unique(shift[crop])) == set(range(-reach[axis], reach[axis] + 1))
    for name in ("scale_x", "scale_y"):
        scale = col[name]
        assert np.all(scale[kind != DSA_SCALE] == 1.0)
        assert scale[kind == DSA_SCALE].min() >= 1 / 1.2 - 1e-6
        assert scale[kind == DSA_SCALE].max() <= 1.2 + 1e-6
    angle = col["angle"]
    assert np.all(angle[kind != DSA_ROTATE] == 0.0)
    assert np.abs(angle).max() <= math.radians(15) + 1e-6
    assert np.abs(angle[kind == DSA_ROTATE]).max() > math.radians(14.5)
    size = (int(height * 0.5 + 0.5), int(width * 0.5 + 0.5))
    top, left, ch, cw = (col[k] for k in CUT)
    assert top.min() >= 0 and left.min() >= 0
    assert (top + ch).max() <= height and (left + cw).max() <= width
    assert ch.max() == size[0] and cw.max() == size[1] and ch.min() >= 1 and cw.min() >= 1
    # the box is clipped only at the edges: a whole one wherever it fits
    inside = (top > 0) & (top + ch < height)
    assert np.all(ch[inside] == size[0])


def test_sample_dsa_deterministic_and_seeded() -> None:
    a = sample_dsa(DsaPolicy(), 7, 3, 100, 28, 28)
    assert a.dtype == np.float32
    assert np.array_equal(a, sample_dsa(DsaPolicy(), 7, 3, 100, 28, 28))
    assert not np.array_equal(a, sample_dsa(DsaPolicy(), 7, 4, 100, 28, 28))
    assert not np.array_equal(a, sample_dsa(DsaPolicy(), 8, 3, 100, 28, 28))


def test_sample_dsa_follows_the_policy() -> None:
    p = sample_dsa(DsaPolicy(flip=0.0, brightness=0.0, rotate=0.0, cutout=0.25), 0, 0, 500, 40, 40)
    assert np.all(p[:, COL["flip"]] == 0) and np.all(p[:, COL["brightness"]] == 0)
    assert np.all(p[:, COL["angle"]] == 0)
    assert p[:, COL["cut_height"]].max() == 10


@pytest.mark.parametrize(
    "kwargs", [{"flip": 1.5}, {"crop": -0.1}, {"cutout": 2.0}, {"scale": 0.9}, {"rotate": -1.0}]
)
def test_dsa_policy_rejects_bad_ranges(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="DSA"):
        DsaPolicy(**kwargs)
