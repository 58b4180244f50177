"""Benchmark of the relabel pipeline and the label codecs, on synthetic image sets.

In one run on one machine, for each configuration (a synthetic image set and a teacher):

1. **Throughput.** ``softserve.worker.relabel.relabel`` end to end, against the bare teacher
   forward on exactly the same batches (views built with the same ``epoch_order`` /
   ``sample_views`` / ``apply_views``, batch size and normalization, a batch at a time; only
   ``model(views)`` is timed). Measurements are repeated, interleaved, and the median is
   reported, since the machine may be shared. The pipeline's time is also split into phases
   (load images, build teacher, probe, dataset write, label loop, manifest) by relabel's
   ``timing`` hook, so the steady-state ratio (label loop vs bare forward) is reported
   beside the end-to-end one. The project's goal is a ratio of at least 0.9.
2. **Storage.** The set is relabelled once at fp32 and transcoded to every codec (fp16, int8,
   and top-k with k of 1, 3, 5, 10 below K): bytes per label, and the stored bytes per
   (epoch, sample) of the shards (the refined label, its norm, the order and the view).
3. **Loss error.** What each codec moves the GIFT loss (on refined labels) and the official
   KL loss at T = 20 (on the logits recovered from them), against fp32, under random student
   logits; and a check that the stored labels equal the codec's round trip of fp32's.
   ``imagenet-k`` (K = 1000) is there for the codecs at ImageNet's class count.

Run ``python bench/relabel_bench.py --help`` for the options; ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.harness import make_image_set, paired_ratio
from softserve.client.losses import Targets, get_loss
from softserve.errors import InputError
from softserve.format.augment import ViewPolicy, sample_views
from softserve.format.sampling import epoch_order
from softserve.pixels import apply_views
from softserve.storage import CODECS, LabelSetConfig, LabelSetReader, get_codec, read_manifest
from softserve.storage.shards import NORM
from softserve.worker.relabel import RelabelOptions, relabel
from softserve.worker.runtime import autocast, check_precision, resolve_device
from softserve.worker.teacher import load_teacher
from softserve.worker.transcode import TranscodeOptions, transcode


@dataclass(frozen=True)
class Scenario:
    """A synthetic image set, its teacher, and how many epochs to relabel."""

    name: str
    channels: int
    size: int
    num_classes: int
    teacher: str
    num_samples: int
    epochs: int


SCENARIOS: dict[str, Scenario] = {
    "cifar100-like": Scenario(
        "cifar100-like", 3, 32, 100, "softserve.models:resnet18_small", 500, 2
    ),
    "fashion-mnist-like": Scenario(
        "fashion-mnist-like", 1, 28, 10, "softserve.models:fashion_mnist_teacher", 100, 40
    ),
    "imagenet-k": Scenario("imagenet-k", 3, 16, 1000, "softserve.models:resnet18_small", 200, 2),
}
QUICK: dict[str, dict[str, int]] = {
    "cifar100-like": {"num_samples": 128, "epochs": 2},
    "fashion-mnist-like": {"num_samples": 100, "epochs": 10},
    "imagenet-k": {"num_samples": 64, "epochs": 2},
}
#: k of the top-k codecs measured (those below the class count).
TOPK = (1, 3, 5, 10)


# --------------------------------------------------------------------------- inputs


def relabel_options(
    args: argparse.Namespace, scenario: Scenario, images: Path, out: Path, codec: str
) -> RelabelOptions:
    """The options of one relabel of ``scenario`` into ``out``."""
    return RelabelOptions(
        images=images,
        teacher=scenario.teacher,
        out=out,
        num_classes=scenario.num_classes,
        epochs=scenario.epochs,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        codec=codec,
        progress=False,
    )


# --------------------------------------------------------------------------- pipeline


def _sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """relabel's ``timing`` hook: sums the wall time of each phase it wraps (the probe
    included), waiting for queued CUDA work at each phase's end."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - start


@dataclass
class PipelineRun:
    """One timed relabel: total seconds and the seconds of each phase found."""

    total_s: float
    phases: dict[str, float]


def run_pipeline(opts: RelabelOptions, seed: int, device: torch.device) -> PipelineRun:
    """Relabel into a fresh ``opts.out``, timed end to end and by phase."""
    torch.manual_seed(seed)  # the teacher's random init: same weights in every run
    timer = PhaseTimer(device)
    start = time.perf_counter()
    relabel(opts, timing=timer)
    _sync(device)
    total = time.perf_counter() - start
    phases = dict(timer.times)
    phases["other"] = total - sum(phases.values())
    return PipelineRun(total, phases)


# --------------------------------------------------------------------------- bare teacher


def plan_batches(config: LabelSetConfig, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (sample ids, view params) of every teacher batch the worker runs, in its order.

    Mirrors the worker: per shard, every epoch's order and its views in order, flattened
    across the shard's epochs and cut into batches of ``batch_size`` (the last one shorter;
    the worker pads it, the bare baseline does not).
    """
    _, h, w = config.image_shape
    policy = ViewPolicy(scale=config.views.scale, ratio=config.views.ratio, flip=config.views.flip)
    batches = []
    for start, stop in config.shard_ranges():
        ids, params = [], []
        for epoch in range(start, stop):
            order = epoch_order(config.seed, epoch, config.num_samples)
            ids.append(order)
            params.append(sample_views(policy, config.seed, epoch, config.num_samples, h, w)[order])
        flat_ids, flat_params = np.concatenate(ids), np.concatenate(params)
        for pos in range(0, len(flat_ids), batch_size):
            batches.append((flat_ids[pos : pos + batch_size], flat_params[pos : pos + batch_size]))
    return batches


def iter_views(
    images: torch.Tensor,
    batches: list[tuple[np.ndarray, np.ndarray]],
    config: LabelSetConfig,
    device: torch.device,
) -> Iterator[torch.Tensor]:
    """The teacher's input of every batch, on ``device``, as the worker builds it, one batch
    at a time: at 224 px the views of a whole run would not fit in memory."""
    images = images.to(device)
    for ids, params in batches:
        x = apply_views(
            images[torch.from_numpy(ids).to(device)],
            torch.from_numpy(params).to(device),
            config.views.output_size,
            mean=config.mean,
            std=config.std,
        )
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        yield x


def build_bare_teacher(scenario: Scenario, seed: int, device: torch.device) -> torch.nn.Module:
    """The same teacher the worker loads (same spec, same seeded init), on ``device``."""
    torch.manual_seed(seed)
    model = load_teacher(scenario.teacher, None, scenario.num_classes).model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def time_bare(
    model: torch.nn.Module, views: Iterator[torch.Tensor], device: torch.device, precision: str
) -> float:
    """Seconds in ``model(x)`` over every batch of ``views``, the views' own building not
    counted (one untimed warm-up batch first)."""
    total = 0.0
    with torch.inference_mode(), autocast(device, precision):
        for i, x in enumerate(views):
            _sync(device)
            if i == 0:
                model(x)
                _sync(device)
            start = time.perf_counter()
            model(x)
            _sync(device)
            total += time.perf_counter() - start
    return total


# --------------------------------------------------------------------------- measurements


@dataclass
class Throughput:
    """Median throughputs of one configuration, and the raw times of every repeat."""

    samples: int
    teacher_rows_pipeline: int
    bare_s: list[float] = field(default_factory=list)
    pipeline_s: list[float] = field(default_factory=list)
    loop_s: list[float] = field(default_factory=list)
    phases_s: dict[str, list[float]] = field(default_factory=dict)

    def rate(self, times: list[float]) -> float | None:
        """Useful samples per second at the median of ``times``."""
        return self.samples / statistics.median(times) if times else None

    def summary(self) -> dict[str, float | None]:
        """Throughputs and their ratios to the bare forward."""
        bare, pipe, loop = (
            self.rate(self.bare_s),
            self.rate(self.pipeline_s),
            self.rate(self.loop_s),
        )
        return {
            "bare_samples_per_s": bare,
            "pipeline_samples_per_s": pipe,
            "loop_samples_per_s": loop,
            "ratio_pipeline_over_bare": pipe / bare if bare and pipe else None,
            "ratio_loop_over_bare": loop / bare if bare and loop else None,
            # bare time over the other's, per repeat: the other's rate over the bare one's
            "paired_ratio_pipeline_over_bare": _paired(self.bare_s, self.pipeline_s),
            "paired_ratio_loop_over_bare": _paired(self.bare_s, self.loop_s),
        }


def _paired(bare_s: list[float], other_s: list[float]) -> float | None:
    return paired_ratio(bare_s, other_s) if bare_s and len(bare_s) == len(other_s) else None


def measure_throughput(
    args: argparse.Namespace,
    scenario: Scenario,
    images_path: Path,
    work: Path,
    device: torch.device,
) -> tuple[Throughput, Path]:
    """Interleaved repeats of (pipeline, bare forward); returns the last pipeline's output."""
    # built first: importing the teacher's module (torchvision) is not charged to run 0
    model = build_bare_teacher(scenario, args.seed, device)
    out = work / f"{scenario.name}-{args.codec}-0"
    first = run_pipeline(
        relabel_options(args, scenario, images_path, out, args.codec), args.seed, device
    )
    config = read_manifest(out).config
    batches = plan_batches(config, args.batch_size)
    samples = scenario.epochs * scenario.num_samples
    if device.type == "cuda":  # shards' last batches padded; the probe is a full batch
        pipeline_rows = len(batches) * args.batch_size + args.batch_size
    else:  # no padding; a 2-row probe
        pipeline_rows = samples + min(2, args.batch_size)
    images = torch.load(images_path, weights_only=True)["data"]
    result = Throughput(
        samples=samples,
        teacher_rows_pipeline=pipeline_rows,
    )
    runs = [first]
    for repeat in range(args.repeats):
        if repeat > 0:
            out = work / f"{scenario.name}-{args.codec}-{repeat}"
            opts = relabel_options(args, scenario, images_path, out, args.codec)
            runs.append(run_pipeline(opts, args.seed, device))
        views = iter_views(images, batches, config, device)
        result.bare_s.append(time_bare(model, views, device, args.precision))
    for run in runs:
        result.pipeline_s.append(run.total_s)
        if "label loop" in run.phases:
            result.loop_s.append(run.phases["label loop"])
        for name, seconds in run.phases.items():
            result.phases_s.setdefault(name, []).append(seconds)
    return result, out


def stored_label_bytes(out: Path) -> int:
    """Total size of the label shards of the label set at ``out``."""
    return sum(p.stat().st_size for p in out.glob("labels-*.h5"))


def read_labels(out: Path, epochs: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Every epoch's (or the given stored epochs') refined labels, recovered logits, norms
    and hard labels, in order."""
    with LabelSetReader(out) as reader:
        n = reader.config.num_samples
        chosen = range(reader.config.epochs) if epochs is None else epochs
        rows = [reader.read(e, 0, n, fields=("order", "soft", "logits", NORM)) for e in chosen]
        hard = reader.hard_labels()
    stacked = {f: np.stack([r[f] for r in rows]) for f in ("order", "soft", "logits", NORM)}
    stacked["hard"] = hard[stacked.pop("order")]
    return stacked


def loss_errors(
    reference: dict[str, np.ndarray], decoded: dict[str, np.ndarray], batch_size: int, seed: int
) -> dict[str, float]:
    """Max and mean |Δ loss| over batches for GIFT (on refined labels) and KL at T = 20 (on
    logits, the official evaluator's, no T²).

    Batches are ``batch_size`` consecutive rows of each epoch (as served); student logits
    are standard normal from ``seed``, the same for every codec.
    """
    gen = torch.Generator().manual_seed(seed)
    epochs, n, k = reference["soft"].shape
    gift, kl = get_loss("gift"), get_loss("kl")
    diffs: dict[str, list[float]] = {"gift": [], "kl": []}
    for e in range(epochs):
        student = torch.randn(n, k, generator=gen, dtype=torch.float64)
        for pos in range(0, n, batch_size):
            s = slice(pos, pos + batch_size)
            exact, approx = (
                Targets(
                    soft=torch.from_numpy(x["soft"][e, s]).double(),
                    hard=torch.from_numpy(reference["hard"][e, s]),
                    logits=torch.from_numpy(x["logits"][e, s]).double(),
                )
                for x in (reference, decoded)
            )
            for name, loss in (("gift", gift), ("kl", kl)):
                diffs[name].append(abs(float(loss(student[s], approx) - loss(student[s], exact))))
    return {
        f"{stat}_abs_{name}_error": fn(values)
        for name, values in diffs.items()
        for stat, fn in (("max", max), ("mean", lambda v: float(np.mean(v))))
    }


@dataclass
class CodecResult:
    """Storage cost and loss error of one codec on one configuration."""

    codec: str
    bytes_per_label: int
    stored_bytes_per_epoch_sample: float
    max_abs_refined_error: float
    max_abs_logits_error: float
    max_abs_gift_error: float
    mean_abs_gift_error: float
    max_abs_kl_error: float
    mean_abs_kl_error: float
    max_abs_stored_vs_roundtrip: float


def codecs_for(num_classes: int) -> list[str]:
    """The codecs measured at ``num_classes``: every fixed one, and top-k with k < K."""
    return [*CODECS, *(f"topk:{k}" for k in TOPK if k < num_classes)]


def measure_codecs(
    args: argparse.Namespace,
    scenario: Scenario,
    images_path: Path,
    work: Path,
    device: torch.device,
    reuse: dict[str, Path],
) -> list[CodecResult]:
    """Relabel once at fp32 (or reuse it), transcode to every codec, and measure each
    against fp32: bytes, label and loss errors."""
    source = reuse.get("fp32")
    if source is None:
        source = work / f"{scenario.name}-fp32-codec"
        run_pipeline(
            relabel_options(args, scenario, images_path, source, "fp32"), args.seed, device
        )
    reference = read_labels(source)
    results = []
    samples = scenario.epochs * scenario.num_samples
    for name in codecs_for(scenario.num_classes):
        out = source if name == "fp32" else work / f"{scenario.name}-{name.replace(':', '-')}"
        if name != "fp32":
            transcode(TranscodeOptions(source, out, codec=name, progress=False))
        stored = read_labels(out)
        codec = get_codec(name)
        roundtrip = codec.decode(codec.encode(reference["soft"]), scenario.num_classes)
        results.append(
            CodecResult(
                codec=name,
                bytes_per_label=codec.bytes_per_label(scenario.num_classes),
                stored_bytes_per_epoch_sample=stored_label_bytes(out) / samples,
                max_abs_refined_error=float(np.abs(stored["soft"] - reference["soft"]).max()),
                max_abs_logits_error=float(np.abs(stored["logits"] - reference["logits"]).max()),
                **loss_errors(reference, stored, args.batch_size, args.seed),
                max_abs_stored_vs_roundtrip=float(np.abs(stored["soft"] - roundtrip).max()),
            )
        )
    return results


# --------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _rate_row(
    label: str, rate: float | None, ratio: float | None, paired: float | None, times: list[float]
) -> str:
    """One line of the throughput table."""
    runs = " ".join(f"{t:.2f}" for t in times)
    return (
        f"  {label:<32}{_fmt(rate, '.1f'):>10}{_fmt(ratio, '.2f'):>9}{_fmt(paired, '.2f'):>8}"
        f"   {runs}"
    )


def format_report(
    scenario: Scenario,
    args: argparse.Namespace,
    device: torch.device,
    tp: Throughput,
    codecs: list[CodecResult],
) -> str:
    """The human-readable tables of one configuration."""
    s = tp.summary()
    med = {k: statistics.median(v) for k, v in tp.phases_s.items()}
    lines = [
        f"== {scenario.name}: N={scenario.num_samples} {scenario.channels}x{scenario.size}x"
        f"{scenario.size} K={scenario.num_classes} teacher={scenario.teacher}",
        f"   epochs={scenario.epochs} batch={args.batch_size} device={device} "
        f"precision={args.precision} codec={args.codec} repeats={args.repeats} "
        f"threads={torch.get_num_threads()}",
        "",
        f"  {'throughput':<32}{'samples/s':>10}{'vs bare':>9}{'paired':>8}   seconds per run",
        _rate_row("bare teacher forward", s["bare_samples_per_s"], 1.0, 1.0, tp.bare_s),
        _rate_row(
            "pipeline end to end",
            s["pipeline_samples_per_s"],
            s["ratio_pipeline_over_bare"],
            s["paired_ratio_pipeline_over_bare"],
            tp.pipeline_s,
        ),
        _rate_row(
            "pipeline label loop (no setup)",
            s["loop_samples_per_s"],
            s["ratio_loop_over_bare"],
            s["paired_ratio_loop_over_bare"],
            tp.loop_s,
        ),
        "  (samples/s from the median time; vs bare: ratio of those; paired: median over repeats"
        " of\n   the ratio within a repeat, robust to load that drifts between repeats)",
        f"  useful samples {tp.samples}; teacher rows the pipeline runs "
        f"{tp.teacher_rows_pipeline} (with the probe, and on CUDA the padding of each "
        "shard's last batch)",
        "  pipeline phases (median s): " + ", ".join(f"{k} {v:.2f}" for k, v in med.items()),
        "",
        f"  {'codec':<8}{'B/label':>8}{'stored B/(ep,smp)':>19}{'max|Δrefined|':>15}"
        f"{'max|Δlogits|':>14}{'max|Δgift|':>12}{'mean|Δgift|':>13}{'max|Δkl|':>11}"
        f"{'mean|Δkl|':>11}{'stored≠rt':>11}",
    ]
    for c in codecs:
        lines.append(
            f"  {c.codec:<8}{c.bytes_per_label:>8}{c.stored_bytes_per_epoch_sample:>19.1f}"
            f"{c.max_abs_refined_error:>15.2e}{c.max_abs_logits_error:>14.2e}"
            f"{c.max_abs_gift_error:>12.2e}{c.mean_abs_gift_error:>13.2e}"
            f"{c.max_abs_kl_error:>11.2e}{c.mean_abs_kl_error:>11.2e}"
            f"{c.max_abs_stored_vs_roundtrip:>11.1e}"
        )
    lines.append(
        "  stored B/(ep,smp): label shard bytes / (epochs*N): the refined label in the codec,"
        " its\n  norm (4 B), order (4 B) and view params (10 B) per row, plus HDF5 overhead."
        " Errors against\n  fp32 (logits recovered from the refined labels); kl: T = 20,"
        " batchmean, no T^2.\n  stored≠rt: max |stored - codec(fp32 labels)|."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options, with the --quick-dependent defaults filled in."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        nargs="+",
        choices=list(SCENARIOS),
        default=list(SCENARIOS),
        help="configurations to run: cifar100-like (32x32 RGB, 100 classes, ResNet-18), "
        "fashion-mnist-like (28x28 gray, 10 classes, small ConvNet) and imagenet-k (16x16 RGB, "
        "1000 classes, ResNet-18: the codecs at K = 1000); default all",
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="tiny sizes, batch 64, 2 repeats: a ~30 s smoke run")
    add("--repeats", type=int, help="timed repeats, interleaved (default 3; 2 with --quick)")
    add("--batch-size", type=int, help="teacher batch size (default 256; 64 with --quick)")
    add("--device", default="auto", help="auto, cpu or cuda (default %(default)s)")
    add("--precision", default="fp32", help="fp32; bf16 or fp16 on CUDA (default %(default)s)")
    add("--codec", default="fp16", help="codec of the timed runs (default %(default)s)")
    add("--seed", type=int, default=0, help="seed of images, teacher init and views")
    add("--threads", type=int, help="call torch.set_num_threads (default: torch's choice)")
    add("--workdir", type=Path, help="keep outputs in a new folder here (default: temp, deleted)")
    add("--json", type=Path, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    if args.batch_size is None:
        args.batch_size = 64 if args.quick else 256
    if args.repeats < 1 or args.batch_size < 1:
        parser.error("--repeats and --batch-size must be at least 1")
    return args


def scenario_for(name: str, quick: bool) -> Scenario:
    """The named configuration, shrunk for ``--quick``."""
    base = SCENARIOS[name]
    if not quick:
        return base
    return replace(base, **QUICK[name])


def run_scenario(
    args: argparse.Namespace, scenario: Scenario, work: Path, device: torch.device
) -> dict[str, Any]:
    """Measure one configuration, print its tables, and return its JSON record."""
    images = work / f"{scenario.name}.pt"
    make_image_set(
        images, scenario.num_samples, scenario.num_classes, args.seed,
        channels=scenario.channels, size=scenario.size,
    )  # fmt: skip
    tp, last_out = measure_throughput(args, scenario, images, work, device)
    codecs = measure_codecs(args, scenario, images, work, device, {args.codec: last_out})
    print(format_report(scenario, args, device, tp, codecs), flush=True)
    print()
    return {
        "scenario": asdict(scenario),
        "throughput": {**tp.summary(), **asdict(tp)},
        "codecs": [asdict(c) for c in codecs],
    }


def main(argv: list[str] | None = None) -> int:
    """Run every selected configuration, print the tables, write --json if asked."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        check_precision(device, args.precision)
    except InputError as exc:
        print(f"relabel_bench: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="relabel-bench-")))
        else:
            args.workdir.mkdir(parents=True, exist_ok=True)  # a fresh run dir: nothing reused
            work = Path(tempfile.mkdtemp(prefix="relabel-bench-", dir=args.workdir))
        records = [
            run_scenario(args, scenario_for(n, args.quick), work, device) for n in args.config
        ]
    elapsed = time.perf_counter() - started
    print(f"total benchmark time {elapsed:.1f} s")
    if args.json is not None:
        meta = {
            "torch": torch.__version__,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "total_s": elapsed,
        }
        args.json.write_text(json.dumps({"meta": meta, "configs": records}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
