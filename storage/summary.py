"""A human summary of a label set directory, complete or not."""

from __future__ import annotations

from pathlib import Path

from softserve.format.codecs import get_codec
from softserve.storage.layout import MANIFEST_FILE, shard_file
from softserve.storage.manifest import (
    RESUME_HINT,
    DsaViewInfo,
    LabelSetConfig,
    ViewInfo,
    read_manifest,
    read_plan,
)


def _mib(size: int) -> str:
    return f"{size / 2**20:.2f} MiB"


def _views(views: ViewInfo | DsaViewInfo) -> str:
    """The view policy in a line: crop + flip and its ranges, or DSA and its."""
    if isinstance(views, DsaViewInfo):
        d = views.dsa
        return (
            f"dsa {d.strategy}, per sample: flip {d.flip}, brightness {d.brightness}, "
            f"saturation {d.saturation}, contrast {d.contrast}, then one of crop {d.crop} / "
            f"scale {d.scale} / rotate {d.rotate}°, cutout {d.cutout}; {views.interpolation}"
        )
    return (
        f"rrc: crop scale {views.scale}, ratio ({views.ratio[0]:.3g}, {views.ratio[1]:.3g}), "
        f"flip {'on' if views.flip else 'off'}, {views.interpolation}"
    )


def _config_rows(config: LabelSetConfig) -> list[tuple[str, str]]:
    codec = get_codec(config.codec)
    c, h, w = config.image_shape
    teacher = config.teacher
    return [
        ("samples", str(config.num_samples)),
        (
            "classes",
            f"{config.num_classes} ({', '.join(config.class_names[:5])}"
            + (", …)" if config.num_classes > 5 else ")"),
        ),
        (
            "images",
            f"{c}×{h}×{w} uint8, views {config.views.output_size[0]}×{config.views.output_size[1]}",
        ),
        ("views", _views(config.views)),
        (
            "mix",
            "none"
            if config.mix is None
            else (
                f"{config.mix.kind}, probability {config.mix.prob}, "
                f"λ ~ Beta({config.mix.alpha}, {config.mix.alpha}), per sample"
            ),
        ),
        ("normalization", f"mean {config.mean}, std {config.std}"),
        ("teacher", teacher.spec + (f" + {teacher.weights}" if teacher.weights else "")),
        ("weights sha256", teacher.weights_sha256 or "-"),
        ("epochs", f"{config.epochs} (seed {config.seed}), {config.shard_epochs} per shard"),
        ("refinement", f"GIFT α={config.refinement.alpha} β={config.refinement.beta}"),
        (
            "codec",
            f"{codec.name}: {codec.bytes_per_label(config.num_classes)} bytes per label "
            "(refined labels; logits recovered from them and their norms)",
        ),
        ("precision", config.precision),
    ]


def describe(root: Path) -> list[tuple[str, str]]:
    """Rows (key, value) describing the label set at ``root``."""
    plan = read_plan(root) if root.is_dir() and not (root / MANIFEST_FILE).exists() else None
    if plan is not None:
        ranges = plan.config.shard_ranges()
        done = sum((root / shard_file(i)).exists() for i in range(len(ranges)))
        return [
            (
                "status",
                f"INCOMPLETE: {done} of {len(ranges)} shards written; to finish, {RESUME_HINT}",
            ),
            *_config_rows(plan.config),
        ]
    manifest = read_manifest(root)
    config = manifest.config
    label_bytes = manifest.label_bytes()
    rows_stored = config.epochs * config.num_samples
    producer = manifest.producer
    return [
        ("name", manifest.name),
        ("status", "complete"),
        ("format", f"version {manifest.format_version}"),
        ("created", manifest.created.isoformat(timespec="seconds")),
        *_config_rows(config),
        ("shards", f"{len(manifest.shards)}, {_mib(label_bytes)} of labels"),
        ("dataset", f"{manifest.dataset.file}, {_mib(manifest.dataset.size)}"),
        (
            "stored bytes per label",
            f"{label_bytes / rows_stored:.1f} (all fields, per epoch and sample)",
        ),
        (
            "producer",
            f"{producer.device}, batch {producer.batch_size}, {producer.world_size} rank(s), "
            f"softserve {producer.softserve_version}",
        ),
    ]
