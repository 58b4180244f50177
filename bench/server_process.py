"""A ``softserve serve`` process on a fixed loopback port, for benchmarks that signal it,
restart it and measure it (``fault_trials.py``, ``load_test.py``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from serve_bench import free_port, server_env, stop_process, wait_ready


class ServerProcess:
    """``softserve serve --store STORE`` on one port across restarts; its log appends."""

    def __init__(self, store: Path, log_path: Path, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.store = store
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**server_env(), **(env or {})}
        self.args = args
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        cmd = [sys.executable, "-m", "softserve", "serve", "--store", str(self.store),
               "--port", str(self.port), "--log-level", "warning", *self.args]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_ready(self.proc, self.url, self.log_path)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def restart_after(self, sig: signal.Signals) -> threading.Thread:
        """Send ``sig`` now and start the server again once it has exited, in a thread
        (join it to know the server is back)."""
        assert self.proc is not None
        proc = self.proc
        os.kill(proc.pid, sig)

        def restart() -> None:
            proc.wait(timeout=60)
            self.start()

        thread = threading.Thread(target=restart, name="server-restart")
        thread.start()
        return thread

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
