"""The relabel pipeline: a teacher over E epochs of augmented views, into label shards.

For each shard (a range of epochs) the worker draws every epoch's order and view
parameters, runs the teacher on exactly those views in fixed-size batches, refines the
logits with GIFT, and hands the results to a background thread that encodes and writes
them, so the teacher never waits on the disk. Shards are written under temporary names
and renamed when complete; the manifest is written last. Rerunning an interrupted
command skips the complete shards, and the result equals an uninterrupted run.
"""

from __future__ import annotations

import errno
import functools
import queue
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import softserve
from softserve.errors import InputError, StoreError, brief
from softserve.format.augment import MixPolicy, ViewPolicy, sample_mix, sample_views
from softserve.format.codecs import DEFAULT_CODEC, get_codec
from softserve.format.labels import NORM, SOFT
from softserve.format.refinement import refine_labels
from softserve.format.sampling import epoch_order
from softserve.pixels import mixed_views
from softserve.storage.layout import DATASET_FILE, MANIFEST_FILE, PLAN_FILE, TMP_SUFFIX, shard_file
from softserve.storage.manifest import (
    FORMAT_VERSION,
    LabelSetConfig,
    Manifest,
    MixInfo,
    PlanProducer,
    ProducerInfo,
    RefinementInfo,
    RelabelPlan,
    TeacherInfo,
    ViewInfo,
    read_manifest,
    read_plan,
    write_model,
)
from softserve.storage.shards import stored_version
from softserve.storage.writer import (
    ShardWriter,
    bytes_per_epoch,
    chunk_rows_for,
    file_info,
    shard_info,
    write_dataset,
)
from softserve.worker.runtime import (
    PRECISIONS,
    Ranks,
    autocast,
    check_precision,
    distributed,
    resolve_device,
)
from softserve.worker.sources import (
    ImageSet,
    TeacherInputs,
    check_teacher_inputs,
    default_normalization,
    load_image_set,
)
from softserve.worker.teacher import Teacher, check_teacher_output, load_teacher_of

_SHARD_MIN_BYTES = 4 << 20
_SHARD_MAX_BYTES = 256 << 20
_MIN_SHARDS = 16
_QUEUE_DEPTH = 4
_DEVICE_IMAGE_BUDGET = 2 << 30


@dataclass(kw_only=True)
class RelabelOptions(TeacherInputs):
    """Everything ``softserve relabel`` takes: the teacher inputs, and what to write."""

    out: Path
    epochs: int = 300
    seed: int = 0
    batch_size: int = 256
    device: str = "auto"
    precision: str = "fp32"
    codec: str = DEFAULT_CODEC
    shard_epochs: int | None = None
    #: CutMix or Mixup per (epoch, sample) on top of the views; None: views only
    mix: MixPolicy | None = None
    progress: bool = True


@dataclass
class RelabelResult:
    """The finished label set and how much of it this run computed."""

    manifest: Manifest | None
    computed_shards: int
    reused_shards: int


def default_shard_epochs(epochs: int, bytes_per_epoch: int) -> int:
    """Epochs per shard: up to 16 shards (for parallel ranks and resume granularity), fewer
    when they would be under 4 MiB, more when they would be over 256 MiB."""
    per_epoch = max(1, bytes_per_epoch)
    by_count = -(-epochs // _MIN_SHARDS)
    smallest = -(-_SHARD_MIN_BYTES // per_epoch)
    largest = max(1, _SHARD_MAX_BYTES // per_epoch)
    return max(1, min(epochs, largest, max(by_count, smallest)))


def _validate(opts: RelabelOptions) -> None:
    checks = [
        (opts.epochs > 0, f"--epochs must be positive, got {opts.epochs}"),
        (opts.batch_size > 0, f"--batch-size must be positive, got {opts.batch_size}"),
        (opts.shard_epochs is None or opts.shard_epochs > 0, "--shard-epochs must be positive"),
    ]
    for ok, message in checks:
        if not ok:
            raise InputError(message)
    check_teacher_inputs(opts)
    get_codec(opts.codec)


def describe_run(teacher: Teacher, device: torch.device, precision: str) -> str:
    """What relabel resolved: the teacher (class, weights), the device and the dtype."""
    if teacher.weights is not None:
        weights = f"weights {teacher.weights} (sha256 {str(teacher.weights_sha256)[:12]})"
    elif teacher.weights_sha256 is not None:
        weights = f"exported file sha256 {teacher.weights_sha256[:12]}"
    elif teacher.spec.startswith("torchvision:"):
        weights = "RANDOM weights (--random-teacher): its labels teach nothing"
    else:
        weights = "weights as the factory builds them"
    where = str(device)
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    dtype = "float32" if PRECISIONS[precision] is None else f"{precision} autocast"
    return (
        f"relabel: teacher {teacher.spec} = {type(teacher.model).__name__}, {weights}; "
        f"device {where}; dtype {dtype}"
    )


def build_config(opts: RelabelOptions, data: ImageSet, teacher: Teacher) -> LabelSetConfig:
    """The label set's identity, from the options and the loaded inputs."""
    n, c, h, w = data.images.shape
    mean, std = default_normalization(c, opts.mean, opts.std)
    size = opts.size or (h, w)
    return LabelSetConfig(
        num_samples=n,
        num_classes=data.num_classes,
        class_names=data.class_names,
        image_shape=(c, h, w),
        dataset_sha256=data.sha256(),
        mean=mean,
        std=std,
        teacher=TeacherInfo(
            spec=teacher.spec, weights=teacher.weights, weights_sha256=teacher.weights_sha256
        ),
        views=ViewInfo(
            scale=opts.policy.scale,
            ratio=opts.policy.ratio,
            flip=opts.policy.flip,
            output_size=size,
        ),
        mix=None if opts.mix is None else MixInfo(**vars(opts.mix)),
        refinement=RefinementInfo(alpha=opts.alpha, beta=opts.beta),
        seed=opts.seed,
        precision=opts.precision,  # type: ignore[arg-type]
        **storage_fields(
            n, data.num_classes, opts.codec, opts.epochs, opts.shard_epochs, opts.mix is not None
        ),
    )


def storage_fields(
    num_samples: int, num_classes: int, codec_name: str, epochs: int, shard_epochs: int | None,
    mixed: bool = False,
) -> dict[str, object]:  # fmt: skip
    """The config fields that fix how labels are stored: codec, epochs, shard and chunk sizes
    (the shard size by default from the bytes an epoch takes)."""
    codec = get_codec(codec_name)
    codec.check(num_classes)
    epoch_bytes = bytes_per_epoch(num_samples, num_classes, codec, mixed)
    return {
        "epochs": epochs,
        "codec": codec_name,
        "shard_epochs": shard_epochs or default_shard_epochs(epochs, epoch_bytes),
        "chunk_rows": chunk_rows_for(num_samples, codec.bytes_per_label(num_classes)),
    }


def _check_folder_path(out: Path) -> None:
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
    _check_folder_path(out)
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


def _describe_write_error(exc: OSError, out: Path) -> str:
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or "No space left" in str(exc)
    reason = "the disk is full" if full else brief(exc)
    return f"writing labels into {out} failed: {reason}"


def write_error(exc: OSError, out: Path) -> StoreError:
    """A failed write into ``out`` as one line: what failed, and that a rerun resumes
    (complete shards are kept, a partial one is dropped)."""
    return StoreError(
        _describe_write_error(exc, out)
        + "; free space (or fix the path) and rerun the same command to resume"
    )


class _Writer(threading.Thread):
    """Background writer: runs each shard's queued tasks (store rows, commit) in order.

    After an error every further task is skipped, so no shard is committed past a failed
    write; the main thread raises the error at its next hand-over.
    """

    def __init__(self) -> None:
        super().__init__(name="softserve-shard-writer", daemon=True)
        self.queue: queue.Queue = queue.Queue(maxsize=_QUEUE_DEPTH)
        self.error: BaseException | None = None
        self._dropped: set[int] = set()

    def run(self) -> None:
        while (item := self.queue.get()) is not None:
            shard, task = item
            if self.error is not None or id(shard) in self._dropped:
                continue
            try:
                task()
            except BaseException as exc:  # handed to the main thread, which raises it
                self.error = exc

    def put(self, shard: ShardWriter, task: Callable[[], None]) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((shard, task))

    def finish(self) -> None:
        """Run everything queued, stop, and raise the first error if there was one."""
        self.queue.put(None)
        self.join()
        if self.error is not None:
            raise self.error

    def drop(self, shard: ShardWriter) -> None:
        """Skip what is queued for ``shard``, run the rest, stop, and discard the shard."""
        self._dropped.add(id(shard))
        if self.is_alive():
            self.queue.put(None)
            self.join()
        shard.abort()


def _store_rows(shard: ShardWriter, position: int, rows: dict[str, torch.Tensor], event) -> None:
    if event is not None:
        event.synchronize()
    shard.write_labels(position, rows[SOFT].numpy(), rows[NORM].numpy())


def _to_host(t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start a device-to-host copy; the event marks when the host tensor is ready."""
    if t.device.type != "cuda":
        return t, None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


class _Labeler:
    """Runs the teacher on views and refines its logits, batch by batch, on one device."""

    def __init__(
        self,
        teacher: Teacher,
        data: ImageSet,
        config: LabelSetConfig,
        opts: RelabelOptions,
        device: torch.device,
    ) -> None:
        self.device = device
        self.config = config
        self.batch_size = opts.batch_size
        self.precision = opts.precision
        self.alpha, self.beta = config.refinement.alpha, config.refinement.beta
        self.size = config.views.output_size
        on_device = device.type != "cuda" or data.images.nbytes <= _DEVICE_IMAGE_BUDGET
        images = torch.from_numpy(data.images)
        self.images = images.to(device) if on_device else images.pin_memory()
        self.hard = torch.from_numpy(data.labels).to(device)
        self.model = teacher.model.to(device)
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        # fixed shapes help CUDA kernels and exported teachers with a static batch
        self.pad = device.type == "cuda" or teacher.spec.endswith(".pt2")

    def _base(self, ids: torch.Tensor) -> torch.Tensor:
        return self.images[ids.to(self.images.device)].to(self.device, non_blocking=True)

    def logits(self, ids: torch.Tensor, plan: dict[str, torch.Tensor]) -> torch.Tensor:
        """Teacher logits (float32) on the inputs of samples ``ids``: their views ``params``,
        mixed (mixed sets) by ``mix`` with their partners' views ``partner_params``."""
        count = ids.shape[0]
        if self.pad and count < self.batch_size:
            pad = self.batch_size - count
            ids = torch.cat([ids, ids[:1].expand(pad)])
            plan = {k: torch.cat([v, v[:1].expand(pad, -1)]) for k, v in plan.items()}
        plan = {k: v.to(self.device, non_blocking=True) for k, v in plan.items()}
        mix = self.config.mix
        views = mixed_views(
            None if mix is None else mix.kind,
            self._base(ids),
            plan["params"],
            self.size,
            partner_images=None if mix is None else self._base(plan["mix"][:, 0].long()),
            partner_params=plan.get("partner_params"),
            mix=plan.get("mix"),
            mean=self.config.mean,
            std=self.config.std,
        )
        if self.device.type == "cuda":
            views = views.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, self.precision):
            out = self.model(views)
        return out[:count].float()

    def probe(self) -> None:
        """Check that the teacher accepts the views and outputs K classes, before any writing.

        Two rows suffice, unless batches are padded (then the probe is a full batch).
        """
        c = self.config.image_shape[0]
        rows = self.batch_size if self.pad else min(2, self.batch_size)
        ids = torch.zeros(rows, dtype=torch.long)
        h, w = self.config.image_shape[1:]
        params = torch.tensor([[0, 0, h, w, 0]], dtype=torch.int32).expand(rows, -1)
        plan = {"params": params}
        if self.config.mix is not None:  # each sample mixed with itself, λ = 1
            plan["partner_params"] = params
            plan["mix"] = torch.tensor([[0, 1, 0, 0, 0, 0]], dtype=torch.float32).expand(rows, -1)
        check_teacher_output(
            self.config.teacher.spec, lambda: self.logits(ids, plan), (rows, c, *self.size),
            self.config.num_classes,
        )  # fmt: skip

    def label(self, ids: torch.Tensor, plan: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What a shard stores of each input: GIFT's refined label and the logits' norm."""
        logits = self.logits(ids, plan)
        soft = refine_labels(logits, self.hard[ids.to(self.device)], self.alpha, self.beta)
        return {SOFT: soft, NORM: torch.linalg.vector_norm(logits, dim=1)}


def _shard_plan(
    config: LabelSetConfig, start: int, stop: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Orders (E_s, N) for a range of epochs, and in that order their view ``params``
    (E_s, N, 5) and, for mixed sets, ``mix`` (E_s, N, 6) and ``partner_params`` (E_s, N, 5)."""
    n, (_, h, w) = config.num_samples, config.image_shape
    policy = ViewPolicy(scale=config.views.scale, ratio=config.views.ratio, flip=config.views.flip)
    orders, plans = [], []
    for epoch in range(start, stop):
        order = epoch_order(config.seed, epoch, n)
        orders.append(order)
        views = sample_views(policy, config.seed, epoch, n, h, w)
        plan = {"params": views[order]}
        if config.mix is not None:
            mix = sample_mix(MixPolicy(**config.mix.model_dump()), config.seed, epoch, n,
                             *config.views.output_size)  # fmt: skip
            plan["mix"] = mix[order]
            plan["partner_params"] = views[mix[order, 0].astype(np.int64)]
        plans.append(plan)
    return np.stack(orders), {k: np.stack([p[k] for p in plans]) for k in plans[0]}


def _write_shard(
    labeler: _Labeler, writer: _Writer, config: LabelSetConfig, shard: ShardWriter, bar: tqdm
) -> None:
    start, stop = shard.epoch_start, shard.epoch_stop
    orders, plan = _shard_plan(config, start, stop)
    mix = {k: v for k, v in plan.items() if k != "params"}

    def store_plan() -> None:
        for epoch in range(start, stop):
            local = epoch - start
            rows = {k: v[local] for k, v in mix.items()}
            shard.write_epoch_plan(epoch, orders[local], plan["params"][local], rows)

    writer.put(shard, store_plan)
    ids_all = torch.from_numpy(orders.reshape(-1).astype(np.int64))
    flat = {k: torch.from_numpy(v.reshape(-1, v.shape[-1])) for k, v in plan.items()}
    batch = labeler.batch_size
    for position in range(0, ids_all.shape[0], batch):
        ids = ids_all[position : position + batch]
        labels = labeler.label(ids, {k: v[position : position + batch] for k, v in flat.items()})
        hosts = {k: _to_host(v) for k, v in labels.items()}
        events = [e for _, e in hosts.values() if e is not None]
        rows = {k: t for k, (t, _) in hosts.items()}
        event = events[-1] if events else None
        writer.put(shard, functools.partial(_store_rows, shard, position, rows, event))
        bar.update(ids.shape[0])
    writer.put(shard, shard.commit)


def finalize(out: Path, config: LabelSetConfig, producer: ProducerInfo) -> Manifest:
    """Write the manifest of a set whose shards are all complete, and drop the plan."""
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


def relabel(opts: RelabelOptions) -> RelabelResult:
    """Compute (or finish) the label set ``opts.out``; see the module docstring."""
    _validate(opts)
    device = resolve_device(opts.device)
    check_precision(device, opts.precision)
    data = load_image_set(opts.images, opts.num_classes)
    teacher = load_teacher_of(opts)
    tqdm.write(describe_run(teacher, device, opts.precision))
    config = build_config(opts, data, teacher)
    out = opts.out
    plan = RelabelPlan(config=config, producer=PlanProducer(batch_size=opts.batch_size,
                                                            device=device.type))  # fmt: skip
    with distributed(device) as ranks:
        existing = check_out_dir(out, config, plan.producer)
        if existing is not None:
            return RelabelResult(existing, computed_shards=0, reused_shards=len(existing.shards))
        labeler = _Labeler(teacher, data, config, opts, device)
        labeler.probe()
        ranges = config.shard_ranges()
        done = {i for i in range(len(ranges)) if (out / shard_file(i)).exists()}
        check_format(out, done)
        # every rank has looked at the folder before rank 0 writes the plan and the dataset
        ranks.barrier()
        _claim(out, plan, data, ranks)
        pending = [
            i for i in range(len(ranges)) if i % ranks.world_size == ranks.rank and i not in done
        ]
        _warn_if_low_space(out, config, len(ranges) - len(done), ranks)
        _run_shards(labeler, config, out, pending, ranks, opts.progress)
        ranks.barrier()
        manifest = None
        if ranks.is_main:
            producer = ProducerInfo(
                softserve_version=softserve.__version__,
                torch_version=torch.__version__,
                device=str(device),
                batch_size=opts.batch_size,
                world_size=ranks.world_size,
            )
            try:
                manifest = finalize(out, config, producer)
            except OSError as exc:
                raise write_error(exc, out) from None
        ranks.barrier()
        return RelabelResult(manifest, len(ranges) - len(done), len(done))


def check_format(out: Path, done: set[int]) -> None:
    """Refuse to resume a relabel whose complete shards an older format wrote."""
    for index in sorted(done):
        path = out / shard_file(index)
        version = stored_version(path)
        if version != FORMAT_VERSION:
            raise InputError(
                f"{path} was written in label-set format {version}, this softserve writes "
                f"{FORMAT_VERSION}; finish the relabel with the softserve that started it, or "
                "relabel into a new folder"
            )


def _claim(out: Path, plan: RelabelPlan, data: ImageSet, ranks: Ranks) -> None:
    """Record the plan and write the dataset (rank 0), then clear stale partial shards."""
    config = plan.config
    if ranks.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            write_model(out / PLAN_FILE, plan)
            if not (out / DATASET_FILE).exists():
                write_dataset(
                    out / DATASET_FILE,
                    data.images,
                    data.labels,
                    data.class_names,
                    config.mean,
                    config.std,
                )
        except OSError as exc:
            raise StoreError(_describe_write_error(exc, out) + "; fix it and rerun") from None
    ranks.barrier()
    for index in range(len(config.shard_ranges())):
        if index % ranks.world_size == ranks.rank:
            (out / (shard_file(index) + TMP_SUFFIX)).unlink(missing_ok=True)


def _warn_if_low_space(out: Path, config: LabelSetConfig, pending: int, ranks: Ranks) -> None:
    codec = get_codec(config.codec)
    epoch = bytes_per_epoch(config.num_samples, config.num_classes, codec, config.mix is not None)
    need = pending * config.shard_epochs * epoch
    free = shutil.disk_usage(out).free
    if ranks.is_main and need > free:
        tqdm.write(
            f"warning: about {need / 2**20:.0f} MiB of labels to write and {free / 2**20:.0f} MiB "
            f"free under {out}; the run stops cleanly when the disk fills and can be resumed"
        )


def _run_shards(
    labeler: _Labeler,
    config: LabelSetConfig,
    out: Path,
    pending: list[int],
    ranks: Ranks,
    progress: bool,
) -> None:
    ranges = config.shard_ranges()
    total = sum((ranges[i][1] - ranges[i][0]) * config.num_samples for i in pending)
    writer = _Writer()
    writer.start()
    shard: ShardWriter | None = None
    bar = tqdm(
        total=total,
        unit="sample",
        unit_scale=True,
        desc=f"relabel {out.name}",
        disable=not (progress and ranks.is_main),
        dynamic_ncols=True,
    )
    try:
        for index in pending:
            start, stop = ranges[index]
            shard = ShardWriter(
                out / shard_file(index),
                start,
                stop,
                config.num_samples,
                config.num_classes,
                get_codec(config.codec),
                config.chunk_rows,
                config.mix is not None,
            )
            _write_shard(labeler, writer, config, shard, bar)
        writer.finish()
        shard = None
    except OSError as exc:
        raise write_error(exc, out) from None
    finally:
        bar.close()
        if shard is not None:
            writer.drop(shard)
