"""The numbers of a label-set report, in one pass over the stored epochs.

Every statistic is over views (epoch, sample), from the teacher's distribution
p = softmax(t) of its logits t (float32 per view, float64 sums):

- agreement: argmax t equals the hard label, per class and per stored epoch;
- entropy of p (nats), a histogram per class on [0, ln K];
- refinement cosine cos(t, r) between the logits and GIFT's refined label
  r = t/‖t‖ + β·s/‖s‖; it lies in [√(1-β²), 1] for β < 1 (the minimum is where
  t̂·ŝ = -β), which is the histogram's range;
- hardest samples: lowest p[hard] averaged over epochs (ties to the lower id);
- storage: bytes per label and per stored view for each codec, at this K, N and E;
- top-k sets: the mass of p on the k stored classes. The other classes are served at
  the mean of the rest, so by Jensen's inequality this is an upper bound on the mass
  the teacher's own distribution put there.

Sampling (the classes and samples of the view grid) is seeded: a report is a function of
the label set and its options only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from softserve.errors import StoreError
from softserve.format.codecs import CODECS, get_codec
from softserve.format.payload import ViewKind
from softserve.report.source import EpochRows, LabelSource, SetInfo
from softserve.storage.manifest import FORMAT_VERSION
from softserve.storage.shards import bytes_per_row


@dataclass(frozen=True)
class ReportOptions:
    """How much a report shows, and the seed of what it samples."""

    grid_classes: int = 8
    grid_epochs: int = 4
    hardest: int = 12
    bins: int = 40
    seed: int = 0


@dataclass
class ReportData:
    """A report's numbers (JSON-ready) and the pixels its figures show."""

    numbers: dict
    grid_images: np.ndarray = field(repr=False)  # float32 (cells, C, H, W) in [0, 1]
    hardest_images: np.ndarray = field(repr=False)  # uint8 (n, C, H, W)


@dataclass(frozen=True)
class ViewStats:
    """Per-view statistics of one epoch's rows."""

    probs: np.ndarray  # float32 (N, K)
    top: np.ndarray  # int64 (N,): the teacher's class
    entropy: np.ndarray  # float64 (N,)
    p_hard: np.ndarray  # float64 (N,)
    cosine: np.ndarray  # float64 (N,): cos(logits, refined)


def view_stats(logits: np.ndarray, refined: np.ndarray, hard: np.ndarray) -> ViewStats:
    """Softmax, top class, entropy, hard-label probability and refinement cosine per row.

    Float32 with row dot products by einsum: a quarter of float64's time, which a
    10,000 × 300 set feels (the sums over views are float64).
    """
    t = np.asarray(logits, dtype=np.float32)
    r = np.asarray(refined, dtype=np.float32)
    z = t - t.max(axis=1, keepdims=True)
    e = np.exp(z)
    total = e.sum(axis=1, keepdims=True)
    probs = e / total
    entropy = -np.einsum("ij,ij->i", probs, z - np.log(total))
    dots = np.einsum("ij,ij->i", t, r)
    cosine = dots / np.sqrt(np.einsum("ij,ij->i", t, t) * np.einsum("ij,ij->i", r, r))
    p_hard = probs[np.arange(len(hard)), hard]
    return ViewStats(
        probs, t.argmax(axis=1), entropy.astype(np.float64), p_hard.astype(np.float64),
        cosine.astype(np.float64),
    )  # fmt: skip


def cosine_range(beta: float) -> tuple[float, float]:
    """Where cos(t, r) can lie for GIFT's β (see the module docstring)."""
    return (math.sqrt(1 - beta * beta), 1.0) if beta < 1 else (-1.0, 1.0)


def _bin(values: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    """Bin index of each value on [lo, hi] in ``bins`` equal bins; outliers to the end bins."""
    scaled = np.floor((values - lo) / (hi - lo) * bins)
    return np.clip(scaled, 0, bins - 1).astype(np.int64)


def grid_cells(
    hard: np.ndarray, epochs: int, opts: ReportOptions
) -> tuple[list[int], list[int], list[int]]:
    """The view grid's classes, one sample of each, and its epochs: seeded, sorted."""
    rng = np.random.default_rng(opts.seed)
    present = np.unique(hard)
    classes = present if len(present) <= opts.grid_classes else np.sort(
        rng.choice(present, opts.grid_classes, replace=False)
    )  # fmt: skip
    samples = [int(rng.choice(np.flatnonzero(hard == c))) for c in classes]
    count = min(opts.grid_epochs, epochs)
    grid_epochs = np.unique(np.linspace(0, epochs - 1, count).round().astype(int))
    return [int(c) for c in classes], samples, [int(e) for e in grid_epochs]


def storage_table(
    num_samples: int, num_classes: int, epochs: int, own: str, views: ViewKind = "rrc"
) -> list[dict]:
    """Bytes per label, per stored view (order, view and norm included) and in all, for the
    fixed codecs, a few top-k codecs, and the set's own codec, with this set's views."""
    names = [*CODECS, *(f"topk:{k}" for k in (1, 5, 10, 50) if k < num_classes)]
    if own not in names:
        names.append(own)
    table = []
    for name in names:
        codec = get_codec(name)
        per_view = bytes_per_row(FORMAT_VERSION, num_classes, codec, views=views)
        table.append({
            "codec": name,
            "bytes_per_label": codec.bytes_per_label(num_classes),
            "bytes_per_view": per_view,
            "total_bytes": per_view * num_samples * epochs,
        })  # fmt: skip
    return table


def _check_set(info: SetInfo, hard: np.ndarray) -> None:
    """Refuse, in one line, a set whose class names or hard labels do not fit its class
    count: every figure and table is indexed by them."""
    k = info.num_classes
    if len(info.class_names) != k:
        raise StoreError(f"label set {info.name} names {len(info.class_names)} classes but has {k}")
    if hard.shape != (info.num_samples,):
        raise StoreError(
            f"label set {info.name} has hard labels of shape {hard.shape}, "
            f"not ({info.num_samples},)"
        )
    outside = (hard < 0) | (hard >= k)
    if outside.any():
        sample = int(np.flatnonzero(outside)[0])
        raise StoreError(
            f"label set {info.name} has hard label {int(hard[sample])} at sample {sample}, "
            f"outside [0, {k})"
        )


class _Accumulator:
    """Running sums over epochs of everything the report shows."""

    def __init__(self, source: LabelSource, opts: ReportOptions) -> None:
        info = source.info
        self.info, self.opts = info, opts
        self.hard = source.hard_labels().astype(np.int64)
        _check_set(info, self.hard)
        n, k, b = info.num_samples, info.num_classes, opts.bins
        self.views_per_class = np.zeros(k, np.int64)
        self.agree_per_class = np.zeros(k, np.int64)
        self.agree_per_epoch: list[float] = []
        self.entropy_counts = np.zeros((k, b), np.int64)
        self.entropy_sum = np.zeros(k)
        self.cosine_lo, self.cosine_hi = cosine_range(info.beta)
        self.cosine_counts = np.zeros(b, np.int64)
        self.cosine_sum = np.zeros(k)
        self.cosine_min = np.full(k, np.inf)
        self.p_hard_sum = np.zeros(n)
        self.top_votes = np.zeros(n * k, np.int64)
        self.kept_counts = np.zeros(b, np.int64)
        self.kept_sum = np.zeros(k)
        self.classes, self.samples, self.grid_epochs = grid_cells(self.hard, info.epochs, opts)
        self.cells: list[dict] = []
        self.cell_rows: list[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]] = []

    def add(self, epoch: int, rows: EpochRows) -> None:
        k, b = self.info.num_classes, self.opts.bins
        for what, values in (("labels", rows.soft), ("logits", rows.logits)):
            if not np.isfinite(values).all():
                raise StoreError(
                    f"label set {self.info.name} has non-finite {what} in stored epoch "
                    f"{epoch}; run 'softserve verify' on it and relabel"
                )
        hard = self.hard[rows.order]
        stats = view_stats(rows.logits, rows.soft, hard)
        agree = stats.top == hard
        self.views_per_class += np.bincount(hard, minlength=k)
        self.agree_per_class += np.bincount(hard[agree], minlength=k)
        self.agree_per_epoch.append(float(agree.mean()))
        entropy_bin = _bin(stats.entropy, 0.0, math.log(k), b)
        self.entropy_counts += np.bincount(hard * b + entropy_bin, minlength=k * b).reshape(k, b)
        self.entropy_sum += np.bincount(hard, weights=stats.entropy, minlength=k)
        cosine_bin = _bin(stats.cosine, self.cosine_lo, self.cosine_hi, b)
        self.cosine_counts += np.bincount(cosine_bin, minlength=b)
        self.cosine_sum += np.bincount(hard, weights=stats.cosine, minlength=k)
        np.minimum.at(self.cosine_min, hard, stats.cosine)
        self.p_hard_sum[rows.order] += stats.p_hard
        self.top_votes += np.bincount(rows.order * k + stats.top, minlength=len(self.top_votes))
        if rows.kept is not None:
            kept = np.take_along_axis(stats.probs, rows.kept, axis=1).sum(axis=1)
            self.kept_counts += np.bincount(_bin(kept, 0.0, 1.0, b), minlength=b)
            self.kept_sum += np.bincount(hard, weights=kept, minlength=k)
        if epoch in self.grid_epochs:
            self._add_cells(epoch, rows, stats)

    def _add_cells(self, epoch: int, rows: EpochRows, stats: ViewStats) -> None:
        position = np.empty_like(rows.order)
        position[rows.order] = np.arange(len(rows.order))
        for cls, sample in zip(self.classes, self.samples, strict=True):
            row = int(position[sample])
            probs = stats.probs[row]
            top3 = np.argsort(-probs, kind="stable")[:3]
            self.cells.append({
                "class": cls, "epoch": epoch, "sample": sample, "row": row,
                "params": rows.params[row].tolist(),
                "top3": [[int(c), float(probs[c])] for c in top3],
                "hard_prob": float(probs[cls]),
            })  # fmt: skip
            if rows.mix is not None:
                self.cells[-1]["mix"] = {"partner": int(rows.mix[row, 0]),
                                         "lambda": float(rows.mix[row, 1])}  # fmt: skip
            self.cell_rows.append((
                rows.params[row],
                None if rows.mix is None else rows.mix[row],
                None if rows.partner_params is None else rows.partner_params[row],
            ))  # fmt: skip

    def numbers(self) -> dict:
        info, opts = self.info, self.opts
        k, epochs = info.num_classes, info.epochs
        views = np.maximum(self.views_per_class, 1)
        mean_p_hard = self.p_hard_sum / epochs
        hardest = np.argsort(mean_p_hard, kind="stable")[: opts.hardest]
        votes = self.top_votes.reshape(-1, k)
        out = {
            "label_set": {key: (list(v) if isinstance(v, tuple) else v)
                          for key, v in asdict(info).items()},  # fmt: skip
            "options": asdict(opts),
            "views": int(self.views_per_class.sum()),
            "agreement": {
                "overall": float(self.agree_per_class.sum() / max(1, self.views_per_class.sum())),
                "per_class": (self.agree_per_class / views).tolist(),
                "per_epoch": self.agree_per_epoch,
            },
            "entropy": {
                "max": math.log(k),
                "edges": np.linspace(0.0, math.log(k), opts.bins + 1).tolist(),
                "counts": self.entropy_counts.tolist(),
                "mean_per_class": (self.entropy_sum / views).tolist(),
            },
            "refinement_cosine": {
                "edges": np.linspace(self.cosine_lo, self.cosine_hi, opts.bins + 1).tolist(),
                "counts": self.cosine_counts.tolist(),
                "mean_per_class": (self.cosine_sum / views).tolist(),
                "min_per_class": np.where(np.isinf(self.cosine_min), 1.0, self.cosine_min).tolist(),
            },
            "hardest": [
                {"sample": int(i), "hard": int(self.hard[i]),
                 "mean_hard_prob": float(mean_p_hard[i]), "teacher_class": int(votes[i].argmax()),
                 "teacher_class_share": float(votes[i].max() / epochs)}
                for i in hardest
            ],  # fmt: skip
            "storage": {
                "codec": info.codec,
                "label_bytes": info.label_bytes,
                "bytes_per_view": info.label_bytes / (info.num_samples * epochs),
                "codecs": storage_table(
                    info.num_samples, k, epochs, info.codec, info.views  # type: ignore[arg-type]
                ),
            },
            "grid": {"classes": self.classes, "samples": self.samples,
                     "epochs": self.grid_epochs, "cells": self.cells},  # fmt: skip
            "topk_mass": None,
        }
        if self.kept_counts.any():
            out["topk_mass"] = {
                "edges": np.linspace(0.0, 1.0, opts.bins + 1).tolist(),
                "counts": self.kept_counts.tolist(),
                "mean": float(self.kept_sum.sum() / max(1, self.views_per_class.sum())),
                "mean_per_class": (self.kept_sum / views).tolist(),
            }
        return out


def compute_report(
    source: LabelSource, opts: ReportOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> ReportData:  # fmt: skip
    """Read every stored epoch of ``source`` once and compute the report's numbers;
    ``progress`` is called after each epoch."""
    from softserve.pixels import stored_views

    opts = opts or ReportOptions()
    acc = _Accumulator(source, opts)
    for epoch in range(source.info.epochs):
        acc.add(epoch, source.epoch(epoch))
        if progress is not None:
            progress(epoch)
    numbers = acc.numbers()
    ids = np.array([c["sample"] for c in acc.cells], dtype=np.int64)
    grid = np.zeros((0, *source.info.image_shape[:1], *source.info.output_size), np.float32)
    if len(ids):
        columns = zip(*acc.cell_rows, strict=True)
        params, mix, partner = (None if c[0] is None else np.stack(c) for c in columns)
        grid = stored_views(
            source.info.mix,  # type: ignore[arg-type]
            source.images, ids, params, source.info.output_size, mix, partner,
            source.info.interpolation, views=source.info.views,  # type: ignore[arg-type]
            mean=source.info.mean, std=source.info.std,
        ).numpy()
    hardest_ids = np.array([h["sample"] for h in numbers["hardest"]], dtype=np.int64)
    return ReportData(numbers, grid, source.images(hardest_ids))
