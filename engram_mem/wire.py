"""Hot-path encoding shared by server and client.

A Gather reply chunk is the protobuf message `RowsChunk { bytes rows = 1; }`. Its wire form is
one tag byte (0x0A), the payload length as a varint, then the payload. Building and reading that
by hand costs one copy on the server and none on the client, where protobuf objects would add a
copy each way (measured here: ~2x on 64 MB replies).
"""

from __future__ import annotations

import numpy as np

SERVICE = "engram_mem.v1.Memory"
CHUNK_BYTES = 1 << 20  # ~1 MB chunks measured fastest over loopback (vs 4 MB and 16 MB)
_TAG_ROWS = 0x0A       # field 1, wire type 2 (length-delimited)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_rows_chunk(rows: np.ndarray) -> bytes:
    """RowsChunk wire bytes for a C-contiguous [n, dim] array."""
    payload = memoryview(np.ascontiguousarray(rows).reshape(-1).view(np.uint8))
    return b"".join((bytes([_TAG_ROWS]), _varint(payload.nbytes), payload))


def decode_rows_chunk(data: bytes) -> memoryview:
    """The `rows` payload of RowsChunk wire bytes, without copying."""
    mv = memoryview(data)
    if len(mv) == 0:
        return mv  # an all-default message: empty rows
    if mv[0] != _TAG_ROWS:
        raise ValueError(f"RowsChunk: unexpected field tag {mv[0]:#x}")
    n = shift = 0
    i = 1
    while True:
        c = mv[i]
        n |= (c & 0x7F) << shift
        i += 1
        shift += 7
        if c < 0x80:
            break
    if i + n != len(mv):
        raise ValueError(f"RowsChunk: payload length {n} does not match message size {len(mv) - i}")
    return mv[i:i + n]


def chunk_rows_for(row_bytes: int) -> int:
    return max(1, CHUNK_BYTES // max(1, row_bytes))


def ids_bytes(ids: np.ndarray) -> bytes:
    return np.ascontiguousarray(ids, dtype="<i8").tobytes()
