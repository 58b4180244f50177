"""What compact labels cost in accuracy, measured through a real softserve server.

1. Relabel the Fashion-MNIST demo IPC-10 set once at fp32 with E = 300 epochs of views
   (the demo's teacher, images and views; cached in the work folder).
2. Transcode it (``softserve transcode``: no teacher) into every variant: fp16, int8,
   topk:5, topk:3, topk:1 at E = 300, and fp32 keeping only the first E' = 30 and 10
   stored epochs (the student's 300 epochs wrap around them).
3. Serve the variants and train the ConvNet-3 student on each for 300 epochs with GIFT and
   KL, AdamW and SGD, over seeds; CE (hard labels only) runs on the fp32 reference as the
   floor soft labels should beat.
4. Write the table, the Pareto plot and the README section (``bench/label_budget_report.py``).

Resumable like the loss study: runs are appended to ``bench/results/label_budget.jsonl``
with their command, code version and the label bytes of their variant, and skipped on the
next run. Seed-major: a partial run covers every cell once first.

    python bench/label_budget.py                # the study (hours on 2 CPU cores)
    python bench/label_budget.py --smoke        # CI: 2 epochs, 3 variants, GIFT, 1 seed
    python bench/label_budget.py --device cuda  # on a GPU host
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import label_budget_report  # noqa: E402
from study import Runner, Server, add_common_arguments, small_eval_set  # noqa: E402

from softserve.storage.manifest import read_manifest  # noqa: E402
from softserve.worker.demo import DemoOptions, prepare_demo  # noqa: E402
from softserve.worker.transcode import TranscodeOptions, transcode  # noqa: E402

#: (codec, stored epochs); the first is the reference every other one is compared with.
VARIANTS = "fp32@300,fp16@300,int8@300,topk:5@300,topk:3@300,topk:1@300,fp32@30,fp32@10"
LOSSES = ("gift", "kl")
#: Hard labels only: run once, on the reference, as the floor.
FLOOR_LOSS = "ce"
OPTIMIZERS = ("adamw", "sgd")


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

    @property
    def key(self) -> tuple:
        return (self.codec, self.stored_epochs, self.loss, self.optimizer, self.seed,
                self.epochs, self.model)  # fmt: skip

    @property
    def variant(self) -> Variant:
        return Variant(self.codec, self.stored_epochs)


def plan(
    variants: list[Variant], seeds: list[int], epochs: int, losses: list[str],
    optimizers: list[str], floor: bool,
) -> list[Job]:  # fmt: skip
    """Every run, seed-major; the floor loss on the reference (first) variant only."""
    jobs = []
    for seed in seeds:
        for i, v in enumerate(variants):
            names = [*losses, FLOOR_LOSS] if floor and i == 0 else losses
            for loss in names:
                for optimizer in optimizers:
                    jobs.append(Job(v.codec, v.stored_epochs, loss, optimizer, seed, epochs))
    return jobs


def build_variants(
    workdir: Path, store: Path, variants: list[Variant], epochs: int, device: str, smoke: bool
) -> dict[Variant, dict]:
    """The fp32 reference relabelled once, every variant transcoded from it; their sizes."""
    source = prepare_demo(
        DemoOptions(
            workdir=workdir, store=workdir / "budget-source", ipc=10, label_epochs=epochs,
            codec="fp32", device=device, teacher_epochs=1 if smoke else 3,
            train_limit=2000 if smoke else None,
        ),
        log=lambda m: tqdm.write(f"prepare: {m}"),
    ).label_set  # fmt: skip
    sizes = {}
    for v in variants:
        out = store / v.name
        transcode(TranscodeOptions(source, out, codec=v.codec, epochs=v.stored_epochs))
        manifest = read_manifest(out)
        views = manifest.config.epochs * manifest.config.num_samples
        sizes[v] = {"label_bytes": manifest.label_bytes(),
                    "bytes_per_view": round(manifest.label_bytes() / views, 2)}  # fmt: skip
    return sizes


@dataclass
class Context:
    """What every job's command needs."""

    url: str
    eval: str
    device: str
    sizes: dict[Variant, dict]

    def command(self, job: Job) -> list[str]:
        return [
            "softserve", "train", "--url", self.url, "--labelset", job.variant.name,
            "--model", job.model, "--loss", job.loss, "--optimizer", job.optimizer,
            "--epochs", str(job.epochs), "--seed", str(job.seed), "--eval", self.eval,
            "--device", self.device, "--no-progress",
        ]  # fmt: skip

    def annotate(self, job: Job) -> dict:
        return {"labels": self.sizes[job.variant]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, "label_budget.jsonl")
    parser.add_argument("--variants", default=VARIANTS, help="CODEC@STORED_EPOCHS, reference first")
    parser.add_argument("--epochs", type=int, default=300, help="reference and training epochs")
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--no-floor", action="store_true", help=f"no {FLOOR_LOSS} on the reference")
    parser.add_argument(
        "--smoke", action="store_true",
        help="CI: tiny teacher, 2 epochs, fp32@2, topk:1@2 and fp32@1, GIFT, AdamW, seed 0",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.seeds, args.variants = 2, "0", "fp32@2,topk:1@2,fp32@1"
        args.losses, args.optimizers, args.no_floor = "gift", "adamw", True
        args.eval_limit = args.eval_limit or 500
    variants = [Variant.parse(v) for v in args.variants.split(",") if v]
    names = lambda text: [v for v in text.split(",") if v]  # noqa: E731
    args.results.parent.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    if not args.report_only:
        args.workdir.mkdir(parents=True, exist_ok=True)
        store = args.workdir / "budget-store"
        sizes = build_variants(args.workdir, store, variants, args.epochs, args.device, args.smoke)
        jobs = plan(
            variants, [int(s) for s in args.seeds.split(",")], args.epochs, names(args.losses),
            names(args.optimizers), floor=not args.no_floor,
        )  # fmt: skip
        evaluation = "fashion-mnist"
        if args.eval_limit:
            evaluation = str(small_eval_set(args.workdir, args.eval_limit))
        with Server(store, args.workdir / "budget-server.log") as server:
            ctx = Context(server.url, evaluation, args.device, sizes)
            runner = Runner(
                args.results, ctx.command, args.workers, args.threads, "label budget",
                annotate=ctx.annotate,
            )  # fmt: skip
            failures = runner.run(jobs)
    label_budget_report.write_report(args.results, args.out, readme=args.readme)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
