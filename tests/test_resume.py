"""Interrupted relabels: killed or stopped part way, they resume to the uninterrupted result."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import relabel_args, run_cli, shard_digests, start_cli

from softserve.errors import StoreError
from softserve.storage import LabelSetReader, verify_label_set
from softserve.worker.relabel import relabel

#: Enough shards that a loaded machine's polling still signals well before the last one
#: (0.3 s each: 6 s in all).
SHARDS = 20


def _start_and_stop(opts, sig: int, after_shards: int) -> subprocess.CompletedProcess[str]:
    """Start a slow relabel, send ``sig`` once ``after_shards`` shards are complete."""
    proc = start_cli(*relabel_args(opts))
    deadline = time.monotonic() + 120
    while len(list(opts.out.glob("labels-*.h5"))) < after_shards:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "relabel made no progress"
        time.sleep(0.02)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture
def slow_options(make_options):
    """One shard per epoch, 0.3 s per shard: slow enough to stop part way."""
    return make_options(teacher="teachers:slow_rgb", epochs=SHARDS, shard_epochs=1, batch_size=16)


@pytest.fixture
def reference(make_options, tmp_path: Path) -> dict[str, str]:
    """Shard digests of the same label set computed without interruption."""
    opts = make_options(epochs=SHARDS, shard_epochs=1, batch_size=16, out=tmp_path / "ref")
    relabel(opts)
    return shard_digests(opts.out)


def test_killed_run_is_incomplete_then_resumes(slow_options, reference) -> None:
    killed = _start_and_stop(slow_options, signal.SIGKILL, after_shards=3)
    assert killed.returncode == -signal.SIGKILL
    out = slow_options.out
    assert not (out / "manifest.json").exists()
    complete = shard_digests(out)
    assert 3 <= len(complete) < SHARDS
    for name, digest in complete.items():
        assert reference[name] == digest  # what is complete is already final

    with pytest.raises(StoreError, match="no complete label set"):
        LabelSetReader(out)
    status = run_cli("inspect", out)
    assert status.returncode == 0 and "INCOMPLETE" in status.stdout
    assert run_cli("verify", out).returncode == 1

    resumed = run_cli(*relabel_args(slow_options))
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(complete)} reused" in resumed.stdout
    assert shard_digests(out) == reference
    assert not list(out.glob("*.tmp"))
    assert verify_label_set(out) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stopped_run_exits_cleanly_and_resumes(slow_options, reference, sig: int) -> None:
    stopped = _start_and_stop(slow_options, sig, after_shards=2)
    assert stopped.returncode == 130
    assert "interrupted" in stopped.stderr and "rerun the same command" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    out = slow_options.out
    assert not list(out.glob("*.tmp"))  # the partial shard is removed on the way out
    assert not (out / "manifest.json").exists()
    resumed = run_cli(*relabel_args(slow_options))
    assert resumed.returncode == 0, resumed.stderr
    assert shard_digests(out) == reference
