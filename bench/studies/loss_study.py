"""The GIFT paper's loss study on Fashion-MNIST, run through a real softserve server.

1. Build (or reuse) the demo label sets at IPC 1, 10 and 50: one real teacher, an IPC-k
   synthetic set picked by confidence, E epochs of views relabelled into a store.
2. Start ``softserve serve`` over that store on loopback.
3. Run ``softserve train`` jobs in a worker pool sized to the cores: at IPC 10 every loss
   × optimizer × seed, served; the online-teacher arm (GIFT and KL, AdamW and SGD) beside
   it; then IPC 1 and IPC 50 for GIFT, KL and CE.
4. Write the tables and plots (``bench.studies.loss_report``).

``--views dsa`` runs the IPC-10 cell again under the GIFT evaluator's DSA views: the demo's
teacher, images and seed relabelled into ``fashion-mnist-ipc10-dsa``, GIFT, KL and CE ×
AdamW and SGD, served only (the online arm draws crops), into ``loss_study_dsa.jsonl``; its
report puts the paper's questions to both protocols.

Resumable: every finished run is appended to a JSON-lines results file, with its command
and code version, and skipped on the next run; the file is the source of every table.
Jobs are ordered seed-major, so a partial run already covers every cell once.

    python -m bench.studies.loss_study                 # the full study (hours on 2 CPU cores)
    python -m bench.studies.loss_study --smoke         # CI: 2 epochs, 2 losses, 1 seed, small eval
    python -m bench.studies.loss_study --device cuda   # on a GPU host
    python -m bench.studies.loss_study --views dsa     # the IPC-10 cell under DSA views
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from bench.harness import Server
from bench.studies import loss_report
from bench.studies.study import RESULTS, Runner, add_common_arguments, provenance, small_eval_set
from softserve.client import LOSS_NAMES
from softserve.format.augment import VIEW_KINDS
from softserve.worker import fashion_mnist
from softserve.worker.demo import DEMO_POLICY, TEACHER_SPEC, DemoOptions, prepare_demo

OPTIMIZERS = ("adamw", "adam", "sgd")
#: Losses run at every IPC; at the main IPC every loss of the paper runs.
CORE_LOSSES = ("gift", "kl", "ce")
#: The online-teacher arm: what precomputed labels are compared against.
ONLINE_LOSSES = ("gift", "kl")
ONLINE_OPTIMIZERS = ("adamw", "sgd")
#: What ``--views dsa`` changes in the defaults: the IPC-10 cell of the paper's questions.
DSA_DEFAULTS = {
    "ipcs": "10", "losses": ",".join(CORE_LOSSES), "optimizers": ",".join(ONLINE_OPTIMIZERS),
    "results": RESULTS / "loss_study_dsa.jsonl",
}  # fmt: skip


@dataclass(frozen=True)
class Job:
    """One student run; its key identifies it in the results file."""

    ipc: int
    feed: str
    loss: str
    optimizer: str
    seed: int
    epochs: int
    model: str = "convnet"
    #: The label set's views: "rrc" (crops + flip, every record before DSA) or "dsa".
    views: str = "rrc"

    @property
    def key(self) -> tuple:
        return (self.ipc, self.feed, self.loss, self.optimizer, self.seed, self.epochs, self.model,
                self.views)  # fmt: skip

    @property
    def labelset(self) -> str:
        """The served set's name, as the demo names it."""
        return DemoOptions(ipc=self.ipc, views=self.views).label_set_name


def plan(
    ipcs: list[int], main_ipc: int, seeds: list[int], epochs: int, losses: Iterable[str],
    core_losses: Iterable[str], optimizers: Iterable[str], online: bool, views: str = "rrc",
) -> list[Job]:  # fmt: skip
    """Every job of the study, seed-major: a partial run covers every cell once first.
    The online arm draws crops, so it runs beside crop sets only."""
    jobs = []
    for seed in seeds:
        for ipc in sorted(ipcs, key=lambda i: (i != main_ipc, i)):
            names = losses if ipc == main_ipc else core_losses
            for loss in names:
                for optimizer in optimizers:
                    jobs.append(Job(ipc, "served", loss, optimizer, seed, epochs, views=views))
            if online and ipc == main_ipc and views == "rrc":
                for loss in ONLINE_LOSSES:
                    for optimizer in ONLINE_OPTIMIZERS:
                        if optimizer in optimizers and loss in names:
                            jobs.append(Job(ipc, "online", loss, optimizer, seed, epochs))
    return jobs


@dataclass
class Context:
    """What every job's command needs: where things are and how to run them."""

    url: str
    workdir: Path
    eval: str
    device: str
    #: The store the demo sets are relabelled into and served from.
    store: Path

    def annotate(self, job: Job) -> dict:
        """What labelled the run: the served set's digest, teacher, images and views (from its
        manifest); an online run's teacher weights."""
        if job.feed == "online":
            weights = (self.workdir / "teacher.pt").read_bytes()
            return {"teacher_sha256": hashlib.sha256(weights).hexdigest(), "views": job.views}
        from softserve.storage.manifest import load_manifest

        root = self.store / job.labelset
        return {**provenance(root), "views": load_manifest(root)[0].config.views.policy}

    def command(self, job: Job) -> list[str]:
        common = [
            "--model", job.model, "--loss", job.loss, "--optimizer", job.optimizer,
            "--epochs", str(job.epochs), "--seed", str(job.seed), "--eval", self.eval,
            "--device", self.device, "--no-progress",
        ]  # fmt: skip
        if job.feed == "served":
            feed = ["--url", self.url, "--labelset", job.labelset]
        else:
            feed = [
                "--teacher", TEACHER_SPEC, "--weights", str(self.workdir / "teacher.pt"),
                "--images", str(self.workdir / f"ipc{job.ipc}"),
                "--mean", ",".join(map(str, fashion_mnist.MEAN)),
                "--std", ",".join(map(str, fashion_mnist.STD)),
                "--min-scale", str(DEMO_POLICY.scale[0]), "--max-scale", str(DEMO_POLICY.scale[1]),
            ]  # fmt: skip
        return ["softserve", "train", *feed, *common]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, "loss_study.jsonl")
    parser.add_argument(
        "--views", choices=VIEW_KINDS, default="rrc",
        help="rrc: the crop study; dsa: its IPC-10 cell (GIFT, KL, CE × AdamW, SGD) under DSA "
        "views, into loss_study_dsa.jsonl",
    )  # fmt: skip
    parser.add_argument("--ipcs", default="1,10,50")
    parser.add_argument("--main-ipc", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=300, help="label and training epochs")
    parser.add_argument("--losses", default=",".join(LOSS_NAMES), help="losses at the main IPC")
    parser.add_argument("--core-losses", default=",".join(CORE_LOSSES), help="at other IPCs")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--no-online", action="store_true", help="skip the online-teacher arm")
    parser.add_argument(
        "--codec", default="fp16",
        help="the label sets' codec (fp16: the committed study's; only new sets take it)",
    )  # fmt: skip
    parser.add_argument(
        "--smoke", action="store_true",
        help="CI: tiny teacher, 2 epochs, gift and kl, AdamW and SGD, seed 0, 500 test images "
        "(IPC 1 and 10; with --views dsa, IPC 10)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.views == "dsa":  # the DSA cell's defaults; options given still win
        parser.set_defaults(**DSA_DEFAULTS)
        args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.seeds = 2, "0"
        args.ipcs = "10" if args.views == "dsa" else "1,10"
        args.losses = args.core_losses = "gift,kl"
        args.optimizers = "adamw,sgd"
        args.eval_limit = args.eval_limit or 500
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    names = lambda text: [v for v in text.split(",") if v]  # noqa: E731
    args.results.parent.mkdir(parents=True, exist_ok=True)

    if not args.report_only:
        args.workdir.mkdir(parents=True, exist_ok=True)
        store = args.workdir / "store"
        for ipc in ints(args.ipcs):
            prepare_demo(
                DemoOptions(
                    workdir=args.workdir, store=store, ipc=ipc, label_epochs=args.epochs,
                    device=args.device, codec=args.codec, teacher_epochs=1 if args.smoke else 3,
                    train_limit=2000 if args.smoke else None, views=args.views,
                ),
                log=lambda m: tqdm.write(f"prepare: {m}"),
            )  # fmt: skip
        jobs = plan(
            ints(args.ipcs), args.main_ipc, ints(args.seeds), args.epochs, names(args.losses),
            names(args.core_losses), names(args.optimizers), online=not args.no_online,
            views=args.views,
        )  # fmt: skip
        evaluation = "fashion-mnist"
        if args.eval_limit:
            evaluation = str(small_eval_set(args.workdir, args.eval_limit))
        with Server(
            store, "--log-level", "warning", log=args.workdir / "server.log", ready_timeout=1800
        ) as server:
            ctx = Context(server.url, args.workdir, evaluation, args.device, store)
            runner = Runner(args.results, ctx.command, args.workers, args.threads,
                            f"loss study ({args.views})", annotate=ctx.annotate)  # fmt: skip
            failures = runner.run(jobs)
    if args.views == "dsa":
        loss_report.write_dsa_report(args.results, args.out, readme=args.readme)
    else:
        loss_report.write_report(args.results, args.out, readme=args.readme, main_ipc=args.main_ipc)
    return 1 if not args.report_only and failures else 0


if __name__ == "__main__":
    sys.exit(main())
