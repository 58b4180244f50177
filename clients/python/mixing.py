"""CutMix and Mixup per (epoch, sample): seeded parameters and one function that mixes.

Every sample of every epoch gets its own mix, drawn from the label set's seed: a partner
sample from the whole set, λ ~ Beta(α, α), and for CutMix a box in output pixels. The
partner is seen through its own view of that epoch. Nothing depends on the batch, so a
label never depends on the batch size or the world size (SRe2L mixes within a batch, which
pins the batch its labels were made with). The worker labels the output of
:func:`mixed_views`; the client builds the student's input with the same function, from the
stored mix rows, so teacher and student see the same pixels.

A mix row (float32, :data:`MIX_FIELDS`) is (partner id, λ, box top, left, height, width);
a sample left unmixed (probability 1 − prob) has itself as partner, λ = 1 and an empty
box, which both kinds leave exactly as it was. For CutMix λ is the area left to the sample,
as CutMix's label mixing uses it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from softserve.client.payload import MIX_FIELDS as MIX_FIELDS
from softserve.client.payload import NUM_MIX as NUM_MIX
from softserve.client.views import _rng, apply_views

MixKind = Literal["cutmix", "mixup"]
MIX_KINDS: tuple[str, ...] = ("cutmix", "mixup")
_MIX_STREAM = 2
#: Partner ids travel in float32 mix rows: exact up to 2**24.
_MAX_SAMPLES = 1 << 24


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
    rng = _rng(seed, epoch, _MIX_STREAM)
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
    box = mix[:, 2:6].to(torch.long)
    rows = torch.arange(h, device=views.device)
    cols = torch.arange(w, device=views.device)
    in_rows = (rows >= box[:, 0:1]) & (rows < box[:, 0:1] + box[:, 2:3])
    in_cols = (cols >= box[:, 1:2]) & (cols < box[:, 1:2] + box[:, 3:4])
    inside = in_rows[:, None, :, None] & in_cols[:, None, None, :]
    return torch.where(inside, partner_views, views)


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
) -> torch.Tensor:
    """The teacher's (and the student's) input: the views, mixed with their partners' views
    when ``kind`` is set. What the worker labels and the client trains on."""
    views = apply_views(images, params, size, mean=mean, std=std)
    if kind is None:
        return views
    if partner_images is None or partner_params is None or mix is None:
        raise ValueError("a mixed set needs partner_images, partner_params and mix")
    partner = apply_views(partner_images, partner_params, size, mean=mean, std=std)
    return apply_mix(kind, views, partner, mix)


def stored_views(
    kind: MixKind | None, images_of: Callable[[np.ndarray], np.ndarray], ids: np.ndarray,
    params: np.ndarray, size: int | Sequence[int], mix: np.ndarray | None = None,
    partner_params: np.ndarray | None = None,
) -> torch.Tensor:  # fmt: skip
    """Stored rows as pictures: samples ``ids`` through their view ``params``, mixed by their
    stored ``mix`` rows with their partners' views, unnormalized in [0, 1]. ``images_of``
    gives the base images (uint8) of sample ids."""

    def tensor(a: np.ndarray | None, dtype: type = np.int64) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=dtype))

    partners = None if mix is None else torch.from_numpy(images_of(mix[:, 0].astype(np.int64)))
    return mixed_views(
        kind, torch.from_numpy(images_of(np.asarray(ids, dtype=np.int64))), tensor(params),
        size, partner_images=partners, partner_params=tensor(partner_params),
        mix=tensor(mix, np.float32),
    )  # fmt: skip
