"""What an unauthenticated client can do to the server before it sends a request: huge
request heads, connections that send nothing or a byte at a time (slowloris), and
enough of them to exhaust the open-file limit. A real server on loopback each time."""

from __future__ import annotations

import contextlib
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Server, rss_bytes

HEAD = b"GET /healthz HTTP/1.1\r\nHost: softserve\r\n"


@contextlib.contextmanager
def serving(store: Path, command: list[str] | None = None, **env: object) -> Iterator[Server]:
    """A server over ``store`` with ``SOFTSERVE_<NAME>`` settings from ``env``."""
    server = Server(
        store, env={f"SOFTSERVE_{k.upper()}": str(v) for k, v in env.items()}, command=command
    ).start()
    try:
        yield server
    finally:
        server.stop()


def healthz_seconds(server: Server) -> float:
    """Seconds a fresh client waits for /healthz (on a new connection)."""
    started = time.monotonic()
    assert httpx.get(server.url + "/healthz", timeout=30).status_code == 200
    return time.monotonic() - started


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def send_huge_head(server: Server, megabytes: int, answers: list[bytes]) -> None:
    """A request with one header of ``megabytes`` MiB; what the server answered (nothing
    when it reset the connection) is appended to ``answers``."""
    with connect(server) as sock:
        with contextlib.suppress(OSError):  # the server closes while this still sends
            sock.sendall(HEAD + b"X-Pad: ")
            chunk = b"a" * (1 << 20)
            for _ in range(megabytes):
                sock.sendall(chunk)
            sock.sendall(b"\r\n\r\n")
        answer = b""
        with contextlib.suppress(OSError):
            answer = sock.recv(4096)
        answers.append(answer)


def test_an_oversized_request_head_is_refused_at_once(store: Path) -> None:
    """Three clients each sending a 64 MiB header (httptools parses one in ~12 s, and
    keeps it) are answered 431 or cut off; the server does not grow, and /healthz answers
    meanwhile and after."""
    with serving(store) as server:
        before = rss_bytes(server.proc.pid)
        answers: list[bytes] = []
        senders = [
            threading.Thread(target=send_huge_head, args=(server, 64, answers)) for _ in range(3)
        ]
        started = time.monotonic()
        for sender in senders:
            sender.start()
        assert healthz_seconds(server) < 5
        for sender in senders:
            sender.join(timeout=60)
        assert time.monotonic() - started < 30
        assert len(answers) == 3
        for answer in answers:  # 431, or a reset that dropped it before it was read
            assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:80]
        assert rss_bytes(server.proc.pid) - before < 32 << 20
        assert healthz_seconds(server) < 5
        with connect(server) as sock:  # a head within the limit is served
            sock.sendall(HEAD + b"X-Pad: " + b"a" * 15_000 + b"\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")


def closed_within(sockets: list[socket.socket], seconds: float) -> int:
    """How many of ``sockets`` the server closes within ``seconds`` (what it sends before,
    a 408, is read and dropped)."""
    open_ = {sock.fileno(): sock for sock in sockets}
    for sock in sockets:
        sock.setblocking(False)
    deadline = time.monotonic() + seconds
    while open_ and time.monotonic() < deadline:
        for fd, sock in list(open_.items()):
            try:
                if sock.recv(4096) == b"":
                    del open_[fd]
            except BlockingIOError:
                pass
            except OSError:  # reset
                del open_[fd]
        time.sleep(0.05)
    return len(sockets) - len(open_)


def test_slowloris_connections_are_closed_and_healthz_answers(store: Path) -> None:
    """200 connections: half send nothing, half a request line and then a header a byte
    every 0.3 s. With a 2 s head timeout all are closed by the server, and fresh clients
    are served meanwhile."""
    with serving(store, header_seconds=2, keep_alive_seconds=1) as server:
        silent = [connect(server) for _ in range(100)]
        slow = [connect(server) for _ in range(100)]
        for sock in slow:
            sock.sendall(HEAD)
        stop = threading.Event()

        def drip() -> None:
            while not stop.wait(0.3):
                for sock in slow:
                    with contextlib.suppress(OSError):
                        sock.send(b"x")

        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        try:
            assert max(healthz_seconds(server) for _ in range(5)) < 5
            assert closed_within(silent + slow, 20) == 200
        finally:
            stop.set()
            dripper.join()
            for sock in silent + slow:
                sock.close()
        assert healthz_seconds(server) < 5


def test_half_open_connections_cannot_lock_out_fresh_clients(store: Path, tmp_path: Path) -> None:
    """Under an open-file limit of 256, 600 connections that never send: the server keeps
    at most half the limit, closing the oldest waiting ones, so fresh clients are served
    and rescans still open files (a new set appears)."""
    served = tmp_path / "served"
    shutil.copytree(store / "tiny", served / "tiny")
    limited = ["bash", "-c", 'ulimit -n 256 && exec "$0" "$@"', sys.executable, "-m", "softserve"]
    with serving(served, command=limited, header_seconds=600) as server:
        assert "open-file limit 256: at most 128 connections" in server.log.read_text()
        held = [connect(server) for _ in range(600)]
        try:
            assert max(healthz_seconds(server) for _ in range(5)) < 5
            held += [connect(server) for _ in range(200)]  # and more, between requests
            shutil.copytree(store / "tiny", served / "later")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                listed = httpx.get(server.url + "/v1/labelsets", timeout=30).json()
                if [entry["name"] for entry in listed] == ["later", "tiny"]:
                    break
                time.sleep(0.2)
            else:
                pytest.fail("the rescan never found the new set")
            assert closed_within(held, 5) >= 800 - 128
        finally:
            for sock in held:
                sock.close()
        assert "Too many open files" not in server.log.read_text()
