"""The relabel pipeline: a teacher over E epochs of augmented views, into label shards.

For each shard (a range of epochs) the worker draws every epoch's order and view
parameters, runs the teacher on exactly those views in fixed-size batches, refines the
logits with GIFT, and hands the results to a background thread that encodes and writes
them, so the teacher never waits on the disk. Shards are written under temporary names
and renamed when complete; the manifest is written last. Rerunning an interrupted
command skips the complete shards, and the result equals an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import softserve
from softserve.errors import InputError, StoreError
from softserve.format.augment import MixPolicy, identity_view, view_kind
from softserve.format.codecs import default_codec, default_codec_reason, get_codec
from softserve.format.labels import NORM, SOFT
from softserve.format.refinement import refine_labels
from softserve.pixels import mixed_views
from softserve.storage.build import (
    check_format,
    check_out_dir,
    describe_write_error,
    finalize,
    low_space_warning,
    shard_plan,
    storage_fields,
    write_error,
)
from softserve.storage.layout import DATASET_FILE, PLAN_FILE, TMP_SUFFIX, shard_file
from softserve.storage.manifest import (
    LabelSetConfig,
    Manifest,
    MixInfo,
    PlanProducer,
    ProducerInfo,
    RefinementInfo,
    RelabelPlan,
    TeacherInfo,
    view_info,
    write_model,
)
from softserve.storage.writer import ShardWriter, write_dataset
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

_QUEUE_DEPTH = 4
_DEVICE_IMAGE_BUDGET = 2 << 30


#: A phase timer: called with a phase's name, it returns the context that phase runs in.
PhaseTiming = Callable[[str], contextlib.AbstractContextManager[object]]


def no_timing(phase: str) -> contextlib.AbstractContextManager[object]:
    """The default ``PhaseTiming``: times nothing."""
    return contextlib.nullcontext()


@dataclass(kw_only=True)
class RelabelOptions(TeacherInputs):
    """Everything ``softserve relabel`` takes: the teacher inputs, and what to write."""

    out: Path
    epochs: int = 300
    seed: int = 0
    batch_size: int = 256
    device: str = "auto"
    precision: str = "fp32"
    codec: str | None = None  # by class count (default_codec) when not given
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
    if opts.codec is not None:
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
        views=view_info(opts.views, size),
        mix=None if opts.mix is None else MixInfo(**vars(opts.mix)),
        refinement=RefinementInfo(alpha=opts.alpha, beta=opts.beta),
        seed=opts.seed,
        precision=opts.precision,  # type: ignore[arg-type]
        **storage_fields(
            n, data.num_classes, opts.codec or default_codec(data.num_classes), opts.epochs,
            opts.shard_epochs, opts.mix is not None, view_kind(opts.views),
        ),
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
        # shares the set's memory on the CPU; a set too large for the GPU stays there too
        # (unpinned: a batch is gathered from it into a new tensor anyway)
        on_device = device.type != "cuda" or data.images.nbytes <= _DEVICE_IMAGE_BUDGET
        images = torch.from_numpy(data.images)
        self.images = images.to(device) if on_device else images
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
            interpolation=self.config.views.interpolation,
            views=self.config.views.policy,
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
        params = torch.from_numpy(identity_view(self.config.views.policy, h, w)).expand(rows, -1)
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


def _write_shard(
    labeler: _Labeler, writer: _Writer, config: LabelSetConfig, shard: ShardWriter, bar: tqdm
) -> None:
    start, stop = shard.epoch_start, shard.epoch_stop
    orders, plan = shard_plan(config, start, stop)
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


def relabel(opts: RelabelOptions, timing: PhaseTiming | None = None) -> RelabelResult:
    """Compute (or finish) the label set ``opts.out``; see the module docstring.

    ``timing``, if given, wraps each phase: "load images", "build teacher", "probe",
    "write dataset", "label loop" and "manifest" (a benchmark's timer; nothing by default).
    """
    phase = timing or no_timing
    _validate(opts)
    device = resolve_device(opts.device)
    check_precision(device, opts.precision)
    with phase("load images"):
        data = load_image_set(opts.images, opts.num_classes, progress=opts.progress and _rank0())
    with phase("build teacher"):
        teacher = load_teacher_of(opts, data)
    tqdm.write(describe_run(teacher, device, opts.precision))
    config = build_config(opts, data, teacher)
    if opts.codec is None:
        tqdm.write(
            f"relabel: codec {config.codec}, the default for {config.num_classes} classes: "
            f"{default_codec_reason(config.num_classes)} "
            f"({get_codec(config.codec).bytes_per_label(config.num_classes)} bytes a label; "
            "--codec to choose another)"
        )
    out = opts.out
    plan = RelabelPlan(config=config, producer=PlanProducer(batch_size=opts.batch_size,
                                                            device=device.type))  # fmt: skip
    with distributed(device) as ranks:
        existing = check_out_dir(out, config, plan.producer)
        if existing is not None:
            return RelabelResult(existing, computed_shards=0, reused_shards=len(existing.shards))
        labeler = _Labeler(teacher, data, config, opts, device)
        with phase("probe"):
            labeler.probe()
        ranges = config.shard_ranges()
        done = {i for i in range(len(ranges)) if (out / shard_file(i)).exists()}
        check_format(out, done)
        # every rank has looked at the folder before rank 0 writes the plan and the dataset
        ranks.barrier()
        with phase("write dataset"):
            _claim(out, plan, data, ranks)
        pending = [
            i for i in range(len(ranges)) if i % ranks.world_size == ranks.rank and i not in done
        ]
        warning = low_space_warning(out, config, len(ranges) - len(done))
        if ranks.is_main and warning is not None:
            tqdm.write(warning)
        with phase("label loop"):
            _run_shards(labeler, config, out, pending, ranks, opts.progress)
        ranks.barrier()
        manifest = None
        if ranks.is_main:
            producer = _producer(opts, device, ranks)
            try:
                with phase("manifest"):
                    manifest = finalize(out, config, producer)
            except OSError as exc:
                raise write_error(exc, out) from None
        ranks.barrier()
        return RelabelResult(manifest, len(ranges) - len(done), len(done))


def _rank0() -> bool:
    """Whether this process is rank 0 of its torchrun job (or runs alone), before it joins."""
    return os.environ.get("RANK", "0") == "0"


def _producer(opts: RelabelOptions, device: torch.device, ranks: Ranks) -> ProducerInfo:
    """Who wrote the set: softserve's and torch's versions, the device, batch and ranks."""
    return ProducerInfo(
        softserve_version=softserve.__version__,
        torch_version=torch.__version__,
        device=str(device),
        batch_size=opts.batch_size,
        world_size=ranks.world_size,
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
            raise StoreError(describe_write_error(exc, out) + "; fix it and rerun") from None
    ranks.barrier()
    for index in range(len(config.shard_ranges())):
        if index % ranks.world_size == ranks.rank:
            (out / (shard_file(index) + TMP_SUFFIX)).unlink(missing_ok=True)


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
                config.views.policy,
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
