"""Fault trials: inject faults while label sets are built and served, and check that a
training job gets exactly the right labels or a clear error, never anything else.

Setup (untimed): a random 32×32 RGB image set is relabelled twice in forked processes (seed
0: the reference, seed 1: a rebuild under the same name), one server is started on
loopback, and the reference is read once through the client (every tensor of every batch,
images included: this is what each trial must deliver).

Each round runs one trial of each kind, each with its own seed:

* ``flip_byte``: a copy of the reference set gets one byte of a random ``.h5`` file XORed
  with a random non-zero value, before the server opens it or after; the client reads
  every stored epoch.
* ``flip_metadata``: the same with a byte that belongs to no chunk of any dataset (the
  superblock, object headers, chunk indexes, heaps: what no chunk checksum covers), before
  the server opens the set, after, or before with the manifest rewritten to match the
  flipped file (so that only the HDF5 format's own checksums and the reader's checks
  stand between the flip and a label).
* ``zero_block``: a 4 KiB-aligned block of a random ``.h5`` file zeroed (fletcher32 takes a
  zeroed chunk with its zeroed checksum for intact), before the server opens it or after.
* ``kill_worker``: ``relabel`` in a forked process is sent SIGKILL or SIGTERM at a random
  moment of its run, then run again to completion; its shards must equal the reference's
  byte for byte (what a client would then be served), or the rerun must fail clearly.
* ``kill_server`` / ``sigterm_server``: the server is sent SIGKILL / SIGTERM at a random
  batch of a long stream and restarted on the same port; the client rides it out.
* ``replace_set``: at a random batch of a long stream, the set's folder is replaced by the
  rebuild (another version); the stream must go on with the old version to its end, or
  the client must refuse the new one (digest mismatch).
* ``overwrite_in_place``: at a random batch of a long stream, the rebuild's shards (and,
  in half the trials, its manifest) are copied over the open files, as ``cp`` does: same
  inodes, same sizes, other labels.
* ``truncate_stream``: at a random batch of a long stream, a random shard is truncated to a
  random length.

A trial's outcome: ``right`` (every batch equal to the reference's, none missing),
``clear_error`` (the batches before it right, then a ``SoftserveError``: ``ClientError``,
``PayloadError``, ``StoreError``), ``wrong_labels`` (any batch that differs: the failure
this exists to catch) or ``unexpected`` (another exception, missing batches, a timeout).
Failures are the last two. The JSON summary counts them per kind.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

from bench.harness import TEACHER, Server, make_image_set
from softserve.client import Client
from softserve.errors import SoftserveError
from softserve.storage.layout import MANIFEST_FILE, sha256_file
from softserve.storage.manifest import read_manifest, write_model
from softserve.storage.writer import file_info
from softserve.worker.relabel import RelabelOptions, relabel

BENCH_DIR = Path(__file__).resolve().parent

KINDS = ("flip_byte", "kill_worker", "kill_server", "sigterm_server", "replace_set",
         "flip_metadata", "zero_block", "overwrite_in_place", "truncate_stream")  # fmt: skip
REF, SWAP = "ref", "swap"
Batches = list[dict[str, np.ndarray]]


@dataclass
class Trial:
    kind: str
    seed: int
    outcome: str
    detail: str
    seconds: float


@dataclass
class Bench:
    """What the trials share: the work folder, the built sets, the server, the reference."""

    args: argparse.Namespace
    work: Path
    images: Path
    ref_root: Path
    alt_root: Path
    relabel_seconds: float
    server: Server
    stored: Batches  # every stored epoch once
    long: Batches  # a long stream: ``--stream-epochs`` epochs, wrapping


# --------------------------------------------------------------------------- setup


def relabel_options(args: argparse.Namespace, images: Path, out: Path, seed: int) -> RelabelOptions:
    return RelabelOptions(
        images=images, teacher=TEACHER, out=out, num_classes=args.classes, epochs=args.epochs,
        shard_epochs=1, seed=seed, batch_size=64, device="cpu", codec="fp16", progress=False,
    )  # fmt: skip


def _relabel_child(opts: RelabelOptions) -> None:
    """A forked relabel: one thread (no pool shared with the parent), exit 3 on a clear
    error, 1 on anything else."""
    import torch

    torch.set_num_threads(1)
    try:
        relabel(opts)
    except SoftserveError as exc:
        print(f"relabel failed clearly: {exc}", file=sys.stderr)
        os._exit(3)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def start_relabel(opts: RelabelOptions) -> multiprocessing.Process:
    proc = multiprocessing.get_context("fork").Process(target=_relabel_child, args=(opts,))
    proc.start()
    return proc


def run_relabel(opts: RelabelOptions) -> int:
    proc = start_relabel(opts)
    proc.join(timeout=300)
    return proc.exitcode if proc.exitcode is not None else -1


def read_all(url: str, name: str, epochs: int, args: argparse.Namespace,
             on_batch: Callable[[int], None] | None = None,
             got: Batches | None = None) -> Batches:  # fmt: skip
    """Every tensor of ``epochs`` epochs of ``name`` through the client, images included,
    appended to ``got`` as received (so that a read that fails keeps what came before);
    ``on_batch(i)`` runs after batch i is received."""
    got = [] if got is None else got
    with Client(url, retry_seconds=args.retry_seconds, max_wait=args.max_wait) as client:
        remote = client.labelset(name, image_cache_mb=0)
        sharding = remote.sharding(args.batch_size)
        for raw in remote.raw_batches(0, sharding, with_images=True, epochs=epochs):
            got.append({k: v.numpy().copy() for k, v in raw.tensors.items()})
            if on_batch is not None:
                on_batch(len(got) - 1)
    return got


def wait_listed(server: Server, name: str, present: bool = True) -> None:
    """Until the server's rescan lists ``name`` (or no longer does)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        names = {s["name"] for s in httpx.get(server.url + "/v1/labelsets").json()}
        if (name in names) == present:
            return
        time.sleep(0.05)
    raise RuntimeError(f"label set {name} never {'appeared' if present else 'went'}")


def setup(args: argparse.Namespace, work: Path) -> Bench:
    images = work / "images.pt"
    make_image_set(images, args.samples, args.classes, seed=0)
    ref_root, alt_root = work / "sets" / REF, work / "sets" / "alt"
    started = time.perf_counter()
    if run_relabel(relabel_options(args, images, ref_root, seed=0)) != 0:
        raise RuntimeError("building the reference label set failed")
    relabel_seconds = time.perf_counter() - started
    if run_relabel(relabel_options(args, images, alt_root, seed=1)) != 0:
        raise RuntimeError("building the rebuilt label set failed")
    store = work / "store"
    shutil.copytree(ref_root, store / REF)
    shutil.copytree(ref_root, store / SWAP)
    env = {"SOFTSERVE_RESCAN_SECONDS": "0.1", "SOFTSERVE_STREAM_READ_MB": "1"}
    server = Server(store, "--log-level", "warning", log=work / "server.log", env=env).start()
    stored = read_all(server.url, REF, args.epochs, args)
    long = read_all(server.url, REF, args.stream_epochs, args)
    return Bench(args, work, images, ref_root, alt_root, relabel_seconds, server, stored, long)


# --------------------------------------------------------------------------- judging


def judge(got: Batches, reference: Batches, error: BaseException | None) -> tuple[str, str]:
    """A trial's outcome and a line saying why."""
    for i, batch in enumerate(got):
        if i >= len(reference):
            return "unexpected", f"{len(got)} batches, more than the {len(reference)} expected"
        want = reference[i]
        if batch.keys() != want.keys() or any(
            not np.array_equal(batch[k], want[k]) for k in want
        ):
            return "wrong_labels", f"batch {i} differs from the reference"
    if error is None:
        if len(got) != len(reference):
            return "unexpected", f"{len(got)} of {len(reference)} batches, and no error"
        return "right", f"{len(got)} batches"
    if isinstance(error, SoftserveError):
        return "clear_error", f"after {len(got)} batches: {type(error).__name__}: {error}"
    return "unexpected", f"after {len(got)} batches: {type(error).__name__}: {error}"


def guarded_read(bench: Bench, name: str, epochs: int, reference: Batches,
                 on_batch: Callable[[int], None] | None = None) -> tuple[str, str]:  # fmt: skip
    got: Batches = []

    def record(i: int) -> None:
        if on_batch is not None:
            on_batch(i)

    error: BaseException | None = None
    try:
        read_all(bench.server.url, name, epochs, bench.args, record, got)
    except Exception as exc:  # judged: a clear error, or not
        error = exc
    return judge(got, reference, error)


# --------------------------------------------------------------------------- trials


def damage_and_read(
    bench: Bench, name: str, after_open: bool, damage: Callable[[Path], str],
    reseal: bool = False,
) -> tuple[str, str]:  # fmt: skip
    """Stage a copy of the reference as ``name``, ``damage`` a file of it (given the set's
    folder, it says what it did) before the server opens the set or after, rewriting the
    manifest to match when ``reseal``; then read every stored epoch."""
    staged = bench.work / "staged" / name
    shutil.copytree(bench.ref_root, staged)
    store_path = bench.server.store / name
    if after_open:
        staged.rename(store_path)
        wait_listed(bench.server, name)
    what = damage(store_path if after_open else staged)
    if reseal:
        reseal_manifest(staged)
    if not after_open:
        staged.rename(store_path)
        time.sleep(0.3)  # a rescan or two: the set is opened, or skipped as broken
    when = "after open" if after_open else "before open, resealed" if reseal else "before open"
    outcome, detail = guarded_read(bench, name, bench.args.epochs, bench.stored)
    shutil.rmtree(store_path)
    wait_listed(bench.server, name, present=False)
    return outcome, f"{what} {when}: {detail}"


def reseal_manifest(root: Path) -> None:
    """Rewrite the manifest's sizes and sha256s to match the files: a damaged set whose
    manifest vouches for it, as a source that built it so would hand it over."""
    manifest = read_manifest(root)
    dataset = file_info(root / manifest.dataset.file)
    shards = [s.model_copy(update=file_info(root / s.file).model_dump()) for s in manifest.shards]
    write_model(root / MANIFEST_FILE, manifest.model_copy(update={"dataset": dataset,
                                                                  "shards": shards}))  # fmt: skip


def flip_at(path: Path, offset: int, mask: int) -> None:
    """XOR one byte of a file with ``mask``, in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def outside_chunks(path: Path) -> np.ndarray:
    """Offsets of a file's bytes that belong to no chunk of any dataset: its metadata
    (superblock, object headers, chunk indexes, heaps) and free space."""
    import h5py

    inside = np.zeros(path.stat().st_size, bool)
    with h5py.File(path, "r") as f:
        for key in f:
            for i in range(f[key].id.get_num_chunks()):
                chunk = f[key].id.get_chunk_info(i)
                inside[chunk.byte_offset : chunk.byte_offset + chunk.size] = True
    return np.flatnonzero(~inside)


def flip_byte(bench: Bench, rng: random.Random, index: int) -> tuple[str, str]:
    def damage(root: Path) -> str:
        target = rng.choice(sorted(root.glob("*.h5")))
        offset = rng.randrange(target.stat().st_size)
        flip_at(target, offset, rng.randrange(1, 256))
        return f"{target.name}@{offset}"

    return damage_and_read(bench, f"flip{index}", rng.random() < 0.5, damage)


def flip_metadata(bench: Bench, rng: random.Random, index: int) -> tuple[str, str]:
    def damage(root: Path) -> str:
        target = rng.choice(sorted(root.glob("*.h5")))
        offset = int(rng.choice(list(outside_chunks(target))))
        flip_at(target, offset, rng.randrange(1, 256))
        return f"{target.name}@{offset} (metadata)"

    mode = rng.choice(["before", "after", "resealed"])
    return damage_and_read(bench, f"meta{index}", mode == "after", damage, mode == "resealed")


def zero_block(bench: Bench, rng: random.Random, index: int) -> tuple[str, str]:
    def damage(root: Path) -> str:
        target = rng.choice(sorted(root.glob("*.h5")))
        size = target.stat().st_size
        offset = rng.randrange(0, size, 4096)
        with open(target, "r+b") as f:
            f.seek(offset)
            f.write(bytes(min(4096, size - offset)))
        return f"{target.name}@{offset}+4096 zeroed"

    return damage_and_read(bench, f"zero{index}", rng.random() < 0.5, damage)


def kill_worker(bench: Bench, rng: random.Random, index: int) -> tuple[str, str]:
    out = bench.work / "worker" / f"w{index}"
    opts = relabel_options(bench.args, bench.images, out, seed=0)
    sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
    delay = rng.uniform(0, bench.relabel_seconds * 1.2)
    proc = start_relabel(opts)
    proc.join(timeout=delay)
    if proc.is_alive():
        os.kill(proc.pid, sig)
    proc.join(timeout=120)
    where = f"{sig.name} after {delay:.2f} s"
    code = run_relabel(opts)
    if code == 3:
        return "clear_error", f"{where}: the resumed relabel failed clearly"
    if code != 0:
        return "unexpected", f"{where}: the resumed relabel exited with {code}"
    ours = {p.name: sha256_file(p) for p in sorted(out.glob("labels-*.h5"))}
    theirs = {p.name: sha256_file(p) for p in sorted(bench.ref_root.glob("labels-*.h5"))}
    shutil.rmtree(out)
    if ours != theirs:
        return "wrong_labels", f"{where}: resumed shards differ from the reference"
    return "right", f"{where}: {len(ours)} shards equal the reference"


def _signal_server(sig: signal.Signals) -> Callable[[Bench, random.Random, int], tuple[str, str]]:
    def trial(bench: Bench, rng: random.Random, index: int) -> tuple[str, str]:
        at = rng.randrange(1, len(bench.long) - 1)
        restarts = []

        def on_batch(i: int) -> None:
            if i == at:
                restarts.append(bench.server.restart_after(sig))

        outcome, detail = guarded_read(bench, REF, bench.args.stream_epochs, bench.long,
                                       on_batch)  # fmt: skip
        for thread in restarts:
            thread.join()
        return outcome, f"{sig.name} at batch {at}: {detail}"

    return trial


def replace_set(bench: Bench, rng: random.Random, index: int) -> tuple[str, str]:
    at = rng.randrange(1, len(bench.long) - 1)
    store = bench.server.store
    old = bench.work / "replaced" / f"r{index}"
    old.parent.mkdir(exist_ok=True)

    def on_batch(i: int) -> None:
        if i == at:
            staged = bench.work / "staged" / f"alt{index}"
            shutil.copytree(bench.alt_root, staged)
            (store / SWAP).rename(old)
            staged.rename(store / SWAP)

    outcome, detail = guarded_read(bench, SWAP, bench.args.stream_epochs, bench.long, on_batch)
    if (store / SWAP).exists() and old.exists():  # put the reference back for the next trial
        shutil.rmtree(store / SWAP)
        wait_listed(bench.server, SWAP, present=False)
    if not (store / SWAP).exists():
        shutil.copytree(bench.ref_root, store / SWAP)
        wait_listed(bench.server, SWAP)
    shutil.rmtree(old, ignore_errors=True)
    return outcome, f"replaced at batch {at}: {detail}"


def fault_mid_stream(
    bench: Bench, rng: random.Random, name: str, fault: Callable[[Path], str]
) -> tuple[str, str]:
    """A copy of the reference served as ``name``; at a random batch of a long stream of
    it, ``fault`` changes its files in place (it says what it did)."""
    at = rng.randrange(1, len(bench.long) - 1)
    root = bench.server.store / name
    staged = bench.work / "staged" / name
    shutil.copytree(bench.ref_root, staged)
    staged.rename(root)
    wait_listed(bench.server, name)
    what: list[str] = []

    def on_batch(i: int) -> None:
        if i == at:
            what.append(fault(root))

    outcome, detail = guarded_read(bench, name, bench.args.stream_epochs, bench.long, on_batch)
    shutil.rmtree(root)
    wait_listed(bench.server, name, present=False)
    return outcome, f"{''.join(what)} at batch {at}: {detail}"


def overwrite_in_place(bench: Bench, rng: random.Random, index: int) -> tuple[str, str]:
    with_manifest = rng.random() < 0.5

    def fault(root: Path) -> str:
        names = sorted(p.name for p in bench.alt_root.glob("labels-*.h5"))
        for file in [*names, *([MANIFEST_FILE] if with_manifest else [])]:
            shutil.copyfile(bench.alt_root / file, root / file)  # in place, as cp does
        return "rebuild's shards" + (" and manifest" if with_manifest else "") + " copied over"

    return fault_mid_stream(bench, rng, f"inplace{index}", fault)


def truncate_stream(bench: Bench, rng: random.Random, index: int) -> tuple[str, str]:
    def fault(root: Path) -> str:
        target = rng.choice(sorted(root.glob("labels-*.h5")))
        size = rng.randrange(target.stat().st_size)
        os.truncate(target, size)
        return f"{target.name} truncated to {size} bytes"

    return fault_mid_stream(bench, rng, f"trunc{index}", fault)


TRIALS: dict[str, Callable[[Bench, random.Random, int], tuple[str, str]]] = {
    "flip_byte": flip_byte,
    "kill_worker": kill_worker,
    "kill_server": _signal_server(signal.SIGKILL),
    "sigterm_server": _signal_server(signal.SIGTERM),
    "replace_set": replace_set,
    "flip_metadata": flip_metadata,
    "zero_block": zero_block,
    "overwrite_in_place": overwrite_in_place,
    "truncate_stream": truncate_stream,
}


def run_trials(bench: Bench, started: float) -> list[Trial]:
    """Every round's trials; the summary is rewritten after each round, so a run stopped
    early still reports the trials it finished."""
    trials: list[Trial] = []
    (bench.work / "staged").mkdir()
    for index in range(bench.args.rounds):
        for kind in bench.args.kinds:
            seed = bench.args.seed * 1_000_003 + index * len(KINDS) + KINDS.index(kind)
            begun = time.perf_counter()
            try:
                outcome, detail = TRIALS[kind](bench, random.Random(seed), index)
            except Exception as exc:  # the harness itself failed: counted, not hidden
                outcome, detail = "unexpected", f"trial raised {type(exc).__name__}: {exc}"
            trial = Trial(kind, seed, outcome, detail, time.perf_counter() - begun)
            trials.append(trial)
            if bench.args.verbose or outcome in ("wrong_labels", "unexpected"):
                print(f"{kind:>15} {outcome:>12}  {detail}", flush=True)
        write_summary(summarize(trials, bench.args, time.perf_counter() - started), bench.args)
    return trials


def write_summary(summary: dict, args: argparse.Namespace) -> None:
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")


def summarize(trials: list[Trial], args: argparse.Namespace, seconds: float) -> dict:
    by_kind = {}
    for kind in args.kinds:
        mine = [t for t in trials if t.kind == kind]
        mean = sum(t.seconds for t in mine) / max(1, len(mine))
        by_kind[kind] = {**Counter(t.outcome for t in mine), "mean_seconds": round(mean, 2)}
    counts = Counter(t.outcome for t in trials)
    failures = [t for t in trials if t.outcome in ("wrong_labels", "unexpected")]
    usage = os.times()
    return {
        "trials": len(trials),
        "failures": len(failures),
        "wrong_labels": counts["wrong_labels"],
        "right": counts["right"],
        "clear_error": counts["clear_error"],
        "by_kind": by_kind,
        "failed": [asdict(t) for t in failures],
        "seconds": round(seconds, 1),
        "cpu_seconds": round(usage.user + usage.system + usage.children_user
                             + usage.children_system, 1),  # fmt: skip
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "work")},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40, help="trials of each kind")
    parser.add_argument("--kinds", type=lambda s: s.split(","), default=list(KINDS),
                        help=f"comma-separated among {', '.join(KINDS)}")  # fmt: skip
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=4, help="stored epochs")
    parser.add_argument("--stream-epochs", type=int, default=24,
                        help="epochs of the long streams that servers are killed in")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--retry-seconds", type=float, default=60.0)
    parser.add_argument("--max-wait", type=float, default=1.0,
                        help="the client's backoff cap (its default is 10 s: here the trials "
                        "spend their time on faults, not on waiting out a restart)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: temp)")
    parser.add_argument("--json", type=Path, default=BENCH_DIR / "results" / "fault_trials.json")
    parser.add_argument("--verbose", action="store_true", help="a line per trial")
    args = parser.parse_args(argv)
    unknown = set(args.kinds) - set(KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}; choose among {', '.join(KINDS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    import tempfile

    args = parse_args(argv)
    # stopped early (SIGTERM): stop the server and remove the work folder on the way out;
    # the summary of the rounds finished so far is already written
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not args.verbose:  # the client's retry warnings are what the trials provoke
        logging.getLogger("softserve.client").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="softserve-faults-", dir=args.work) as tmp:
        started = time.perf_counter()
        bench = setup(args, Path(tmp))
        try:
            trials = run_trials(bench, started)
        finally:
            bench.server.stop()
        summary = summarize(trials, args, time.perf_counter() - started)
    write_summary(summary, args)
    print(json.dumps({k: summary[k] for k in ("trials", "failures", "wrong_labels", "right",
                                              "clear_error", "by_kind")}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
