"""torchrun: ranks split the shards, and the result equals a single-process run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import cli_env, relabel_args, shard_digests

from softserve.format.augment import DsaPolicy
from softserve.storage import read_manifest, verify_label_set
from softserve.worker.relabel import relabel


def torchrun(nproc: int, args: list[str], module: bool = True) -> subprocess.CompletedProcess[str]:
    """``torchrun`` on this machine: ``-m softserve ARGS``, or a script when not ``module``."""
    launcher = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert launcher, "torchrun is installed with torch"
    target = ["-m", "softserve"] if module else []
    return subprocess.run(
        [launcher, "--standalone", f"--nproc-per-node={nproc}", *target, *args],
        env=cli_env(), capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).parent.parent,
    )  # fmt: skip


def test_two_gloo_ranks_equal_one_process(make_options, tmp_path: Path) -> None:
    single = make_options(epochs=7, shard_epochs=2, out=tmp_path / "single")
    relabel(single)
    multi = make_options(epochs=7, shard_epochs=2, out=tmp_path / "multi")
    done = torchrun(2, relabel_args(multi))
    assert done.returncode == 0, done.stderr
    assert "4 shards computed" in done.stdout
    manifest = read_manifest(multi.out)
    assert manifest.producer.world_size == 2
    assert shard_digests(multi.out) == shard_digests(single.out)
    assert manifest.config == read_manifest(single.out).config
    assert verify_label_set(multi.out) == []


def test_two_ranks_of_dsa_views_equal_one_process(make_options, tmp_path: Path) -> None:
    """DSA rows are drawn per (epoch, sample): ranks that split the shards write the bytes
    one process writes."""
    single = make_options(epochs=4, shard_epochs=1, out=tmp_path / "single", dsa=DsaPolicy())
    relabel(single)
    multi = make_options(epochs=4, shard_epochs=1, out=tmp_path / "multi", dsa=DsaPolicy())
    done = torchrun(2, relabel_args(multi))
    assert done.returncode == 0, done.stderr
    assert read_manifest(multi.out).config.views.policy == "dsa"
    assert shard_digests(multi.out) == shard_digests(single.out)


def test_ranks_resume_a_single_process_start(make_options, tmp_path: Path) -> None:
    """Shards written by any earlier run, of any world size, are reused."""
    full = make_options(epochs=6, shard_epochs=1, out=tmp_path / "full")
    relabel(full)
    partial = make_options(epochs=6, shard_epochs=1, out=tmp_path / "partial")
    relabel(partial)
    (partial.out / "manifest.json").unlink()
    for name in ("labels-00001.h5", "labels-00004.h5"):
        (partial.out / name).unlink()
    shutil.copy(full.out / "labels-00000.h5", partial.out / "labels-00002.h5.tmp")
    (partial.out / "relabel-plan.json").write_text(
        read_manifest(full.out).config.model_dump_json(indent=2)
    )
    done = torchrun(2, relabel_args(partial))
    assert done.returncode == 0, done.stderr
    assert "2 shards computed, 4 reused" in done.stdout
    assert shard_digests(partial.out) == shard_digests(full.out)
    assert not list(partial.out.glob("*.tmp"))
