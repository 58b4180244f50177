"""Shared fixtures: tiny synthetic image sets, a CLI runner, relabel helpers, and the
benchmarks' server (``bench.harness``) in the tests' environment."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from bench import harness
from bench.harness import free_port as free_port  # re-exported: tests import it from here
from softserve.storage.layout import sha256_file
from softserve.worker.relabel import RelabelOptions, relabel

TESTS_DIR = Path(__file__).parent
CLASSES = ["ant", "bee", "cat"]


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """Write uint8 (N, C, H, W) images as an ImageFolder tree of PNGs."""
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        Image.fromarray(array).save(folder / f"{i:03d}.png")
    return root


def random_set(n: int = 12, channels: int = 3, h: int = 12, w: int = 10, seed: int = 0):
    """Random uint8 images with labels cycling through the three classes."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, channels, h, w), dtype=np.uint8)
    labels = np.arange(n) % len(CLASSES)
    return images, labels


@pytest.fixture
def rgb_folder(tmp_path: Path) -> Path:
    """12 RGB 12×10 images in three class folders."""
    return write_folder(tmp_path / "rgb", *random_set())


@pytest.fixture
def gray_folder(tmp_path: Path) -> Path:
    """12 grayscale 12×10 images in three class folders."""
    return write_folder(tmp_path / "gray", *random_set(channels=1))


@pytest.fixture
def make_options(rgb_folder: Path, tmp_path: Path) -> Callable[..., RelabelOptions]:
    """RelabelOptions for the tiny RGB set and teacher, with overrides."""

    def make(**overrides: object) -> RelabelOptions:
        base = RelabelOptions(
            images=rgb_folder,
            teacher="teachers:tiny_rgb",
            out=tmp_path / "store" / "set",
            epochs=6,
            shard_epochs=2,
            batch_size=8,
            device="cpu",
            codec="fp32",
            progress=False,
        )
        return replace(base, **overrides)

    return make


def shard_digests(root: Path) -> dict[str, str]:
    """sha256 of every label shard of a label set, by file name."""
    return {p.name: sha256_file(p) for p in sorted(root.glob("labels-*.h5"))}


def cli_env() -> dict[str, str]:
    """Environment for CLI subprocesses: the test teachers importable, no colour codes."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "200"
    return env


def softserve_cmd(*args: object) -> list[str]:
    return [sys.executable, "-m", "softserve", *map(str, args)]


def start_cli(*args: object) -> subprocess.Popen[str]:
    """Start ``softserve ARGS`` with its output piped and SIGINT's default action, as a
    terminal's foreground job gets it: a shell's background jobs (pytest run with ``&`` from
    a script) start with SIGINT ignored, and the child would inherit that."""
    return subprocess.Popen(
        softserve_cmd(*args), env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


def run_cli(
    *args: object, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``softserve ARGS`` in a subprocess, with ``env`` added to its environment, and
    capture its output."""
    return subprocess.run(
        softserve_cmd(*args), env={**cli_env(), **(env or {})}, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def relabel_args(opts: RelabelOptions) -> list[str]:
    """The ``softserve relabel`` arguments equivalent to the fixture's options."""
    args = [
        "relabel", "--images", opts.images, "--teacher", opts.teacher, "--out", opts.out,
        "--epochs", opts.epochs, "--shard-epochs", opts.shard_epochs,
        "--batch-size", opts.batch_size, "--device", opts.device, "--codec", opts.codec,
        "--seed", opts.seed, "--no-progress",
    ]  # fmt: skip
    if opts.weights is not None:
        args += ["--weights", opts.weights]
    if opts.dsa is not None:
        args += ["--views", "dsa"]
    return [str(a) for a in args]


@pytest.fixture(autouse=True, scope="session")
def _private_image_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every test, and every process it starts, caches base images in a folder of the test
    session's, never in the user's ~/.cache/softserve (tests that test the cache set their
    own)."""
    os.environ["SOFTSERVE_CACHE_DIR"] = str(tmp_path_factory.mktemp("softserve-cache"))


@pytest.fixture(autouse=True)
def _quiet_threads() -> None:
    """Keep torch to the machine's two cores, as CI has."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (VmRSS of /proc/PID/status), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError(f"no VmRSS for process {pid}")


class Server(harness.Server):
    """:class:`bench.harness.Server` with the CLI's test environment (:func:`cli_env`: the
    test teachers importable) and a rescan every 0.2 s; its log beside the store."""

    def __init__(
        self, store: Path, *args: object, port: int | None = None, env: dict | None = None,
        command: list[str] | None = None,
    ):  # fmt: skip
        """``command`` runs the CLI (default ``python -m softserve``), e.g. in a lean env."""
        env = {**cli_env(), "SOFTSERVE_RESCAN_SECONDS": "0.2", **(env or {})}
        super().__init__(store, *args, port=port, env=env, command=command)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 100 KiB tmpfs: room for the dataset and a few shards of the tiny set, no more."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def build_label_set(out: Path, **overrides: object) -> Path:
    """A small label set of random RGB images labelled by the tiny teacher."""
    shape = {k: int(overrides.pop(k)) for k in ("n", "h", "w") if k in overrides}
    images, labels = random_set(**{"n": 50, **shape})
    folder = write_folder(out.parent / f"{out.name}-images", images, labels)
    opts = RelabelOptions(
        images=folder, teacher="teachers:tiny_rgb", out=out, epochs=4, shard_epochs=2,
        batch_size=32, device="cpu", codec="fp16", progress=False,
    )  # fmt: skip
    relabel(replace(opts, **overrides))
    return out


def reseal_manifest(root: Path) -> None:
    """Rewrite the manifest's file sizes and sha256s after a test edited the set's files:
    a forged but self-consistent set, as an untrusted source could hand over."""
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    for entry in (manifest["dataset"], *manifest["shards"]):
        file = root / entry["file"]
        entry["size"], entry["sha256"] = file.stat().st_size, sha256_file(file)
    path.write_text(json.dumps(manifest, indent=1))


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with two label sets: ``tiny`` (fp16, 50 samples) and ``tiny-int8``."""
    root = tmp_path_factory.mktemp("served") / "store"
    build_label_set(root / "tiny")
    build_label_set(root / "tiny-int8", codec="int8", n=20)
    return root


@pytest.fixture(scope="session")
def builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two builds of one small set (20 samples, 4 epochs in 2 shards, fp16), seeds 0 and 1:
    the same file names and sizes, other views and labels. Tests copy them, never edit them."""
    root = tmp_path_factory.mktemp("builds")
    return build_label_set(root / "a", n=20, seed=0), build_label_set(root / "b", n=20, seed=1)


@pytest.fixture(scope="session")
def long_builds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """:func:`builds` with 64 epochs in 2 shards: more than a stream reads ahead, so a
    stream reads from disk long after it starts."""
    root = tmp_path_factory.mktemp("long-builds")
    a, b = (
        build_label_set(root / name, n=20, epochs=64, shard_epochs=32, seed=seed)
        for name, seed in (("a", 0), ("b", 1))
    )
    return a, b


@pytest.fixture(scope="session")
def server(store: Path):
    """One server over ``store`` for the whole session."""
    srv = Server(store).start()
    yield srv
    srv.stop()


#: Where browser tests leave their screenshots (git-ignored; CI keeps them as artifacts).
ARTIFACTS = TESTS_DIR / "artifacts"


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium, headless, driven by Playwright (browser downloads are not
    reachable: Playwright is pointed at the system browser). Skipped only where Chromium is
    missing and this user could not have installed it; as root (CI) a missing one fails."""
    import shutil

    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    if executable is None:
        if os.geteuid() == 0:
            pytest.fail("chromium is missing; scripts/setup.sh installs it (apt-get)")
        pytest.skip("chromium is not installed and this user cannot install it (not root)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def browser_page(browser):
    """A fresh browser page (its own context: no shared token or storage)."""
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    yield context.new_page()
    context.close()


#: Headers the proxy sets itself rather than passing on.
_OWN = ("date", "server", "connection", "content-length")


class Proxy:
    """An HTTP proxy on loopback before ``upstream``, for one file: it cuts the connection
    once after ``cut_after`` body bytes of that file, or flips bit 0 of its body byte
    ``flip_at``, and runs ``before()`` once before forwarding its first request; every body
    passes through ``rewrite(path, body)`` (a newer server's answers, say). It counts
    the body bytes of set files (the manifest aside) it passed on, and keeps each request's
    path and Range header."""

    def __init__(
        self, upstream: str, file: str = "", *, cut_after: int | None = None,
        flip_at: int | None = None, before: Callable[[], None] | None = None,
        rewrite: Callable[[str, bytes], bytes] | None = None,
    ) -> None:  # fmt: skip
        self.upstream, self.file = upstream, file
        self.cut_after, self.flip_at, self.before = cut_after, flip_at, before
        self.rewrite = rewrite
        self.file_bytes = 0
        self.requests: list[tuple[str, str | None]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Proxy:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                proxy.forward(self)

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def forward(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?")[0]
        self.requests.append((path, handler.headers.get("Range")))
        ours = path.endswith("/" + self.file)
        if ours and self.before is not None:
            before, self.before = self.before, None
            before()
        sent = {k: v for k in ("Range", "Authorization") if (v := handler.headers.get(k))}
        with httpx.stream("GET", self.upstream + handler.path, headers=sent) as response:
            headers = [(k, v) for k, v in response.headers.items() if k.lower() not in _OWN]
            status, body = response.status_code, b"".join(response.iter_raw())
        if self.rewrite is not None:
            body = self.rewrite(path, body)
        if ours and self.flip_at is not None and len(body) > self.flip_at:
            body = body[: self.flip_at] + bytes([body[self.flip_at] ^ 1]) + body[self.flip_at + 1 :]
        handler.send_response(status)
        for key, value in [*headers, ("Content-Length", str(len(body)))]:
            handler.send_header(key, value)
        handler.end_headers()
        cut = ours and self.cut_after is not None and len(body) > self.cut_after
        if cut:
            body, self.cut_after = body[: self.cut_after], None
        handler.wfile.write(body)
        handler.wfile.flush()
        if "/files/" in path and not path.endswith("/manifest.json"):
            self.file_bytes += len(body)
        if cut:
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
