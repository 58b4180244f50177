"""Load test: many clients streaming at once from one server, for a while.

Setup (untimed): a random 32×32 RGB image set is relabelled (``--samples`` images,
``--classes`` classes, ``--epochs`` stored epochs) and ``softserve serve --workers W`` is
started on loopback with its default limits. Then ``--clients`` threads each open the
label set with the Python client and stream batches of ``--batch-size`` (labels as stored,
images from the client's cache, as a training job does) over as many epochs as it takes,
for ``--seconds``.

Reported: batches and samples per second over all clients, the time between consecutive
batches of a client (p50, p99: what a training step waits at worst with no prefetch),
errors (any exception in a client: the goal is 0), and the server's resident memory (all
its processes) before and after, and its peak (the goal: flat, within the limits).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.harness import LABEL_SET, Server, build_label_set
from softserve.client import Client

BENCH_DIR = Path(__file__).resolve().parent


def server_rss(pid: int) -> int:
    """Resident bytes of a process and its children (uvicorn's workers), from /proc."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) << 10
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return total
    return total + sum(server_rss(int(child)) for child in children)


class Watch(threading.Thread):
    """The server's peak resident memory while the load runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(name="rss-watch", daemon=True)
        self.pid = pid
        self.peak = server_rss(pid)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.peak = max(self.peak, server_rss(self.pid))


@dataclass
class Tally:
    """What the clients recorded, appended from their threads."""

    gaps: list[float] = field(default_factory=list)
    first: list[float] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def client_run(url: str, args: argparse.Namespace, go: threading.Barrier, tally: Tally) -> None:
    """One client: open the set and cache its images, wait for the others, then stream for
    ``args.seconds``, recording the time to the first batch and the gap before each next."""
    try:
        with Client(url) as client:
            remote = client.labelset(LABEL_SET)
            remote.base_images()
            sharding = remote.sharding(args.batch_size)
            go.wait(timeout=300)
            last = time.perf_counter()
            deadline = last + args.seconds
            batches = remote.raw_batches(0, sharding, epochs=1_000_000)
            for n, raw in enumerate(batches):
                now = time.perf_counter()
                (tally.gaps if n else tally.first).append(now - last)
                tally.samples.append(len(raw.tensors["indices"]))
                last = now
                if now >= deadline:
                    break
            batches.close()
    except Exception as exc:  # counted and reported: the goal is none
        go.abort()
        tally.errors.append(f"{type(exc).__name__}: {exc}")


def _ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.array(values) * 1e3, q)), 3) if values else float("nan")


def run_load(url: str, pid: int, args: argparse.Namespace) -> dict:
    tally = Tally()
    go = threading.Barrier(args.clients + 1)
    threads = [threading.Thread(target=client_run, args=(url, args, go, tally))
               for _ in range(args.clients)]  # fmt: skip
    for t in threads:
        t.start()
    go.wait(timeout=300)  # every client has its images: the load starts now
    rss_before = server_rss(pid)
    watch = Watch(pid)
    watch.start()
    started = time.perf_counter()
    for t in threads:
        t.join(timeout=args.seconds + 120)
    elapsed = time.perf_counter() - started
    watch.done.set()
    watch.join()
    time.sleep(1.0)  # let the server settle after the last stream ended
    rss_after = server_rss(pid)
    batches, samples = len(tally.samples), sum(tally.samples)
    return {
        "clients": args.clients,
        "seconds": round(elapsed, 2),
        "batches": batches,
        "samples": samples,
        "batches_per_s": round(batches / elapsed, 1),
        "samples_per_s": round(samples / elapsed, 1),
        "latency_ms": {"p50": _ms(tally.gaps, 50), "p99": _ms(tally.gaps, 99)},
        "first_batch_ms": {"p50": _ms(tally.first, 50), "max": _ms(tally.first, 100)},
        "errors": len(tally.errors),
        "error_messages": tally.errors[:10],
        "server_rss_mb": {"before": round(rss_before / 2**20, 1),
                          "after": round(rss_after / 2**20, 1),
                          "peak": round(watch.peak / 2**20, 1)},  # fmt: skip
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=2, help="server processes")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=4, help="stored epochs")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--codec", default="topk:10")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=BENCH_DIR / "results" / "load_test.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="softserve-load-") as tmp:
        work = Path(tmp)
        build_label_set(work, args.samples, args.classes, args.epochs, args.codec, args.seed)
        server = Server(work / "store", "--log-level", "warning", "--workers", args.workers,
                        log=work / "server.log")  # fmt: skip
        with server:
            record = run_load(server.url, server.pid, args)
    record["config"] = {k: str(v) for k, v in vars(args).items()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "config"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
