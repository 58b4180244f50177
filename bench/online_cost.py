"""What precomputing labels costs against the online teacher, in compute, in one run.

For each scenario (a synthetic image set and a teacher), on this machine:

1. relabel E epochs of views once (the precomputation), timed;
2. train the same student for E epochs on the stored labels (``softserve train --store``'s
   feed) and on the online teacher (``--teacher``'s feed: views drawn and labelled every
   step), interleaved and repeated; the median seconds of each.

Reported: the online/served training-time ratio, and the break-even: after how many
student runs the one relabel has paid for itself (relabel seconds over what each online
run spends more). Scenarios: the demo's narrow teacher (1×28×28, ConvNet width 32) and a
teacher as large as the student (3×32×32, ConvNet-3 width 128), both for the ConvNet-3
student. Timings are ratios within one run; the machine may be shared.

    python -m bench.online_cost [--epochs 30] [--repeats 3] [--json bench/results/online_cost.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bench.harness import make_image_set
from softserve.client import get_loss, open_local
from softserve.train import TrainOptions, build_student, fit, online_feed, served_feed
from softserve.worker.relabel import RelabelOptions, relabel
from softserve.worker.runtime import resolve_device
from softserve.worker.sources import TeacherInputs


@dataclass(frozen=True)
class Scenario:
    name: str
    teacher: str
    channels: int
    size: int
    ipc: int = 10
    classes: int = 10


SCENARIOS = (
    Scenario("demo teacher (ConvNet width 32, 1x28x28)", "softserve.models:fashion_mnist_teacher",
             1, 28),
    Scenario("teacher as large as the student (ConvNet-3 width 128, 3x32x32)",
             "softserve.models:convnet", 3, 32),
)  # fmt: skip


def measure(scenario: Scenario, work: Path, args: argparse.Namespace) -> dict:
    """Relabel once, then time served and online training, interleaved."""
    device = resolve_device(args.device)
    images = make_image_set(
        work / "images.pt", scenario.ipc * scenario.classes, scenario.classes, args.seed,
        channels=scenario.channels, size=scenario.size,
    )  # fmt: skip
    inputs = TeacherInputs(images=images, teacher=scenario.teacher)
    out = work / "store" / "set"
    started = time.perf_counter()
    relabel(RelabelOptions(**vars(inputs), out=out, epochs=args.epochs, device=args.device,
                           progress=False))  # fmt: skip
    relabel_s = time.perf_counter() - started
    base = TrainOptions(epochs=args.epochs, device=args.device, progress=False, eval="")
    served_opts = replace(base, store=out.parent, labelset=out.name)
    online_opts = replace(base, online=inputs)
    loss = get_loss("gift")
    seconds: dict[str, list[float]] = {"served": [], "online": []}
    for _ in range(args.repeats):
        for arm in ("served", "online"):
            torch.manual_seed(args.seed)
            with contextlib.ExitStack() as stack:
                if arm == "served":
                    labels = stack.enter_context(open_local(out))
                    feed, opts = served_feed(served_opts, labels, device), served_opts
                else:
                    feed, opts = online_feed(online_opts, device), online_opts
                student = build_student("convnet", feed.channels, feed.num_classes,
                                        feed.output_size)  # fmt: skip
                seconds[arm].append(fit(student.to(device), feed, loss, opts)[2])
    served, online = (statistics.median(seconds[a]) for a in ("served", "online"))
    extra = online - served
    return {
        "scenario": scenario.name,
        "teacher": scenario.teacher,
        "epochs": args.epochs,
        "relabel_s": round(relabel_s, 2),
        "served_s": [round(s, 4) for s in seconds["served"]],
        "online_s": [round(s, 4) for s in seconds["online"]],
        "online_over_served": round(online / served, 3),
        "break_even_runs": round(relabel_s / extra, 2) if extra > 0 else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=30, help="relabel and training epochs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.repeats < 1:
        parser.error("--epochs and --repeats must be at least 1")
    torch.set_num_threads(args.threads)
    results = []
    for scenario in SCENARIOS:
        with tempfile.TemporaryDirectory(prefix="online-cost-") as tmp:
            results.append(measure(scenario, Path(tmp), args))
        r = results[-1]
        print(f"{r['scenario']}: relabel {r['relabel_s']:.1f} s once; training online / served "
              f"{r['online_over_served']:.2f}; break-even after {r['break_even_runs']} runs",
              flush=True)  # fmt: skip
    if args.json is not None:
        meta = {"torch": torch.__version__, "device": args.device, "threads": args.threads,
                "epochs": args.epochs, "repeats": args.repeats}  # fmt: skip
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
