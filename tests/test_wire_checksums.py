"""Bytes damaged between server and client: a real server, a bit-flipping proxy between
it and the client, and the client never yields a batch that differs from the server's."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import zlib
from collections.abc import Callable
from typing import BinaryIO

import httpx
import pytest
import safetensors.numpy
import torch
from conftest import Server

from softserve.client import Client, ClientError, PayloadError
from softserve.client.remote import RemoteLabelSet
from softserve.format.payload import END_FRAME, STREAM_MEDIA_TYPE

SINGLE = "application/vnd.softserve.safetensors"
#: Where in a response body a bit is flipped.
Where = Callable[[bytes], int]


def in_payload(start: int, part: str) -> Where:
    """A byte of the safetensors payload at ``start`` of a body: its header size, its JSON
    header, or the first, middle or last byte of its tensor data."""

    def where(body: bytes) -> int:
        size = int.from_bytes(body[start : start + 8], "little")
        data = start + 8 + size
        end = start + len(body) if start == 0 else 12 + int.from_bytes(body[:8], "little")
        return {"size": start, "json": start + 20, "data": data, "middle": (data + end) // 2,
                "last": end - 1}[part]  # fmt: skip

    return where


def _read_body(upstream: BinaryIO, headers: dict[str, str]) -> list[tuple[bytes, bool]]:
    """A response body as read, in pieces (bytes, whether they are body data rather than
    chunked framing)."""
    if headers.get("transfer-encoding") != "chunked":
        return [(upstream.read(int(headers.get("content-length", 0))), True)]
    pieces = []
    while True:
        line = upstream.readline()
        size = int(line.split(b";")[0], 16)
        pieces.append((line, False))
        if size == 0:
            pieces.append((upstream.readline(), False))  # no trailers: the closing CRLF
            return pieces
        pieces += [(upstream.read(size), True), (upstream.read(2), False)]


class BitFlipProxy:
    """A TCP proxy on loopback before ``port``: requests pass as they are; in the body of
    each of the first ``flips`` responses of content type ``kind`` (dechunked, HTTP framing
    left intact), bit 0 of byte ``where(body)`` is flipped (negative: from the end)."""

    def __init__(self, port: int, kind: str, where: Where, flips: float = 1) -> None:
        self.port, self.kind, self.where, self.flips = port, kind, where, flips
        self.flipped = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def __enter__(self) -> BitFlipProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.port))
        threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
        reader = upstream.makefile("rb")
        with contextlib.suppress(OSError, ValueError), client, upstream:
            while head := self._head(reader):
                lines = head.decode("latin-1").split("\r\n")[1:]
                headers = dict(line.lower().split(": ", 1) for line in lines if line)
                pieces = _read_body(reader, headers)
                if headers.get("content-type") == self.kind and self.flipped < self.flips:
                    self.flipped += 1
                    pieces = self._flip(pieces)
                client.sendall(head + b"".join(piece for piece, _ in pieces))

    @staticmethod
    def _head(reader: BinaryIO) -> bytes:
        head = b""
        while (line := reader.readline()) not in (b"\r\n", b""):
            head += line
        return head + b"\r\n" if head else b""

    @staticmethod
    def _requests(client: socket.socket, upstream: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                upstream.sendall(data)
            upstream.shutdown(socket.SHUT_WR)

    def _flip(self, pieces: list[tuple[bytes, bool]]) -> list[tuple[bytes, bool]]:
        body = b"".join(piece for piece, data in pieces if data)
        at = self.where(body) % len(body)
        out = []
        for piece, data in pieces:
            if data and 0 <= at < len(piece):
                piece = piece[:at] + bytes([piece[at] ^ 1]) + piece[at + 1 :]
            at -= len(piece) if data else 0
            out.append((piece, data))
        return out


Tensors = list[dict[str, torch.Tensor]]


def stream_of(labels: RemoteLabelSet, step: int = 1) -> Tensors:
    """Every raw batch of epochs 1 and 2 at batch size 8: one stream, or with ``step`` 2
    every other batch by its own request."""
    batches = labels.raw_batches(1, labels.sharding(8), epochs=2, step=step)
    return [raw.tensors for raw in batches]


def assert_same(got: Tensors, want: Tensors) -> None:
    assert len(got) == len(want)
    for ours, theirs in zip(got, want, strict=True):
        assert ours.keys() == theirs.keys()
        for name in ours:
            assert torch.equal(ours[name], theirs[name]), name


@pytest.fixture(scope="module")
def reference(server: Server) -> dict[str, object]:
    """What the server sends undisturbed: the images, the stream, every other batch."""
    with Client(server.url) as client:
        labels = client.labelset("tiny")
        stream = stream_of(labels)
        images = labels.base_images()
        assert images is not None
        return {"images": images, "stream": stream, "every_other": stream_of(labels, step=2)}


def at(offset: int) -> Where:
    return lambda body: offset


#: Bytes of a stream body: the first frame's length and CRC, bytes of its payload, the
#: last payload's last byte, the end frame's length and CRC.
STREAM_FLIPS = {
    "frame length": at(0), "frame length, high byte": at(7), "frame crc": at(9),
    **{f"payload {part}": in_payload(12, part) for part in ("size", "json", "data", "middle",
                                                            "last")},
    "last payload byte": at(-13), "end frame length": at(-12), "end frame crc": at(-1),
}  # fmt: skip


@pytest.mark.parametrize("where", STREAM_FLIPS.values(), ids=STREAM_FLIPS.keys())
def test_a_flipped_bit_in_a_stream_is_retried_never_a_batch(
    server: Server, reference: dict, where: Where, caplog: pytest.LogCaptureFixture
) -> None:
    with BitFlipProxy(server.port, STREAM_MEDIA_TYPE, where) as proxy, Client(proxy.url) as client:
        labels = client.labelset("tiny")
        with caplog.at_level(logging.WARNING, "softserve.client"):
            got = stream_of(labels)
    assert proxy.flipped == 1
    assert_same(got, reference["stream"])
    assert any("retrying" in r.getMessage() for r in caplog.records), "the flip went unseen"


@pytest.mark.parametrize("part", ["size", "json", "data", "middle", "last"])
def test_a_flipped_bit_in_a_single_payload_is_retried_never_data(
    server: Server, reference: dict, part: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Base images (cached for the whole run) and batches asked one by one (a DataLoader
    worker's share) each come with X-Softserve-CRC32; the first two payloads are damaged."""
    flipper = BitFlipProxy(server.port, SINGLE, in_payload(0, part), flips=2)
    with flipper as proxy, Client(proxy.url) as client:
        labels = client.labelset("tiny")
        with caplog.at_level(logging.WARNING, "softserve.client"):
            images = labels.base_images()
            every_other = stream_of(labels, step=2)
    assert proxy.flipped == 2
    assert images is not None and torch.equal(images, reference["images"])
    assert_same(every_other, reference["every_other"])
    failures = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(failures) == 2 and all("CRC-32" in f for f in failures)


def test_damage_on_every_try_fails_over_or_raises(server: Server, reference: dict) -> None:
    """A path that damages every payload: the client fails over to a clean URL, and with
    none raises (the PayloadError as the cause), having yielded nothing wrong."""
    every = float("inf")
    with BitFlipProxy(server.port, STREAM_MEDIA_TYPE, in_payload(12, "data"), every) as proxy:
        with Client([proxy.url, server.url]) as client:
            assert_same(stream_of(client.labelset("tiny")), reference["stream"])
        with Client(proxy.url, retries=2) as client:
            labels = client.labelset("tiny")
            with pytest.raises(ClientError, match="CRC-32") as caught:
                stream_of(labels)
        assert isinstance(caught.value.__cause__, PayloadError)


def test_payloads_stay_plain_safetensors_with_their_crc32(server: Server) -> None:
    """The checksum travels beside the payload (a header, a frame's header), so curl and
    a plain safetensors reader still read a batch."""
    response = httpx.get(server.url + "/v1/labelsets/tiny/epochs/0/batches/0?batch_size=4")
    assert int(response.headers["x-softserve-crc32"], 16) == zlib.crc32(response.content)
    assert safetensors.numpy.load(response.content)["soft"].shape == (4, 3)
    stream = httpx.get(server.url + "/v1/labelsets/tiny/epochs/0/stream?batch_size=25")
    assert stream.headers["content-type"] == STREAM_MEDIA_TYPE
    assert stream.content.endswith(END_FRAME)
