"""``softserve import sre2l``: an SRe2L-family relabel's soft labels as a softserve label set.

SRe2L's relabel (and CDA's, LPLD's and LPQLD's; files described in
:mod:`softserve.worker.sre2l_format`) stores, per batch of its DataLoader, each row's crop
and flip, the batch's CutMix or Mixup, and the teacher's logits; the rows' images are
known only from the relabel's sampler, replayed here. The import maps every row to its
image and stores each (epoch, sample)'s view (the crop in base-image pixels, the flip),
its mix (partner: the sample at the batch's permuted row, λ, the box in output pixels)
and the logits refined into GIFT's labels with their norms, as a relabel would have stored
them; the set then serves at any batch size and world size, each sample with the input
and label SRe2L's teacher had. SRe2L's teacher saw PIL's bilinear resize, antialiased
where a crop is larger than the output: a set with such a crop names the view policy's
interpolation "bilinear-antialias" (the client then resamples as PIL does), any other
"bilinear" (the two are the same filter when no axis shrinks).

A relabel whose DataLoader dropped each epoch's last partial batch (LPLD's and LPQLD's
``--prune_ratio > 0``) leaves N mod B images without a label in each of its epochs, which a
label set's epoch cannot do: epoch k of the imported set holds each image's k-th labelled
view (its row in the k-th epoch of the files that labels it), for as many epochs as every
image has views; the views beyond are left out and counted. Without dropped batches that is
the files' epoch k itself. Each row keeps its own mix (partner, partner's view, λ, box), so
moving it to another epoch changes nothing it serves.

Two passes: the first loads and checks every batch file (layout, sampler, batch sizes,
class count, crops and boxes) before anything is written, so a bad input writes nothing;
the second converts and writes shard by shard, resumable as a transcode is (the plan
first, complete shards kept on a rerun, the manifest last).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import softserve
from softserve.errors import InputError
from softserve.format.codecs import default_codec, get_codec
from softserve.format.refinement import DEFAULT_ALPHA, DEFAULT_BETA, refine_labels
from softserve.storage.build import (
    check_folder_path,
    check_format,
    check_out_dir,
    finalize,
    storage_fields,
    write_error,
)
from softserve.storage.layout import DATASET_FILE, PLAN_FILE, shard_file, tmp_path
from softserve.storage.manifest import (
    LabelSetConfig,
    Manifest,
    MixInfo,
    ProducerInfo,
    RefinementInfo,
    RelabelPlan,
    TeacherInfo,
    ViewInfo,
    write_model,
)
from softserve.storage.writer import ShardWriter, write_dataset
from softserve.worker.sources import ImageSet, default_normalization, load_image_set
from softserve.worker.sre2l_format import (
    SAMPLER_SEED,
    BatchFile,
    Layout,
    load_batch_file,
    parse_batch,
    recorded_epochs,
    sampler_epochs,
    scan_layout,
)

#: λ's Beta(α, α) in SRe2L's relabel by default (--cutmix, --mixup); the files omit it.
DEFAULT_MIX_ALPHA = {"cutmix": 1.0, "mixup": 0.8}
_PRECISION = {torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class ImportOptions:
    """Everything ``softserve import sre2l`` takes."""

    labels: Path
    images: Path
    out: Path
    seed: int = SAMPLER_SEED
    #: the relabel's --input-size (h, w); None: the base images' size
    size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    codec: str | None = None
    #: import the first E epochs only; None: all
    epochs: int | None = None
    #: recorded in the manifest; None: SRe2L's default for the files' mix
    mix_alpha: float | None = None
    alpha: float = DEFAULT_ALPHA
    beta: float = DEFAULT_BETA
    shard_epochs: int | None = None
    progress: bool = True


@dataclass
class ImportResult:
    """The label set; how many views the files hold, how many of them SRe2L's teacher saw
    downscaled (the crop larger than the output: the set's views are then antialiased), and
    how many a relabel with dropped batches left beyond the set's last complete epoch."""

    manifest: Manifest
    computed_shards: int
    views: int
    downscaled: int
    left_out: int = 0


@dataclass(frozen=True)
class _Source:
    """The relabel's files with the sampler that says which image each row is."""

    layout: Layout
    num_samples: int
    batch_size: int
    seed: int
    #: the relabel's DataLoader dropped each epoch's last partial batch
    drop_last: bool = False

    @property
    def per_epoch(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    @property
    def labelled(self) -> int:
        """Rows an epoch of the files holds."""
        return self.per_epoch * self.batch_size if self.drop_last else self.num_samples

    def epochs(self, stop: int) -> Iterator[tuple[int, list[tuple[Path, np.ndarray]]]]:
        """Epochs 0..stop-1, each as its batch files with the sample ids of their rows."""
        cuts = range(self.batch_size, self.labelled, self.batch_size)
        epochs = itertools.islice(sampler_epochs(self.num_samples, self.seed), stop)
        for epoch, ids in enumerate(epochs):
            paths = (self.layout.path(epoch, b, self.per_epoch) for b in itertools.count())
            yield epoch, list(zip(paths, np.split(ids[: self.labelled], cuts), strict=False))


@dataclass
class _Survey:
    """What the checking pass found: the set's shape, and what its config records."""

    epochs: int
    num_classes: int = 0
    kind: str | None = None
    logits_dtype: torch.dtype = torch.float32
    digests: dict[Path, str] = field(default_factory=dict)
    scale: list[float] = field(default_factory=lambda: [1.0, 0.0])
    ratio: list[float] = field(default_factory=lambda: [np.inf, 0.0])
    flip: bool = False
    views: int = 0
    downscaled: int = 0
    #: per epoch of the files, each row's epoch in the set (see the module docstring)
    slots: list[np.ndarray] = field(default_factory=list)
    #: the set's epochs: the views every image has
    kept: int = 0
    left_out: int = 0

    def digest(self, root: Path) -> str:
        """sha256 over every imported file's name and sha256, in import order."""
        total = hashlib.sha256()
        for path, sha in self.digests.items():
            total.update(f"{path.relative_to(root)}\0{sha}\n".encode())
        return total.hexdigest()


# --------------------------------------------------------------------------- rows


def _views(batch: BatchFile, height: int, width: int, where: str) -> np.ndarray:
    """Each row's view params (top, left, height, width, flip) in base-image pixels, int32
    (B, 5); refused unless every crop is a box of pixels inside the base image."""
    exact = batch.coords * np.array([height, width, height, width], dtype=np.float64)
    pixels = np.rint(exact)
    slack = 0.25 if batch.coarse else 1e-3  # float32 coords are i/H to ~2⁻²⁴ of a side
    top, left, h, w = pixels.T
    bad = (np.abs(exact - pixels).max(axis=1) > slack) | (h < 1) | (w < 1)
    bad |= (top + h > height) | (left + w > width)
    if bad.any():
        j = int(np.argmax(bad))
        raise InputError(
            f"{where}: row {j}'s crop {tuple(np.round(batch.coords[j], 6))} is not a box of "
            f"pixels of the {height}x{width} images in --images; pass the tree the relabel read"
        )
    return np.column_stack([pixels, batch.flip]).astype(np.int32)


def _mixes(
    batch: BatchFile, ids: np.ndarray, params: np.ndarray, out: tuple[int, int], where: str
) -> dict[str, np.ndarray]:
    """The batch's mix as softserve's rows: ``mix`` (partner id, λ, box top, left, height,
    width) and ``partner_params``; none without a mix. CutMix's λ is the area left to the
    sample, as softserve's mix rows hold it (SRe2L's file keeps the unclipped Beta draw)."""
    if batch.permutation is None:
        return {}
    lam, box = batch.lam, [0, 0, 0, 0]
    if batch.box is not None:
        r0, c0, r1, c1 = batch.box
        if not (0 <= r0 <= r1 <= out[0] and 0 <= c0 <= c1 <= out[1]):
            raise InputError(
                f"{where}: the CutMix box (rows {r0}:{r1}, columns {c0}:{c1}) does not fit a "
                f"{out[0]}x{out[1]} view; pass the relabel's --input-size as --size"
            )
        box = [r0, c0, r1 - r0, c1 - c0]
        lam = 1.0 - (r1 - r0) * (c1 - c0) / (out[0] * out[1])
    mix = np.empty((batch.rows, 6), dtype=np.float32)
    mix[:, 0], mix[:, 1], mix[:, 2:] = ids[batch.permutation], lam, box
    return {"mix": mix, "partner_params": params[batch.permutation]}


# --------------------------------------------------------------------------- checking pass


def _first_rows(layout: Layout) -> int:
    """Rows of the first batch file: the relabel's batch size."""
    path = layout.path(0, 0, 1)
    if not path.is_file():
        raise InputError(f"missing batch file {path}")
    return parse_batch(load_batch_file(path)[0], str(path)).rows


def _drops_last(layout: Layout, n: int, b: int, data: ImageSet, images: Path) -> bool:
    """Whether the relabel's epochs dropped their last partial batch (epoch 0 holds N - N mod
    B rows in full batches: LPLD's and LPQLD's ``--prune_ratio > 0`` set drop_last); refuse
    an --images tree whose sample count is not the one the relabel's epoch 0 ran over."""
    short = n % b
    if layout.flat:  # batch_{N // B} ends epoch 0 with N mod B rows, or begins epoch 1
        path = layout.root / f"batch_{n // b}.tar"
        if not short or not path.is_file():
            return False
        rows = parse_batch(load_batch_file(path)[0], str(path)).rows
        if rows not in (short, b):
            raise InputError(
                f"--images {images} holds {n} images, so the sampler ends epoch 0 with "
                f"{short} rows in {path.name} (or, dropping that partial batch, begins epoch 1 "
                f"there with {b}), which has {rows}; pass the tree the relabel read"
            )
        return rows == b != short
    numbers = layout.batches[0]
    missing = min(set(range(len(numbers) + 1)) - numbers)
    if missing < len(numbers):
        raise InputError(f"missing batch file {layout.path(0, missing, 1)}")
    last = layout.path(0, len(numbers) - 1, 1)
    total = (len(numbers) - 1) * b + parse_batch(load_batch_file(last)[0], str(last)).rows
    if total == n or (short and total == n - short):
        return total != n
    raise InputError(
        f"--images {images} holds {n} images ({data.num_classes} class folders), the "
        f"labels' epoch 0 has {total} rows ({len(numbers)} batches of up to {b}); pass the "
        "tree the relabel read"
    )


def _epoch_count(source: _Source, requested: int | None) -> int:
    available = source.layout.available(source.per_epoch)
    if requested is not None and requested > available:
        raise InputError(f"--epochs {requested}: {source.layout.root} holds {available} epochs")
    return requested or available


def _check_epoch_files(source: _Source, epoch: int, last: int, cut_hint: bool) -> None:
    """Refuse an epoch without exactly the batch files the sampler gives it."""
    layout, nb = source.layout, source.per_epoch
    present = layout.present(epoch, nb)
    missing = sorted(set(range(nb)) - present)
    if missing:
        hint = ""
        if cut_hint and epoch == last and epoch > 0:
            hint = (
                f"; epoch {epoch} is cut short ({len(present)} of {nb} batches, as a pruned "
                f"LPLD or LPQLD relabel leaves its last epoch): import the {epoch} complete "
                f"epochs with --epochs {epoch}"
            )
        raise InputError(f"missing batch file {layout.path(epoch, missing[0], nb)}{hint}")
    extra = sorted(present - set(range(nb)))
    if extra:
        raise InputError(
            f"{layout.path(epoch, extra[0], nb)}: the sampler over {source.num_samples} images "
            f"in batches of {source.batch_size} (batch_0.tar's rows) gives epoch {epoch} {nb} "
            "batches; the batch size disagrees"
        )


def _check_record(source: _Source, epochs: int) -> None:
    """Where LPLD or LPQLD recorded the sampler, the replay must agree with the record."""
    nb = source.per_epoch
    recorded = recorded_epochs(
        source.layout, source.num_samples, lambda e: list(range(e * nb, (e + 1) * nb)), epochs
    )
    if recorded is None:
        return
    for (epoch, batches), ids in zip(source.epochs(epochs), recorded, strict=True):
        if not np.array_equal(np.concatenate([p for _, p in batches]), ids):
            raise InputError(
                f"{source.layout.indices} records other images for epoch {epoch} than a "
                f"RandomSampler seeded {source.seed} draws: pass the relabel's --fkd-seed as "
                "--seed, and the tree it read as --images"
            )


def _note(
    survey: _Survey,
    batch: BatchFile,
    params: np.ndarray,
    data: ImageSet,
    out: tuple[int, int],
    where: str,
) -> None:
    """Check a batch against the first one (classes, mix) and add its views to the ranges."""
    if survey.views == 0:
        survey.num_classes, survey.kind = batch.logits.shape[1], batch.kind
        survey.logits_dtype = batch.logits.dtype
        if survey.num_classes != data.num_classes:
            raise InputError(
                f"{where}: the logits have {survey.num_classes} classes, --images has "
                f"{data.num_classes} class folders"
            )
    if batch.logits.shape[1] != survey.num_classes:
        raise InputError(
            f"{where}: logits of {batch.logits.shape[1]} classes, the first batch's have "
            f"{survey.num_classes}; the files are not one relabel's"
        )
    if batch.kind != survey.kind:
        raise InputError(
            f"{where} mixes by {batch.kind or 'nothing'}, the first batch by "
            f"{survey.kind or 'nothing'}; the files are not one relabel's"
        )
    h, w = params[:, 2].astype(np.float64), params[:, 3].astype(np.float64)
    area = h * w / float(np.prod(data.images.shape[2:]))
    survey.scale = [min(survey.scale[0], area.min()), max(survey.scale[1], area.max())]
    survey.ratio = [min(survey.ratio[0], (w / h).min()), max(survey.ratio[1], (w / h).max())]
    survey.flip |= bool(params[:, 4].any())
    survey.views += len(params)
    survey.downscaled += int(((h > out[0]) | (w > out[1])).sum())


def _survey(source: _Source, data: ImageSet, opts: ImportOptions, out: tuple[int, int]) -> _Survey:
    """Load and check every file to import (see the module docstring); nothing is kept of
    them but their digests and what the config records."""
    survey = _Survey(epochs=_epoch_count(source, opts.epochs))
    for epoch in range(survey.epochs):
        _check_epoch_files(source, epoch, survey.epochs - 1, opts.epochs is None)
    _check_record(source, survey.epochs)
    height, width = data.images.shape[2:]
    bar = tqdm(
        total=survey.epochs * source.per_epoch,
        unit="file",
        desc=f"check {opts.labels}",
        disable=not opts.progress,
        dynamic_ncols=True,
    )
    with bar:
        for _, batches in source.epochs(survey.epochs):
            for path, ids in batches:
                obj, survey.digests[path] = load_batch_file(path)
                batch = parse_batch(obj, str(path))
                if batch.rows != len(ids):
                    raise InputError(
                        f"{path} has {batch.rows} rows where the sampler over "
                        f"{source.num_samples} images in batches of {source.batch_size} puts "
                        f"{len(ids)}; the batch size disagrees with the first batch's"
                    )
                params = _views(batch, height, width, str(path))
                _mixes(batch, ids, params, out, str(path))
                _note(survey, batch, params, data, out, str(path))
                bar.update()
    _place(source, survey)
    return survey


def _place(source: _Source, survey: _Survey) -> None:
    """Each row's epoch in the set: its image's count of views in earlier rows (module
    docstring); refused if some image has no view in the files' epochs."""
    counts = np.zeros(source.num_samples, dtype=np.int64)
    for _, batches in source.epochs(survey.epochs):
        ids = np.concatenate([p for _, p in batches])
        survey.slots.append(counts[ids])
        counts[ids] += 1
    survey.kept = int(counts.min())
    survey.left_out = int((counts - survey.kept).sum())
    if survey.kept == 0:
        dropped = source.num_samples % source.batch_size
        raise InputError(
            f"{source.layout.root}: sample {int(np.argmin(counts))} has no label in the "
            f"{survey.epochs} epochs imported (each dropped {dropped} images, its last partial "
            "batch), and each epoch of a label set labels every sample"
        )


# --------------------------------------------------------------------------- config, writing


def _config(
    opts: ImportOptions,
    data: ImageSet,
    survey: _Survey,
    out: tuple[int, int],
    normalization: tuple[tuple[float, ...], tuple[float, ...]],
) -> LabelSetConfig:
    """The imported set's identity: the images, the files' digest, their views and mix."""
    n, c, h, w = data.images.shape
    mean, std = normalization
    mix = None
    if survey.kind is not None:
        alpha = opts.mix_alpha or DEFAULT_MIX_ALPHA[survey.kind]
        mix = MixInfo(kind=survey.kind, prob=1.0, alpha=alpha)  # type: ignore[arg-type]
    return LabelSetConfig(
        num_samples=n,
        num_classes=survey.num_classes,
        class_names=data.class_names,
        image_shape=(c, h, w),
        dataset_sha256=data.sha256(),
        mean=mean,
        std=std,
        teacher=TeacherInfo(
            spec="sre2l", weights=str(opts.labels), weights_sha256=survey.digest(opts.labels)
        ),
        views=ViewInfo(
            scale=tuple(survey.scale),
            ratio=tuple(survey.ratio),
            flip=survey.flip,
            output_size=out,
            interpolation="bilinear-antialias" if survey.downscaled else "bilinear",
        ),
        mix=mix,
        refinement=RefinementInfo(alpha=opts.alpha, beta=opts.beta),
        seed=opts.seed,
        precision=_PRECISION.get(survey.logits_dtype, "fp32"),  # type: ignore[arg-type]
        **storage_fields(
            n,
            survey.num_classes,
            opts.codec or default_codec(survey.num_classes),
            survey.kept,
            opts.shard_epochs,
            mix is not None,
        ),
    )


def _epoch_rows(
    source: _Source,
    batches: list[tuple[Path, np.ndarray]],
    data: ImageSet,
    config: LabelSetConfig,
    survey: _Survey,
) -> dict[str, np.ndarray]:
    """One epoch's rows in its order: order, view params, mix rows, GIFT labels, norms."""
    height, width = config.image_shape[1:]
    parts: list[dict[str, np.ndarray]] = []
    for path, ids in batches:
        obj, sha = load_batch_file(path)
        if sha != survey.digests[path]:
            raise InputError(f"{path} changed while it was imported; rerun the same command")
        batch = parse_batch(obj, str(path))
        params = _views(batch, height, width, str(path))
        logits = batch.logits.float()
        hard = torch.from_numpy(data.labels[ids])
        soft = refine_labels(logits, hard, config.refinement.alpha, config.refinement.beta)
        parts.append(
            {
                "order": ids,
                "params": params,
                **_mixes(batch, ids, params, config.views.output_size, str(path)),
                "soft": soft.numpy(),
                "norm": torch.linalg.vector_norm(logits, dim=1).numpy(),
            }
        )
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _set_epochs(
    source: _Source,
    data: ImageSet,
    config: LabelSetConfig,
    survey: _Survey,
    start: int,
    stop: int,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """The set's epochs start..stop-1, each as its rows in the files' order, gathered from
    the files' epochs that hold them (the same epochs without dropped batches)."""
    parts: dict[int, list[dict[str, np.ndarray]]] = {k: [] for k in range(start, stop)}
    for epoch, batches in source.epochs(survey.epochs):
        slots = survey.slots[epoch]
        if not ((slots >= start) & (slots < stop)).any():
            continue
        rows = _epoch_rows(source, batches, data, config, survey)
        for k in range(start, stop):
            take = slots == k
            if take.any():
                parts[k].append({key: value[take] for key, value in rows.items()})
    for k in range(start, stop):
        yield k, {key: np.concatenate([p[key] for p in parts[k]]) for key in parts[k][0]}


def _write(
    source: _Source, data: ImageSet, config: LabelSetConfig, survey: _Survey, opts: ImportOptions
) -> int:
    """The plan, the dataset, every shard not yet complete; the number of shards written."""
    out, n = opts.out, config.num_samples
    ranges = config.shard_ranges()
    done = {i for i in range(len(ranges)) if (out / shard_file(i)).exists()}
    check_format(out, done)
    out.mkdir(parents=True, exist_ok=True)
    write_model(out / PLAN_FILE, RelabelPlan(config=config))
    if not (out / DATASET_FILE).exists():
        write_dataset(
            out / DATASET_FILE, data.images, data.labels, data.class_names, config.mean, config.std
        )
    pending = [i for i in range(len(ranges)) if i not in done]
    bar = tqdm(
        total=sum(ranges[i][1] - ranges[i][0] for i in pending) * n,
        unit="label",
        unit_scale=True,
        desc=f"import {out.name}",
        disable=not opts.progress,
        dynamic_ncols=True,
    )
    mixed = config.mix is not None
    with bar:
        for index in pending:
            start, stop = ranges[index]
            tmp_path(out / shard_file(index)).unlink(missing_ok=True)
            shard = ShardWriter(
                out / shard_file(index),
                start,
                stop,
                n,
                config.num_classes,
                get_codec(config.codec),
                config.chunk_rows,
                mixed,
            )
            for epoch, rows in _set_epochs(source, data, config, survey, start, stop):
                plan = {k: rows[k] for k in ("mix", "partner_params") if mixed}
                shard.write_epoch_plan(epoch, rows["order"], rows["params"], plan)
                shard.write_labels((epoch - start) * n, rows["soft"], rows["norm"])
                bar.update(n)
            shard.commit()
    return len(pending)


def _validate(opts: ImportOptions) -> None:
    checks = [
        (opts.epochs is None or opts.epochs > 0, f"--epochs must be positive, got {opts.epochs}"),
        (opts.size is None or min(opts.size) > 0, f"--size must be positive, got {opts.size}"),
        (opts.mix_alpha is None or opts.mix_alpha > 0, "--mix-alpha must be positive"),
        (opts.shard_epochs is None or opts.shard_epochs > 0, "--shard-epochs must be positive"),
        (opts.alpha >= 0 and opts.beta >= 0, "--alpha and --beta must be non-negative"),
    ]
    for ok, message in checks:
        if not ok:
            raise InputError(message)
    if opts.codec is not None:
        get_codec(opts.codec)
    check_folder_path(opts.out)


def import_sre2l(opts: ImportOptions) -> ImportResult:
    """Write (or finish) the label set ``opts.out`` from the relabel files ``opts.labels``;
    see the module docstring. Every check runs before anything is written."""
    _validate(opts)
    layout = scan_layout(opts.labels)
    data = load_image_set(opts.images)
    channels, height, width = data.images.shape[1:]
    if channels != 3:
        raise InputError(
            f"--images {opts.images} holds gray images, which SRe2L's ImageFolder read as RGB; "
            "convert the tree to RGB"
        )
    normalization = default_normalization(channels, opts.mean, opts.std)
    out = opts.size or (height, width)
    n, batch_size = len(data.labels), _first_rows(layout)
    drop_last = _drops_last(layout, n, batch_size, data, opts.images)
    source = _Source(layout, n, batch_size, opts.seed, drop_last)
    survey = _survey(source, data, opts, out)
    config = _config(opts, data, survey, out, normalization)
    existing = check_out_dir(opts.out, config)
    if existing is not None:
        return ImportResult(existing, 0, survey.views, survey.downscaled, survey.left_out)
    try:
        computed = _write(source, data, config, survey, opts)
        producer = ProducerInfo(
            softserve_version=softserve.__version__,
            torch_version=torch.__version__,
            device="cpu",
            batch_size=source.batch_size,
            world_size=1,
        )
        manifest = finalize(opts.out, config, producer)
    except OSError as exc:
        raise write_error(exc, opts.out) from None
    return ImportResult(manifest, computed, survey.views, survey.downscaled, survey.left_out)
