"""What the benchmarks, the studies and the tests share: a real server, synthetic image sets
and paired ratios.

- :class:`Server`: ``softserve serve`` (uvicorn) in a subprocess on a loopback port, started
  for real and waited for until it answers, restarted on the same port, stopped;
- :func:`make_image_set`: random images with balanced labels as a tensor file, and
  :func:`build_label_set`: one relabelled by the cheap :data:`TEACHER`, the label set that
  ``serve_bench``, ``load_test`` and ``fault_trials`` serve;
- :func:`paired_ratio`: two measurements compared within each repeat, then the median;
- :func:`peak_rss`: the peak RSS of a ``softserve`` command in a process of its own.

torch and the worker are imported where they are used: the studies' reports import this
module (through ``bench.studies.study``) and read results files without them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

#: ConvNet-3 of width 8 (``bench/serve_teacher.py``): labels that cost next to nothing.
TEACHER = "bench.serve_teacher:tiny_convnet"
#: The name of :func:`build_label_set`'s label set in its store.
LABEL_SET = "bench"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``softserve serve --store STORE --port PORT ARGS`` in a subprocess on loopback.

    ``args``: more ``serve`` options (``--workers 2``, ``--token-file F``, ``--log-level
    warning``); ``env``: added to this process's environment (``SOFTSERVE_*`` settings);
    ``command``: the CLI (default ``python -m softserve``; another venv's, a wrapper). The
    port stays the same across restarts, and the log (default ``server-PORT.log`` beside
    the store) is appended to. ``ready_timeout``: how long a start may take (a store of
    large sets hashes every file before ``/readyz``). As a context manager: started on
    entry, stopped on exit.
    """

    def __init__(
        self, store: Path, *args: object, log: Path | None = None, port: int | None = None,
        env: Mapping[str, str] | None = None, command: Sequence[str] | None = None,
        ready_timeout: float = 60,
    ) -> None:  # fmt: skip
        self.store = store
        self.args = [str(a) for a in args]
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log or store.parent / f"server-{self.port}.log"
        self.env = {**os.environ, **(env or {})}
        self.command = list(command or [sys.executable, "-m", "softserve"])
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None

    def start(self, probe: str = "/readyz", timeout: float | None = None) -> Server:
        """Start, and wait until ``probe`` answers 200 (``/healthz``: up, maybe not ready);
        a RuntimeError with the log if the server exits first or is not ready in time."""
        cmd = [*self.command, "serve", "--store", str(self.store), "--port", str(self.port)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*cmd, *self.args], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"server exited with {code}:\n{self.log.read_text()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + probe, timeout=1).status_code == 200:
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout:.0f} s:\n{self.log.read_text()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the server was never started"
        return self.proc.pid

    def restart_after(self, sig: signal.Signals) -> threading.Thread:
        """Send ``sig`` now and start the server again once it has exited, in a thread
        (join it to know the server is back)."""
        assert self.proc is not None, "the server was never started"
        proc = self.proc
        os.kill(proc.pid, sig)

        def restart() -> None:
            proc.wait(timeout=60)
            self.start()

        thread = threading.Thread(target=restart, name="server-restart")
        thread.start()
        return thread

    def kill(self) -> None:
        """SIGKILL, and wait for the exit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM (a graceful shutdown), then SIGKILL after 30 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def make_image_set(
    path: Path, samples: int, classes: int, seed: int, channels: int = 3, size: int = 32
) -> Path:
    """Random uint8 images (``samples`` × ``channels`` × ``size`` × ``size``) and balanced
    labels in a random order, as a ``{"data", "label"}`` tensor file: the same file for the
    same arguments. Returns ``path``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (samples, channels, size, size), generator=gen, dtype=torch.uint8)
    label = (torch.arange(samples) % classes)[torch.randperm(samples, generator=gen)]
    torch.save({"data": data, "label": label}, path)
    return path


def build_label_set(
    work: Path, samples: int, classes: int, epochs: int, codec: str, seed: int
) -> Path:  # fmt: skip
    """A random 3×32×32 image set (``work/images.pt``) relabelled by :data:`TEACHER` on the
    CPU into ``work/store/bench``; returns the label set's root."""
    import torch

    from softserve.worker.relabel import RelabelOptions, relabel

    images = make_image_set(work / "images.pt", samples, classes, seed)
    out = work / "store" / LABEL_SET
    torch.manual_seed(seed)
    relabel(
        RelabelOptions(
            images=images, teacher=TEACHER, out=out, num_classes=classes, epochs=epochs,
            seed=seed, batch_size=256, device="cpu", codec=codec, progress=False,
        )
    )  # fmt: skip
    return out


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over repeats of ``num[i] / den[i]``, two measurements taken in the same repeat
    (rates; or times, for the inverse ratio): robust to load that drifts between repeats,
    as a ratio of medians is not."""
    return statistics.median(n / d for n, d in zip(num, den, strict=True))


#: ``softserve ARGS`` in this process, then its peak RSS (VmHWM) on stdout's last line: read
#: before exit, since torch's teardown at exit raises the peak by 100 MB or more.
_RUN_AND_REPORT_PEAK = """
import sys
from pathlib import Path
from softserve.entry import main
sys.argv[0] = "softserve"
try:
    main()
except SystemExit as exc:
    assert not exc.code, exc.code
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
print(int(status["VmHWM"].split()[0]) << 10)
"""


def peak_rss(
    args: Sequence[object], env: Mapping[str, str] | None = None, timeout: float = 3600
) -> int:  # fmt: skip
    """Peak RSS in bytes of ``softserve ARGS`` run in a process of its own (Linux /proc),
    with ``env`` as its environment (default this one's); a RuntimeError with its stderr
    when it fails."""
    done = subprocess.run(
        [sys.executable, "-c", _RUN_AND_REPORT_PEAK, *map(str, args)],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"softserve {' '.join(map(str, args))} failed:\n{done.stderr}")
    return int(done.stdout.split()[-1])
