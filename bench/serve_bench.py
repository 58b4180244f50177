"""Benchmark of serving label batches over HTTP, against reading them locally.

Setup (untimed): a random 32×32 RGB image set (``--samples`` images, ``--classes`` classes)
is relabelled for ``--epochs`` epochs with ``--codec`` (fp16 by default; ``topk:k`` for the
compact sets) by ``softserve.worker.relabel.relabel`` and a cheap teacher
(``bench/serve_teacher.py``), and ``python -m softserve serve`` is started on a free
loopback port (stopped at the end, also on errors): ``bench.harness`` does both.

Throughput, in samples/s at ``--batch-size`` per rank, world size 1 (``drop_last``, so an
epoch is ``samples // batch_size`` batches). One measurement is a training run's worth of
batches: ``--passes`` × E epochs, where epochs past the E stored ones wrap (the server
serves stored epoch e mod E). Tensors per batch: indices, view params, hard labels, soft
(GIFT-refined, float32) labels, and (a, d, e) images. The remote paths (b, c, c', d) ask for
``label_encoding=stored``, as the client does (labels in the codec's stored parts: for fp16
half of float32's bytes, for top-k a few dozen bytes a row), and decode ``soft`` to float32
on receipt, so every path delivers the same tensors:

  a. in-process: ``LabelSetReader.read`` (order, params, refined) per batch, plus base
     images and hard labels gathered by index from in-memory arrays: a local job's reads;
  a'. in-process, the server's reads: ``softserve.service.batches.read_batches`` over the
     groups a stream reads at a time (consecutive batches of a stored epoch in one read),
     images from the server's cache; for information: c against it is the cost of serving
     alone (encode, HTTP, decode), with the reads on both sides;
  b. per-batch: one ``GET .../epochs/{e}/batches/{i}`` per batch on one ``httpx.Client``
     (include=indices,params,hard,soft: images are cached client-side, as the client does),
     decoded by ``softserve.format.payload.decode`` into torch tensors;
  c. stream: ``RemoteLabelSet.raw_batches`` over all the run's epochs: one stream, as the
     loader opens for a training run; received and decoded;
  c'. a stream per epoch: the same, one ``raw_batches`` per epoch, as
     ``RemoteLabelSet.batches`` opens; it pays a stream's fixed cost every epoch, which
     small label sets (3 batches per epoch by default) feel;
  d. stream + views: c plus ``to_batch`` (base images gathered from the client's cache,
     ``apply_views`` on the CPU): the student's input, float32;
  e. files: the field's practice (SRe2L/FKD), one ``torch.save`` file per stored (epoch,
     batch) holding the same tensors as a (base images + params + soft labels, not the
     views), written once, read back with ``torch.load(weights_only=True)``; the files sit
     in the page cache, as the server's HDF5 shards do.

Server memory: the RSS of one server process over an empty store (goal <= 150 MiB; the
server imports no torch) and over the benchmark's label set after the paths ran, beside a
process that imported torch alone, which every server process carried before.

Goals, both for c (the loader's stream): stream/in-process >= 0.5 (a naive server lands
near 0.1 per batch), stream/files >= 1.0 (remote against local files). Client and server
CPU milliseconds per batch are reported beside each path (server: its process's
user+system time from /proc), and a few diagnostics say where a batch's time goes (fixed
cost of a request and of a stream, the server's own work per batch, the client's image
gather and views).

Student step time: two identical ConvNet-3 students (``softserve.models:convnet``, same
seeded init) trained side by side with the GIFT loss, one fed by
``RemoteLabelSet.loader(batch_size, device="cpu", prefetch=8)``, the other by the same
batches pre-materialized in memory (images already viewed). They take turns every
``--student-block`` steps (ABBA), so load that drifts over seconds falls on both alike; a
repeat is ``--student-steps`` steps of each. This runs for each of ``--student-widths``:
the first is the student the goal is judged on (default 128, the literature's ConvNet-3 and
``softserve train``'s), the others are reported for information (default 32: a student 5-8x
cheaper per step on a CPU, the stress case for the loader's fixed per-batch work). Goal: remote
within 5% of in-memory. The time each step waits in ``next()`` (the loader: queue wait plus
views) is reported apart from the compute. On a 2-core machine the loader's thread and the
server share the student's cores; at a turn's end the loader may still be receiving the
batch it was last allowed, which then overlaps the in-memory student's first step (a
fraction of a millisecond of work).

Measurements are repeated (``--repeats``), interleaved with a rotating order, and medians
reported; "paired" ratios are the median over repeats of the ratio within a repeat, robust to
load that drifts between repeats, and goals are judged on them. Run
``python -m bench.serve_bench --help`` for options; the default run takes three to
four minutes on 2 cores, ``--quick`` (fewer repeats and steps) well under one.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from bench.harness import LABEL_SET, TEACHER, Server, build_label_set, paired_ratio
from softserve.client import Client, RemoteLabelSet, Sharding, Targets, apply_views, get_loss
from softserve.format.codecs import get_codec
from softserve.format.payload import crc32, decode
from softserve.models import convnet
from softserve.service.batches import BatchRequest, batch_payload, read_batches, stream_groups
from softserve.service.catalog import Catalog
from softserve.service.settings import ServiceSettings
from softserve.storage import LabelSetReader

INCLUDE = "indices,params,hard,soft"
Tensors = dict[str, torch.Tensor]

# --------------------------------------------------------------------------- server process


def rss_mib(pid: int) -> float | None:
    """Resident set size of a process in MiB (Linux /proc), None where unreadable."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kib = [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")]
    return kib[0] / 1024 if kib else None


def server_memory(work: Path) -> dict[str, float | None]:
    """RSS of one server process (one uvicorn worker) over an empty store, after it answered
    a listing; and, for reference, of a Python process that has imported torch and nothing
    else, which is what every server process carried while the server imported torch."""
    store = work / "empty-store"
    store.mkdir()
    with Server(store, "--log-level", "warning", log=work / "empty-server.log") as server:
        httpx.get(server.url + "/v1/labelsets", timeout=10).raise_for_status()
        empty = rss_mib(server.pid)
    code = "import os, torch; print(open(f'/proc/{os.getpid()}/status').read())"
    status = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    torch_kib = [int(line.split()[1]) for line in status.stdout.splitlines() if "VmRSS:" in line]
    return {"empty_store": empty, "torch_alone": torch_kib[0] / 1024 if torch_kib else None}


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc), None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- paths a to e


@dataclass
class Sources:
    """Everything the timed paths read from, opened once in the setup."""

    reader: LabelSetReader
    images: np.ndarray
    hard: np.ndarray
    sharding: Sharding
    stored_epochs: int
    run_epochs: int
    http: httpx.Client
    remote: RemoteLabelSet
    request: BatchRequest
    files: list[Path] = field(default_factory=list)

    def positions(self) -> Iterator[tuple[int, int]]:
        """Every (epoch, batch index) of a run, in serving order."""
        return itertools.product(range(self.run_epochs), range(len(self.sharding)))

    @property
    def batch_query(self) -> dict[str, str | int]:
        s = self.sharding
        return {"batch_size": s.batch_size, "rank": s.rank, "world_size": s.world_size,
                "include": INCLUDE, "label_encoding": "stored"}  # fmt: skip


def in_process(src: Sources) -> Iterator[Tensors]:
    """a. LabelSetReader.read per batch + images and hard labels gathered in memory."""
    for epoch, index in src.positions():
        start, stop = src.sharding.positions(index)
        stored = epoch % src.stored_epochs
        rows = src.reader.read(stored, start, stop, ("order", "params", "soft"))
        ids = rows["order"].astype(np.int64)
        yield {
            "indices": torch.from_numpy(ids),
            "images": torch.from_numpy(src.images[ids]),
            "params": torch.from_numpy(rows["params"]),
            "hard": torch.from_numpy(src.hard[ids]),
            "soft": torch.from_numpy(rows["soft"]),
        }


def decoded(src: Sources, tensors: Tensors) -> Tensors:
    """Stored labels decoded to float32, as ``RemoteLabelSet.to_batch`` decodes them."""
    codec, classes = get_codec(src.remote.detail.codec), src.remote.num_classes
    names = codec.part_names("soft", classes)
    out = {k: v for k, v in tensors.items() if k not in names.values()}
    out["soft"] = codec.decode({s: tensors[n] for s, n in names.items()}, classes)
    return out


def in_process_grouped(src: Sources) -> Iterator[Tensors]:
    """a'. The server's reads, in this process: read_batches over the stream's groups."""
    group_bytes = ServiceSettings().stream_read_mb << 20  # the server's default
    for group in stream_groups(src.request, 0, src.run_epochs, group_bytes):
        for tensors in read_batches(src.request, group):
            yield decoded(src, {k: torch.from_numpy(v) for k, v in tensors.items()})


def per_batch(src: Sources) -> Iterator[Tensors]:
    """b. One GET per batch (no images), decoded into torch tensors."""
    path = f"/v1/labelsets/{LABEL_SET}/epochs"
    for epoch, index in src.positions():
        response = src.http.get(f"{path}/{epoch}/batches/{index}", params=src.batch_query)
        response.raise_for_status()
        tensors = decode(response.content)[0]
        yield decoded(src, {k: torch.from_numpy(v) for k, v in tensors.items()})


def stream(src: Sources) -> Iterator[Tensors]:
    """c. RemoteLabelSet.raw_batches (no images): one stream for the run, as the loader."""
    for raw in src.remote.raw_batches(0, src.sharding, epochs=src.run_epochs):
        yield decoded(src, raw.tensors)


def stream_per_epoch(src: Sources) -> Iterator[Tensors]:
    """c'. RemoteLabelSet.raw_batches (no images), one stream per epoch."""
    for epoch in range(src.run_epochs):
        for raw in src.remote.raw_batches(epoch, src.sharding):
            yield decoded(src, raw.tensors)


def stream_views(src: Sources) -> Iterator[Tensors]:
    """d. The run's stream plus to_batch: images from the cache, apply_views on the CPU."""
    for raw in src.remote.raw_batches(0, src.sharding, epochs=src.run_epochs):
        b = src.remote.to_batch(raw, "cpu")
        yield {"indices": b.indices, "images": b.images, "params": b.params,
               "hard": b.hard, "soft": b.soft}  # fmt: skip


def torch_files(src: Sources) -> Iterator[Tensors]:
    """e. torch.load(weights_only=True) of one file per stored (epoch, batch)."""
    per_epoch = len(src.sharding)
    for epoch, index in src.positions():
        yield torch.load(src.files[(epoch % src.stored_epochs) * per_epoch + index],
                         weights_only=True)  # fmt: skip


PATHS: dict[str, tuple[str, Callable[[Sources], Iterator[Tensors]]]] = {
    "in_process": ("a in-process reader + gather", in_process),
    "in_process_grouped": ("a' in-process, the server's reads", in_process_grouped),
    "per_batch": ("b remote, one GET per batch", per_batch),
    "stream": ("c remote stream, one per run", stream),
    "stream_per_epoch": ("c' remote stream, one per epoch", stream_per_epoch),
    "stream_views": ("d remote stream + views (to_batch)", stream_views),
    "files": ("e torch.load, file per batch", torch_files),
}


def write_files(src: Sources, folder: Path) -> list[Path]:
    """The field's practice: one torch.save file per stored (epoch, batch), from path a's
    tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    stored = src.stored_epochs * len(src.sharding)
    batches = itertools.islice(zip(src.positions(), in_process(src), strict=True), stored)
    for (epoch, index), tensors in batches:
        path = folder / f"epoch{epoch:04d}-batch{index:05d}.pt"
        torch.save(tensors, path)
        files.append(path)
    return files


def check_paths(src: Sources, output_size: tuple[int, int], mean: list, std: list) -> None:
    """Every path must deliver path a's tensors (b, c: all but images; d: views of a's)."""
    reference = list(in_process(src))
    for key, (_, path) in PATHS.items():
        got = list(path(src))
        if len(got) != len(reference):
            raise AssertionError(f"{key}: {len(got)} batches, expected {len(reference)}")
        for ref, out in zip(reference, got, strict=True):
            expected = dict(ref)
            if key == "stream_views":
                expected["images"] = apply_views(
                    ref["images"], ref["params"], output_size, mean=mean, std=std
                )
            if key in ("per_batch", "stream", "stream_per_epoch"):  # images: the client's cache
                expected.pop("images")
            if set(out) != set(expected):
                raise AssertionError(f"{key}: tensors {sorted(out)}, expected {sorted(expected)}")
            for name, tensor in out.items():
                if not torch.equal(tensor, expected[name]):
                    raise AssertionError(f"{key}: tensor {name!r} differs from the in-process one")


# --------------------------------------------------------------------------- throughput


@dataclass
class PathResult:
    """Timed measurements of one path: each reads ``samples`` samples in ``batches`` batches."""

    key: str
    label: str
    samples: int = 0
    batches: int = 0
    seconds: list[float] = field(default_factory=list)
    client_cpu_s: list[float] = field(default_factory=list)
    server_cpu_s: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.samples / statistics.median(self.seconds)

    @property
    def rates(self) -> list[float]:
        """Samples per second of each repeat."""
        return [self.samples / s for s in self.seconds]

    def cpu_ms_per_batch(self, values: list[float]) -> float | None:
        return 1000 * statistics.median(values) / self.batches if values else None


def time_path(
    src: Sources, path: Callable[[Sources], Iterator[Tensors]], server_pid: int
) -> tuple[int, int, float, float, float | None]:
    """(samples, batches, wall s, client CPU s, server CPU s) of one run of a path."""
    samples = batches = 0
    server_before = process_cpu_s(server_pid)
    cpu_before = time.process_time()
    start = time.perf_counter()
    for tensors in path(src):
        samples += int(tensors["indices"].shape[0])
        batches += 1
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_before
    server_after = process_cpu_s(server_pid)
    server = None if server_before is None or server_after is None else server_after - server_before
    return samples, batches, wall, cpu, server


def measure_paths(src: Sources, args: argparse.Namespace, server_pid: int) -> dict[str, PathResult]:
    """Interleaved repeats of every path (order rotated each repeat), after one warm-up run."""
    results = {key: PathResult(key, label) for key, (label, _) in PATHS.items()}
    keys = list(PATHS)
    for key in keys:
        time_path(src, PATHS[key][1], server_pid)
    for repeat in range(args.repeats):
        shift = repeat % len(keys)
        for key in keys[shift:] + keys[:shift]:
            samples, batches, wall, cpu, server = time_path(src, PATHS[key][1], server_pid)
            r = results[key]
            r.samples, r.batches = samples, batches
            r.seconds.append(wall)
            r.client_cpu_s.append(cpu)
            if server is not None:
                r.server_cpu_s.append(server)
    return results


# --------------------------------------------------------------------------- student


@dataclass
class StudentResult:
    """Timed student runs fed one way: per run, total, waiting-for-data and compute seconds."""

    feed: str
    steps: int
    total_s: list[float] = field(default_factory=list)
    data_s: list[float] = field(default_factory=list)
    compute_s: list[float] = field(default_factory=list)

    def ms_per_step(self, values: list[float]) -> float:
        return 1000 * statistics.median(values) / self.steps


Step = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def loader_feed(remote: RemoteLabelSet, args: argparse.Namespace, steps: int) -> Iterator[Step]:
    """(views, soft, hard) from ``RemoteLabelSet.loader``, enough epochs for ``steps``."""
    per_epoch = args.samples // args.batch_size
    epochs = math.ceil((steps + 1) / per_epoch)
    loader = remote.loader(args.batch_size, epochs=epochs, device="cpu", prefetch=args.prefetch)
    batches = iter(loader)
    try:
        for b in batches:
            yield b.images, b.soft, b.hard
    finally:
        batches.close()  # stops the prefetch thread


class Student:
    """A ConvNet-3 student with a fixed seeded init and SGD, trained with the GIFT loss."""

    def __init__(self, args: argparse.Namespace, width: int) -> None:
        torch.manual_seed(args.seed)
        self.model = convnet(num_classes=args.classes, width=width)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.loss = get_loss("gift")

    def step(self, x: torch.Tensor, soft: torch.Tensor, hard: torch.Tensor) -> None:
        loss = self.loss(self.model(x), Targets(soft=soft, hard=hard))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def train(self, feed: Iterator[Step], steps: int) -> tuple[float, float]:
        """(waiting-for-data, compute) seconds of ``steps`` steps fed by ``feed``."""
        data = compute = 0.0
        for _ in range(steps):
            t0 = time.perf_counter()
            batch = next(feed)
            t1 = time.perf_counter()
            self.step(*batch)
            t2 = time.perf_counter()
            data, compute = data + t1 - t0, compute + t2 - t1
        return data, compute


def measure_student(
    remote: RemoteLabelSet, args: argparse.Namespace, width: int
) -> dict[str, StudentResult]:
    """Two identical students trained side by side, one fed by the remote loader and one by
    the same batches in memory, taking turns every ``--student-block`` steps (in ABBA order).

    A repeat is ``--student-steps`` steps of each, so both feeds meet the same load; the
    first block of each is an untimed warm-up (it also opens the loader's stream).
    """
    block, steps = args.student_block, args.student_steps
    total_steps = block + args.student_repeats * steps
    with contextlib.closing(loader_feed(remote, args, steps)) as feed:
        memory = list(itertools.islice(feed, steps))
    order = ["in_memory", "remote_loader"]
    results = {k: StudentResult(k, steps) for k in order}
    students = {k: Student(args, width) for k in order}
    with contextlib.closing(loader_feed(remote, args, total_steps)) as remote_feed:
        feeds = {"in_memory": itertools.cycle(memory), "remote_loader": remote_feed}
        for key in order:
            students[key].train(feeds[key], block)
        for _ in range(args.student_repeats):
            spent = {k: [0.0, 0.0] for k in order}
            for turn in range(steps // block):
                for key in order if turn % 2 == 0 else order[::-1]:
                    data, compute = students[key].train(feeds[key], block)
                    spent[key][0] += data
                    spent[key][1] += compute
            for key, (data, compute) in spent.items():
                results[key].total_s.append(data + compute)
                results[key].data_s.append(data)
                results[key].compute_s.append(compute)
    return results


# --------------------------------------------------------------------------- diagnostics


def median_ms(fn: Callable[[], object], calls: int) -> float:
    """Median milliseconds of ``calls`` calls of ``fn``, after one untimed call."""
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def diagnostics(src: Sources, calls: int) -> dict[str, float]:
    """Where a streamed batch's time goes: fixed costs and per-batch parts, in median ms.

    - ``healthz``: a GET /healthz round trip (keep-alive): the floor of any request;
    - ``empty_stream``: ``raw_batches`` from the last batch on (only the end frame): the fixed
      cost of one stream, paid once per epoch;
    - ``server_batch``: ``softserve.service.batches.batch_payload`` in this process (read,
      gather, encode): the server's own work per batch, without HTTP;
    - ``reader_read``: the ``LabelSetReader.read`` part of it;
    - ``gather`` and ``views``: the two parts of ``RemoteLabelSet.to_batch`` (base images
      indexed out of the client's cache, then ``apply_views`` on the CPU);
    - ``crc32``: the CRC-32 of one batch payload as served, which the server takes and the
      client checks once each per batch (``crc32_mb_s``: its rate).
    """
    request = replace(src.request, include=tuple(INCLUDE.split(",")))
    remote, last = src.remote, len(src.sharding)
    raw = next(remote.raw_batches(0, src.sharding))
    cache, idx = remote.base_images(), raw.tensors["indices"]
    assert cache is not None
    images, params = cache.index_select(0, idx), raw.tensors["params"]
    view = dict(mean=remote.mean, std=remote.std)
    payload = src.http.get(f"/v1/labelsets/{LABEL_SET}/epochs/0/batches/0", params=src.batch_query)
    crc_ms = median_ms(lambda: crc32([payload.content]), calls)
    return {
        "crc32": crc_ms,
        "crc32_mb_s": len(payload.content) / 1e3 / crc_ms,
        "healthz": median_ms(lambda: src.http.get("/healthz"), calls),
        "empty_stream": median_ms(lambda: list(remote.raw_batches(0, src.sharding, last)), calls),
        "server_batch": median_ms(lambda: batch_payload(request, 0), calls),
        "reader_read": median_ms(
            lambda: src.reader.read(0, 0, src.sharding.batch_size, ("order", "params", "soft")),
            calls,
        ),
        "gather": median_ms(lambda: cache.index_select(0, idx), calls),
        "views": median_ms(lambda: apply_views(images, params, remote.output_size, **view), calls),
    }


# --------------------------------------------------------------------------- report


@dataclass
class Goal:
    """A ratio, its target, and whether it is met (None: reported for information)."""

    name: str
    value: float
    paired: float
    target: str
    met: bool | None


def goals(
    paths: dict[str, PathResult], students: dict[int, dict[str, StudentResult]]
) -> list[Goal]:
    """The benchmark's ratios against the project's goals."""
    a, b, c, e = (paths[k] for k in ("in_process", "per_batch", "stream", "files"))
    a1, c1, d = paths["in_process_grouped"], paths["stream_per_epoch"], paths["stream_views"]

    def vs(name: str, num: PathResult, den: PathResult, target: str) -> Goal:
        return Goal(name, num.rate / den.rate, paired_ratio(num.rates, den.rates), target, None)

    out = [
        vs("stream / in-process", c, a, ">= 0.5"),
        vs("per-batch / in-process", b, a, "naive ~0.1"),
        vs("stream / torch.load files", c, e, ">= 1.0"),
        vs("stream / in-process server's reads", c, a1, "info"),
        vs("stream per epoch / in-process", c1, a, "info"),
        vs("stream+views / in-process", d, a, "info"),
    ]
    out[0].met = out[0].paired >= 0.5
    out[2].met = out[2].paired >= 1.0
    for i, (width, student) in enumerate(students.items()):
        mem, rem = student["in_memory"], student["remote_loader"]
        ratio = statistics.median(rem.total_s) / statistics.median(mem.total_s)
        paired = paired_ratio(rem.total_s, mem.total_s)
        name = f"student step remote / in-memory w{width}"
        if i == 0:
            out.append(Goal(name, ratio, paired, "<= 1.05", paired <= 1.05))
        else:
            out.append(Goal(name, ratio, paired, "info", None))
    return out


def _opt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_paths(paths: dict[str, PathResult]) -> list[str]:
    """The throughput table."""
    base = paths["in_process"].rate
    lines = [
        f"  {'path':<36}{'samples/s':>11}{'vs a':>7}{'client CPU':>12}{'server CPU':>12}"
        "   seconds per run",
        f"  {'':<36}{'':>11}{'':>7}{'ms/batch':>12}{'ms/batch':>12}",
    ]
    for r in paths.values():
        runs = " ".join(f"{t:.3f}" for t in r.seconds)
        lines.append(
            f"  {r.label:<36}{r.rate:>11,.0f}{r.rate / base:>7.2f}"
            f"{_opt(r.cpu_ms_per_batch(r.client_cpu_s), '.2f'):>12}"
            f"{_opt(r.cpu_ms_per_batch(r.server_cpu_s), '.2f'):>12}   {runs}"
        )
    return lines


def format_student(student: dict[str, StudentResult]) -> list[str]:
    """The student step table."""
    lines = [
        f"  {'feed':<36}{'ms/step':>9}{'waiting':>9}{'compute':>9}   seconds per repeat",
        f"  {'':<36}{'':>9}{'ms/step':>9}{'ms/step':>9}",
    ]
    labels = {"in_memory": "in-memory batches (views applied)", "remote_loader": "remote loader"}
    for key, r in student.items():
        runs = " ".join(f"{t:.2f}" for t in r.total_s)
        lines.append(
            f"  {labels[key]:<36}{r.ms_per_step(r.total_s):>9.1f}{r.ms_per_step(r.data_s):>9.1f}"
            f"{r.ms_per_step(r.compute_s):>9.1f}   {runs}"
        )
    return lines


def format_goals(rows: list[Goal]) -> list[str]:
    """The ratio table with goals."""
    lines = [f"  {'ratio':<36}{'median':>8}{'paired':>8}   {'goal':<12}met"]
    for g in rows:
        met = "-" if g.met is None else ("yes" if g.met else "NO")
        lines.append(f"  {g.name:<36}{g.value:>8.3f}{g.paired:>8.3f}   {g.target:<12}{met}")
    return lines


def format_diagnostics(diag: dict[str, float], paths: dict[str, PathResult]) -> list[str]:
    """Per-request, per-stream and per-batch costs beside the measured per-batch times."""
    wall = {k: 1000 * statistics.median(r.seconds) / r.batches for k, r in paths.items()}
    letters = ", ".join(f"{r.label.split()[0]} {wall[k]:.2f}" for k, r in paths.items())
    c = paths["stream"]
    stream_cpu = sum(c.cpu_ms_per_batch(cpu) or 0.0 for cpu in (c.client_cpu_s, c.server_cpu_s))
    return [
        "  where a batch's time goes (median ms):",
        f"    wall per batch: {letters}",
        f"    fixed: GET /healthz round trip {diag['healthz']:.2f}; empty stream (paid once per "
        f"run by c, per epoch by c') {diag['empty_stream']:.2f}",
        f"    server work per batch in-process (batch_payload) {diag['server_batch']:.2f}, of "
        f"which LabelSetReader.read {diag['reader_read']:.2f}",
        f"    client to_batch: image gather from the cache {diag['gather']:.2f}, apply_views "
        f"{diag['views']:.2f}",
        f"    CRC-32 of one payload {diag['crc32']:.3f} ({diag['crc32_mb_s']:.0f} MB/s), taken "
        f"once by the server and once by the client: {2 * diag['crc32'] / stream_cpu:.1%} of "
        "c's CPU per batch (client and server)",
    ]


def format_report(
    args: argparse.Namespace,
    info: dict[str, Any],
    paths: dict[str, PathResult],
    students: dict[int, dict[str, StudentResult]],
    rows: list[Goal],
) -> str:
    """The whole human-readable report."""
    per_epoch = args.samples // args.batch_size
    rss = info["server_rss_mib"]
    lines = [
        f"== softserve serve benchmark: N={args.samples} 3x32x32 K={args.classes} "
        f"epochs={args.epochs} codec={args.codec} teacher={TEACHER}",
        f"   batch {args.batch_size} per rank, world size 1, drop_last: {per_epoch} batches "
        f"({per_epoch * args.batch_size} samples) per epoch; one run = {args.passes * args.epochs} "
        f"epochs ({args.passes} passes over the {args.epochs} stored ones)",
        f"   repeats={args.repeats} threads={torch.get_num_threads()} cpus={os.cpu_count()} "
        f"loadavg(1m) start {info['loadavg_start']:.2f}",
        f"   payload {info['payload_bytes'] / 1024:.1f} KiB/batch on the wire (no images); "
        f"torch.save file {info['file_bytes'] / 1024:.1f} KiB/batch (base images + labels)",
        f"   every path checked to deliver identical tensors: {info['checked']}",
        "",
        *format_paths(paths),
        "  (CPU ms/batch: client = this process, all threads; server = the server process)",
        "",
        *format_diagnostics(info["diagnostics"], paths),
        "",
        "  server memory, RSS MiB of one worker process: "
        + ", ".join(f"{k.replace('_', ' ')} {_opt(v, '.0f')}" for k, v in rss.items())
        + " (torch alone: a process that imported torch and nothing else, for reference)",
    ]
    for width, student in students.items():
        lines += [
            "",
            f"  student: ConvNet-3 width {width}, GIFT loss, SGD, {args.student_steps} steps per "
            f"repeat in turns of {args.student_block}, batch {args.batch_size}, "
            f"prefetch {args.prefetch}, repeats {args.student_repeats}",
            *format_student(student),
        ]
    if students:
        lines.append(
            "  (waiting: time in next() - for the loader, queue wait plus apply_views in the "
            "training thread)"
        )
    lines += ["", *format_goals(rows)]
    lines.append(f"  loadavg(1m) end {os.getloadavg()[0]:.2f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def widths(text: str) -> list[int]:
    """``128,32`` as [128, 32]: positive ints."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="fewer repeats and student steps: well under a minute")
    add("--samples", type=int, default=1000, help="images in the set (default %(default)s)")
    add("--classes", type=int, default=100, help="classes (default %(default)s)")
    add("--epochs", type=int, default=3, help="stored epochs (default %(default)s)")
    add("--codec", default="fp16", help="label codec of the set (default %(default)s)")
    add("--batch-size", type=int, default=256, help="batch size per rank (default %(default)s)")
    add("--repeats", type=int, help="interleaved repeats of each path (default 7; 3 quick)")
    add("--passes", type=int,
        help="a run's epochs, in passes over the stored ones (default 50; 10 quick)")  # fmt: skip
    add("--student-widths", type=widths, default=[128, 32],
        help="student ConvNet-3 widths, the first judged on the goal (default 128,32)")  # fmt: skip
    add("--student-steps", type=int, help="timed steps per repeat and feed (default 8; 2 quick)")
    add("--student-repeats", type=int, help="repeats per student (default 5; 2 quick)")
    add("--student-block", type=int,
        help="steps a student takes before the other's turn (default 1)")  # fmt: skip
    add("--prefetch", type=int, default=8, help="loader prefetch (default %(default)s)")
    add("--no-student", action="store_true", help="skip the student step measurement")
    add("--diag-calls", type=int, default=50, help="calls per diagnostic timing (default 50)")
    add("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    add("--seed", type=int, default=0, help="seed of images, views and student init")
    add("--workdir", type=Path, help="keep store, files and server log here (default: temp)")
    add("--json", type=Path, help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    defaults = {"repeats": (7, 3), "passes": (50, 10), "student_steps": (8, 2),
                "student_repeats": (5, 2), "student_block": (1, 1)}  # fmt: skip
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.student_steps % args.student_block:
        parser.error("--student-steps must be a multiple of --student-block")
    if args.samples < args.batch_size:
        parser.error("--samples must be at least --batch-size (drop_last leaves no batch)")
    return args


def open_sources(
    root: Path, url: str, args: argparse.Namespace, stack: contextlib.ExitStack
) -> Sources:
    """Reader, the server's catalog entry, HTTP clients and the client's base-image cache
    (all opened once, untimed)."""
    reader = stack.enter_context(LabelSetReader(root))
    client = stack.enter_context(Client(url))
    remote = client.labelset(LABEL_SET)
    if remote.base_images() is None:  # fetched once here, then cached by the client
        raise RuntimeError("the base images must fit the client's image cache")
    catalog = Catalog(root.parent, image_cache_bytes=1 << 30, locking=None)
    stack.callback(catalog.close)
    catalog.refresh()
    entry = catalog.get(LABEL_SET)
    assert entry is not None
    sharding = remote.sharding(args.batch_size, 0, 1)
    return Sources(
        reader=reader,
        images=reader.images(),
        hard=reader.hard_labels(),
        sharding=sharding,
        stored_epochs=reader.config.epochs,
        run_epochs=args.passes * reader.config.epochs,
        http=stack.enter_context(httpx.Client(base_url=url, timeout=30)),
        remote=remote,
        request=BatchRequest(
            entry,
            0,
            sharding,
            ("indices", "images", "params", "hard", "soft"),
            label_encoding="stored",
        ),  # fmt: skip
    )


def payload_bytes(src: Sources) -> int:
    """Bytes of one batch payload as served (no images)."""
    response = src.http.get(f"/v1/labelsets/{LABEL_SET}/epochs/0/batches/0", params=src.batch_query)
    response.raise_for_status()
    return len(response.content)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Build, serve, measure; returns the JSON record (and prints the report)."""
    started = time.perf_counter()
    root = build_label_set(work, args.samples, args.classes, args.epochs, args.codec, args.seed)
    info: dict[str, Any] = {
        "setup_relabel_s": time.perf_counter() - started,
        "loadavg_start": os.getloadavg()[0],
    }
    with contextlib.ExitStack() as stack:
        server = Server(root.parent, "--log-level", "warning", log=work / "server.log")
        stack.enter_context(server)
        src = open_sources(root, server.url, args, stack)
        src.files = write_files(src, work / "files")
        remote = src.remote
        check_paths(src, remote.output_size, remote.mean, remote.std)
        info.update(checked="yes", payload_bytes=payload_bytes(src),
                    file_bytes=src.files[0].stat().st_size)  # fmt: skip
        paths = measure_paths(src, args, server.pid)
        info["server_rss_mib"] = {"serving": rss_mib(server.pid), **server_memory(work)}
        info["diagnostics"] = diagnostics(src, args.diag_calls)
        widths = [] if args.no_student else args.student_widths
        students = {w: measure_student(remote, args, w) for w in widths}
    rows = goals(paths, students)
    rss = info["server_rss_mib"]["empty_store"]
    if rss is not None:
        rows.append(Goal("server RSS MiB per worker, empty store", rss, rss, "<= 150", rss <= 150))
    print(format_report(args, info, paths, students, rows), flush=True)
    return {
        "info": info,
        "paths": {k: {**asdict(r), "samples_per_s": r.rate} for k, r in paths.items()},
        "student": {
            str(w): {k: asdict(r) for k, r in student.items()} for w, student in students.items()
        },
        "goals": [asdict(g) for g in rows],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serve-bench-")))
        else:
            args.workdir.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix="serve-bench-", dir=args.workdir))
        record = run(args, work)
    elapsed = time.perf_counter() - started
    print(f"total benchmark time {elapsed:.1f} s")
    if args.json is not None:
        meta = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "total_s": elapsed,
        }
        args.json.write_text(json.dumps({"meta": meta, **record}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
