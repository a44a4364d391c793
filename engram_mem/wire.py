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


# ---- what a shard accepts (any bytes get a defined status) -------------------------------------
MAX_CHUNK_BYTES = 16 << 20  # a Gather reply chunk is at most this big, whatever `chunk_rows` asks for
REPLY_LIMIT_FACTOR = 4      # a Gather reply is at most this many times the request limit (1 GiB by default)


def gather_chunk_rows(requested: int, row_bytes: int) -> int:
    """Rows per reply chunk: the request's `chunk_rows` (0 = ~1 MB), clamped to MAX_CHUNK_BYTES."""
    cap = max(1, MAX_CHUNK_BYTES // max(1, row_bytes))
    return min(int(requested), cap) if requested else min(chunk_rows_for(row_bytes), cap)


def max_reply_bytes(max_request_bytes: int) -> int:
    """The largest Gather reply a shard builds; larger requests are refused before any row is copied."""
    return REPLY_LIMIT_FACTOR * max_request_bytes


def decode_request(rpc: str, raw: bytes):
    """The request message of `rpc` parsed from raw bytes, or InvalidArgument naming what failed."""
    from engram_mem.errors import InvalidArgument
    from engram_mem.pb.v1 import memory_pb2 as pb

    cls = getattr(pb, f"{rpc}Request")
    try:
        return cls.FromString(raw)
    except Exception as e:  # noqa: BLE001 - DecodeError, invalid UTF-8 in a string field, ...
        raise InvalidArgument(f"{rpc}: could not parse the {len(raw)}-byte request as {cls.DESCRIPTOR.full_name} "
                              f"({type(e).__name__}: {e}); send a message built from proto/engram_mem/v1/memory.proto") from None
