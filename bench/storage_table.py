"""Label storage of an ImageNet-1K-shaped label set, per codec, built by the real writer.

N = 10,000 samples (IPC 10), K = 1000 classes, E = 300 and E' = 30 stored epochs: the
shape of the field's ImageNet-1K IPC-10 label sets. Labels are synthetic (teacher-like
logits: normal noise with a peak on the hard label, refined with GIFT); sizes do not depend
on the values, since no codec compresses. For each codec and E, the shard plan is the one a
relabel would make; every distinct shard shape in it is written by ``ShardWriter`` (the
bytes a relabel writes, checksums included) and the plan's total is the sum over its shards.

    python bench/storage_table.py [--samples 10000] [--classes 1000] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from softserve.client import refine_labels
from softserve.format.augment import NUM_PARAMS
from softserve.format.codecs import get_codec
from softserve.storage.build import storage_fields
from softserve.storage.manifest import LabelSetConfig
from softserve.storage.writer import ShardWriter

CODECS = ("fp32", "fp16", "int8", "topk:10", "topk:5", "topk:1")
EPOCHS = (300, 30)
#: Published ImageNet-1K IPC-10 label storage of other methods (their figures, in GB).
PUBLISHED = {
    "SRe2L (per-batch soft labels; figure from the label-pruning paper, NeurIPS 2024)": 5.67,
    "LPLD (label pruning, NeurIPS 2024)": 0.14,
    "LPQLD (label pruning and quantization, TPAMI 2026)": 0.03,
}


def shard_bytes(work: Path, epochs: int, n: int, k: int, codec: str, seed: int) -> int:
    """Size of one shard of ``epochs`` epochs written by the real writer."""
    fields = storage_fields(n, k, codec, epochs, epochs)
    rng = np.random.default_rng(seed)
    path = work / f"{codec.replace(':', '-')}-{epochs}.h5"
    writer = ShardWriter(path, 0, epochs, n, k, get_codec(codec), fields["chunk_rows"])
    hard = torch.from_numpy(rng.integers(0, k, n))
    for epoch in range(epochs):
        order = rng.permutation(n)
        writer.write_epoch_plan(epoch, order, rng.integers(0, 64, (n, NUM_PARAMS)))
        logits = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32))
        logits[torch.arange(n), hard[order]] += 8.0
        refined = refine_labels(logits, hard[order]).numpy()
        writer.write_labels(epoch * n, refined, logits.norm(dim=1).numpy())
    writer.commit()
    size = path.stat().st_size
    path.unlink()
    return size


def plan_bytes(work: Path, epochs: int, n: int, k: int, codec: str) -> tuple[int, int, int]:
    """Total label bytes of a relabel's shard plan; and its shard count and epochs each."""
    fields = storage_fields(n, k, codec, epochs, None)
    # the relabel's own shard plan (shard_ranges), for just the two fields it reads
    config = LabelSetConfig.model_construct(epochs=epochs, shard_epochs=fields["shard_epochs"])
    lengths = Counter(stop - start for start, stop in config.shard_ranges())
    total = sum(count * shard_bytes(work, length, n, k, codec, length)
                for length, count in lengths.items())  # fmt: skip
    return total, sum(lengths.values()), int(fields["shard_epochs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    n, k = args.samples, args.classes
    rows = []
    with tempfile.TemporaryDirectory(prefix="storage-table-") as tmp:
        for codec in CODECS:
            for epochs in EPOCHS:
                total, shards, per_shard = plan_bytes(Path(tmp), epochs, n, k, codec)
                rows.append({
                    "codec": codec, "epochs": epochs, "total_bytes": total, "shards": shards,
                    "epochs_per_shard": per_shard, "bytes_per_view": total / (epochs * n),
                })  # fmt: skip
                print(f"{codec:8} E={epochs:3} {total / 1e9:8.3f} GB "
                      f"{rows[-1]['bytes_per_view']:8.1f} B/view ({shards} shards)")  # fmt: skip
    lines = [
        f"N = {n:,}, K = {k}: label shards only (order, view, refined label, norm), as written.",
        "",
        "| codec | E = 300: total | bytes per view | E' = 30: total | bytes per view |",
        "| --- | --- | --- | --- | --- |",
    ]
    for codec in CODECS:
        cells = []
        for epochs in EPOCHS:
            row = next(r for r in rows if r["codec"] == codec and r["epochs"] == epochs)
            cells += [f"{row['total_bytes'] / 1e9:.3f} GB", f"{row['bytes_per_view']:.1f}"]
        lines.append(f"| `{codec}` | " + " | ".join(cells) + " |")
    lines += ["", "Published, ImageNet-1K IPC 10 (their figures):", ""]
    lines += [f"- {name}: {gb} GB" for name, gb in PUBLISHED.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "storage_table.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "storage_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
