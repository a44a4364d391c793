"""The fetch agent's wire format: small messages over a local SOCK_SEQPACKET socket; bulk bytes in
shared memory.

    message = header | meta
    header  = struct "<4sBBHQI": magic b"EMag", version, op, flags (u16, 0),
              request id (u64, the worker's), meta bytes (u32)
    meta    = JSON (utf-8) for requests and OK replies, except a FETCH's OK: FETCH_REPLY, one u64;
              "<error class>\\n<message>" for ERROR

A socket of this kind keeps message boundaries, so a message is read whole or not at all and a
malformed one loses nothing but itself: the agent answers it with ERROR and reads the next.
Ids, rows and gradients never travel on the socket: they sit in the worker's slots (slots.py),
shared memory the worker hands the agent once per slot (SLOT, with the memfd attached).

    HELLO  {"credential", "worker", "pid", "caches": {table: bytes}, "node_local": bool}
    SLOT   {"slot": i, "bytes": n}                    + one file descriptor (SCM_RIGHTS)
    FETCH  {"table", "slot", "n", "uid"}              ids in the slot; reply U (FETCH_REPLY): U distinct
                                                      ids, their rows and the inverse written in the slot
    PUSH   {"table", "slot", "n", "uid", "lr", "step", "key": [client, seq]}   ids, grads in the slot;
                                                      reply {"rows": k}
    STATS  {}                                         reply: the agent's counters
    CLEAR  {}                                         empty the node's hot-row caches (benchmarks)
"""

from __future__ import annotations

import json
import struct

from engram_mem.errors import InvalidArgument, RequestTooLarge
from engram_mem.transport.protocol import decode_error, encode_error  # noqa: F401 - one error format for both

MAGIC = b"EMag"
VERSION = 2  # 2: a FETCH's OK carries its count as FETCH_REPLY, not JSON
HEADER = struct.Struct("<4sBBHQI")
# A fetch's answer, read on the model's thread inside get(): a fixed field, not JSON, whose
# parse cost about 20 us there (its caches are cold after the layers' compute).
FETCH_REPLY = struct.Struct("<Q")
MAX_MESSAGE = 64 << 10   # a header and its meta; ids and rows travel in shared memory
MAX_FDS = 1

HELLO, SLOT, FETCH, PUSH, STATS, CLEAR = 1, 2, 3, 4, 5, 6
OK, ERROR = 0x10, 0x11
REQUEST_OPS = {HELLO: "Hello", SLOT: "Slot", FETCH: "Fetch", PUSH: "Push", STATS: "Stats", CLEAR: "Clear"}
REPLY_OPS = {OK: "Ok", ERROR: "Error"}


class MessageError(InvalidArgument):
    """Bytes that are not a message of this protocol, or a message whose fields are wrong."""


def pack(op: int, request_id: int, meta: dict | bytes = b"") -> bytes:
    body = meta if isinstance(meta, (bytes, bytearray)) else json.dumps(meta, separators=(",", ":")).encode()
    if HEADER.size + len(body) > MAX_MESSAGE:
        raise RequestTooLarge(f"fetch agent: a {REQUEST_OPS.get(op) or REPLY_OPS.get(op)} message of "
                              f"{HEADER.size + len(body)} bytes is over the {MAX_MESSAGE}-byte limit")
    return HEADER.pack(MAGIC, VERSION, op, 0, request_id, len(body)) + body


def unpack(raw: bytes, ops: dict) -> tuple[int, int, bytes]:
    """(op, request id, meta bytes) of one message, or MessageError naming what is wrong."""
    if len(raw) < HEADER.size:
        raise MessageError(f"fetch agent: a message of {len(raw)} bytes is shorter than the "
                           f"{HEADER.size}-byte header (engram_mem/agent/protocol.py)")
    magic, version, op, flags, request_id, meta_len = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise MessageError(f"fetch agent: not a message of this protocol (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise MessageError(f"fetch agent: protocol version {version} is not supported (this agent speaks {VERSION})")
    if op not in ops:
        raise MessageError(f"fetch agent: unknown op {op} (expected one of {sorted(ops)})")
    if flags:
        raise MessageError(f"fetch agent: flags {flags:#x} are not defined (send 0)")
    if meta_len != len(raw) - HEADER.size:
        raise MessageError(f"fetch agent: the header says {meta_len} meta bytes, the message holds "
                           f"{len(raw) - HEADER.size}")
    return op, request_id, raw[HEADER.size:]


def meta_dict(meta: bytes, op: int, fields: dict) -> dict:
    """A request's JSON meta with each required field of the right type, or MessageError naming it."""
    name = REQUEST_OPS.get(op, op)
    try:
        d = json.loads(bytes(meta).decode("utf-8")) if meta else {}
    except (UnicodeDecodeError, ValueError) as e:
        raise MessageError(f"fetch agent: {name}: meta is not JSON: {e}") from None
    if not isinstance(d, dict):
        raise MessageError(f"fetch agent: {name}: meta is a JSON {type(d).__name__}, expected an object")
    for key, kind in fields.items():
        if key not in d:
            raise MessageError(f"fetch agent: {name}: field {key!r} is missing")
        v = d[key]
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise MessageError(f"fetch agent: {name}: field {key!r} is {type(v).__name__}, expected "
                               f"{getattr(kind, '__name__', kind)}")
        if kind is int and v < 0:
            raise MessageError(f"fetch agent: {name}: field {key!r} is {v}, expected >= 0")
    return d
