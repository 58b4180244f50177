"""The wire format: safetensors payloads and frames of length, CRC-32 and payload."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import safetensors.numpy

from softserve.errors import PayloadError
from softserve.format.payload import (
    END_FRAME,
    check_crc32,
    decode,
    encode,
    error_frame,
    frame,
    read_frames,
)

DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.int64, np.float16, np.float32, np.float64]


def sample_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        f"t{i}": (rng.standard_normal((3, 5)) * 50).astype(dtype) for i, dtype in enumerate(DTYPES)
    } | {"empty": np.zeros((0, 4), np.float32), "flag": np.array([True, False])}


def test_decode_equals_safetensors() -> None:
    tensors = sample_tensors()
    payload = encode(tensors, {"epoch": "3"})
    ours, metadata = decode(bytearray(payload))
    theirs = safetensors.numpy.load(payload)
    assert metadata == {"epoch": "3"} and ours.keys() == theirs.keys() == tensors.keys()
    for name, value in tensors.items():
        assert ours[name].dtype == value.dtype and ours[name].shape == value.shape
        np.testing.assert_array_equal(ours[name], value)
        np.testing.assert_array_equal(ours[name], theirs[name])
    assert ours["t7"].flags.writeable  # views into a bytearray: usable by torch as is


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda p: p[:5], "too short"),
        (lambda p: p[:40], "header is longer"),
        (lambda p: p[:8] + b"X" + p[9:], "not JSON"),
        (lambda p: p[:-4], "do not match"),
        (lambda p: p.replace(b'"shape":[10]', b'"shape":[-1]'), "malformed header"),
    ],
)
def test_decode_rejects_broken_payloads(mangle, message: str) -> None:
    payload = encode({"x": np.arange(10, dtype=np.int64)})
    with pytest.raises(PayloadError, match=message):
        decode(mangle(payload))


def test_frames_survive_any_chunking() -> None:
    payloads = [encode(sample_tensors(seed)) for seed in range(4)]
    stream = b"".join(frame(p) for p in payloads) + END_FRAME + b"ignored trailing bytes"
    for size in (1, 7, 64, len(stream)):
        chunks = (stream[i : i + size] for i in range(0, len(stream), size))
        assert [bytes(p) for p in read_frames(chunks)] == payloads


def test_cut_stream_and_error_frame() -> None:
    whole = frame(encode({"x": np.arange(3)})) * 2
    with pytest.raises(PayloadError, match="before its end frame"):
        list(read_frames(iter([whole[:-5]])))
    (bad,) = read_frames(iter([error_frame("shard unreadable") + END_FRAME]))
    with pytest.raises(PayloadError, match="server error: shard unreadable"):
        decode(bad)


def test_oversized_frame_is_refused_before_it_is_read() -> None:
    """A length prefix over the limit (garbled, or not softserve) is an error, not a 1 TB
    allocation; the limit is a parameter."""
    huge = (1 << 40).to_bytes(8, "little") + b"x" * 64
    with pytest.raises(PayloadError, match="over the .*-byte limit"):
        list(read_frames(iter([huge])))
    small = frame(encode({"x": np.arange(300)}))
    with pytest.raises(PayloadError, match="limit"):
        list(read_frames(iter([small]), max_frame_bytes=100))
    assert len(list(read_frames(iter([small + END_FRAME])))) == 1


def test_every_flipped_bit_of_a_stream_is_an_error() -> None:
    """Each bit of a stream (lengths, CRCs, payloads, the end frame) flipped in turn: the
    reader raises every time, never hands over a payload that differs from what was sent."""
    payloads = [encode({"x": np.arange(4, dtype=np.int16)}, {"batch": str(i)}) for i in (0, 1)]
    stream = b"".join(frame(p) for p in payloads) + END_FRAME
    assert [bytes(p) for p in read_frames(iter([stream]))] == payloads
    for bit in range(8 * len(stream)):
        damaged = bytearray(stream)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(PayloadError):
            for payload in read_frames(iter([bytes(damaged)])):
                assert bytes(payload) in payloads


def test_a_single_payload_is_checked_against_its_header() -> None:
    payload = encode({"x": np.arange(10)})
    check_crc32(payload, f"{zlib.crc32(payload):08x}")
    damaged = payload[:-1] + bytes([payload[-1] ^ 4])
    with pytest.raises(PayloadError, match="damaged in transit"):
        check_crc32(damaged, f"{zlib.crc32(payload):08x}")
    with pytest.raises(PayloadError, match="not a CRC-32"):
        check_crc32(payload, "zz")
    with pytest.raises(PayloadError, match="without its X-Softserve-CRC32 header"):
        check_crc32(payload, None)
