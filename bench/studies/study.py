"""What every training study in ``bench/studies/`` shares: a pool of runs, a results file
(the server is :class:`bench.harness.Server`).

A study is a list of jobs (frozen dataclasses with a ``key``), each one ``softserve train``
command. Finished runs are appended to a JSON-lines results file with their command and
code version, and skipped on the next run; the file is the source of every table. The
report side reads that file back into cells of seeds (``Cell``) and rewrites a marked
section of the README.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[1]
#: Where the studies' results files, tables and plots are committed.
RESULTS = BENCH / "results"


def code_version() -> str:
    """The commit the study runs, with ``-dirty`` when tracked files differ from it;
    ``SOFTSERVE_CODE_VERSION`` where the tree is a copy without git (a GPU host)."""
    if os.environ.get("SOFTSERVE_CODE_VERSION"):
        return os.environ["SOFTSERVE_CODE_VERSION"]

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", "-C", str(BENCH), *args], capture_output=True, text=True
            )
        except FileNotFoundError:  # no git on this host
            return ""
        return done.stdout.strip()

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def add_common_arguments(parser: argparse.ArgumentParser, results: str | None) -> None:
    """The options every study takes: where things go, the seeds, how runs are spread
    (``results`` None: the study picks its results file from its other options)."""
    parser.add_argument("--workdir", type=Path, default=Path("study"), help="teacher, sets, store")
    parser.add_argument("--results", type=Path, default=RESULTS / results if results else None)
    parser.add_argument("--out", type=Path, default=RESULTS, help="tables and plots")
    parser.add_argument("--readme", type=Path, default=None, help="README to update in place")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eval-limit", type=int, default=None, help="first N test images only")
    parser.add_argument("--report-only", action="store_true", help="tables and plots only")


def labels_of(record: dict, *, starting: bool = False) -> frozenset[str]:
    """The identities of what a run learned from, any one of which a run on the same labels
    shares: its labels' content sha256; in records before it, its label set's digest, or the
    teacher and images with the CPU it ran on (a rebuild from those on that kind of CPU gives
    the same labels bit for bit, README "At K = 1000"); an online run's teacher.
    ``starting``: every identity of a run about to start here. Empty: a record before
    provenance."""
    content = record.get("labels_sha256")
    if content and not starting:
        return frozenset({content})
    teacher, images = record.get("teacher_sha256"), record.get("images_sha256")
    cpu = cpu_model() if starting else record.get("host", {}).get("cpu")
    ids = {content, record.get("labelset_digest"), teacher if images is None else None,
           f"{teacher} {images} {cpu}" if teacher and images and cpu else None}  # fmt: skip
    return frozenset(ids - {None})


def done_keys(results: Path, job_type: type) -> dict[tuple, list[frozenset[str]]]:
    """Keys of the runs already in the results file, each with the labels it ran on."""
    done: dict[tuple, list[frozenset[str]]] = {}
    for record in load(results):
        done.setdefault(job_type(**record["job"]).key, []).append(labels_of(record))
    return done


def is_done(done: dict[tuple, list[frozenset[str]]], key: tuple, labels: frozenset[str]) -> bool:
    """Whether a run of ``key`` on ``labels`` is in: a reference rebuilt on another machine
    (float32 training differs across CPUs, so its teacher does) starts its cells afresh;
    a record without provenance counts for any labels, and any record for unknown labels."""
    found = done.get(key, [])
    return any(not ran or ran & labels for ran in found) or (not labels and bool(found))


def cpu_model() -> str:
    """The CPU's model name (float32 results differ across SIMD kernels: a record says which)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(root: Path) -> dict:
    """What a run's labels are, beyond their name: the label set's digest (its version), its
    content's sha256, the teacher's weights and the base images, by sha256."""
    from softserve.storage.manifest import load_manifest

    manifest, digest = load_manifest(root)
    config = manifest.config
    return {"labelset_digest": digest, "labels_sha256": manifest.content_sha256(),
            "teacher_sha256": config.teacher.weights_sha256,
            "images_sha256": config.dataset_sha256}  # fmt: skip


def run_job(command: list[str], threads: int) -> tuple[dict, float]:
    """Run one ``softserve train`` command; its JSON result line and the seconds it took."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NO_COLOR": "1"}
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "softserve", *command[1:]], capture_output=True, text=True, env=env
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), time.time() - started


@dataclass
class Runner:
    """Runs jobs in a pool and appends each finished run's record to the results file."""

    results: Path
    command: Callable[[Any], list[str]]
    workers: int
    threads: int
    desc: str
    #: Extra fields of a job's record (what the job's key alone does not say).
    annotate: Callable[[Any], dict] = lambda job: {}

    def record(self, job: Any, version: str) -> dict:
        import torch

        command = self.command(job)
        started = time.time()
        result, seconds = run_job(command, self.threads)
        return {
            "job": asdict(job),
            "result": result,
            **self.annotate(job),
            "command": command,
            "code_version": version,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "seconds": round(seconds, 1),
            "host": {"cpus": os.cpu_count(), "threads": self.threads, "torch": torch.__version__,
                     "cpu": cpu_model()},  # fmt: skip
        }

    def run(self, jobs: Sequence[Any]) -> list[str]:
        """Run ``jobs`` not yet in the results file; returns the failures."""
        from tqdm.auto import tqdm

        done = done_keys(self.results, type(jobs[0])) if jobs else {}
        todo = [job for job in jobs if not is_done(
            done, job.key, labels_of(self.annotate(job), starting=True))]  # fmt: skip
        print(f"{len(jobs)} runs planned, {len(jobs) - len(todo)} already in {self.results}")
        version = code_version()
        lock = threading.Lock()
        failures = []
        with ThreadPoolExecutor(self.workers) as pool:
            futures = {pool.submit(self.record, job, version): job for job in todo}
            bar = tqdm(total=len(todo), unit="run", desc=self.desc, dynamic_ncols=True)
            for future in as_completed(futures):
                job = futures[future]
                try:
                    record = future.result()
                except Exception as exc:  # a failed run is reported, the others go on
                    failures.append(str(exc))
                    tqdm.write(f"FAILED {job}: {exc}")
                else:
                    with lock, open(self.results, "a") as out:
                        out.write(json.dumps(record) + "\n")
                    bar.set_postfix_str(
                        f"{job.loss}/{job.optimizer} {record['result']['top1']:.3f}"
                    )
                bar.update()
            bar.close()
        if failures:
            print(f"{len(failures)} runs failed; rerun to retry them", file=sys.stderr)
        return failures


def small_eval_set(workdir: Path, count: int) -> Path:
    """The first ``count`` test images as a tensor file: a quick evaluation for smoke runs."""
    import torch

    from softserve.worker import fashion_mnist

    path = workdir / f"test-{count}.pt"
    if not path.exists():
        images, labels = fashion_mnist.load_split(fashion_mnist.find_data(), "test")
        data = {"data": torch.from_numpy(images[:count]), "label": torch.from_numpy(labels[:count])}
        torch.save(data, path)
    return path


@dataclass(frozen=True)
class Cell:
    """The seeds' top-1 of one table cell."""

    values: tuple[float, ...]
    seeds: tuple[int, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    @property
    def pstd(self) -> float:
        """Population std, as the official evaluator reports (``np.std``)."""
        return statistics.pstdev(self.values)

    def text(self) -> str:
        """Mean ± sample std [population std] (seeds); one seed has no std to show."""
        if len(self.values) == 1:
            return f"{self.mean:.3f} (1)"
        return f"{self.mean:.3f} ± {self.std:.3f} [{self.pstd:.3f}] ({len(self.values)})"


def cells_by(
    records: list[dict], key: Callable[[dict], tuple], metric: str = "top1"
) -> dict[tuple, Cell]:
    """``metric`` (top-1 after the last epoch, or ``top1_best4``, the official evaluator's
    best of four) grouped by ``key(job)``, seeds sorted; one record per seed (the last)."""
    by_seed: dict[tuple, dict[int, float]] = {}
    for r in records:
        by_seed.setdefault(key(r["job"]), {})[r["job"]["seed"]] = r["result"][metric]
    return {
        k: Cell(tuple(seeds[s] for s in sorted(seeds)), tuple(sorted(seeds)))
        for k, seeds in sorted(by_seed.items())
    }


def load(results: Path) -> list[dict]:
    """Every record of a results file, in file order."""
    lines = results.read_text().splitlines() if results.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def replace_section(readme: Path, begin: str, end: str, body: str) -> None:
    """Replace the text between the ``begin`` and ``end`` markers of ``readme``."""
    text = readme.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{readme} has no {begin} ... {end} section to update")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{body}{end}{tail}")


def write_pages(
    out: Path, stem: str, title: str, render: Callable[[str], str], readme: Path | None,
    markers: tuple[str, str],
) -> Path:  # fmt: skip
    """Write ``out/STEM.md`` from ``render(link)`` (link: the prefix of files in ``out``) and,
    given ``readme``, its section between ``markers``; returns the page."""
    page = out / f"{stem}.md"
    page.write_text(f"# {title}\n\n" + render(""))
    if readme is not None:
        link = os.path.relpath(out.resolve(), readme.parent.resolve()) + "/"
        replace_section(readme, *markers, render(link))
    return page


def save_figure(fig: Any, path: Path) -> str:
    """Save a matplotlib figure reproducibly (no software stamp); returns its file name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return path.name


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
