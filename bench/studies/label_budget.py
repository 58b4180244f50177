"""What compact labels cost in accuracy, measured through a real softserve server.

1. Relabel the Fashion-MNIST demo IPC-10 set once at fp32 with E = 300 epochs of views
   (the demo's teacher, images and views; cached in the work folder).
2. Transcode it (``softserve transcode``: no teacher) into every variant: fp16, int8,
   topk:5, topk:3, topk:1 at E = 300, and fp32 keeping only the first E' = 30 and 10
   stored epochs (the student's 300 epochs wrap around them).
3. Serve the variants and train the ConvNet-3 student on each for 300 epochs with GIFT and
   KL, AdamW and SGD, over seeds; CE (hard labels only) runs on the fp32 reference as the
   floor soft labels should beat.
4. Write the table, the Pareto plot and the README section (``bench.studies.label_budget_report``).

``--task triplets`` runs the same study at K = 1000 on Fashion-MNIST triplets
(:mod:`softserve.worker.garments`): IPC 1, a ConvNet-3 of width 32, SGD at lr 1.0, into
``bench/results/label_budget_k1000.jsonl``, with the K = 1000 codes (topk:10+int4, topk:10,
...). ``--losses softce`` adds a loss the verdict does not rest on.

Resumable like the loss study: runs are appended to the task's results file with their
command, code version, the label bytes of their variant and the provenance of its labels
(label-set digest, teacher and image sha256), and skipped on the next run. Decisive cells
first: the first ``--lead`` variants under each optimizer in turn (seed-major), then the
rest, so a partial run answers the question that decides the default codec. An optimizer
``NAME@LR`` trains with that learning rate (``sgd@0.1``: ``--optimizer sgd --lr 0.1``), a
column of its own; a bare name takes ``softserve train``'s default.

    python -m bench.studies.label_budget                   # the K = 10 study (hours on 2 CPU cores)
    python -m bench.studies.label_budget --task triplets   # the K = 1000 study
    python -m bench.studies.label_budget --smoke           # CI: 2 epochs, 3 variants, GIFT, 1 seed
    python -m bench.studies.label_budget --device cuda     # on a GPU host
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from bench.harness import Server
from bench.studies import label_budget_report
from bench.studies.study import RESULTS, Runner, add_common_arguments, provenance, small_eval_set
from softserve.storage.manifest import read_manifest
from softserve.worker.demo import DemoOptions, prepare_demo
from softserve.worker.transcode import TranscodeOptions, transcode

#: (codec, stored epochs) by task; the first is the reference every other one is compared
#: with, and the first four are the decisive ones (--lead).
VARIANTS = {
    "fashion-mnist": "fp32@300,fp16@300,int8@300,topk:5@300,topk:3@300,topk:1@300,fp32@30,fp32@10",
    "triplets": "fp32@300,topk:10+int4@300,topk:10+int2@300,int8@300,topk:10+int1@300,"
                "topk:10@300,topk:50@300,topk:100@300,topk:1@300,fp16@300,topk:10+int4@30",
}  # fmt: skip
#: What differs by task: the synthetic set's IPC, the student's width (None: 128) and its
#: training epochs (None: as many as the reference's, --epochs).
TASK_SETS = {"fashion-mnist": (10, None, None), "triplets": (1, 32, 100)}
LOSSES = ("gift", "kl")
#: Hard labels only: run once, on the reference, as the floor.
FLOOR_LOSS = "ce"
#: Optimizers by task: at K = 1000, SGD at train's lr 0.01 leaves soft-label students at
#: chance, and lr 1.0 is where GIFT under SGD matches AdamW (README, "At K = 1000").
OPTIMIZERS = {"fashion-mnist": "adamw,sgd", "triplets": "adamw,sgd@1.0"}


@dataclass(frozen=True)
class Variant:
    """One stored form of the reference labels."""

    codec: str
    stored_epochs: int

    @classmethod
    def parse(cls, text: str) -> Variant:
        codec, _, epochs = text.rpartition("@")
        if not codec or not epochs.isdigit():
            raise SystemExit(f"variant {text!r}: expected CODEC@EPOCHS, e.g. topk:5@300")
        return cls(codec, int(epochs))

    @property
    def name(self) -> str:
        return f"budget-{self.codec.replace(':', '')}-e{self.stored_epochs}"


@dataclass(frozen=True)
class Job:
    """One student run on one variant; its key identifies it in the results file."""

    codec: str
    stored_epochs: int
    loss: str
    optimizer: str
    seed: int
    epochs: int
    model: str = "convnet"
    width: int | None = None
    ipc: int | None = None  # None: the task's (TASK_SETS), as every record before --ipc

    @property
    def key(self) -> tuple:
        return (self.codec, self.stored_epochs, self.loss, self.optimizer, self.seed,
                self.epochs, self.model, self.width, self.ipc)  # fmt: skip

    @property
    def variant(self) -> Variant:
        return Variant(self.codec, self.stored_epochs)


def plan(
    variants: list[Variant], seeds: list[int], epochs: int, losses: list[str],
    optimizers: list[str], floor: bool, lead: int = 4, width: int | None = None,
    ipc: int | None = None,
) -> list[Job]:  # fmt: skip
    """Every run: the first ``lead`` variants under each optimizer in turn, then the rest;
    seed-major within each; the floor loss on the reference (first) variant only."""
    jobs = []
    for group in (variants[:lead], variants[lead:]):
        for optimizer in optimizers:
            for seed in seeds:
                for v in group:
                    names = [*losses, FLOOR_LOSS] if floor and v == variants[0] else losses
                    jobs += [Job(v.codec, v.stored_epochs, loss, optimizer, seed, epochs,
                                 width=width, ipc=ipc) for loss in names]  # fmt: skip
    return jobs


def build_variants(
    workdir: Path, store: Path, variants: list[Variant], epochs: int, device: str, smoke: bool,
    task: str = "fashion-mnist", ipc: int | None = None,
) -> tuple[dict[Variant, dict], str]:  # fmt: skip
    """The fp32 reference relabelled once, every variant transcoded from it; their sizes,
    and the task's test split for --eval."""
    prepared = prepare_demo(
        DemoOptions(
            task=task, workdir=workdir, store=workdir / "budget-source",
            ipc=ipc or TASK_SETS[task][0],
            label_epochs=epochs, codec="fp32", device=device, teacher_epochs=1 if smoke else 3,
            train_limit=2000 if smoke else None, progress=False,
        ),
        log=lambda m: tqdm.write(f"prepare: {m}"),
    )  # fmt: skip
    source = prepared.label_set
    sizes = {}
    for v in variants:
        out = store / v.name
        transcode(TranscodeOptions(source, out, codec=v.codec, epochs=v.stored_epochs))
        manifest = read_manifest(out)
        views = manifest.config.epochs * manifest.config.num_samples
        sizes[v] = {"label_bytes": manifest.label_bytes(),
                    "bytes_per_view": round(manifest.label_bytes() / views, 2)}  # fmt: skip
    return sizes, prepared.eval_set


@dataclass
class Context:
    """What every job's command needs."""

    url: str
    eval: str
    device: str
    sizes: dict[Variant, dict]
    store: Path

    def command(self, job: Job) -> list[str]:
        width = [] if job.width is None else ["--width", str(job.width)]
        optimizer, _, lr = job.optimizer.partition("@")
        rate = ["--lr", lr] if lr else []
        return [
            "softserve", "train", "--url", self.url, "--labelset", job.variant.name,
            "--model", job.model, *width, "--loss", job.loss, "--optimizer", optimizer, *rate,
            "--epochs", str(job.epochs), "--seed", str(job.seed), "--eval", self.eval,
            "--device", self.device, "--no-progress",
        ]  # fmt: skip

    def annotate(self, job: Job) -> dict:
        return {"labels": self.sizes[job.variant], **provenance(self.store / job.variant.name)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, None)
    parser.add_argument("--task", choices=TASK_SETS, default="fashion-mnist")
    parser.add_argument("--variants", default=None,
                        help="CODEC@STORED_EPOCHS, reference first [default: the task's]")
    parser.add_argument("--lead", type=int, default=4, help="decisive variants, run first")
    parser.add_argument("--ipc", type=int, default=None,
                        help="images per class of the synthetic set [default: the task's]")
    parser.add_argument("--epochs", type=int, default=300, help="reference and training epochs")
    parser.add_argument("--train-epochs", type=int, default=None,
                        help="student epochs [default: the task's, or --epochs]")  # fmt: skip
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--optimizers", default=None,
                        help="NAME or NAME@LR, comma-separated (sgd@0.1: SGD at lr 0.1) "
                             "[default: the task's]")  # fmt: skip
    parser.add_argument("--no-floor", action="store_true", help=f"no {FLOOR_LOSS} on the reference")
    parser.add_argument(
        "--smoke", action="store_true",
        help="CI: tiny teacher, 2 epochs, fp32@2, topk:1@2 and fp32@1, GIFT, AdamW, seed 0",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.results is None:
        args.results = RESULTS / f"{label_budget_report.TASKS[args.task].stem}.jsonl"
    args.variants = args.variants or VARIANTS[args.task]
    if args.smoke:
        args.epochs, args.seeds, args.variants = 2, "0", "fp32@2,topk:1@2,fp32@1"
        args.train_epochs = 2
        args.losses, args.optimizers, args.no_floor = "gift", "adamw", True
        args.eval_limit = args.eval_limit or 500
    args.optimizers = args.optimizers or OPTIMIZERS[args.task]
    args.train_epochs = args.train_epochs or TASK_SETS[args.task][2] or args.epochs
    variants = [Variant.parse(v) for v in args.variants.split(",") if v]
    names = lambda text: [v for v in text.split(",") if v]  # noqa: E731
    args.results.parent.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    if not args.report_only:
        args.workdir.mkdir(parents=True, exist_ok=True)
        ipc = None if args.ipc in (None, TASK_SETS[args.task][0]) else args.ipc
        store = args.workdir / ("budget-store" if ipc is None else f"budget-store-ipc{ipc}")
        sizes, evaluation = build_variants(
            args.workdir, store, variants, args.epochs, args.device, args.smoke, args.task, ipc
        )
        jobs = plan(
            variants, [int(s) for s in args.seeds.split(",")], args.train_epochs,
            names(args.losses),
            names(args.optimizers), floor=not args.no_floor, lead=args.lead,
            width=TASK_SETS[args.task][1], ipc=ipc,
        )  # fmt: skip
        if args.eval_limit and args.task == "fashion-mnist":
            evaluation = str(small_eval_set(args.workdir, args.eval_limit))
        log = args.workdir / "budget-server.log"
        server = Server(store, "--log-level", "warning", log=log, ready_timeout=1800)
        with server:
            ctx = Context(server.url, evaluation, args.device, sizes, store)
            runner = Runner(
                args.results, ctx.command, args.workers, args.threads, "label budget",
                annotate=ctx.annotate,
            )  # fmt: skip
            failures = runner.run(jobs)
    label_budget_report.write_report(args.results, args.out, readme=args.readme, task=args.task)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
