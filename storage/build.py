"""Building a label set on disk: output folder checks, format checks, shard planning,
finalize, write errors.

The rules here are the ones every writer of a label set shares (a relabel, an import, a
transcode): which folder may receive a set and when it is a resume, how the labels are
stored (codec, shard and chunk sizes), each shard's orders and views, the manifest written
last, and how a failed write is reported. Nothing here runs a teacher, so nothing here needs
torch.
"""

from __future__ import annotations

import errno
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from softserve.errors import InputError, StoreError, brief
from softserve.format.augment import MixPolicy, ViewKind, sample_epoch_views, sample_mix
from softserve.format.codecs import get_codec
from softserve.format.sampling import epoch_order
from softserve.storage.layout import DATASET_FILE, MANIFEST_FILE, PLAN_FILE, shard_file
from softserve.storage.manifest import (
    FORMAT_VERSION,
    LabelSetConfig,
    Manifest,
    PlanProducer,
    ProducerInfo,
    read_manifest,
    read_plan,
    write_model,
)
from softserve.storage.shards import stored_version
from softserve.storage.writer import bytes_per_epoch, chunk_rows_for, file_info, shard_info

__all__ = [
    "check_format",
    "check_folder_path",
    "check_out_dir",
    "default_shard_epochs",
    "epoch_views",
    "describe_write_error",
    "finalize",
    "low_space_warning",
    "shard_plan",
    "storage_fields",
    "write_error",
]

_SHARD_MIN_BYTES = 4 << 20
_SHARD_MAX_BYTES = 256 << 20
_MIN_SHARDS = 16


# --------------------------------------------------------------------------- storage layout


def default_shard_epochs(epochs: int, bytes_per_epoch: int) -> int:
    """Epochs per shard: up to 16 shards (for parallel ranks and resume granularity), fewer
    when they would be under 4 MiB, more when they would be over 256 MiB."""
    per_epoch = max(1, bytes_per_epoch)
    by_count = -(-epochs // _MIN_SHARDS)
    smallest = -(-_SHARD_MIN_BYTES // per_epoch)
    largest = max(1, _SHARD_MAX_BYTES // per_epoch)
    return max(1, min(epochs, largest, max(by_count, smallest)))


def storage_fields(
    num_samples: int, num_classes: int, codec_name: str, epochs: int, shard_epochs: int | None,
    mixed: bool = False, views: ViewKind = "rrc",
) -> dict[str, object]:  # fmt: skip
    """The config fields that fix how labels are stored: codec, epochs, shard and chunk sizes
    (the shard size by default from the bytes an epoch takes)."""
    codec = get_codec(codec_name)
    codec.check(num_classes)
    epoch_bytes = bytes_per_epoch(num_samples, num_classes, codec, mixed, views)
    return {
        "epochs": epochs,
        "codec": codec_name,
        "shard_epochs": shard_epochs or default_shard_epochs(epochs, epoch_bytes),
        "chunk_rows": chunk_rows_for(num_samples, codec.bytes_per_label(num_classes)),
    }


def shard_plan(
    config: LabelSetConfig, start: int, stop: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Orders (E_s, N) for a range of epochs, and in that order their view ``params``
    (E_s, N, 5), or DSA rows (E_s, N, 14), and, for mixed sets, ``mix`` (E_s, N, 6) and
    ``partner_params`` (like ``params``).

    What a shard of epochs ``start``..``stop`` stores besides its labels; a function of the
    config alone, so every writer (and a resume) draws the same rows."""
    n = config.num_samples
    orders, plans = [], []
    for epoch in range(start, stop):
        order = epoch_order(config.seed, epoch, n)
        orders.append(order)
        views = epoch_views(config, epoch)
        plan = {"params": views[order]}
        if config.mix is not None:
            mix = sample_mix(MixPolicy(**config.mix.model_dump()), config.seed, epoch, n,
                             *config.views.output_size)  # fmt: skip
            plan["mix"] = mix[order]
            plan["partner_params"] = views[mix[order, 0].astype(np.int64)]
        plans.append(plan)
    return np.stack(orders), {k: np.stack([p[k] for p in plans]) for k in plans[0]}


def epoch_views(config: LabelSetConfig, epoch: int) -> np.ndarray:
    """The view rows of every sample of one epoch, by sample id, as the set's policy draws
    them: crop boxes in base pixels, or DSA rows in output pixels."""
    return sample_epoch_views(
        config.views.view_policy(), config.seed, epoch, config.num_samples,
        config.image_shape[1:], config.views.output_size,
    )  # fmt: skip


# --------------------------------------------------------------------------- the output folder


def check_folder_path(out: Path) -> None:
    """Refuse an --out that is a file, or lies under one, before anything is written."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                where = "is" if path == out else f"lies under {path}, which is"
                raise StoreError(f"--out {out} {where} a file; choose a folder")
            return


def check_out_dir(
    out: Path, config: LabelSetConfig, producer: PlanProducer | None = None
) -> Manifest | None:
    """The existing manifest if ``out`` already holds this label set; raise if another, or
    if the relabel that started it ran with another batch size or device (a resume must
    write the bytes an uninterrupted run would)."""
    check_folder_path(out)
    if (out / MANIFEST_FILE).exists():
        existing = read_manifest(out)
        if existing.config == config:
            return existing
        found = existing.config
    else:
        plan = read_plan(out)
        if plan is None:
            if out.exists() and (not out.is_dir() or any(out.iterdir())):
                raise StoreError(f"--out {out} exists and is not a label set; choose a new path")
            return None
        found = plan.config
        if found == config:
            started = plan.producer
            if started is None or producer is None or started == producer:
                return None
            raise StoreError(
                f"--out {out} was started with --batch-size {started.batch_size} on "
                f"{started.device}; resume it with the same (the labels' bytes depend on "
                "them), or relabel into a new folder"
            )
    changed = ", ".join(config.differences(found))
    raise StoreError(
        f"--out {out} holds a different label set (differs in: {changed}); "
        "choose a new --out or delete the old one"
    )


def check_format(out: Path, done: set[int]) -> None:
    """Refuse to resume a build whose complete shards an older format wrote (a set must be
    one format throughout)."""
    for index in sorted(done):
        path = out / shard_file(index)
        version = stored_version(path)
        if version != FORMAT_VERSION:
            raise InputError(
                f"{path} was written in label-set format {version}, this softserve writes "
                f"{FORMAT_VERSION}; finish the relabel with the softserve that started it, or "
                "relabel into a new folder"
            )


def low_space_warning(out: Path, config: LabelSetConfig, pending: int) -> str | None:
    """A warning when ``pending`` shards of ``config`` need more than is free under ``out``
    (a warning only: a full disk stops the build cleanly, and it resumes); else None."""
    codec = get_codec(config.codec)
    epoch = bytes_per_epoch(config.num_samples, config.num_classes, codec,
                            config.mix is not None, config.views.policy)  # fmt: skip
    need = pending * config.shard_epochs * epoch
    free = shutil.disk_usage(out).free
    if need <= free:
        return None
    return (
        f"warning: about {need / 2**20:.0f} MiB of labels to write and {free / 2**20:.0f} MiB "
        f"free under {out}; the run stops cleanly when the disk fills and can be resumed"
    )


# --------------------------------------------------------------------------- finish, fail


def finalize(out: Path, config: LabelSetConfig, producer: ProducerInfo) -> Manifest:
    """Write the manifest of a set whose shards are all complete, and drop the plan: the
    manifest is written last, so a set with one is complete."""
    shards = []
    for index, (start, stop) in enumerate(config.shard_ranges()):
        path = out / shard_file(index)
        if not path.exists():
            raise StoreError(f"{path} is missing after all ranks finished; rerun the same command")
        shards.append(shard_info(path, start, stop))
    manifest = Manifest(
        name=out.name,
        created=datetime.now(timezone.utc),
        config=config,
        dataset=file_info(out / DATASET_FILE),
        shards=shards,
        producer=producer,
    )
    write_model(out / MANIFEST_FILE, manifest)
    (out / PLAN_FILE).unlink(missing_ok=True)
    return manifest


def describe_write_error(exc: OSError, out: Path) -> str:
    """What failed when writing into ``out``, in a few words (a full disk named as such)."""
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or "No space left" in str(exc)
    reason = "the disk is full" if full else brief(exc)
    return f"writing labels into {out} failed: {reason}"


def write_error(exc: OSError, out: Path) -> StoreError:
    """A failed write into ``out`` as one line: what failed, and that a rerun resumes
    (complete shards are kept, a partial one is dropped)."""
    return StoreError(
        describe_write_error(exc, out)
        + "; free space (or fix the path) and rerun the same command to resume"
    )
