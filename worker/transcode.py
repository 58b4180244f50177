"""Transcode: a new label set from an existing one's stored labels, without the teacher.

The new set keeps the source's dataset, orders, views, refinement and norms, and stores its
labels in another codec and/or only its first E' epochs. Each epoch's labels are decoded
from the source (float32) and encoded again; from an fp32 source that gives exactly the
bytes a relabel with the new codec writes. Resumable like a relabel: the plan is written
first, complete shards are skipped on a rerun, the manifest is written last.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from softserve.errors import InputError
from softserve.format.codecs import get_codec
from softserve.format.labels import NORM, SOFT
from softserve.storage.build import (
    check_format,
    check_out_dir,
    finalize,
    storage_fields,
    write_error,
)
from softserve.storage.layout import DATASET_FILE, PLAN_FILE, commit, shard_file, tmp_path
from softserve.storage.manifest import LabelSetConfig, Manifest, RelabelPlan, write_model
from softserve.storage.reader import LabelSetReader
from softserve.storage.shards import MIX_DATASETS
from softserve.storage.writer import ShardWriter


@dataclass
class TranscodeOptions:
    """Everything ``softserve transcode`` takes."""

    source: Path
    out: Path
    codec: str | None = None
    epochs: int | None = None
    shard_epochs: int | None = None
    progress: bool = True


def transcode(opts: TranscodeOptions) -> Manifest:
    """Write (or finish) ``opts.out`` from ``opts.source``; returns its manifest."""
    with LabelSetReader(opts.source) as reader:
        target = _target_config(reader.config, opts)
        existing = check_out_dir(opts.out, target)
        if existing is not None:
            return existing
        try:
            return _write(reader, target, opts)
        except OSError as exc:
            raise write_error(exc, opts.out) from None


def _target_config(config: LabelSetConfig, opts: TranscodeOptions) -> LabelSetConfig:
    """The source's config with the new codec, epochs and shard size, checked."""
    epochs = config.epochs if opts.epochs is None else opts.epochs
    if not 0 < epochs <= config.epochs:
        raise InputError(
            f"--epochs {epochs}: the source stores {config.epochs} epochs; keep 1 to "
            f"{config.epochs} of them"
        )
    if opts.shard_epochs is not None and opts.shard_epochs <= 0:
        raise InputError(f"--shard-epochs must be positive, got {opts.shard_epochs}")
    fields = storage_fields(
        config.num_samples, config.num_classes, opts.codec or config.codec, epochs,
        opts.shard_epochs, config.mix is not None, config.views.policy,
    )  # fmt: skip
    # validated, unlike model_copy: a bad field fails here, not when the set is opened
    return type(config).model_validate({**config.model_dump(), **fields})


def _write(reader: LabelSetReader, target: LabelSetConfig, opts: TranscodeOptions) -> Manifest:
    """The plan, the dataset, every shard not yet complete, then the manifest."""
    ranges = target.shard_ranges()
    done = {i for i in range(len(ranges)) if (opts.out / shard_file(i)).exists()}
    check_format(opts.out, done)
    opts.out.mkdir(parents=True, exist_ok=True)
    write_model(opts.out / PLAN_FILE, RelabelPlan(config=target))
    if not (opts.out / DATASET_FILE).exists():
        copy = tmp_path(opts.out / DATASET_FILE)
        try:
            shutil.copyfile(opts.source / DATASET_FILE, copy)
        except BaseException:
            copy.unlink(missing_ok=True)
            raise
        commit(copy, opts.out / DATASET_FILE)
    n = target.num_samples
    pending = [i for i in range(len(ranges)) if i not in done]
    bar = tqdm(
        total=sum(ranges[i][1] - ranges[i][0] for i in pending) * n, unit="label",
        unit_scale=True, desc=f"transcode {opts.out.name}", disable=not opts.progress,
        dynamic_ncols=True,
    )  # fmt: skip
    with bar:
        for index in pending:
            _write_shard(reader, target, opts.out, index, bar.update)
    return finalize(opts.out, target, reader.manifest.producer)


def _write_shard(
    reader: LabelSetReader, target: LabelSetConfig, out: Path, index: int,
    advance: Callable[[int], object],
) -> None:  # fmt: skip
    """Shard ``index`` of ``target``: the source's rows of its epochs, labels re-encoded."""
    start, stop = target.shard_ranges()[index]
    n, mixed = target.num_samples, target.mix is not None
    mix_fields = MIX_DATASETS if mixed else ()
    tmp_path(out / shard_file(index)).unlink(missing_ok=True)
    shard = ShardWriter(
        out / shard_file(index), start, stop, n, target.num_classes, get_codec(target.codec),
        target.chunk_rows, mixed, target.views.policy,
    )  # fmt: skip
    for epoch in range(start, stop):
        rows = reader.read(epoch, 0, n, ("order", "params", SOFT, NORM, *mix_fields))
        mix = {k: rows[k] for k in mix_fields}
        shard.write_epoch_plan(epoch, rows["order"], rows["params"], mix)
        shard.write_labels((epoch - start) * n, rows[SOFT], rows[NORM])
        advance(n)
    shard.commit()
