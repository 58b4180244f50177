"""The wire format of batches: one safetensors payload per batch, framed for streaming.

A batch payload holds these tensors (any subset, as the request's ``include`` asks):

=========  =======  ==========  =====================================================
name       dtype    shape       meaning
=========  =======  ==========  =====================================================
indices    int64    (B,)        sample ids (rows of the base images), in epoch order
images     uint8    (B,C,H,W)   base images of those samples (before the view)
params     int16    (B,5)       views: top, left, height, width, flip
hard       int64    (B,)        hard labels
soft       float32  (B,K)       GIFT-refined labels, decoded from the stored codec
logits     float32  (B,K)       raw teacher logits on the same views (when asked)
=========  =======  ==========  =====================================================

and metadata ``epoch``, ``stored_epoch`` and ``batch``. A stream is a sequence of frames,
each an 8-byte little-endian length and that many payload bytes, ended by a zero-length
frame; a frame whose metadata has ``error`` reports a failure mid-stream.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping

import numpy as np
from safetensors.numpy import load, save

TENSORS: tuple[str, ...] = ("indices", "images", "params", "hard", "soft", "logits")
DEFAULT_INCLUDE: tuple[str, ...] = ("indices", "images", "params", "hard", "soft")
MEDIA_TYPE = "application/vnd.softserve.safetensors"
STREAM_MEDIA_TYPE = "application/vnd.softserve.safetensors-stream"
_LENGTH = struct.Struct("<Q")
END_FRAME = _LENGTH.pack(0)


class PayloadError(ValueError):
    """A payload or stream that cannot be decoded, or an error the server sent in-stream."""


def encode(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """One batch as safetensors bytes."""
    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)


def frame(payload: bytes) -> bytes:
    """A payload as one stream frame."""
    return _LENGTH.pack(len(payload)) + payload


def error_frame(message: str) -> bytes:
    """A frame that tells the client the stream failed, and why."""
    return frame(encode({}, {"error": message}))


def decode(payload: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and metadata of one payload."""
    if len(payload) < 8:
        raise PayloadError(f"payload of {len(payload)} bytes is too short for safetensors")
    header_len = _LENGTH.unpack_from(payload)[0]
    if 8 + header_len > len(payload):
        raise PayloadError("payload header is longer than the payload")
    header = json.loads(payload[8 : 8 + header_len])
    metadata = header.get("__metadata__") or {}
    if "error" in metadata:
        raise PayloadError(f"server error: {metadata['error']}")
    try:
        return load(payload), metadata
    except Exception as exc:  # safetensors raises its own error type for bad bytes
        raise PayloadError(f"cannot decode batch payload: {exc}") from None


def read_frames(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Payloads of a framed stream, from an iterator of byte chunks of any size."""
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        while len(buffer) >= _LENGTH.size:
            length = _LENGTH.unpack_from(buffer)[0]
            if length == 0:
                return
            if len(buffer) < _LENGTH.size + length:
                break
            yield bytes(buffer[_LENGTH.size : _LENGTH.size + length])
            del buffer[: _LENGTH.size + length]
    raise PayloadError("stream ended before its end frame (connection lost?)")
