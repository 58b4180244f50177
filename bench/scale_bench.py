"""ImageNet-shaped, end to end: N = 10,000 random 224 px RGB images (IPC 10 of ImageNet-1K),
K = 1000, ``topk:10``, from the relabel to a node of ranks and DataLoader workers.

Every figure is a ratio against a baseline in the same run (medians of interleaved repeats;
goals are judged on paired ratios, the median of the ratios within each repeat):

1. **Relabel.** ``relabel`` end to end against the bare teacher forward on the same views
   (``bench.relabel_bench``): a small teacher on the CPU (``bench.serve_teacher:
   patch_convnet``, E = 3), a ResNet-18 in bf16 on CUDA (``bench.serve_teacher:resnet18``).
   Peak RSS of ``softserve relabel`` (one epoch) in a process of its own, N images against
   ``--baseline-samples`` of them, so that torch's fixed cost cancels: its growth over the
   images' bytes.
2. **Server.** One server process (``serve --workers 1``) streaming the run's batches in
   stored form (``label_encoding=stored``, no images) to one client: samples/s, and samples
   per second of the server process's own CPU (what one worker process sustains when the
   client is not on its cores).
3. **Client.** ``RemoteLabelSet.loader`` against ``open_local(...).loader`` on the same set,
   batch 256, views on ``--device``, both over the node's image cache; and their stored
   batches alone (no views), for information.
4. **Wire.** Bytes a sample of the stream costs on the wire, and the base images' bytes
   sent to a node over their size (the server's ``softserve_response_bytes_total``).
5. **Node.** ``--ranks`` processes (RANK/WORLD_SIZE, each its own rank of the loader) with
   ``--workers`` DataLoader workers each read one epoch from a fresh ``SOFTSERVE_CACHE_DIR``,
   remote and local; with the workers alive, Pss_Anon + Pss_Shmem (``/proc/PID/
   smaps_rollup``) plus the Pss of the mapped cache file (``/proc/PID/smaps``) over the
   ranks' process trees: the memory the node holds, against the same run over the baseline
   set (read for as many batches), over the images' bytes.
6. **Report.** ``softserve report`` and ``softserve verify`` on a set the real writer built
   (``bench.report_bench``: N = 10,000 × E = 300 × K = 1000, ``topk:10``) against one pass
   that decodes every epoch.
7. **Projection.** ImageNet-1K at IPC 50 (50,000 images) × 300 epochs on an 8-GPU node,
   from the figures above.

    python -m bench.scale_bench [--samples 10000] [--device auto] [--json PATH]
    python -m bench.scale_bench --smoke     # tiny sizes, well under a minute (CI)
    python -m bench.scale_bench --sections node   # one section (the set relabelled untimed)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import torch
from torch.utils.data import DataLoader

from bench.harness import Server, make_image_set, paired_ratio, peak_rss
from bench.relabel_bench import Scenario, measure_throughput, stored_label_bytes
from bench.report_bench import time_report, write_synthetic_set
from bench.serve_bench import Goal, format_goals, process_cpu_s, rss_mib
from softserve.client import Client, LabelSet, open_local
from softserve.client.cache import ENV
from softserve.errors import InputError
from softserve.worker.relabel import RelabelOptions, relabel
from softserve.worker.runtime import check_precision, resolve_device

ROOT = Path(__file__).resolve().parent.parent
NAME, BASELINE = "scale", "scale-baseline"
IMAGES_ROUTE = "/v1/labelsets/{name}/images"
#: What a run can measure: relabel (1), serve (2 to 4), node (4, 5), report (6).
SECTIONS = ("relabel", "serve", "node", "report")
TEACHERS = {"cpu": "bench.serve_teacher:patch_convnet", "cuda": "bench.serve_teacher:resnet18"}
#: The projection's workload: ImageNet-1K at IPC 50, 300 epochs, one node of 8 GPUs.
IPC50, PROJECTED_EPOCHS, GPUS = 50_000, 300, 8
#: (full, smoke) defaults of the sizes.
SIZES: dict[str, tuple[int, int]] = {
    "samples": (10_000, 256), "size": (224, 64), "epochs": (3, 2), "batch_size": (256, 32),
    "repeats": (2, 1), "baseline_samples": (512, 64), "node_batch": (64, 8),
    "report_samples": (10_000, 64), "report_epochs": (300, 3), "stream_passes": (50, 30),
    "workers": (4, 2),
}  # fmt: skip


# --------------------------------------------------------------------------- relabel


def relabel_figures(
    args: argparse.Namespace, images: Path, baseline: Path, work: Path, device: torch.device
) -> tuple[dict[str, Any], Path]:
    """Throughput against the bare teacher, and peak RSS growth over the images' bytes;
    returns the figures and the last relabelled set (E epochs). The baseline set's relabel
    (one epoch) is left in ``work/store``, for the node's baseline."""
    scenario = Scenario("scale", 3, args.size, args.classes, args.teacher, args.samples,
                        args.epochs)  # fmt: skip
    options = argparse.Namespace(
        seed=args.seed, batch_size=args.batch_size, device=str(device),
        precision=args.precision, codec=args.codec, repeats=args.repeats,
    )  # fmt: skip
    (work / "relabel").mkdir()
    throughput, out = measure_throughput(options, scenario, images, work / "relabel", device)
    for other in (work / "relabel").iterdir():  # each repeat's set holds the images again
        if other != out:
            shutil.rmtree(other)
    peaks = {}
    targets = {args.samples: work / "rss-set", args.baseline_samples: work / "store" / BASELINE}
    for n, source in ((args.samples, images), (args.baseline_samples, baseline)):
        target = targets[n]
        peaks[n] = peak_rss(
            ["relabel", "--images", source, "--teacher", args.teacher, "--num-classes",
             args.classes, "--out", target, "--epochs", 1, "--batch-size", args.batch_size,
             "--codec", args.codec, "--device", device.type, "--precision", args.precision,
             "--no-progress"],
            env=bench_env(),
        )  # fmt: skip
        if n == args.samples:
            shutil.rmtree(target)
    grown = peaks[args.samples] - peaks[args.baseline_samples]
    summary = throughput.summary()
    return {
        **summary, "bare_s": throughput.bare_s, "pipeline_s": throughput.pipeline_s,
        "loop_s": throughput.loop_s, "views": throughput.samples,
        "peak_rss_bytes": peaks[args.samples],
        "peak_rss_baseline_bytes": peaks[args.baseline_samples],
        "peak_rss_growth_over_image_bytes": grown / (image_bytes(args, args.samples)
                                                     - image_bytes(args, args.baseline_samples)),
        "stored_label_bytes_per_view": stored_label_bytes(out) / throughput.samples,
    }, out  # fmt: skip


def bench_env() -> dict[str, str]:
    """This environment with the repository root last on PYTHONPATH: a subprocess finds
    ``bench`` (the teachers) without the source folder shadowing an installed softserve."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, str(ROOT)])}


def image_bytes(args: argparse.Namespace, samples: int) -> int:
    return samples * 3 * args.size * args.size


# --------------------------------------------------------------------------- server, client


def route_bytes(server: Server) -> dict[str, float]:
    """``softserve_response_bytes_total`` by route, from the server's /metrics."""
    found = {}
    for line in httpx.get(server.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("softserve_response_bytes_total{"):
            route = line.split('route="', 1)[1].split('"', 1)[0]
            found[route] = float(line.split()[-1])
    return found


def server_figures(
    remote: LabelSet, server: Server, args: argparse.Namespace
) -> dict[str, Any]:  # fmt: skip
    """One stream of ``--stream-passes`` passes over the stored epochs, in stored form and
    without images, repeated: wall samples/s, samples per server CPU second, wire bytes."""
    sharding = remote.sharding(args.batch_size, 0, 1)
    epochs = args.stream_passes * remote.epochs
    walls, cpus, wire = [], [], []
    samples = 0
    for _ in range(args.repeats + 1):  # the first: a warm-up
        before, cpu_before = route_bytes(server), tree_cpu_s(server.pid)
        started = time.perf_counter()
        samples = sum(len(raw.tensors["indices"])
                      for raw in remote.raw_batches(0, sharding, epochs=epochs))  # fmt: skip
        walls.append(time.perf_counter() - started)
        cpus.append(tree_cpu_s(server.pid) - cpu_before)
        after = route_bytes(server)
        wire.append(sum(after[k] - before.get(k, 0.0) for k in after if k != "/metrics"))
    walls, cpus, wire = walls[1:], cpus[1:], wire[1:]
    return {
        "samples": samples, "batch_size": args.batch_size, "wall_s": walls, "server_cpu_s": cpus,
        "stream_samples_per_s": samples / statistics.median(walls),
        "samples_per_server_cpu_s": samples / statistics.median(cpus),
        "wire_bytes_per_sample": statistics.median(wire) / samples,
        "server_rss_mib": rss_mib(server.pid),
    }  # fmt: skip


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants (uvicorn's workers)."""
    return sum(process_cpu_s(p) or 0.0 for p in process_tree(pid))


def count_loader(labels: LabelSet, args: argparse.Namespace, device: torch.device) -> int:
    """Samples of one epoch of the set's loader, views built on ``device``."""
    return sum(len(b) for b in labels.loader(args.batch_size, epochs=1, device=device))


def count_stored(labels: LabelSet, args: argparse.Namespace, device: torch.device) -> int:
    """Samples of one epoch of the set's stored batches (no views, labels as stored)."""
    sharding = labels.sharding(args.batch_size, 0, 1)
    return sum(len(raw.tensors["indices"]) for raw in labels.raw_batches(0, sharding))


def interleaved(
    count: Callable[[LabelSet, argparse.Namespace, torch.device], int],
    sets: dict[str, LabelSet], args: argparse.Namespace, device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    """Rates of ``count`` over each set, repeated in a rotating order after a warm-up;
    ``paired``: remote over local within each repeat, then the median."""
    rates: dict[str, list[float]] = {k: [] for k in sets}
    for labels in sets.values():
        count(labels, args, device)
    keys = list(sets)
    for repeat in range(args.repeats):
        for key in keys[repeat % 2 :] + keys[: repeat % 2]:
            started = time.perf_counter()
            samples = count(sets[key], args, device)
            rates[key].append(samples / (time.perf_counter() - started))
    return {
        **{f"{k}_samples_per_s": statistics.median(v) for k, v in rates.items()},
        "rates": rates, "paired_remote_over_local": paired_ratio(rates["remote"], rates["local"]),
    }  # fmt: skip


# --------------------------------------------------------------------------- node memory


def node_rank(
    kind: str, source: str, name: str, epochs: int, rank: int, args: argparse.Namespace,
    cache: str, ready: multiprocessing.Queue, done: multiprocessing.synchronize.Event,
) -> None:  # fmt: skip
    """One rank of a node (a spawned process): RANK/WORLD_SIZE set, ``--workers`` forked
    DataLoader workers reading its share of ``epochs`` epochs, kept alive until ``done``."""
    os.environ.update({ENV: cache, "RANK": str(rank), "WORLD_SIZE": str(args.ranks)})
    warnings.filterwarnings("ignore", "This DataLoader will create")  # more workers than cores
    try:
        local = kind == "local"
        labels = open_local(Path(source) / name) if local else Client(source).labelset(name)
        loader = labels.loader(args.node_batch, epochs=epochs, rank=rank, world_size=args.ranks)
        data = DataLoader(loader, batch_size=None, num_workers=args.workers,
                          persistent_workers=True, multiprocessing_context="fork")  # fmt: skip
        samples = sum(len(batch) for batch in data)
        ready.put((rank, samples, None))
    except BaseException:  # to the parent, which must not wait for a rank that died
        ready.put((rank, 0, traceback.format_exc()))
        return
    done.wait(timeout=600)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in (task / "children").read_text().split()]
    return found


def pss_bytes(pid: int, mapped: Path) -> dict[str, int]:
    """Pss_Anon and Pss_Shmem of a process (smaps_rollup), and the Pss of its mappings of
    ``mapped`` (smaps), in bytes."""
    out = {"anon": 0, "shmem": 0, "cache_file": 0}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("Pss_Anon", "Pss_Shmem"):
                out[key[4:].lower()] += int(value.split()[0]) << 10
        inside = False
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
                inside = len(head) > 5 and head[5] == str(mapped)
            elif inside and head[0] == "Pss:":
                out["cache_file"] += int(head[1]) << 10
    return out


def node_figures(
    kind: str, source: str, name: str, epochs: int, args: argparse.Namespace, work: Path,
    server: Server | None,
) -> dict[str, Any]:  # fmt: skip
    """Memory a node of ``--ranks`` × ``--workers`` holds after ``epochs`` epochs of
    ``name``, from a fresh cache folder, and (remote) the images' bytes the server sent it."""
    cache = work / f"node-{kind}-{name}"
    sent_before = route_bytes(server).get(IMAGES_ROUTE, 0.0) if server else 0.0
    context = multiprocessing.get_context("spawn")
    ready, done = context.Queue(), context.Event()
    ranks = [
        context.Process(target=node_rank,
                        args=(kind, source, name, epochs, rank, args, str(cache), ready, done))
        for rank in range(args.ranks)
    ]  # fmt: skip
    for proc in ranks:
        proc.start()
    try:
        answers = [ready.get(timeout=1200) for _ in ranks]
        failed = [error for _, _, error in answers if error]
        if failed:
            raise RuntimeError(f"a rank failed:\n{failed[0]}")
        (mapped,) = cache.glob("*.images")
        pids = [pid for proc in ranks for pid in process_tree(proc.pid)]
        parts = [pss_bytes(pid, mapped) for pid in pids]
    finally:
        done.set()
        for proc in ranks:
            proc.join(timeout=120)
            if proc.is_alive():
                proc.kill()
    total = {k: sum(p[k] for p in parts) for k in ("anon", "shmem", "cache_file")}
    sent = (route_bytes(server).get(IMAGES_ROUTE, 0.0) - sent_before) if server else 0.0
    shutil.rmtree(cache)
    return {
        "processes": len(pids), "samples": sum(s for _, s, _ in answers),
        "pss_bytes": total, "memory_bytes": sum(total.values()), "image_bytes_sent": sent,
    }  # fmt: skip


def node_epochs(args: argparse.Namespace) -> dict[str, int]:
    """Epochs each set is read for: one of the set, and of the baseline as many as make as
    many batches, so that what processing batches leaves in the processes (the allocator's
    high-water marks, torch's caches) cancels and the difference is the images'."""
    return {NAME: 1, BASELINE: max(1, round(args.samples / args.baseline_samples))}


def node_summary(
    large: dict[str, Any], small: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:  # fmt: skip
    """The node's figures over the images' bytes: growth from the baseline set to the set."""
    extra = image_bytes(args, args.samples) - image_bytes(args, args.baseline_samples)
    return {
        "set": large, "baseline": small,
        "memory_growth_over_image_bytes": (large["memory_bytes"] - small["memory_bytes"]) / extra,
        "image_bytes_sent_over_image_bytes": large["image_bytes_sent"]
        / image_bytes(args, args.samples),
    }  # fmt: skip


# --------------------------------------------------------------------------- projection, goals


def projection(record: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    """IPC 50 × 300 epochs of ImageNet-1K on one 8-GPU node, from the measured figures:
    what scales with views (relabel, labels on the wire, serving CPU, report) scales
    linearly from them, the images' memory and download by the measured ratios."""
    relabel, server, node = record["relabel"], record["server"], record["node"]["remote"]
    views = IPC50 * PROJECTED_EPOCHS
    images = IPC50 * 3 * 224 * 224
    scale = views / (args.report_samples * args.report_epochs)
    return {
        "views": views, "image_bytes": images,
        "relabel_device_hours": views / relabel["pipeline_samples_per_s"] / 3600,
        "relabel_node_hours": views / relabel["pipeline_samples_per_s"] / 3600 / GPUS,
        "label_store_bytes": views * relabel["stored_label_bytes_per_view"],
        "node_image_memory_bytes": images * node["memory_growth_over_image_bytes"],
        "node_image_download_bytes": images * node["image_bytes_sent_over_image_bytes"],
        "node_label_wire_bytes": views * server["wire_bytes_per_sample"],
        "server_cpu_hours": views / server["samples_per_server_cpu_s"] / 3600,
        "report_seconds": record["report"]["report_seconds"] * scale,
        "verify_seconds": record["report"]["verify_seconds"] * scale,
    }  # fmt: skip


def goals(record: dict[str, Any], args: argparse.Namespace) -> list[Goal]:
    """The issue's goals, as ratios, and the figures beside them for information (those of
    the sections that ran)."""
    out = []
    nodes = f"{args.ranks}x{args.workers}"
    if "relabel" in record:
        r = record["relabel"]
        paired, growth = r["paired_ratio_pipeline_over_bare"], r["peak_rss_growth_over_image_bytes"]
        out += [
            Goal("relabel / bare teacher", r["ratio_pipeline_over_bare"], paired, ">= 0.9",
                 paired >= 0.9),
            Goal("relabel label loop / bare teacher", r["ratio_loop_over_bare"],
                 r["paired_ratio_loop_over_bare"], "info", None),
            Goal("relabel peak RSS growth / image bytes", growth, growth, "info", None),
        ]  # fmt: skip
    if "client" in record:
        loader, stored = record["client"]["loader"], record["client"]["stored"]
        paired = loader["paired_remote_over_local"]
        out += [
            Goal(f"remote loader / open_local, b{args.batch_size}",
                 loader["remote_samples_per_s"] / loader["local_samples_per_s"], paired,
                 ">= 0.9", paired >= 0.9),
            Goal("remote stored / local stored batches",
                 stored["remote_samples_per_s"] / stored["local_samples_per_s"],
                 stored["paired_remote_over_local"], "info", None),
        ]  # fmt: skip
    if "node" in record:
        remote, local = record["node"]["remote"], record["node"]["local"]
        memory, sent = (remote[k] for k in ("memory_growth_over_image_bytes",
                                            "image_bytes_sent_over_image_bytes"))  # fmt: skip
        local_memory = local["memory_growth_over_image_bytes"]
        out += [
            Goal(f"node memory / image bytes, {nodes}", memory, memory, "<= 1.25",
                 memory <= 1.25),
            Goal("image bytes sent / image bytes", sent, sent, "<= 1.1", sent <= 1.1),
            Goal(f"local node memory / image bytes, {nodes}", local_memory, local_memory, "info",
                 None),
        ]  # fmt: skip
    if "report" in record:
        report, verify = record["report"]["report_over_read"], record["report"]["verify_over_read"]
        out += [
            Goal("report / one decode pass", report, report, "<= 3", report <= 3),
            Goal("verify / one decode pass", verify, verify, "info", None),
        ]
    return out


# --------------------------------------------------------------------------- report


def format_record(record: dict[str, Any], args: argparse.Namespace) -> str:
    """The human-readable summary: the figures of the sections that ran, the goals, and the
    projection when every section ran."""
    lines = [
        f"== scale: N={args.samples} 3x{args.size}x{args.size} K={args.classes} E={args.epochs} "
        f"codec={args.codec} teacher={args.teacher} device={record['meta']['device']} "
        f"precision={args.precision} sections={','.join(args.sections)}",
    ]
    if "relabel" in record:
        r = record["relabel"]
        lines.append(
            f"   relabel: bare {r['bare_samples_per_s']:,.0f} samples/s, pipeline "
            f"{r['pipeline_samples_per_s']:,.0f} ({r['paired_ratio_pipeline_over_bare']:.2f} "
            f"paired); peak RSS {r['peak_rss_bytes'] / 2**20:,.0f} MiB (baseline "
            f"{r['peak_rss_baseline_bytes'] / 2**20:,.0f}): growth "
            f"{r['peak_rss_growth_over_image_bytes']:.2f}x the images' bytes"
        )
    if "server" in record:
        s, c = record["server"], record["client"]
        lines += [
            f"   server, one process, stored form: {s['stream_samples_per_s']:,.0f} samples/s "
            f"to one client, {s['samples_per_server_cpu_s']:,.0f} samples per server CPU "
            f"second; {s['wire_bytes_per_sample']:.1f} B a sample on the wire",
            f"   client loader b{args.batch_size}: remote "
            f"{c['loader']['remote_samples_per_s']:,.0f}, open_local "
            f"{c['loader']['local_samples_per_s']:,.0f} samples/s; stored batches: remote "
            f"{c['stored']['remote_samples_per_s']:,.0f}, local "
            f"{c['stored']['local_samples_per_s']:,.0f}",
        ]
    for kind, n in record.get("node", {}).items():
        lines.append(
            f"   node ({kind}, {args.ranks} ranks x {args.workers} workers, "
            f"{n['set']['processes']} processes): {n['set']['memory_bytes'] / 2**20:,.0f} MiB "
            f"(baseline {n['baseline']['memory_bytes'] / 2**20:,.0f}): "
            f"{n['memory_growth_over_image_bytes']:.2f}x the images' bytes; images sent "
            f"{n['image_bytes_sent_over_image_bytes']:.2f}x their bytes"
        )
    if "report" in record:
        rep = record["report"]
        lines.append(
            f"   report set {args.report_samples} x {args.report_epochs} x {args.classes}: "
            f"decode pass {rep['read_seconds']:.1f} s, report {rep['report_seconds']:.1f} s, "
            f"verify {rep['verify_seconds']:.1f} s"
        )
    if "projection" in record:
        p, gb = record["projection"], 1e9
        lines.append(
            f"   projection, IPC 50 x {PROJECTED_EPOCHS} epochs, {GPUS}-GPU node: relabel "
            f"{p['relabel_node_hours']:.1f} h on {GPUS} of this device, labels "
            f"{p['label_store_bytes'] / gb:.2f} GB, images {p['image_bytes'] / gb:.2f} GB held "
            f"as {p['node_image_memory_bytes'] / gb:.2f} GB and sent as "
            f"{p['node_image_download_bytes'] / gb:.2f} GB, labels on the wire "
            f"{p['node_label_wire_bytes'] / gb:.2f} GB, server CPU "
            f"{p['server_cpu_hours']:.2f} h, report {p['report_seconds'] / 60:.1f} min"
        )
    lines += ["", *format_goals([Goal(**g) for g in record["goals"]])]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def sections(text: str) -> list[str]:
    """``relabel,node`` as a list of known sections."""
    chosen = [part for part in text.split(",") if part]
    unknown = set(chosen) - set(SECTIONS)
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"sections are {', '.join(SECTIONS)}; got {text!r}"
        )
    return chosen


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--smoke", action="store_true", help="tiny sizes (64 px, N = 256): well under a minute")
    add("--samples", type=int, help="images N (default 10,000)")
    add("--size", type=int, help="image side in pixels (default 224)")
    add("--classes", type=int, default=1000, help="classes K (default %(default)s)")
    add("--epochs", type=int, help="relabelled epochs E (default 3)")
    add("--codec", default="topk:10", help="label codec (default %(default)s)")
    add("--device", default="auto", help="auto, cpu or cuda (default %(default)s)")
    add("--precision", help="teacher precision (default bf16 on CUDA, fp32 on the CPU)")
    add("--teacher", help="teacher spec (default patch_convnet on the CPU, resnet18 on CUDA)")
    add("--batch-size", type=int, help="relabel and loader batch size (default 256)")
    add("--repeats", type=int, help="interleaved timed repeats (default 2)")
    add("--baseline-samples", type=int,
        help="images of the baseline set that cancels fixed costs (default 512)")  # fmt: skip
    add("--ranks", type=int, default=2, help="ranks of the node (default %(default)s)")
    add("--workers", type=int, help="DataLoader workers a rank (default 4)")
    add("--node-batch", type=int, help="batch size of the node's ranks (default 64)")
    add("--stream-passes", type=int, help="passes over the stored epochs a stream (default 50)")
    add("--report-samples", type=int, help="N of the report's set (default 10,000)")
    add("--report-epochs", type=int, help="E of the report's set (default 300)")
    add("--sections", type=sections, default=list(SECTIONS),
        help=f"comma-separated sections to run, of {','.join(SECTIONS)} (default all; the "
        "projection needs all; without relabel the set is relabelled untimed)")  # fmt: skip
    add("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    add("--seed", type=int, default=0, help="seed of images, teacher init and views")
    add("--workdir", type=Path, help="keep sets and logs in a new folder here (default: temp)")
    add("--json", type=Path, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    for name, (full, smoke) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.baseline_samples < args.samples:
        parser.error("--baseline-samples must be fewer than --samples")
    if args.baseline_samples < args.ranks * args.workers * args.node_batch:
        parser.error("--baseline-samples must give every DataLoader worker a batch")
    return args


def relabel_untimed(
    args: argparse.Namespace, images: Path, out: Path, epochs: int, device: torch.device
) -> None:  # fmt: skip
    """The set the other sections serve, when the relabel section does not run."""
    relabel(RelabelOptions(
        images=images, teacher=args.teacher, out=out, num_classes=args.classes, epochs=epochs,
        seed=args.seed, batch_size=args.batch_size, device=str(device),
        precision=args.precision, codec=args.codec, progress=False,
    ))  # fmt: skip


def run(
    args: argparse.Namespace, work: Path, device: torch.device, record: dict[str, Any],
    save: Callable[[], None],
) -> None:  # fmt: skip
    """The chosen sections in turn, each added to ``record`` and saved as it ends (a long
    run that fails late keeps what it measured)."""
    os.environ[ENV] = str(work / "cache")  # this process's loaders: a fresh node cache
    sections = set(args.sections)
    store = work / "store"
    store.mkdir()
    if sections & {"relabel", "serve", "node"}:
        images = make_image_set(work / "images.pt", args.samples, args.classes, args.seed,
                                size=args.size)  # fmt: skip
        baseline = make_image_set(work / "baseline.pt", args.baseline_samples, args.classes,
                                  args.seed + 1, size=args.size)  # fmt: skip
        if "relabel" in sections:
            record["relabel"], out = relabel_figures(args, images, baseline, work, device)
            out.rename(store / NAME)
            save()
        else:
            relabel_untimed(args, images, store / NAME, args.epochs, device)
            relabel_untimed(args, baseline, store / BASELINE, 1, device)
        images.unlink()
    if sections & {"serve", "node"}:
        with contextlib.ExitStack() as stack:
            server = stack.enter_context(
                Server(store, "--workers", 1, "--log-level", "warning",
                       log=work / "server.log", ready_timeout=1800)
            )  # fmt: skip
            if "serve" in sections:
                serve_and_load(server, store, args, device, stack, record)
                save()
            if "node" in sections:
                record["node"] = {}
                for kind, source in (("remote", server.url), ("local", str(store))):
                    runs = {
                        name: node_figures(kind, source, name, epochs, args, work,
                                           server if kind == "remote" else None)
                        for name, epochs in node_epochs(args).items()
                    }  # fmt: skip
                    record["node"][kind] = node_summary(runs[NAME], runs[BASELINE], args)
                    save()
    shutil.rmtree(store)
    if "report" in sections:
        report_set = work / "report-set"
        write_synthetic_set(report_set, args.report_samples, args.classes, args.report_epochs,
                            args.codec, args.seed)  # fmt: skip
        record["report"] = time_report(report_set, work / "report-page")
        shutil.rmtree(report_set)


def serve_and_load(
    server: Server, store: Path, args: argparse.Namespace, device: torch.device,
    stack: contextlib.ExitStack, record: dict[str, Any],
) -> None:  # fmt: skip
    """The server and client sections: one server process in stored form, then the remote
    loader against ``open_local``, both over this process's node cache."""
    remote = stack.enter_context(Client(server.url)).labelset(NAME)
    local = stack.enter_context(open_local(store / NAME))
    if remote.base_images() is None:  # fetched once into the cache, then mapped
        raise RuntimeError("the base images must fit the client's image_cache_mb")
    record["server"] = server_figures(remote, server, args)
    sets = {"remote": remote, "local": local}
    record["client"] = {
        "loader": interleaved(count_loader, sets, args, device),
        "stored": interleaved(count_stored, sets, args, device),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
        args.teacher = args.teacher or TEACHERS[device.type]
        check_precision(device, args.precision)
    except InputError as exc:
        print(f"scale_bench: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    record: dict[str, Any] = {"meta": {
        "torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "complete": False,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }}  # fmt: skip

    def save() -> None:
        record["meta"]["total_s"] = time.perf_counter() - started
        if args.json is not None:
            args.json.write_text(json.dumps(record, indent=2) + "\n")

    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scale-bench-")))
        else:
            args.workdir.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix="scale-bench-", dir=args.workdir))
        run(args, work, device, record, save)
    if set(args.sections) == set(SECTIONS):
        record["projection"] = projection(record, args)
    record["goals"] = [asdict(g) for g in goals(record, args)]
    record["meta"]["complete"] = True
    save()
    print(format_record(record, args), flush=True)
    print(f"total benchmark time {record['meta']['total_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
