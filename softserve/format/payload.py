"""The wire format of batches: one safetensors payload per batch, framed for streaming.

A batch payload holds these tensors (any subset, as the request's ``include`` asks):

==============  =======  ==========  ==================================================
name            dtype    shape       meaning
==============  =======  ==========  ==================================================
indices         int64    (B,)        sample ids (rows of the base images), in epoch order
images          uint8    (B,C,H,W)   base images of those samples (before the view)
params          int16    (B,5)       views: top, left, height, width, flip; float32
                                     (B,14) for a set of DSA views (:data:`DSA_FIELDS`)
hard            int64    (B,)        hard labels
soft            float32  (B,K)       GIFT-refined labels, decoded from the stored codec
logits          float32  (B,K)       raw teacher logits on the same views (when asked)
mix             float32  (B,6)       mixed sets only: partner id, λ, CutMix box top,
                                     left, height, width (softserve.format.augment)
partner_params  int16    (B,5)       mixed sets only: the partner's view in this epoch
                                     (float32 (B,14) for DSA views)
partner_images  uint8    (B,C,H,W)   mixed sets only: the partner's base image
==============  =======  ==========  ==================================================

``soft`` and ``logits`` come as float16 when a request asks ``label_dtype=float16``: half
the bytes, and for a label set stored with the fp16 codec exactly the stored values.

With ``label_encoding=stored``, labels travel as the label set stores them: ``soft`` and
``soft_<part>`` are the codec's parts (:mod:`softserve.format.codecs`; a top-k batch of 256
at K = 1000 is ~10 KB of labels instead of 1 MB of float32), and ``logits`` is replaced by
``norm`` (float32 (B,), the norm of the teacher's logits), from which the client recovers
them (:func:`softserve.format.refinement.recover_logits`). The metadata then names the ``codec``.
The Python client asks for this; a plain safetensors reader gets floats by default.

and metadata ``epoch``, ``stored_epoch`` and ``batch``. A stream is a sequence of frames,
each an 8-byte little-endian length, the 4-byte little-endian CRC-32 (zlib's) of the
payload, and that many payload bytes, ended by a frame of length and CRC 0; a frame whose
metadata has ``error`` reports a failure mid-stream, and one whose metadata has
``going_away`` says the server is shutting down: the client resumes at the next batch, on
this server once restarted or on another. A single payload (a batch, a range of images)
carries its CRC-32 in the ``X-Softserve-CRC32`` response header, as 8 hex digits, so the
body stays plain safetensors. A payload whose CRC does not match is a
:class:`PayloadError`: damaged in transit, retried, never decoded.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Literal

import numpy as np

from softserve.errors import GoingAway as GoingAway
from softserve.errors import PayloadError as PayloadError

#: Columns of a ``params`` row: crop box in base pixels, then the flip bit.
PARAM_FIELDS: tuple[str, ...] = ("top", "left", "height", "width", "flip")
NUM_PARAMS = len(PARAM_FIELDS)
#: Columns of a DSA ``params`` row (softserve.format.augment.sample_dsa), in output pixels:
#: the flip bit, the brightness shift, the saturation and contrast factors, which of
#: crop / scale / rotate runs (0, 1, 2), the crop's shift (rows, columns), the scale's
#: factors (x, y), the rotation in radians, and the cutout box (top, left, height, width).
DSA_FIELDS: tuple[str, ...] = (
    "flip", "brightness", "saturation", "contrast", "transform", "shift_y", "shift_x",
    "scale_x", "scale_y", "angle", "cut_top", "cut_left", "cut_height", "cut_width",
)  # fmt: skip
NUM_DSA = len(DSA_FIELDS)
#: View policies: RandomResizedCrop + flip (the default), or the DSA views of the GIFT
#: evaluator (``color_crop_cutout_flip_scale_rotate``).
ViewKind = Literal["rrc", "dsa"]
VIEW_KINDS: tuple[str, ...] = ("rrc", "dsa")


def view_columns(views: ViewKind) -> tuple[tuple[str, ...], np.dtype]:
    """The columns of a ``params`` row of a view policy, and their dtype on disk and on the
    wire: int16 crop boxes, or float32 DSA rows."""
    if views == "dsa":
        return DSA_FIELDS, np.dtype(np.float32)
    if views == "rrc":
        return PARAM_FIELDS, np.dtype(np.int16)
    raise ValueError(f"views must be one of {', '.join(VIEW_KINDS)}, got {views!r}")
#: Columns of a ``mix`` row: partner sample id, λ, then the CutMix box in output pixels.
MIX_FIELDS: tuple[str, ...] = ("partner", "lam", "top", "left", "height", "width")
NUM_MIX = len(MIX_FIELDS)
TENSORS: tuple[str, ...] = ("indices", "images", "params", "hard", "soft", "logits")
#: The tensors only a set relabelled with ``--mix`` serves, beside :data:`TENSORS`.
MIX_TENSORS: tuple[str, ...] = ("mix", "partner_params", "partner_images")
DEFAULT_INCLUDE: tuple[str, ...] = ("indices", "images", "params", "hard", "soft")
LabelDtype = Literal["float32", "float16"]
LabelEncoding = Literal["decoded", "stored"]
MEDIA_TYPE = "application/vnd.softserve.safetensors"
#: Streams of frames with a CRC-32 each (the ``checksum`` parameter names the framing: a
#: client refuses a stream framed otherwise rather than misread it).
STREAM_MEDIA_TYPE = "application/vnd.softserve.safetensors-stream; checksum=crc32"
#: Response header of a single payload: its CRC-32 as 8 lowercase hex digits.
CHECKSUM_HEADER = "X-Softserve-CRC32"
_LENGTH = struct.Struct("<Q")
_FRAME = struct.Struct("<QI")  # payload length, CRC-32 of the payload
END_FRAME = _FRAME.pack(0, 0)
_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
    "U32": np.uint32, "I32": np.int32, "U64": np.uint64, "I64": np.int64,
    "F16": np.float16, "F32": np.float32, "F64": np.float64,
}  # fmt: skip
_NAMES = {np.dtype(dtype): name for name, dtype in _DTYPES.items()}


def encode_parts(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> list[bytes | memoryview]:
    """One batch in the safetensors layout, as buffers to join: the tensors are not copied.

    Layout: 8-byte little-endian header size, JSON header (padded with spaces to a multiple
    of 8), then each tensor's bytes back to back, as the header's ``data_offsets`` say.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    buffers: list[bytes | memoryview] = []
    offset = 0
    for name, value in tensors.items():
        array = np.ascontiguousarray(value)
        header[name] = {
            "dtype": _NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        buffers.append(memoryview(array.reshape(-1)).cast("B"))
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return [_LENGTH.pack(len(raw)), raw, *buffers]


def encode(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """One batch as safetensors bytes."""
    return b"".join(encode_parts(tensors, metadata))


def crc32(parts: Iterable[bytes | bytearray | memoryview]) -> int:
    """The CRC-32 of buffers joined, without joining them (zlib's, ~2 GB/s on one core; it
    releases the GIL on buffers over 5 KiB)."""
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return crc


def check_crc32(payload: bytes | bytearray, sent: int | str | None) -> None:
    """PayloadError unless ``payload`` has the CRC-32 ``sent`` (an int, or the hex digits
    of :data:`CHECKSUM_HEADER`; None when the server sent none)."""
    if sent is None:
        raise PayloadError(
            f"payload came without its {CHECKSUM_HEADER} header (a server older than this "
            "client, or a proxy that drops headers?)"
        )
    try:
        expected = int(sent, 16) if isinstance(sent, str) else sent
    except ValueError:
        raise PayloadError(f"{CHECKSUM_HEADER} {sent!r} is not a CRC-32") from None
    if (got := zlib.crc32(payload)) != expected:
        raise PayloadError(
            f"payload of {len(payload)} bytes has CRC-32 {got:08x}, not the {expected:08x} "
            "the server sent: damaged in transit"
        )


def frame_parts(parts: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """A payload's buffers as one stream frame's buffers (length and CRC-32 first)."""
    return [_FRAME.pack(sum(len(part) for part in parts), crc32(parts)), *parts]


def frame(payload: bytes) -> bytes:
    """A payload as one stream frame."""
    return b"".join(frame_parts([payload]))


def error_frame(message: str) -> bytes:
    """A frame that tells the client the stream failed, and why."""
    return frame(encode({}, {"error": message}))


def going_away_frame(message: str) -> bytes:
    """A frame that ends a stream cleanly because the server is shutting down."""
    return frame(encode({}, {"going_away": message}))


def decode(payload: bytes | bytearray) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and metadata of one payload.

    Arrays are views into ``payload``, not copies (writable when it is a bytearray): the
    safetensors layout is an 8-byte header length, a JSON header, then the raw data.
    """
    size = len(payload)
    if size < 8:
        raise PayloadError(f"payload of {size} bytes is too short for safetensors")
    header_len = _LENGTH.unpack_from(payload)[0]
    base = 8 + header_len
    if base > size:
        raise PayloadError("payload header is longer than the payload")
    try:
        header = json.loads(bytes(payload[8:base]))
    except ValueError as exc:
        raise PayloadError(f"payload header is not JSON ({exc})") from None
    metadata = header.pop("__metadata__", None) or {}
    if "error" in metadata:
        raise PayloadError(f"server error: {metadata['error']}", from_server=True)
    if "going_away" in metadata:
        raise GoingAway(f"server going away: {metadata['going_away']}")
    tensors = {}
    for name, info in header.items():
        try:
            dtype = np.dtype(_DTYPES[info["dtype"]])
            start, stop = info["data_offsets"]
            shape = tuple(int(d) for d in info["shape"])
            if min(shape, default=0) < 0:
                raise ValueError("negative dimension")
        except (KeyError, TypeError, ValueError):
            raise PayloadError(f"tensor {name!r}: unsupported or malformed header {info}") from None
        count = math.prod(shape)  # not np.prod: ~40x the cost on a tiny tuple, per tensor
        if stop - start != count * dtype.itemsize or base + stop > size:
            raise PayloadError(f"tensor {name!r}: data offsets do not match shape {shape}")
        tensors[name] = np.frombuffer(payload, dtype, count, base + start).reshape(shape)
    return tensors, metadata


#: The largest frame a client accepts: far above any real batch, far below what a garbled
#: length prefix would make it allocate.
MAX_FRAME_BYTES = 1 << 31


def read_frames(
    chunks: Iterator[bytes], max_frame_bytes: int = MAX_FRAME_BYTES
) -> Iterator[bytearray]:
    """Payloads of a framed stream, from an iterator of byte chunks of any size, each
    checked against its frame's CRC-32."""
    buffer = bytearray()
    for chunk in chunks:
        buffer += chunk
        pos = 0
        while len(buffer) - pos >= _FRAME.size:
            length, crc = _FRAME.unpack_from(buffer, pos)
            if length == 0:
                if crc != 0:  # a damaged length: the end frame's CRC is 0
                    raise PayloadError(f"stream frame of length 0 has CRC-32 {crc:08x}: damaged")
                return
            if length > max_frame_bytes:
                raise PayloadError(
                    f"stream frame of {length} bytes is over the {max_frame_bytes}-byte limit: "
                    "not a softserve stream, or a corrupt one"
                )
            start = pos + _FRAME.size
            if len(buffer) < start + length:
                break
            payload = buffer[start : start + length]
            check_crc32(payload, crc)
            yield payload
            pos = start + length
        del buffer[:pos]
    raise PayloadError("stream ended before its end frame (connection lost?)")
