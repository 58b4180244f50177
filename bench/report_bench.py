"""Time of ``softserve report`` and ``softserve verify`` on a large label set, against
reading its labels once.

A synthetic label set of N samples × E epochs × K classes (default 10,000 × 300 × 100,
codec topk:10) is written by the real writer: teacher-like logits (normal noise with a peak
on the hard label for most views), refined with GIFT, views drawn by ``sample_views``. The
baseline is one pass that reads and decodes every stored epoch (what any consumer of the
set pays); the report is that pass plus its statistics, then its figures and page. The
ratio is the claim; seconds depend on the machine. Decoding is memory-bound work on ~1M
values per epoch: one torch thread (the default here) beats two on a shared 2-core machine.

    python bench/report_bench.py [--samples 10000] [--epochs 300] [--classes 100]
        [--codec topk:10] [--threads 1] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import softserve
from softserve.client import refine_labels
from softserve.format.augment import ViewPolicy, sample_views
from softserve.format.codecs import get_codec
from softserve.format.sampling import epoch_order
from softserve.report import ReportOptions, StoreSource, compute_report
from softserve.report.page import write_report
from softserve.storage.build import finalize, storage_fields
from softserve.storage.layout import DATASET_FILE, shard_file
from softserve.storage.manifest import (
    LabelSetConfig,
    ProducerInfo,
    RefinementInfo,
    TeacherInfo,
    ViewInfo,
)
from softserve.storage.verify import verify_label_set
from softserve.storage.writer import ShardWriter, write_dataset


def write_synthetic_set(out: Path, n: int, k: int, epochs: int, codec: str, seed: int = 0):
    """A complete label set of synthetic teacher-like labels, written by the real writer."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    images = rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)
    hard = np.arange(n) % k
    names = [f"class{c}" for c in range(k)]
    write_dataset(out / DATASET_FILE, images, hard, names, (0.5,), (0.25,))
    policy = ViewPolicy()
    config = LabelSetConfig(
        num_samples=n, num_classes=k, class_names=names, image_shape=(1, 28, 28),
        dataset_sha256="0" * 64, mean=(0.5,), std=(0.25,),
        teacher=TeacherInfo(spec="synthetic"),
        views=ViewInfo(scale=policy.scale, ratio=policy.ratio, flip=policy.flip,
                       output_size=(28, 28)),
        refinement=RefinementInfo(alpha=0.1, beta=0.1), seed=seed, precision="fp32",
        **storage_fields(n, k, codec, epochs, None),
    )  # fmt: skip
    hard_t = torch.from_numpy(hard)
    for index, (start, stop) in enumerate(config.shard_ranges()):
        writer = ShardWriter(
            out / shard_file(index), start, stop, n, k, get_codec(codec), config.chunk_rows
        )
        for epoch in range(start, stop):
            order = epoch_order(seed, epoch, n)
            views = sample_views(policy, seed, epoch, n, 28, 28)[order]
            writer.write_epoch_plan(epoch, order, views)
            logits = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32))
            confident = torch.from_numpy(rng.random(n) < 0.8)
            logits[torch.arange(n), hard_t[order]] += 4.0 * confident
            refined = refine_labels(logits, hard_t[order]).numpy()
            writer.write_labels((epoch - start) * n, refined, logits.norm(dim=1).numpy())
        writer.commit()
    producer = ProducerInfo(
        softserve_version=softserve.__version__, torch_version=torch.__version__,
        device="cpu", batch_size=n,
    )  # fmt: skip
    finalize(out, config, producer)


def time_report(root: Path, page: Path) -> dict[str, float]:
    """Seconds of one pass that reads and decodes every stored epoch of the set at ``root``
    (the baseline), of ``softserve verify`` (every file's sha256, structure and content), and
    of the report: its numbers, then its figures and page (written to ``page``)."""
    source = StoreSource(root)
    try:
        started = time.perf_counter()
        for epoch in range(source.info.epochs):
            source.epoch(epoch)
        read = time.perf_counter() - started
        started = time.perf_counter()
        data = compute_report(source, ReportOptions())
        numbers = time.perf_counter() - started
        started = time.perf_counter()
        write_report(data, page)
        figures = time.perf_counter() - started
    finally:
        source.close()
    started = time.perf_counter()
    problems = verify_label_set(root)
    verify = time.perf_counter() - started
    if problems:
        raise RuntimeError(f"verify found problems in a set the writer built: {problems[:3]}")
    return {
        "read_seconds": read, "numbers_seconds": numbers, "figures_and_page_seconds": figures,
        "report_seconds": numbers + figures, "report_over_read": (numbers + figures) / read,
        "verify_seconds": verify, "verify_over_read": verify / read,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--codec", default="topk:10")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (decoding)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="report-bench-") as tmp:
        root = Path(tmp) / "set"
        write_synthetic_set(root, args.samples, args.classes, args.epochs, args.codec)
        times = time_report(root, Path(tmp) / "report")
    result = {
        "samples": args.samples, "epochs": args.epochs, "classes": args.classes,
        "codec": args.codec, "torch_threads": args.threads,
        **{k: round(v, 2) for k, v in times.items()},
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
